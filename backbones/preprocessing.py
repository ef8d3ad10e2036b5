"""Input preprocessing as layers, so a saved model takes raw 0..255 RGB and predicts correctly.

Keras' `preprocess_input` functions are meant to run outside the model, in the data pipeline; a model
saved without them silently mispredicts on raw images. Families whose Keras constructor already includes
preprocessing (ConvNeXt, EfficientNet, MobileNetV3) need nothing here; ResNet ("caffe") and DenseNet
("torch") get a `ImageNetPreprocess` layer, checked against Keras' own `preprocess_input` in the tests.

`ImageNetPreprocess` is registered as serializable under the "cellsearch" package, so loading a saved
model needs `import backbones` first (or `backbones.load_model`).
"""

from __future__ import annotations

import keras
from keras import ops

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
#: Caffe-style mean, in BGR order and 0..255 scale, as in keras.applications.imagenet_utils.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="cellsearch")
class ImageNetPreprocess(keras.layers.Layer):
    """Map raw 0..255 RGB images to what a family's ImageNet weights expect.

    Modes (identical to `keras.applications.imagenet_utils.preprocess_input`, plus "unit"):
        tf     x / 127.5 - 1
        torch  (x / 255 - mean) / std, per RGB channel
        caffe  RGB -> BGR, then subtract the BGR mean (no scaling)
        unit   x / 255
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("tf", "torch", "caffe", "unit"):
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "unit":
            return x / 255.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(IMAGENET_MEAN_RGB, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(IMAGENET_STD_RGB, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        mean = ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        return ops.flip(x, axis=-1) - mean

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}
