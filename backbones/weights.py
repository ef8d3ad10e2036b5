"""Resolve `weights=` ("imagenet", None, or a local file) into a built backbone, with clear failures.

Three cases:
- None: random initialisation.
- "imagenet": Keras downloads the `*_notop.h5` file into ~/.keras/models (or $KERAS_HOME/models) on first
  use and reuses it afterwards. Without internet that download fails deep inside Keras with a bare
  `Exception("URL fetch failure ...")`; we turn it into one `WeightsUnavailableError` telling the user to
  pass a local weights file instead.
- a path: the backbone is built with random weights, then the file is loaded into it. Accepted formats:
  Keras 3 `.weights.h5` of the backbone (as written by `save_backbone_weights`) and the legacy `.h5`
  files Keras applications download (so a `*_notop.h5` copied from another machine works).

One family quirk: EfficientNet (v1) ImageNet files store the ImageNet *std* as the Normalization layer's
variance, which Keras compensates with an extra Rescaling layer it only adds when weights="imagenet".
When such a file is loaded from a path, the model has no such layer, so we square the variance instead
(detected by the stored values, so files saved by us, which already hold the squared values, are left
alone).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np

from backbones.layout import get_backbone_model
from backbones.registry import BackboneSpec
from common.errors import WeightsError, WeightsUnavailableError

WEIGHT_SUFFIXES = (".weights.h5", ".h5", ".hdf5")


def normalize_weights_arg(spec: BackboneSpec, weights: str | os.PathLike | None) -> str | Path | None:
    """Validate `weights` for `spec`: returns None, "imagenet", or an existing file `Path`."""
    if weights is None:
        return None
    if isinstance(weights, str) and weights.lower() == "imagenet":
        if not spec.pretrained:
            raise WeightsError(f"backbone {spec.name!r} is trained from scratch and has no ImageNet weights; "
                               "pass weights=None or a path to a weights file saved from it")
        return "imagenet"
    if not isinstance(weights, (str, os.PathLike)):
        raise WeightsError(f"weights must be 'imagenet', None or a file path, got {weights!r}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (weights must be 'imagenet', None or a file path)")
    if not path.name.endswith(WEIGHT_SUFFIXES):
        raise WeightsError(f"{path}: unsupported weights file; expected one of {', '.join(WEIGHT_SUFFIXES)}")
    return path


def _is_download_failure(exc: BaseException) -> bool:
    """Keras' get_file wraps URLError/HTTPError into a bare Exception("URL fetch failure on ...")."""
    import urllib.error

    text = str(exc)
    return (isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError))
            or "URL fetch failure" in text or "Incomplete or corrupted file" in text)


def _keras_cache_dir() -> Path:
    """Where Keras looks for downloaded weights: $KERAS_HOME/models, else ~/.keras/models."""
    return Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "models"


def _unavailable_message(spec: BackboneSpec, exc: BaseException) -> str:
    """Name the exact file and URL Keras wanted, so the user can fetch it on a connected machine."""
    match = re.search(r"https?://\S+?\.h5", str(exc))
    url = match.group(0) if match else None
    file_name = url.rsplit("/", 1)[-1] if url else f"{spec.name}_notop.h5"
    source = f" (download it elsewhere from {url})" if url else ""
    return (f"could not download ImageNet weights for backbone {spec.name!r} (no internet access?). "
            f"Pass a local weights file path instead: weights='/path/to/{file_name}'{source}, or a "
            f"'.weights.h5' file saved with backbones.save_backbone_weights; or copy {file_name} into "
            f"{_keras_cache_dir()}. Cause: {exc}")


def build_with_weights(spec: BackboneSpec, input_shape: Sequence[int], weights: str | os.PathLike | None,
                       **kwargs: Any) -> keras.Model:
    """Build `spec`'s feature extractor at `input_shape` and give it the requested weights."""
    resolved = normalize_weights_arg(spec, weights)
    if resolved == "imagenet":
        try:
            return spec.constructor(tuple(input_shape), weights="imagenet", **kwargs)
        except Exception as exc:
            if not _is_download_failure(exc):
                raise
            raise WeightsUnavailableError(_unavailable_message(spec, exc)) from None
    backbone = spec.constructor(tuple(input_shape), weights=None, **kwargs)
    if resolved is not None:
        load_backbone_weights(backbone, resolved, spec)
    return backbone


def load_backbone_weights(backbone: keras.Model, path: str | os.PathLike, spec: BackboneSpec | None = None) -> None:
    """Load a weights file into a backbone sub-model; raises `WeightsError` naming the file on mismatch."""
    path = Path(path)
    try:
        backbone.load_weights(str(path))
    except Exception as exc:  # Keras raises ValueError/KeyError/OSError depending on format and mismatch
        name = spec.name if spec else backbone.name
        raise WeightsError(f"could not load {path} into backbone {name!r}: {exc}") from exc
    if spec is not None and spec.family == "efficientnet" and not path.name.endswith(".weights.h5"):
        _fix_efficientnet_v1_normalization(backbone)


def _fix_efficientnet_v1_normalization(backbone: keras.Model) -> None:
    """Square a Normalization variance that holds the ImageNet std (see the module docstring)."""
    from backbones.preprocessing import IMAGENET_STD_RGB

    for layer in backbone.layers:
        if isinstance(layer, keras.layers.Normalization) and getattr(layer, "adapt_variance", None) is not None:
            variance = np.asarray(keras.ops.convert_to_numpy(layer.adapt_variance)).reshape(-1)
            if variance.shape == (3,) and np.allclose(variance, IMAGENET_STD_RGB, atol=1e-4):
                layer.adapt_variance.assign(np.square(variance).reshape(layer.adapt_variance.shape))
                layer.finalize_state()


def save_backbone_weights(model: keras.Model, path: str | os.PathLike) -> Path:
    """Save the backbone of a classifier (or a bare backbone) to a `.weights.h5` file; returns the path.

    The file can be passed back as `build_classifier(name, weights=path)`, e.g. to start several trials
    from one fine-tuned backbone.
    """
    path = Path(path)
    if not path.name.endswith(".weights.h5"):
        raise WeightsError(f"{path}: backbone weights are saved as '.weights.h5'")
    path.parent.mkdir(parents=True, exist_ok=True)
    get_backbone_model(model).save_weights(str(path))
    return path
