"""The 8 flip/rotation views (the dihedral group D4) used for test-time augmentation.

Blood cells have no canonical orientation, so every view is label-safe and their averaged prediction is
the cheapest robust ensemble there is.
"""

from __future__ import annotations

import numpy as np

from common.errors import DataError

VIEW_SETS: dict[int, tuple[int, ...]] = {1: (0,), 2: (0, 4), 4: (0, 1, 2, 3), 8: tuple(range(8))}


def view_indices(n_views: int) -> tuple[int, ...]:
    """Views 0-3 rotate by k*90 degrees, views 4-7 do the same after a horizontal flip."""
    if n_views not in VIEW_SETS:
        raise DataError(f"tta views must be one of {sorted(VIEW_SETS)}, got {n_views}")
    return VIEW_SETS[n_views]


def dihedral_index_maps(height: int, width: int) -> np.ndarray:
    """(V, H*W) int32: row v lists, for each output pixel, the input pixel of view v; row 0 is the identity.

    V = 8 (the views of `dihedral_view`, in its order) for square images, else 4 (identity, half turn,
    horizontal flip, vertical flip), which keep any shape.
    """
    grid = np.arange(height * width, dtype=np.int32).reshape(height, width)
    if height == width:
        views = [np.rot90(view, k) for view in (grid, grid[:, ::-1]) for k in range(4)]
    else:
        views = [grid, grid[::-1, ::-1], grid[:, ::-1], grid[::-1]]
    return np.stack([view.reshape(-1) for view in views])


def dihedral_view(images: np.ndarray, index: int) -> np.ndarray:
    """View `index` (0..7) of a (N,H,W,C) batch; view 0 is the identity."""
    if not 0 <= index < 8:
        raise DataError(f"dihedral view index must be 0..7, got {index}")
    views = images[:, :, ::-1] if index >= 4 else images
    return np.ascontiguousarray(np.rot90(views, index % 4, axes=(1, 2)))
