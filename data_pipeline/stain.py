"""Stain colour space (HED) and stain jitter for batches of RGB images, float 0..255, in `keras.ops` (any backend).

Colour deconvolution after Ruifrok & Johnston (2001), with the matrix and log scaling of scikit-image's
`rgb2hed` / `hed2rgb`: optical density `log(rgb) / log(1e-6)` (rgb in [1e-6, 1]) times the inverse of the
stain matrix gives per-pixel haematoxylin, eosin and DAB concentrations. Unlike `rgb2hed`, negative
concentrations are kept rather than clipped to 0, so `hed_to_rgb(rgb_to_hed(x))` gives `x` back (up to
float rounding and the 1e-6 floor) and jitter with scale 1, bias 0 is the identity.

Stain jitter (Tellez et al. 2018, "H&E stain augmentation"): each image's H, E and D concentrations are
scaled by a factor and shifted by a bias drawn per image and per stain, then mapped back to RGB. It models
batch-to-batch differences in stain strength and hue; May-Gruenwald-Giemsa blood smears are not H&E, but
their two dyes (basic azure, acidic eosin) span a similar plane, and the jitter only needs a plausible basis.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops

# Rows: optical density (R, G, B) of a unit of haematoxylin, eosin and DAB (scikit-image's rgb_from_hed).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_MIN_INTENSITY = 1e-6  # scikit-image's floor; also the unit of its optical-density scale
_LOG_MIN = float(np.log(_MIN_INTENSITY))
_MAX_VALUE = 255.0


def _pixels_times(images: Any, matrix: np.ndarray) -> Any:
    """Each pixel's 3-vector (last axis) times `matrix` (row-vector convention, as scikit-image)."""
    return ops.matmul(images, ops.convert_to_tensor(matrix.astype(np.float32)))


def rgb_to_hed(images: Any) -> Any:
    """(..., 3) RGB in 0..255 -> (..., 3) H, E, D concentrations (scikit-image's scale; 0 = no stain)."""
    rgb = ops.maximum(ops.cast(images, "float32") / _MAX_VALUE, _MIN_INTENSITY)
    return _pixels_times(ops.log(rgb) / _LOG_MIN, HED_FROM_RGB)


def hed_to_rgb(hed: Any) -> Any:
    """(..., 3) H, E, D concentrations -> (..., 3) RGB in 0..255 (clipped)."""
    rgb = ops.exp(_pixels_times(hed, RGB_FROM_HED) * _LOG_MIN)
    return ops.clip(rgb * _MAX_VALUE, 0.0, _MAX_VALUE)


def hed_jitter(images: Any, scale: Any, bias: Any) -> Any:
    """images (B,H,W,3) with each image's H, E, D concentrations mapped to `c * scale + bias`, (B,3) each.

    `bias` is in natural-log optical density, the unit of Tellez et al.'s sigmas (scikit-image < 0.19's
    `rgb2hed`); the concentrations above are that divided by -log(1e-6) ~ 13.8.
    """
    scale, shift = ops.reshape(scale, (-1, 1, 1, 3)), ops.reshape(bias, (-1, 1, 1, 3)) / -_LOG_MIN
    return hed_to_rgb(rgb_to_hed(images) * scale + shift)
