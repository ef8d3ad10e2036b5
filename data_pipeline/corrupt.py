"""Severity-graded image corruptions (in the spirit of ImageNet-C / MedMNIST-C) for robustness checks.

A model that is only scored on clean test images can hide a collapse under the blur, noise, compression,
stain variation and slide artefacts that real smears and scanners produce; a corrupted copy of the test set
measures it.

Severities 1..5 are calibrated on 28x28 PBC cells so that 3 visibly but not totally degrades a cell.
Spatial parameters (blur radius, artefact size) scale with the image side, so a severity means a similar
degradation at 28x28 and at 96x96. Every kind draws its random numbers from a stream that depends on the
seed and the kind but not on the severity, so raising the severity scales the same noise, and the same
artefacts (positions and shapes from the seed) grow in size, number or strength: results are deterministic
and the damage grows monotonically with severity.

The kinds are grouped into `FAMILIES` of what happens to a blood-smear image. Training may draw from some
families and hold the others out, so the held-out ones measure shift nobody trained for
(`check_families`, `shifted_copy`).
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image
from scipy import fft, ndimage

from data_pipeline.dataset import check_seed, validate_images
from common.errors import DataError

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
    "motion_blur": (1.5, 2.2, 3.0, 4.0, 5.2),            # streak length in pixels at 28x28
    "brightness": (0.05, 0.1, 0.15, 0.21, 0.28),         # added to every channel
    "contrast": (0.75, 0.6, 0.45, 0.32, 0.2),            # factor on the distance to the image mean
    "saturate": (1.3, 1.6, 2.0, 2.6, 3.4),               # factor on the distance to grey
    "hue_shift": (8, 16, 25, 36, 50),                    # hue rotation in degrees, sign random per image
    "stain_shift": (0.1, 0.2, 0.3, 0.45, 0.6),           # relative change of per-channel stain density
    "gamma": (1.25, 1.5, 1.8, 2.2, 2.8),                 # tone-curve exponent, or its inverse (random per image)
    "jpeg_compression": (75, 50, 30, 18, 10),            # JPEG quality
    "pixelate": (0.75, 0.6, 0.5, 0.4, 0.3),              # side of the coarse image / original side
    "downsample": (0.7, 0.55, 0.45, 0.37, 0.3),          # side of the low-resolution image / original side
    "haze": (0.15, 0.3, 0.45, 0.6, 0.75),                # peak opacity of an uneven light haze
    "bubbles": (2.5, 3.5, 4.8, 6.3, 8.0),                # largest bubble radius in pixels at 28x28
    "dust": (3, 5, 8, 12, 16),                           # specks and fibres per image
    "stain_deposit": (4, 8, 14, 22, 32),                 # precipitate granules per image
    "smudge": (0.3, 0.45, 0.6, 0.75, 0.9),               # smear strength: width, smear length, contrast loss
}

FAMILIES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "blur": ("gaussian_blur", "defocus_blur", "motion_blur"),
    "colour": ("brightness", "contrast", "saturate", "hue_shift", "stain_shift", "gamma"),
    # haze is uneven illumination (misaligned condenser, dirty optics): part of how the image is acquired.
    "acquisition": ("jpeg_compression", "pixelate", "downsample", "haze"),
    "artefact": ("bubbles", "dust", "stain_deposit", "smudge"),
})
"""Corruption kinds grouped by what happens to a blood-smear image; every kind is in exactly one family."""

DEFAULT_TRAIN_FAMILIES: tuple[str, ...] = ("noise", "blur", "colour")
"""Families training may draw from: colour and stain shift is the commonest shift in practice and must be
learned; noise and blur are physically simulable."""

DEFAULT_HELDOUT_FAMILIES: tuple[str, ...] = ("acquisition", "artefact")
"""Families kept out of training: scanner and compression pipelines and slide-preparation artefacts vary by
lab, so holding them out measures shift nobody trained for."""

CORRUPTIONS: tuple[str, ...] = tuple(kind for kinds in FAMILIES.values() for kind in kinds)
SEVERITY_LEVELS = MappingProxyType(_LEVELS)
_FAMILY_OF = {kind: family for family, kinds in FAMILIES.items() for kind in kinds}

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


def _coverage(distance: np.ndarray, radius: np.ndarray | float) -> np.ndarray:
    """Share of each pixel inside a shape, from its distance to the shape's centre or centre line.

    The anti-aliased rim lets shapes grow smoothly with fractional sizes, so damage grows with severity.
    """
    return np.clip(radius + 0.5 - distance, 0.0, 1.0).astype(np.float32)


def _convolve_each(x: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """Convolve each image with its own (N,k,k) kernel, or all with one (1,k,k) kernel, edges reflected."""
    half = kernels.shape[1] // 2
    padded = np.pad(x, ((0, 0), (half, half), (half, half), (0, 0)), mode="reflect")
    shape = padded.shape[1:3]
    # Circular convolution by FFT; the first 2*half rows and columns wrap around, the rest is exact.
    spectrum = fft.rfft2(padded, axes=(1, 2)) * fft.rfft2(kernels[..., None], s=shape, axes=(1, 2))
    return fft.irfft2(spectrum, s=shape, axes=(1, 2))[:, 2 * half:, 2 * half:]


def _disk_kernel(radius: float) -> np.ndarray:
    """Normalised anti-aliased disk."""
    half = int(np.ceil(radius + 0.5))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    kernel = _coverage(np.hypot(yy, xx), radius)
    return kernel / kernel.sum()


def defocus_blur(x: np.ndarray, radius: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Out-of-focus microscope: each point spreads into a disk."""
    return _convolve_each(x, _disk_kernel(radius * scale)[None])


