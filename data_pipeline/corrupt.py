"""Severity-graded image corruptions (in the spirit of ImageNet-C / MedMNIST-C) for robustness checks.

A model that is only scored on clean test images can hide a collapse under the blur, noise, compression
and stain variation that real smears and scanners produce; a corrupted copy of the test set measures it.

Severities 1..5 are calibrated on 28x28 PBC cells so that 3 visibly but not totally degrades a cell.
Spatial parameters (blur radius) scale with the image side, so a severity means a similar degradation
at 28x28 and at 96x96. Every kind draws its random numbers from a stream that depends on the seed and
the kind but not on the severity, so raising the severity scales the same noise: results are
deterministic and the damage grows monotonically with severity.
"""

from __future__ import annotations

import io
import zlib
from types import MappingProxyType
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage, signal

from data_pipeline.dataset import validate_images
from data_pipeline.errors import DataError

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
REFERENCE_SIDE = 28  # image side the spatial parameters below are given for

# One parameter per severity 1..5; its meaning is given by the function of the same name below.
_LEVELS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.07, 0.10, 0.14, 0.19),   # noise std, intensity in [0, 1]
    "shot_noise": (150, 70, 35, 18, 9),                  # photons per unit intensity (fewer: noisier)
    "impulse_noise": (0.01, 0.025, 0.045, 0.07, 0.10),   # fraction of values set to 0 or 1
    "speckle_noise": (0.08, 0.13, 0.19, 0.27, 0.36),     # multiplicative noise std
    "gaussian_blur": (0.4, 0.6, 0.8, 1.05, 1.35),        # sigma in pixels at 28x28
    "defocus_blur": (0.7, 1.0, 1.3, 1.7, 2.2),           # disk radius in pixels at 28x28
    "jpeg_compression": (75, 50, 30, 18, 10),            # JPEG quality
    "pixelate": (0.75, 0.6, 0.5, 0.4, 0.3),              # side of the coarse image / original side
    "brightness": (0.05, 0.1, 0.15, 0.21, 0.28),         # added to every channel
    "contrast": (0.75, 0.6, 0.45, 0.32, 0.2),            # factor on the distance to the image mean
    "saturate": (1.3, 1.6, 2.0, 2.6, 3.4),               # factor on the distance to grey
    "haze": (0.15, 0.3, 0.45, 0.6, 0.75),                # peak opacity of an uneven light haze
    "hue_shift": (8, 16, 25, 36, 50),                    # hue rotation in degrees, sign random per image
    "stain_shift": (0.1, 0.2, 0.3, 0.45, 0.6),           # relative change of per-channel stain density
}

CORRUPTIONS: tuple[str, ...] = tuple(_LEVELS)
SEVERITY_LEVELS = MappingProxyType(_LEVELS)

Corruption = Callable[[np.ndarray, float, np.random.Generator, float], np.ndarray]
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def _per_image(values: np.ndarray) -> np.ndarray:
    """Shape (N,) -> (N,1,1,1) so a per-image value broadcasts over (N,H,W,C)."""
    return values.reshape(-1, 1, 1, 1).astype(np.float32)


# Each corruption maps float32 (N,H,W,3) images in [0,1] to float32 images of the same shape; values
# outside [0,1] are clipped afterwards. `scale` is the image side divided by REFERENCE_SIDE.

