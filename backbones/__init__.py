"""Backbones for blood-cell classification: one registry by name, timm style.

    from backbones import build_classifier, list_backbones, set_unfreeze
    model = build_classifier("small_resnet", input_shape=(28, 28, 3), num_classes=8)
    model = build_classifier("efficientnet_b0", input_shape=(64, 64, 3), weights="imagenet")
    set_unfreeze(model, 0.5)   # top half of the backbone's blocks; then recompile

Models take raw 0..255 RGB; preprocessing and resizing are layers inside them. Load saved models with
`backbones.load_model` (or import `backbones.preprocessing` before `keras.saving.load_model`), which
registers the custom preprocessing layer.

Importing this package and the registry does not import Keras/TensorFlow (a ~6 s import): asking
`get_backbone(name).pretrained` stays cheap. Model-building names are loaded on first attribute access.
"""

from __future__ import annotations

from backbones import keras_apps as _keras_apps  # noqa: F401  (registers entries)
from backbones import scratch as _scratch  # noqa: F401  (registers entries)
from backbones.blocks import Block
from backbones.registry import BackboneSpec, get_backbone, list_backbones, register
from common.errors import UnknownBackboneError, WeightsError, WeightsUnavailableError
from common.lazy import lazy_exports

_LAZY = {
    "build_head": "backbones.head",
    "BACKBONE_LAYER": "backbones.layout",
    "backbone_input_size": "backbones.model",
    "backbone_spec_of": "backbones.layout",
    "build_backbone": "backbones.model",
    "build_classifier": "backbones.model",
    "get_backbone_model": "backbones.layout",
    "load_model": "backbones.model",
    "ImageNetPreprocess": "backbones.preprocessing",
    "UnfreezeResult": "backbones.unfreeze",
    "UnfreezeStage": "backbones.unfreeze",
    "backbone_blocks": "backbones.unfreeze",
    "blocks_to_unfreeze": "backbones.unfreeze",
    "gradual_unfreeze_stages": "backbones.unfreeze",
    "set_unfreeze": "backbones.unfreeze",
    "load_backbone_weights": "backbones.weights",
    "save_backbone_weights": "backbones.weights",
}

__all__ = sorted(["BackboneSpec", "Block", "UnknownBackboneError", "WeightsError", "WeightsUnavailableError",
                  "get_backbone", "list_backbones", "register", *_LAZY])

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
