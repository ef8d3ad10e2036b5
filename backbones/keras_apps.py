"""Registry entries for `keras.applications` backbones (include_top=False, no pooling).

Preprocessing declared here was checked against each family's source in
keras/src/applications (Keras 3.15):

- MobileNetV3: `Rescaling(1/127.5, offset=-1)` inside the model (include_preprocessing=True) -> builtin:tf.
- EfficientNet (v1): `Rescaling(1/255)` + `Normalization` inside the model. The Normalization mean and
  variance are weights: ImageNet mean/std once ImageNet weights are loaded, but mean 0 / variance 1 (so
  plain x/255) with weights=None -> builtin:torch, exact only with ImageNet weights.
- EfficientNetV2: B0-B3 `Rescaling(1/255)` + ImageNet-mean/std `Normalization` (torch); S/M/L
  `Rescaling(1/128, offset=-1)` (tf, though x/128 - 1 rather than x/127.5 - 1). Keras picks the
  variant from the model *name* (suffix starting with "b"), so these constructors must keep their
  default names: name="backbone" would give S/M/L the B0 preprocessing. `backbones.model` renames the
  built model instead.
- ConvNeXt: `Normalization(mean=255*mean, variance=(255*std)**2)` inside (include_preprocessing=True)
  -> builtin:torch.
- ResNet50: nothing inside; `resnet50.preprocess_input` is caffe (BGR, mean subtraction) -> caffe.
- DenseNet121: nothing inside; `densenet.preprocess_input` is torch -> torch.

All of them refuse inputs below 32x32, hence min_input_size=32 (28x28 images are resized up inside the
model). Pretrained features are far better at larger sizes; `build_classifier(resize_to=...)` does that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from backbones import blocks
from backbones.registry import BackboneSpec, register

if TYPE_CHECKING:
    import keras

KERAS_MIN_INPUT = 32


def _app(factory_name: str, **fixed: Any) -> Callable[..., keras.Model]:
    """A registry constructor around `keras.applications.<factory_name>`.

    Keras is imported at call time, not import time: importing the registry (e.g. to ask whether a
    backbone is pretrained) must not cost the ~6 s TensorFlow import.
    """

    def construct(input_shape: tuple[int, int, int], weights: str | None = None, **kwargs: Any) -> "keras.Model":
        import keras

        factory = getattr(keras.applications, factory_name)
        return factory(include_top=False, weights=weights, input_shape=tuple(input_shape), pooling=None,
                       **{**fixed, **kwargs})

    construct.__name__ = f"construct_{factory_name}"
    construct.__doc__ = f"keras.applications.{factory_name}(include_top=False, pooling=None, ...)"
    return construct


def _keras_app(name: str, family: str, factory: str, preprocessing: str, grouping, *,
               default_input_size: int = 224, heavy: bool = False, lr: float = 1e-3,
               finetune_lr: float = 1e-4, fixed: dict | None = None, description: str = "") -> BackboneSpec:
    return register(BackboneSpec(
        name=name, family=family, constructor=_app(factory, **(fixed or {})), preprocessing=preprocessing,
        min_input_size=KERAS_MIN_INPUT, pretrained=True, block_grouping=grouping, lr=lr,
        finetune_lr=finetune_lr, default_input_size=default_input_size, heavy=heavy,
        description=description or f"keras.applications.{factory}",
    ))


_keras_app("mobilenet_v3_small", "mobilenet_v3", "MobileNetV3Small", "builtin:tf", blocks.mobilenet_v3_blocks,
           fixed={"include_preprocessing": True}, description="MobileNetV3-Small, 0.9M params")
_keras_app("efficientnet_b0", "efficientnet", "EfficientNetB0", "builtin:torch", blocks.efficientnet_blocks,
           description="EfficientNet-B0, 4.0M params")
_keras_app("efficientnet_v2_b0", "efficientnet_v2", "EfficientNetV2B0", "builtin:torch",
           blocks.efficientnet_blocks, fixed={"include_preprocessing": True},
           description="EfficientNetV2-B0, 5.9M params")
for _size, _res, _heavy, _params in (("s", 384, False, "20M"), ("m", 480, True, "53M"), ("l", 480, True, "118M")):
    _keras_app(f"efficientnet_v2_{_size}", "efficientnet_v2", f"EfficientNetV2{_size.upper()}", "builtin:tf",
               blocks.efficientnet_blocks, default_input_size=_res, heavy=_heavy,
               fixed={"include_preprocessing": True}, description=f"EfficientNetV2-{_size.upper()}, {_params} params")
for _size, _heavy, _params in (("tiny", False, "28M"), ("base", True, "88M"), ("large", True, "196M")):
    _keras_app(f"convnext_{_size}", "convnext", f"ConvNeXt{_size.capitalize()}", "builtin:torch",
               blocks.convnext_blocks, heavy=_heavy, finetune_lr=5e-5, fixed={"include_preprocessing": True},
               description=f"ConvNeXt-{_size.capitalize()}, {_params} params")
_keras_app("resnet50", "resnet", "ResNet50", "caffe", blocks.resnet_blocks, description="ResNet50 v1, 24M params")
_keras_app("densenet121", "densenet", "DenseNet121", "torch", blocks.resnet_blocks,
           description="DenseNet121, 7.0M params")