def gaussian_noise(x: np.ndarray, std: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Additive sensor noise."""
    return x + std * rng.standard_normal(x.shape, dtype=np.float32)


def shot_noise(x: np.ndarray, photons: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Poisson photon-count noise: worse in dark regions (stained nuclei) than in the bright background."""
    return rng.poisson(x * photons).astype(np.float32) / np.float32(photons)


def impulse_noise(x: np.ndarray, amount: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Salt-and-pepper noise on single channel values (dead or hot sensor sites)."""
    hit = rng.random(x.shape, dtype=np.float32) < amount
    salt = rng.random(x.shape, dtype=np.float32) < 0.5
    return np.where(hit, salt.astype(np.float32), x)


def speckle_noise(x: np.ndarray, std: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Multiplicative noise, strongest where the image is brightest."""
    return x + x * std * rng.standard_normal(x.shape, dtype=np.float32)


def gaussian_blur(x: np.ndarray, sigma: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Smooth blur, e.g. from scanner optics or resampling."""
    s = sigma * scale
    return ndimage.gaussian_filter(x, sigma=(0, s, s, 0), mode="reflect")


def _disk_kernel(radius: float) -> np.ndarray:
    """Disk with an anti-aliased rim, so the blur grows smoothly with fractional radii."""
    half = int(np.ceil(radius + 0.5))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    kernel = np.clip(radius + 0.5 - np.hypot(yy, xx), 0.0, 1.0).astype(np.float32)
    return kernel / kernel.sum()


def defocus_blur(x: np.ndarray, radius: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Out-of-focus microscope: each point spreads into a disk."""
    kernel = _disk_kernel(radius * scale)
    half = kernel.shape[0] // 2
    padded = np.pad(x, ((0, 0), (half, half), (half, half), (0, 0)), mode="reflect")
    return signal.fftconvolve(padded, kernel[None, :, :, None], mode="valid", axes=(1, 2))


def jpeg_compression(x: np.ndarray, quality: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Lossy re-encoding, as when images are exported or shared as JPEG."""
    out = np.empty_like(x)
    for i, image in enumerate(_to_uint8(x)):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
        with Image.open(buffer) as decoded:
            out[i] = np.asarray(decoded.convert("RGB"), dtype=np.float32) / 255.0
    return out


def pixelate(x: np.ndarray, factor: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Low sampling resolution: average down to a coarser grid, blow back up with visible blocks."""
    height, width = x.shape[1:3]
    coarse = (max(1, round(width * factor)), max(1, round(height * factor)))
    out = np.empty_like(x)
    for i, image in enumerate(_to_uint8(x)):
        small = Image.fromarray(image).resize(coarse, Image.Resampling.BOX)
        out[i] = np.asarray(small.resize((width, height), Image.Resampling.NEAREST), dtype=np.float32) / 255.0
    return out


def brightness(x: np.ndarray, amount: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Over-exposure: the light background clips to white first, then the cell washes out."""
    return x + np.float32(amount)


def contrast(x: np.ndarray, factor: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Flat, low-contrast exposure around each image's mean."""
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - mean) * np.float32(factor) + mean


def saturate(x: np.ndarray, factor: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Over-saturated colour, as from an aggressive camera profile or a strong stain."""
    grey = (x @ _LUMA)[..., None]
    return grey + (x - grey) * np.float32(factor)


def _smooth_field(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    """Low-frequency random field in [0,1] per image, (N,H,W)."""
    noise = rng.standard_normal((n, height, width), dtype=np.float32)
    sigma = max(height, width) / 6
    field = ndimage.gaussian_filter(noise, sigma=(0, sigma, sigma), mode="wrap")
    lo = field.min(axis=(1, 2), keepdims=True)
    hi = field.max(axis=(1, 2), keepdims=True)
    return (field - lo) / np.maximum(hi - lo, 1e-6)


def haze(x: np.ndarray, opacity: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Uneven light veil (fog-like; dirty optics, thick smear), blended towards near-white."""
    field = _smooth_field(rng, *x.shape[:3])
    alpha = (np.float32(opacity) * (0.5 + 0.5 * field))[..., None]
    return x * (1 - alpha) + alpha * np.float32(0.95)


_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


def hue_shift(x: np.ndarray, degrees: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Rotate hue around the grey axis (in YIQ), keeping luminance: a colour cast of camera or stain batch."""
    angles = np.deg2rad(degrees) * rng.choice([-1.0, 1.0], size=len(x))
    cos, sin = np.cos(angles), np.sin(angles)
    rotation = np.zeros((len(x), 3, 3), dtype=np.float32)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    # Per image: YIQ_TO_RGB @ R_i @ RGB_TO_YIQ, applied to row-vector pixels.
    transforms = _YIQ_TO_RGB @ rotation @ _RGB_TO_YIQ
    return np.einsum("nhwc,ndc->nhwd", x, transforms, optimize=True)


def stain_shift(x: np.ndarray, amount: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Stain variation (May-Gruenwald-Giemsa batches, staining time) as per-channel optical-density change.

    Light absorbed by stain follows Beer-Lambert, so stain strength scales optical density -log(I), not
    intensity: darker, more stained regions change most while the bright background stays near white.
    """
    sign = rng.choice([-1.0, 1.0], size=(len(x), 3))
    magnitude = rng.uniform(0.5, 1.0, size=(len(x), 3))
    gain = (1.0 + amount * sign * magnitude).astype(np.float32)[:, None, None, :]
    density = -np.log(np.clip(x, 1 / 255, 1.0))
    return np.exp(-density * gain)


_FUNCTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise, "gaussian_blur": gaussian_blur, "defocus_blur": defocus_blur,
    "jpeg_compression": jpeg_compression, "pixelate": pixelate, "brightness": brightness,
    "contrast": contrast, "saturate": saturate, "haze": haze, "hue_shift": hue_shift,
    "stain_shift": stain_shift,
}


def _check_kind(kind: str) -> str:
    if kind not in _FUNCTIONS:
        raise DataError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")
    return kind


def _check_kinds(kinds: Sequence[str] | None) -> tuple[str, ...]:
    if kinds is None:
        return CORRUPTIONS
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(_check_kind(k) for k in kinds)
    if not kinds:
        raise DataError("no corruption kinds given")
    return kinds


def _check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise DataError(f"corruption severity must be an integer in 1..5, got {severity!r}")
    return int(severity)


def _check_severities(severities: Sequence[int] | int) -> tuple[int, ...]:
    if isinstance(severities, (int, np.integer)):
        severities = (severities,)
    severities = tuple(_check_severity(s) for s in severities)
    if not severities:
        raise DataError("no corruption severities given")
    return severities


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _kind_rng(seed: int, kind: str) -> np.random.Generator:
    """Independent streams per kind, identical across severities (see the module docstring)."""
    return np.random.default_rng([seed, zlib.crc32(kind.encode())])


def _corrupt_checked(images: np.ndarray, kind: str, severity: int, seed: int) -> np.ndarray:
    level = _LEVELS[kind][severity - 1]
    scale = min(images.shape[1:3]) / REFERENCE_SIDE
    x = images.astype(np.float32) / np.float32(255.0)
    return _to_uint8(_FUNCTIONS[kind](x, level, _kind_rng(seed, kind), scale))


def corrupt(images: np.ndarray, kind: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt a batch of uint8 (N,H,W,3) images with one kind at one severity (1..5); same shape and dtype."""
    images = validate_images(images, "corrupt")
    return _corrupt_checked(images, _check_kind(kind), _check_severity(severity), _check_seed(seed))


def corrupt_dataset(images: np.ndarray, severities: Sequence[int] = SEVERITIES, kinds: Sequence[str] | None = None,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A mixed corrupted copy: each image gets one kind and severity, drawn at random (deterministic by seed).

    Returns (images, kind name per image, severity per image) so results can be broken down afterwards.
    """
    images = validate_images(images, "corrupt_dataset")
    kinds, severities, seed = _check_kinds(kinds), _check_severities(severities), _check_seed(seed)
    rng = np.random.default_rng(seed)
    kind_index = rng.integers(len(kinds), size=len(images))
    severity = rng.choice(np.asarray(severities, dtype=np.int64), size=len(images))
    out = np.empty_like(images)
    for k, kind in enumerate(kinds):
        for level in severities:
            rows = np.flatnonzero((kind_index == k) & (severity == level))
            if rows.size:
                out[rows] = _corrupt_checked(images[rows], kind, level, seed)
    return out, np.asarray(kinds)[kind_index], severity


def corruption_suite(images: np.ndarray, kinds: Sequence[str] | None = None,
                     severities: Sequence[int] = SEVERITIES,
                     seed: int = 0) -> Iterator[tuple[str, int, np.ndarray]]:
    """Yield (kind, severity, corrupted copy of all images) for every kind and severity.

    Arguments are checked at call time, not at the first `next()`, so a typo fails where it is made.
    """
    images = validate_images(images, "corruption_suite")
    kinds, severities, seed = _check_kinds(kinds), _check_severities(severities), _check_seed(seed)

    def generate() -> Iterator[tuple[str, int, np.ndarray]]:
        for kind in kinds:
            for level in severities:
                yield kind, level, _corrupt_checked(images, kind, level, seed)

    return generate()
