"""Input preprocessing as layers, so a saved model takes raw 0..255 RGB and predicts correctly.

Keras' `preprocess_input` functions are meant to run outside the model, in the data pipeline; a model
saved without them silently mispredicts on raw images. Families whose Keras constructor already includes
preprocessing (ConvNeXt, EfficientNet, MobileNetV3) need nothing here; ResNet ("caffe") and DenseNet
("torch") get a `ImageNetPreprocess` layer, checked against Keras' own `preprocess_input` in the tests.

The layer is defined once, in `common.inference` (the module the Codabench export copies beside model.py,
which cannot import the package), and registered here as serializable under the "cellsearch" package, so
loading a saved model needs `import backbones` first (or `backbones.load_model`).
"""

from __future__ import annotations

import keras

from common.inference import (CAFFE_MEAN_BGR, IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, preprocess_layer_class,
                              shift_gate_layer_class)

__all__ = ["CAFFE_MEAN_BGR", "IMAGENET_MEAN_RGB", "IMAGENET_STD_RGB", "ImageNetPreprocess", "ShiftGate"]

ImageNetPreprocess = keras.saving.register_keras_serializable(package="cellsearch")(preprocess_layer_class())
# The other custom layer a saved member may hold (an ensemble's gated clean member, ensemble.gate), registered
# here too so that every loader that imports this module loads it.
ShiftGate = keras.saving.register_keras_serializable(package="cellsearch")(shift_gate_layer_class())
