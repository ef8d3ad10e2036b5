"""Small CNNs trained from scratch: the fast, strong baselines for 28x28 and 64x64 blood-cell images.

ImageNet backbones need >= 32x32 inputs and pay for 1000-class capacity; at 28x28 the budget is better spent
on epochs than on depth (measured figures: docs/benchmarks.md).

- `small_resnet`: one basic block per stage by default, which beat deeper stages at equal CPU time.
- `compact_cnn`: the cheap baseline; `compact_cnn_d2` / `compact_cnn_d3` stack two / three convolutions per
  stage for accuracy (`studies/accurate.toml`; d3 is the robust member of the default study, its depth buying
  back the clean accuracy heavy augmentation costs); `compact_cnn_s2` has a stride-2 stem, a quarter of the
  compute, for ensembles under an inference budget (`--min-images-per-s`).

Both families take the already-preprocessed input (x/255, added by `build_classifier`), keep full resolution
in their first stage below 48 px and halve it from 48 px up, and name layers `stage{s}_block{b}_*` so
unfreezing can group them. Keras is imported inside the functions so that importing the registry stays free
of TensorFlow.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

from backbones import blocks
from backbones.registry import BackboneSpec, register
from common.errors import BackboneError, WeightsError

if TYPE_CHECKING:
    import keras


def _per_stage(value: int | Sequence[int], stages: int, what: str) -> tuple[int, ...]:
    values = (value,) * stages if isinstance(value, int) else tuple(value)
    if len(values) != stages or any(v < 1 for v in values):
        raise BackboneError(f"{what} must be a positive int or {stages} positive ints, got {value!r}")
    return values


def _auto_stem_stride(input_shape: Sequence[int], stem_stride: int | None) -> int:
    """Stride 1 up to ~48 px keeps 28x28 detail; 2 above it makes 64x64 cost about what 32x32 costs."""
    if stem_stride is not None:
        return stem_stride
    return 1 if min(input_shape[0], input_shape[1]) < 48 else 2


def _conv_bn(x, filters: int, kernel: int, stride: int, prefix: str, *, relu: bool = True,
             zero_gamma: bool = False):
    from keras import layers

    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                      kernel_initializer="he_normal", name=f"{prefix}conv")(x)
    x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{prefix}bn",
                                  gamma_initializer="zeros" if zero_gamma else "ones")(x)
    return layers.ReLU(name=f"{prefix}relu")(x) if relu else x


def _basic_block(x, filters: int, stride: int, prefix: str):
    """ResNet v1 basic block: 3x3-BN-ReLU, 3x3-BN (gamma 0, so each block starts as identity), add, ReLU."""
    from keras import layers

    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, stride, f"{prefix}proj_", relu=False)
    y = _conv_bn(x, filters, 3, stride, f"{prefix}1_")
    y = _conv_bn(y, filters, 3, 1, f"{prefix}2_", relu=False, zero_gamma=True)
    y = layers.Add(name=f"{prefix}add")([shortcut, y])
    return layers.ReLU(name=f"{prefix}out")(y)


def small_resnet(input_shape: Sequence[int], weights: str | None = None, *,
                 widths: Sequence[int] = (32, 64, 128), depth: int | Sequence[int] = 1,
                 stem_stride: int | None = None, name: str = "small_resnet") -> "keras.Model":
    """A CIFAR-style ResNet: 3x3 stem, then one stage per width of `depth` basic blocks.

    Stages after the first downsample by 2, so 28x28 -> 28, 14, 7 with the defaults (0.3M parameters,
    ~45M multiply-adds per 28x28 image). `stem_stride` None picks 1 below 48 px and 2 above.
    """
    if weights is not None:
        raise WeightsError("small_resnet has no pretrained weights to download; load a file via backbones.weights")
    import keras

    depths = _per_stage(depth, len(widths), "depth")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = _conv_bn(inputs, widths[0], 3, _auto_stem_stride(input_shape, stem_stride), "stem_")
    for s, (width, n_blocks) in enumerate(zip(widths, depths), start=1):
        for b in range(1, n_blocks + 1):
            stride = 2 if (s > 1 and b == 1) else 1
            x = _basic_block(x, width, stride, f"stage{s}_block{b}_")
    return keras.Model(inputs, x, name=name)


def compact_cnn(input_shape: Sequence[int], weights: str | None = None, *,
                widths: Sequence[int] = (32, 64, 128), depth: int | Sequence[int] = 1,
                stem_stride: int | None = None, name: str = "compact_cnn") -> "keras.Model":
    """A plain VGG-like CNN: per stage `depth` conv-BN-ReLU layers, then 2x2 max-pooling between stages.

    The cheapest sensible model: a quick baseline and a smoke-test backbone for the search.
    """
    if weights is not None:
        raise WeightsError("compact_cnn has no pretrained weights to download; load a file via backbones.weights")
    import keras
    from keras import layers

    depths = _per_stage(depth, len(widths), "depth")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    first_stride = _auto_stem_stride(input_shape, stem_stride)
    for s, (width, n_convs) in enumerate(zip(widths, depths), start=1):
        if s > 1:
            x = layers.MaxPooling2D(2, name=f"stage{s}_block1_pool")(x)
        for b in range(1, n_convs + 1):
            stride = first_stride if (s == 1 and b == 1) else 1
            x = _conv_bn(x, width, 3, stride, f"stage{s}_block{b}_")
    return keras.Model(inputs, x, name=name)


register(BackboneSpec(
    name="small_resnet", family="scratch_resnet", constructor=small_resnet, preprocessing="unit",
    min_input_size=16, pretrained=False, block_grouping=blocks.scratch_blocks, lr=2e-3, finetune_lr=2e-4,
    defaults={"widths": (32, 64, 128), "depth": 1, "stem_stride": None}, default_input_size=28,
    description="ResNet from scratch, 3 stages x 1 basic block, widths 32/64/128, 0.3M params",
))
COMPACT_CNN = register(BackboneSpec(
    name="compact_cnn", family="scratch_cnn", constructor=compact_cnn, preprocessing="unit",
    min_input_size=8, pretrained=False, block_grouping=blocks.scratch_blocks, lr=2e-3, finetune_lr=2e-4,
    defaults={"widths": (32, 64, 128), "depth": 1, "stem_stride": None}, default_input_size=28,
    description="plain conv-BN-ReLU CNN from scratch, widths 32/64/128",
))


def _compact_cnn_variant(name: str, description: str, **defaults) -> BackboneSpec:
    """compact_cnn with other constructor defaults, at the learning rate its study (fast.toml,
    accurate.toml) warm-starts with."""
    return register(replace(COMPACT_CNN, name=name, description=description, lr=3e-3, finetune_lr=3e-4,
                            defaults={**COMPACT_CNN.defaults, **defaults}))


_compact_cnn_variant("compact_cnn_s2", "compact_cnn with a stride-2 stem: 1/4 of the compute, for fast ensembles "
                     "under a budget", stem_stride=2)
_compact_cnn_variant("compact_cnn_d2", "compact_cnn with two conv layers per stage: the most accurate scratch "
                     "model at 28x28", depth=2)
_compact_cnn_variant("compact_cnn_d3", "compact_cnn with three conv layers per stage: the robust member, clean "
                     "accuracy back from heavy augmentation", depth=3)
