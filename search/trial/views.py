"""Class probabilities of a Keras model, per test-time-augmentation view."""

from __future__ import annotations

import numpy as np

from common.inference import dihedral_view, view_indices


def predict_views(model, images: np.ndarray, n_views: int = 8, batch_size: int = 512) -> np.ndarray:
    """Probabilities (V,N,C) for each of the first `n_views` dihedral views of uint8 (N,H,W,3) images."""
    views = []
    for index in view_indices(n_views):
        batch = dihedral_view(images, index).astype(np.float32)
        views.append(np.asarray(model.predict(batch, batch_size=batch_size, verbose=0), dtype=np.float32))
    return np.stack(views)