def _line_kernels(length: float, angles: np.ndarray) -> np.ndarray:
    """(N,k,k) kernels, each an anti-aliased line of `length` pixels through the centre at one angle."""
    half = int(np.ceil(length / 2)) + 1
    t = np.linspace(-length / 2, length / 2, max(2, int(np.ceil(4 * length)) + 1))
    rows = half + np.outer(np.sin(angles), t)
    cols = half + np.outer(np.cos(angles), t)
    top, left = np.floor(rows).astype(np.int64), np.floor(cols).astype(np.int64)
    down, right = rows - top, cols - left
    image = np.broadcast_to(np.arange(len(angles))[:, None], rows.shape)
    kernels = np.zeros((len(angles), 2 * half + 1, 2 * half + 1), dtype=np.float32)
    for row, row_weight in ((top, 1 - down), (top + 1, down)):
        for col, col_weight in ((left, 1 - right), (left + 1, right)):
            np.add.at(kernels, (image, row, col), row_weight * col_weight)
    return kernels / kernels.sum(axis=(1, 2), keepdims=True)


def motion_blur(x: np.ndarray, length: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Stage or camera moving during the exposure: each point smears into a line, direction random per image."""
    return _convolve_each(x, _line_kernels(length * scale, rng.uniform(0, np.pi, size=len(x))))


def jpeg_compression(x: np.ndarray, quality: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Lossy re-encoding, as when images are exported or shared as JPEG."""
    out = np.empty_like(x)
    for i, image in enumerate(_to_uint8(x)):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
        with Image.open(buffer) as decoded:
            out[i] = np.asarray(decoded.convert("RGB"), dtype=np.float32) / 255.0
    return out


def _resample(x: np.ndarray, factor: float, down: Image.Resampling, up: Image.Resampling) -> np.ndarray:
    """Resize each image to `factor` times its side with filter `down`, then back with filter `up`."""
    height, width = x.shape[1:3]
    coarse = (max(1, round(width * factor)), max(1, round(height * factor)))
    out = np.empty_like(x)
    for i, image in enumerate(_to_uint8(x)):
        small = Image.fromarray(image).resize(coarse, down)
        out[i] = np.asarray(small.resize((width, height), up), dtype=np.float32) / 255.0
    return out


def pixelate(x: np.ndarray, factor: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Low sampling resolution: average down to a coarser grid, blow back up with visible blocks."""
    return _resample(x, factor, Image.Resampling.BOX, Image.Resampling.NEAREST)


def downsample(x: np.ndarray, factor: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Lost resolution (a low-resolution camera, a thumbnail blown back up): fine detail gone, edges soft."""
    return _resample(x, factor, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


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


def gamma(x: np.ndarray, exponent: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Another tone curve (camera gamma, exposure setting): mid-tones darken or lighten, black and white stay."""
    return x ** _per_image(exponent ** rng.choice([-1.0, 1.0], size=len(x)))


# Slide artefacts. Each image draws its full set of artefacts (positions, shapes, sizes) from the stream
# whatever the severity; the severity only sets how many of them show and how large or strong they are, so a
# higher severity shows the same artefacts and more.

def _random_points(rng: np.random.Generator, n: int, count: int, height: int, width: int) -> np.ndarray:
    """(n, count, 2) points (row, column) spread uniformly over the image."""
    return rng.random((n, count, 2), dtype=np.float32) * np.array([height, width], dtype=np.float32)


def _move(points: np.ndarray, length: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Points (...,2) moved by `length` pixels in direction `angle` (radians, from the column axis)."""
    return points + np.stack([length * np.sin(angle), length * np.cos(angle)], axis=-1).astype(np.float32)


def _distance_to_segments(start: np.ndarray, end: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N,H,W) distance of every pixel to one segment per image; start and end are (N,2), equal for a point."""
    rows = np.arange(height, dtype=np.float32)[None, :, None] - start[:, 0, None, None]
    cols = np.arange(width, dtype=np.float32)[None, None, :] - start[:, 1, None, None]
    step = (end - start)[:, :, None, None]
    along = np.clip((rows * step[:, 0] + cols * step[:, 1]) / np.maximum((step ** 2).sum(axis=1), 1e-6), 0.0, 1.0)
    return np.hypot(rows - along * step[:, 0], cols - along * step[:, 1])


def _distance_to_point(centre: np.ndarray, height: int, width: int) -> np.ndarray:
    return _distance_to_segments(centre, centre, height, width)


def _blend(x: np.ndarray, alpha: np.ndarray, colour: Sequence[float] | np.ndarray) -> np.ndarray:
    """Paint `colour` over the images with an (N,H,W) opacity."""
    return x + alpha[..., None] * (np.asarray(colour, dtype=np.float32) - x)


_BUBBLES_PER_IMAGE = 2


def bubbles(x: np.ndarray, radius: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Air bubbles under the coverslip, one or two per image: a bright disc with a dark refractive rim."""
    n, height, width = x.shape[:3]
    centres = _random_points(rng, n, _BUBBLES_PER_IMAGE, height, width)
    radii = radius * scale * rng.uniform(0.7, 1.0, size=(n, _BUBBLES_PER_IMAGE)).astype(np.float32)
    shown = np.arange(_BUBBLES_PER_IMAGE) < rng.integers(1, _BUBBLES_PER_IMAGE + 1, size=(n, 1))
    for b in range(_BUBBLES_PER_IMAGE):
        r = radii[:, b, None, None]
        distance = _distance_to_point(centres[:, b], height, width)
        rim_half_width = np.maximum(0.15 * r, 0.4 * scale)
        rim = _coverage(np.abs(distance - (r - rim_half_width)), rim_half_width)
        visible = shown[:, b, None, None]
        x = _blend(x, 0.55 * visible * _coverage(distance, r), (0.97, 0.97, 0.97))
        x = _blend(x, 0.75 * visible * rim, (0.3, 0.3, 0.34))
    return x


_DUST_PER_IMAGE = 16  # the most any severity shows


def dust(x: np.ndarray, count: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Dust and lint on the slide or the optics: small dark specks and, one in four, a thin bent fibre."""
    n, height, width = x.shape[:3]
    shape = (n, _DUST_PER_IMAGE)
    starts = _random_points(rng, n, _DUST_PER_IMAGE, height, width)
    is_fibre = rng.random(shape) < 0.25
    half_length = is_fibre * rng.uniform(1.5, 4.0, size=shape) * scale  # a speck is a fibre of length 0
    direction = rng.uniform(0, 2 * np.pi, size=shape)
    turned = direction + rng.uniform(-0.8, 0.8, size=shape)
    kinks = _move(starts, half_length, direction)
    ends = _move(kinks, half_length, turned)
    thickness = (rng.uniform(0.5, 1.1, size=shape) * scale * np.where(is_fibre, 0.5, 1.0)).astype(np.float32)
    opacity = rng.uniform(0.65, 0.95, size=shape).astype(np.float32)
    for j in range(int(count)):
        distance = np.minimum(_distance_to_segments(starts[:, j], kinks[:, j], height, width),
                              _distance_to_segments(kinks[:, j], ends[:, j], height, width))
        alpha = opacity[:, j, None, None] * _coverage(distance, thickness[:, j, None, None])
        x = _blend(x, alpha, (0.22, 0.2, 0.18))
    return x


_GRAINS_PER_IMAGE = 32  # the most any severity shows
_CLUSTERS_PER_IMAGE = 3
_DEPOSIT_DENSITY = np.array([1.3, 2.0, 1.0], dtype=np.float32)  # optical density of a grain: dark purple


def stain_deposit(x: np.ndarray, grains: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Stain precipitate: dye that dried on the smear as clusters of dark purple granules, over cells or not.

    Grains absorb light (Beer-Lambert, as in `stain_shift`), so overlapping grains darken further.
    """
    n, height, width = x.shape[:3]
    clusters = _random_points(rng, n, _CLUSTERS_PER_IMAGE, height, width)
    member = rng.integers(_CLUSTERS_PER_IMAGE, size=(n, _GRAINS_PER_IMAGE))
    spread = rng.standard_normal((n, _GRAINS_PER_IMAGE, 2)).astype(np.float32) * np.float32(2.0 * scale)
    centres = clusters[np.arange(n)[:, None], member] + spread
    radii = rng.uniform(0.4, 1.1, size=(n, _GRAINS_PER_IMAGE)).astype(np.float32) * scale
    density = np.zeros(x.shape[:3], dtype=np.float32)
    for j in range(int(grains)):
        distance = _distance_to_point(centres[:, j], height, width)
        density += _coverage(distance, radii[:, j, None, None])
    return x * np.exp(-np.minimum(density, 1.5)[..., None] * _DEPOSIT_DENSITY)


def smudge(x: np.ndarray, strength: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """A smear across the slide (a finger, immersion oil, a dragged spreader): a soft streak inside which the
    image is smeared along the streak and loses contrast.

    `strength` in (0,1] sets the streak's half-width (8 x strength pixels at 28x28), the smear length
    (10 x strength pixels) and the contrast lost (60% x strength); its place, direction and length come from
    the seed.
    """
    n, height, width = x.shape[:3]
    centre = (0.25 + 0.5 * rng.random((n, 2), dtype=np.float32)) * np.float32([height, width])  # over the cell
    angle = rng.uniform(0, np.pi, size=n)
    half_length = rng.uniform(0.3, 0.6, size=n) * max(height, width)
    distance = _distance_to_segments(_move(centre, -half_length, angle), _move(centre, half_length, angle),
                                     height, width)
    half_width = 8.0 * strength * scale
    streak = np.clip(1.0 - distance / half_width, 0.0, 1.0) ** 0.5
    smeared = _convolve_each(x, _line_kernels(10.0 * strength * scale, angle))
    mean = smeared.mean(axis=(1, 2), keepdims=True)
    flattened = mean + (smeared - mean) * np.float32(1.0 - 0.6 * strength)
    return x + streak[..., None] * (flattened - x)


_FUNCTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise, "gaussian_blur": gaussian_blur, "defocus_blur": defocus_blur,
    "motion_blur": motion_blur, "brightness": brightness, "contrast": contrast, "saturate": saturate,
    "hue_shift": hue_shift, "stain_shift": stain_shift, "gamma": gamma, "jpeg_compression": jpeg_compression,
    "pixelate": pixelate, "downsample": downsample, "haze": haze, "bubbles": bubbles, "dust": dust,
    "stain_deposit": stain_deposit, "smudge": smudge,
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


def _stream(seed: int, name: str) -> np.random.Generator:
    """Independent streams per kind (or family), identical across severities and processes."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _corrupt_checked(images: np.ndarray, kind: str, severity: int, seed: int) -> np.ndarray:
    level = _LEVELS[kind][severity - 1]
    scale = min(images.shape[1:3]) / REFERENCE_SIDE
    x = images.astype(np.float32) / np.float32(255.0)
    return _to_uint8(_FUNCTIONS[kind](x, level, _stream(seed, kind), scale))


def corrupt(images: np.ndarray, kind: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt a batch of uint8 (N,H,W,3) images with one kind at one severity (1..5); same shape and dtype."""
    images = validate_images(images, "corrupt")
    return _corrupt_checked(images, _check_kind(kind), _check_severity(severity), check_seed(seed))


def corrupt_dataset(images: np.ndarray, severities: Sequence[int] = SEVERITIES, kinds: Sequence[str] | None = None,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A mixed corrupted copy: each image gets one kind and severity, drawn at random (deterministic by seed).

    Returns (images, kind name per image, severity per image) so results can be broken down afterwards.
    """
    images = validate_images(images, "corrupt_dataset")
    kinds, severities, seed = _check_kinds(kinds), _check_severities(severities), check_seed(seed)
    rng = np.random.default_rng(seed)
    kind = np.asarray(kinds)[rng.integers(len(kinds), size=len(images))]
    severity = rng.choice(np.asarray(severities, dtype=np.int64), size=len(images))
    return _corrupt_each(images, kind, severity, seed), kind, severity


def _corrupt_each(images: np.ndarray, kind: np.ndarray, severity: np.ndarray, seed: int) -> np.ndarray:
    """Corrupt image i with kind[i] at severity[i]; images sharing a kind and severity are corrupted together."""
    out = np.empty_like(images)
    for name, level in sorted(set(zip(kind.tolist(), severity.tolist()))):
        rows = np.flatnonzero((kind == name) & (severity == level))
        out[rows] = _corrupt_checked(images[rows], name, level, seed)
    return out


def corruption_suite(images: np.ndarray, kinds: Sequence[str] | None = None,
                     severities: Sequence[int] = SEVERITIES,
                     seed: int = 0) -> Iterator[tuple[str, int, np.ndarray]]:
    """Yield (kind, severity, corrupted copy of all images) for every kind and severity.

    Arguments are checked at call time, not at the first `next()`, so a typo fails where it is made.
    """
    images = validate_images(images, "corruption_suite")
    kinds, severities, seed = _check_kinds(kinds), _check_severities(severities), check_seed(seed)

    def generate() -> Iterator[tuple[str, int, np.ndarray]]:
        for kind in kinds:
            for level in severities:
                yield kind, level, _corrupt_checked(images, kind, level, seed)

    return generate()


def family_of(kind: str) -> str:
    """The family (a key of `FAMILIES`) a corruption kind belongs to."""
    return _FAMILY_OF[_check_kind(kind)]


def _check_family_names(families: Sequence[str] | str, what: str) -> tuple[str, ...]:
    """Known family names, each once, in `FAMILIES` order (so any spelling of a set means one protocol)."""
    families = (families,) if isinstance(families, str) else tuple(families)
    for family in families:
        if family not in FAMILIES:
            raise DataError(f"{what}: unknown corruption family {family!r}; known: {', '.join(FAMILIES)}")
    return tuple(family for family in FAMILIES if family in families)


def check_families(train: Sequence[str] | None,
                   heldout: Sequence[str] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Checked (train, held-out) corruption families, each in `FAMILIES` order; None means the defaults.

    Training may use no family, but at least one family must be held out and none may be on both sides.
    """
    train = _check_family_names(DEFAULT_TRAIN_FAMILIES if train is None else train, "train_families")
    heldout = _check_family_names(DEFAULT_HELDOUT_FAMILIES if heldout is None else heldout, "heldout_families")
    if not heldout:
        unused = [family for family in FAMILIES if family not in train] or list(FAMILIES)
        raise DataError(f"heldout_families is empty; hold out at least one of: {', '.join(unused)}")
    shared = [family for family in train if family in heldout]
    if shared:
        raise DataError(f"corruption family {', '.join(map(repr, shared))} is in both train_families and "
                        "heldout_families; a held-out family must stay unseen in training")
    return train, heldout


@dataclass(frozen=True)
class ShiftedCopy:
    """A corrupted copy of some images, one row per (input image, family); its labels are `labels[source]`."""

    images: np.ndarray  # uint8 (len(input) * len(families), H, W, 3)
    source: np.ndarray  # int64: the input row each row was made from
    family: np.ndarray  # str
    kind: np.ndarray  # str
    severity: np.ndarray  # int64


def shifted_copy(images: np.ndarray, families: Sequence[str] | str, seed: int = 0,
                 severities: Sequence[int] = SEVERITIES) -> ShiftedCopy:
    """A validation copy under distribution shift: every image once per family, corrupted by one of its kinds.

    Within a family a seeded shuffle deals the images out evenly over the family's (kind, severity) pairs,
    so each pair gets len(images) / (kinds x severities) images, give or take one: the copy covers every kind
    of the families at every severity for only len(images) x len(families) images. Rows come family by
    family in `FAMILIES` order, each family's rows in input order; callers take the labels as
    `labels[copy.source]`. The same arguments give byte-identical output in any process.
    """
    images = validate_images(images, "shifted_copy")
    families = _check_family_names(families, "shifted_copy")
    if not families:
        raise DataError(f"shifted_copy: no corruption families given; known: {', '.join(FAMILIES)}")
    severities, seed = _check_severities(severities), check_seed(seed)
    parts = [_family_copy(images, family, severities, seed) for family in families]
    return ShiftedCopy(*(np.concatenate(column) for column in zip(*parts)))


def _family_copy(images: np.ndarray, family: str, severities: tuple[int, ...],
                 seed: int) -> tuple[np.ndarray, ...]:
    """One family's part of a `ShiftedCopy`, as its field values in order."""
    kinds = FAMILIES[family]
    rng = _stream(seed, f"family:{family}")
    pair = rng.permutation(np.resize(rng.permutation(len(kinds) * len(severities)), len(images)))
    kind = np.asarray(kinds)[pair // len(severities)]
    severity = np.asarray(severities, dtype=np.int64)[pair % len(severities)]
    return (_corrupt_each(images, kind, severity, seed), np.arange(len(images)), np.full(len(images), family),
            kind, severity)
