"""The inference runtime every layer shares: the dihedral TTA views, the members' ImageNet input preprocessing
and the input rule for images, each written once.

Imports at module level are the standard library, numpy and `common.errors` only; keras is imported inside the
functions that take tensors or build a layer. That keeps the module cheap for the data pipeline and lets
ensemble/export.py copy it, with common/errors.py, beside the submission's model.py, where cellsearch is not
installed.

Views: blood cells have no canonical orientation, so the 8 flips and quarter turns (the dihedral group D4) are
label-safe. View k (0..3) turns the image by k*90 degrees (numpy's rot90), view 4+k does the same after a
horizontal flip; view 0 is the identity. Every other form (index maps for gathers, tensors) is derived from
`dihedral_view`, so the order cannot drift between training, the search's TTA and the ensemble.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.errors import CellsearchError, ConfigError, DataError

#: TTA view subsets in dihedral order: the identity, plus the horizontal flip, the quarter turns, or all 8.
VIEW_SETS: dict[int, tuple[int, ...]] = {1: (0,), 2: (0, 4), 4: (0, 1, 2, 3), 8: tuple(range(8))}
#: Views that keep a non-square (H,W): identity, half turn, horizontal flip, vertical flip.
SHAPE_KEEPING_VIEWS = (0, 2, 4, 6)
#: ImageNet input statistics (keras.applications.imagenet_utils): RGB mean and std on the 0..1 scale, and the
#: caffe-style mean in BGR order on the 0..255 scale.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
PREPROCESSING_MODES = ("tf", "torch", "caffe", "unit")
#: The name the preprocessing layer is registered and saved under.
PREPROCESS_LAYER_NAME = "cellsearch>ImageNetPreprocess"
#: The name the shift gate (`shift_gate_layer_class`) is registered and saved under.
SHIFT_GATE_LAYER_NAME = "cellsearch>ShiftGate"


# ---------------------------------------------------------------------------------------------- views

def cpu_has_bfloat16() -> bool:
    """True on x86 CPUs with native bfloat16 dot products (AVX512_BF16 or AMX); Linux /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def view_indices(n_views: int) -> tuple[int, ...]:
    """The dihedral views averaged for `n_views` TTA views (1, 2, 4 or 8)."""
    if n_views not in VIEW_SETS:
        raise DataError(f"tta views must be one of {sorted(VIEW_SETS)}, got {n_views}")
    return VIEW_SETS[n_views]


def dihedral_view(images: np.ndarray, index: int) -> np.ndarray:
    """View `index` (0..7) of a (N,H,W,C) batch; odd views of non-square images come out (N,W,H,C)."""
    if not 0 <= index < 8:
        raise DataError(f"dihedral view index must be 0..7, got {index}")
    views = images[:, :, ::-1] if index >= 4 else images
    return np.ascontiguousarray(np.rot90(views, index % 4, axes=(1, 2)))


def dihedral_index_maps(height: int, width: int, views: Sequence[int] | None = None) -> np.ndarray:
    """(V, H*W) int32: row v lists, for each output pixel, the input pixel of the v-th of `views`.

    `views` defaults to all 8 for square images and to SHAPE_KEEPING_VIEWS otherwise (the views a batch of
    one shape can stack).
    """
    if views is None:
        views = range(8) if height == width else SHAPE_KEEPING_VIEWS
    views = tuple(int(v) for v in views)
    if height != width and any(v not in SHAPE_KEEPING_VIEWS for v in views):
        raise DataError(f"quarter-turn views need square images, got {height}x{width} for views {views}")
    grid = np.arange(height * width, dtype=np.int32).reshape(1, height, width, 1)
    return np.stack([dihedral_view(grid, v).reshape(-1) for v in views])


def stack_views(x, views: Sequence[int]):
    """(n,H,W,C) tensor -> (V*n,H,W,C): the `views` of every image, view-major, in one gather (keras.ops, any
    backend, traceable), so each member runs once on all views of a batch."""
    from keras import ops

    height, width, channels = (int(d) for d in x.shape[1:])
    maps = dihedral_index_maps(height, width, views)
    flat = ops.reshape(x, (-1, height * width, channels))
    gathered = ops.take(flat, ops.convert_to_tensor(maps.reshape(-1)), axis=1)
    gathered = ops.reshape(gathered, (-1, len(maps), height, width, channels))
    return ops.reshape(ops.transpose(gathered, (1, 0, 2, 3, 4)), (-1, height, width, channels))


# -------------------------------------------------------------------------------------- preprocessing

@functools.lru_cache(maxsize=None)
def preprocess_layer_class():
    """The members' input preprocessing layer, one class for the package and the Codabench copy
    (backbones.preprocessing registers it as PREPROCESS_LAYER_NAME).

    Modes (identical to `keras.applications.imagenet_utils.preprocess_input`, plus "unit"):
        tf     x / 127.5 - 1
        torch  (x / 255 - mean) / std, per RGB channel
        caffe  RGB -> BGR, then subtract the BGR mean (no scaling)
        unit   x / 255
    """
    import keras
    from keras import ops

    class ImageNetPreprocess(keras.layers.Layer):
        """Map raw 0..255 RGB images to what a family's ImageNet weights expect (see the modes above)."""

        def __init__(self, mode: str, **kwargs):
            super().__init__(**kwargs)
            if mode not in PREPROCESSING_MODES:
                raise ConfigError(f"unknown preprocessing mode {mode!r}; one of {PREPROCESSING_MODES}")
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

    return ImageNetPreprocess


