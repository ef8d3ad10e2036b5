"""Small CNNs trained from scratch: the fast, strong baselines for 28x28 and 64x64 blood-cell images.

ImageNet backbones need >= 32x32 inputs and pay for 1000-class capacity on a 2-core CPU. At 28x28 the
budget is better spent on epochs than on depth: measured on this machine (embedded 28x28 PBC data, D4
flips/rotations, AdamW 2e-3 / weight decay 1e-4 with warm-up + cosine decay, batch 128, one seed each,
test split of 2734 images, so +-0.3 points is noise):

    model                        epochs  CPU-s  test acc  (8-view TTA)
    small_resnet depth 2 (0.7M)      18   1150    0.975     (0.983)
    small_resnet depth (1,2,2)       22   1136    0.979     (0.984)
    small_resnet depth 1 (0.3M)      32   1055    0.984     (0.985)   <- default, ~10 min wall
    compact_cnn depth 1 (0.1M)       20    176    0.973     (0.980)
    compact_cnn depth 2              40    935    0.985     (0.988)
    compact_cnn depth 3 (*)          24    976      -       (0.981)
    compact_cnn_s2 (stem stride 2)   30     83    0.963     (0.971)

`compact_cnn_d2` (the depth-2 row) is the accurate member (`studies/accurate.toml`): ~30M multiply-adds
per 28x28 image, nearly 4x compact_cnn's, and the best scratch model here; one core trains an epoch in ~40 s.

(*) trained for robustness (`corrupt` 0.8, label smoothing 0.1, dropout 0.2), two runs sharing the machine:
depth 3 scored 0.981 clean / 0.902 on the held-out corruption families against 0.976 / 0.898 for depth 2
(812 CPU-s) and 0.984 / 0.899 for depth 2 at widths 48/96/192 (1676 CPU-s). `compact_cnn_d3` is the
robust member of the default study: the extra depth buys clean accuracy back from heavy augmentation.

`compact_cnn_s2` is the member for ensembles under an inference budget (`ensemble.build
--min-images-per-s`): its stride-2 stem works at 14x14 from the first layer, a quarter of compact_cnn's
multiply-adds; with 8 TTA views one member predicts ~4,400 img/s here (compact_cnn ~1,200, small_resnet
~260), which is what lets 5 members x 8 views approach 1,000 img/s on 2 CPU cores.

Both models take the already-preprocessed input (x/255, added by `build_classifier`), keep full
resolution in their first stage below 48 px (stem stride 1) and halve it from 48 px up (so 64x64 costs
about what 32x32 does), and name layers `stage{s}_block{b}_*` so unfreezing can group them.

Keras is imported inside the functions so that importing the registry stays free of TensorFlow.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

from backbones import blocks
from backbones.registry import BackboneSpec, register

if TYPE_CHECKING:
    import keras


def _per_stage(value: int | Sequence[int], stages: int, what: str) -> tuple[int, ...]:
    values = (value,) * stages if isinstance(value, int) else tuple(value)
    if len(values) != stages or any(v < 1 for v in values):
        raise ValueError(f"{what} must be a positive int or {stages} positive ints, got {value!r}")
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
        raise ValueError("small_resnet has no pretrained weights to download; load a file via backbones.weights")
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
        raise ValueError("compact_cnn has no pretrained weights to download; load a file via backbones.weights")
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
