"""Assemble raw-image classifiers: input -> [resize] -> [preprocess] -> backbone -> head.

The classifier takes raw float 0..255 RGB of the data set's size, so a saved `.keras` model predicts on
raw images with no outside preprocessing to forget. Resizing and preprocessing live *outside* the
backbone sub-model (layer "backbone"), which is then exactly the Keras application: its weights file is
interchangeable with Keras' own, and `set_unfreeze` / `save_backbone_weights` find it by name.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import keras
from keras import layers

from backbones.head import build_head
from backbones.layout import BACKBONE_LAYER, PRETRAINED_ATTR, SPEC_ATTR
from backbones.preprocessing import ImageNetPreprocess
from backbones.registry import BackboneSpec, get_backbone
from backbones.unfreeze import set_unfreeze
from backbones.weights import build_with_weights, normalize_weights_arg
from common.errors import BackboneError


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or any(int(s) < 1 for s in pair):
        raise BackboneError(f"resize_to must be an int or (height, width), got {size!r}")
    return int(pair[0]), int(pair[1])


def backbone_input_size(spec: BackboneSpec, input_shape: Sequence[int],
                        resize_to: int | Sequence[int] | None = None) -> tuple[int, int]:
    """The (height, width) the backbone sees: `resize_to`, else the input raised to the minimum size."""
    height, width = int(input_shape[0]), int(input_shape[1])
    if resize_to is not None:
        target = _size_pair(resize_to)
        if min(target) < spec.min_input_size:
            raise BackboneError(f"resize_to={resize_to} is below {spec.name}'s minimum input size "
                               f"{spec.min_input_size}")
        return target
    return max(height, spec.min_input_size), max(width, spec.min_input_size)


def build_backbone(name: str, input_shape: Sequence[int], weights: str | os.PathLike | None = None,
                   **kwargs: Any) -> keras.Model:
    """The registered feature extractor for preprocessed input of `input_shape`, named "backbone".

    `kwargs` override the spec's constructor defaults (e.g. widths=(48, 96, 192) for small_resnet).
    """
    spec = get_backbone(name)
    backbone = build_with_weights(spec, input_shape, weights, **{**spec.defaults, **kwargs})
    # Rename after construction: EfficientNetV2 picks its preprocessing from the constructor's name.
    backbone.name = BACKBONE_LAYER
    return backbone


def build_classifier(name: str, input_shape: Sequence[int] = (28, 28, 3), num_classes: int = 8,
                     weights: str | os.PathLike | None = None, dropout: float = 0.2,
                     head_units: int | Sequence[int] = 0, *, resize_to: int | Sequence[int] | None = None,
                     backbone_kwargs: Mapping[str, Any] | None = None, head_batchnorm: bool = True,
                     unfreeze: float | None = None, model_name: str | None = None) -> keras.Model:
    """Build a classifier on raw 0..255 RGB images of `input_shape`, outputting float32 probabilities.

    Args:
        name: registry name (see `list_backbones()`).
        input_shape: (height, width, 3) of the raw images fed to the model.
        num_classes: output classes.
        weights: "imagenet", None (random init) or a path to a backbone weights file.
        dropout: dropout rate in the head (after the pooled features and after each hidden layer).
        head_units: hidden Dense units in the head; 0 for none, or a sequence for several layers.
        resize_to: resize inputs to this size inside the model (int or (h, w)), e.g. 96 to give an
            ImageNet backbone larger objects; default: only up to the spec's `min_input_size`.
        backbone_kwargs: override the spec's constructor defaults.
        head_batchnorm: BatchNorm after pooling (see `backbones.head`).
        unfreeze: initial trainable backbone fraction, applied with `set_unfreeze`. None: 0.0 (head only)
            when weights were loaded, else everything trainable (training from scratch).
        model_name: the Keras model name; defaults to `name`, which lets `set_unfreeze` find the spec
            again after the model has been saved and loaded.
    """
    spec = get_backbone(name)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise BackboneError(f"input_shape must be (height, width, 3), got {tuple(input_shape)}")
    loaded = normalize_weights_arg(spec, weights) is not None
    height, width = backbone_input_size(spec, input_shape, resize_to)

    inputs = keras.Input(shape=tuple(int(d) for d in input_shape), name="image")
    x = inputs
    # Resizing and preprocessing run in float32 even under mixed precision: cheap, and bfloat16 would
    # round 0..255 pixel values (8 significant bits) before the mean subtraction.
    if (height, width) != (int(input_shape[0]), int(input_shape[1])):
        x = layers.Resizing(height, width, interpolation="bilinear", dtype="float32", name="resize")(x)
    if not spec.builtin_preprocessing:
        x = ImageNetPreprocess(spec.preprocessing_mode, dtype="float32", name="preprocess")(x)
    backbone = build_backbone(name, (height, width, 3), weights, **dict(backbone_kwargs or {}))
    outputs = build_head(backbone(x), num_classes, dropout=dropout, head_units=head_units,
                         batchnorm=head_batchnorm)
    model = keras.Model(inputs, outputs, name=model_name or spec.name)
    # Plain attributes, deliberately bypassing Keras' attribute tracking: bookkeeping, not state.
    object.__setattr__(model, SPEC_ATTR, spec.name)
    object.__setattr__(model, PRETRAINED_ATTR, loaded)

    if unfreeze is not None:
        set_unfreeze(model, unfreeze)
    elif loaded:
        set_unfreeze(model, 0.0)
    return model


def load_model(path: str | os.PathLike, **kwargs: Any) -> keras.Model:
    """`keras.saving.load_model`, with this package's custom layers registered (importing it does that)."""
    return keras.saving.load_model(path, **kwargs)