# ----------------------------------------------------------------------------------------- shift gate

def image_statistics(images):
    """(N, 9) float32: per RGB channel the mean, the standard deviation and the mean absolute Laplacian of raw
    0..255 (N,H,W,3) images scaled to 0..1 (keras.ops, so arrays and traced tensors alike). Brightness,
    contrast and sharpness, the low-level statistics most shifts move; all three are the same for every
    dihedral view of an image, so the gate decides alike for each TTA view."""
    from keras import ops

    x = ops.cast(images, "float32") / 255.0
    centre = x[:, 1:-1, 1:-1]
    laplacian = 4.0 * centre - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return ops.concatenate([ops.mean(x, axis=(1, 2)), ops.std(x, axis=(1, 2)),
                            ops.mean(ops.abs(laplacian), axis=(1, 2))], axis=-1)


@functools.lru_cache(maxsize=None)
def shift_gate_layer_class():
    """The shift gate, one class for the package and the Codabench copy (backbones.preprocessing registers it
    as SHIFT_GATE_LAYER_NAME, beside the preprocessing layer).

    Called on (images, probabilities) it passes the probabilities through for images whose
    `image_statistics` lie within `threshold` (Mahalanobis distance from `location` under `precision`, fitted
    on clean training images) and returns the uniform distribution for the rest: a member it wraps then
    votes only on images like the ones it was trained on, and leaves the others to the ensemble.
    """
    import keras
    from keras import ops

    class ShiftGate(keras.layers.Layer):
        """Pass probabilities through for in-distribution images, uniform ones for the others."""

        def __init__(self, location, precision, threshold: float, **kwargs):
            kwargs.setdefault("dtype", "float32")
            super().__init__(**kwargs)
            self.location = [float(v) for v in location]
            self.precision = [[float(v) for v in row] for row in precision]
            self.threshold = float(threshold)

        def call(self, inputs):
            images, probs = inputs
            offset = image_statistics(images) - ops.convert_to_tensor(self.location, dtype="float32")
            squared = ops.sum(ops.matmul(offset, ops.convert_to_tensor(self.precision, dtype="float32")) * offset,
                              axis=-1, keepdims=True)
            inside = ops.cast(squared <= self.threshold ** 2, "float32")
            probs = ops.cast(probs, "float32")
            return inside * probs + (1.0 - inside) / probs.shape[-1]

        def compute_output_shape(self, input_shape):
            return input_shape[1]

        def get_config(self) -> dict:
            return {**super().get_config(), "location": self.location, "precision": self.precision,
                    "threshold": self.threshold}

    return ShiftGate


def custom_layers() -> dict:
    """The custom layers members may hold, by registered name (Keras `custom_objects` for safe_mode loading)."""
    return {PREPROCESS_LAYER_NAME: preprocess_layer_class(), SHIFT_GATE_LAYER_NAME: shift_gate_layer_class()}


# ---------------------------------------------------------------------------------------------- input

def check_images(images: Any, source: str = "images", error: type[CellsearchError] = DataError) -> np.ndarray:
    """`images` as a C-contiguous uint8 (N,H,W,3) array, or `error` naming the problem.

    Other numeric dtypes are accepted only when every value lies in 0..255 (rounded to uint8), so that floats
    scaled to 0..1 (a common mistake) are refused instead of silently turned black. The data pipeline raises
    DataError, the ensemble EnsembleError: the caller passes its own.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        hint = ("a single image? add a batch axis: images[None]" if images.shape[-1] == 3
                else "greyscale (N,H,W)? expected (N,H,W,3) RGB")
        raise error(f"{source}: expected images of shape (N,H,W,3), got rank 3 shape {images.shape} ({hint})")
    if images.ndim != 4:
        raise error(f"{source}: expected images of shape (N,H,W,3), got rank {images.ndim} shape {images.shape}")
    if images.shape[-1] != 3:
        raise error(f"{source}: expected 3 colour channels (RGB), got {images.shape[-1]} (shape {images.shape})")
    if images.shape[0] == 0:
        raise error(f"{source}: no images (N=0)")
    if min(images.shape[1:3]) < 1:
        raise error(f"{source}: empty image size {images.shape[1:3]}")
    if images.dtype != np.uint8:
        if images.dtype == bool or not np.issubdtype(images.dtype, np.number):
            raise error(f"{source}: images must be uint8, got dtype {images.dtype}")
        lo, hi = float(np.min(images)), float(np.max(images))
        if not np.isfinite([lo, hi]).all() or lo < 0 or hi > 255:
            raise error(f"{source}: {images.dtype} images must lie in 0..255 to become uint8, got {lo:g}..{hi:g}")
        if np.issubdtype(images.dtype, np.floating) and hi <= 1.0:
            raise error(f"{source}: float images lie in 0..1; scale them to 0..255 (uint8 expected)")
        images = np.rint(images).astype(np.uint8)
    return np.ascontiguousarray(images)
