"""`EnsembleClassifier`: the scikit-learn-style face of a built ensemble.

    from ensemble import load_ensemble
    clf = load_ensemble("runs/ensemble")        # verifies checksums, loads members with safe_mode on
    probs = clf.predict_proba(images)           # uint8 (N,H,W,3) -> (N, C), batched, TTA inside
    labels = clf.predict(images)                # int labels; clf.class_names[labels] for names

Inputs follow `standalone.prepare_images`: uint8 RGB (N,H,W,3); another size is resized to the members'
input size (antialiased bicubic) unless `resize=False`, which refuses it instead.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from ensemble.standalone import VIEW_SETS, EnsembleError, TTARunner, prepare_images


class EnsembleClassifier(ClassifierMixin, BaseEstimator):
    """Members (Keras models taking raw 0..255 RGB) x TTA views -> a fitted combiner -> probabilities.

    Args:
        models: the member Keras models, all with the same input shape.
        combiner: a fitted `ensemble.combiners` estimator taking (N, M, C) member probabilities.
        class_names: one name per class, in label order.
        tta_views: 1, 2, 4 or 8 dihedral views averaged per member before combining.
        batch_size: images per compiled forward call (None: about 2048 views of 28x28 per call).
        resize: resize images of another size (True) or refuse them (False).
        precision: "float32", or "bfloat16" on CPUs with native bfloat16 (else float32 is used; the one in
            effect is `precision_`).
    """

    def __init__(self, models: Sequence, combiner, class_names: Sequence[str], tta_views: int = 8,
                 batch_size: int | None = None, resize: bool = True, precision: str = "float32"):
        self.models = models
        self.combiner = combiner
        self.class_names = class_names
        self.tta_views = tta_views
        self.batch_size = batch_size
        self.resize = resize
        self.precision = precision
        if tta_views not in VIEW_SETS:
            raise EnsembleError(f"tta_views must be one of {sorted(VIEW_SETS)}, got {tta_views}")
        self.classes_ = np.arange(len(class_names))
        self._runner = TTARunner(models, VIEW_SETS[tta_views], batch_size, precision)
        self.precision_ = self._runner.precision
        self.manifest: dict[str, Any] | None = None  # set by load_ensemble

    @property
    def input_size(self) -> tuple[int, int]:
        return self._runner.input_shape[:2]

    @property
    def n_members(self) -> int:
        return len(self.models)

    def _progress(self, total: int, progress: bool):
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="img", disable=not progress, desc="predict")

    def view_member_proba(self, images, progress: bool = False) -> np.ndarray:
        """(V, N, M, C): every member's probabilities on every TTA view (for diagnostics and tests)."""
        images = prepare_images(images, self.input_size, self.resize)
        parts = []
        with self._progress(len(images), progress) as bar:
            for _, probs in self._runner.batches(images):
                parts.append(probs)
                bar.update(probs.shape[1])
        return np.concatenate(parts, axis=1)

    def member_proba(self, images, progress: bool = False) -> np.ndarray:
        """(N, M, C): each member's TTA-averaged probabilities (what the combiner consumes)."""
        images = prepare_images(images, self.input_size, self.resize)
        out = None
        with self._progress(len(images), progress) as bar:
            for start, probs in self._runner.batches(images):
                if out is None:
                    out = np.empty((len(images),) + probs.shape[2:], dtype=np.float32)
                out[start:start + probs.shape[1]] = probs.mean(axis=0)
                bar.update(probs.shape[1])
        return out

    def predict_proba(self, images, progress: bool = False) -> np.ndarray:
        """(N, C) ensemble probabilities of uint8 (N,H,W,3) images."""
        return np.asarray(self.combiner.predict_proba(self.member_proba(images, progress)), dtype=np.float32)

    def predict(self, images, progress: bool = False) -> np.ndarray:
        return self.predict_proba(images, progress).argmax(axis=1)

    def __sklearn_is_fitted__(self) -> bool:
        return True
