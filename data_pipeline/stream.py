"""Batch streams that feed Keras models under any backend: shuffled, batched, augmented per batch,
deterministic by seed.

Design choices, and why:
- A `keras.utils.PyDataset` over in-memory numpy arrays, not tf.data: `fit` takes it under JAX, TensorFlow
  and PyTorch alike, and the input pipeline needs no TensorFlow. Each batch is one fancy-index gather of
  shuffled rows (uint8, converted to float32 per batch).
- Images stay raw 0..255 (float32 from the batch on): models do their own input scaling.
- Augmentation runs on whole batches in the augmenter's compiled function (`data_pipeline.augment`);
  `workers` > 1 prepares batches in threads while the model trains on the previous ones.
- Determinism: batch b of pass p is augmented with the key (seed, p * batches_per_pass + b) and pass p is
  shuffled by a generator seeded with (seed, p). Two streams built with the same seed therefore give
  identical batches, pass after pass (each new pass gets a new, reproducible shuffle and new keys);
  different seeds differ. Batches never straddle two passes.
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import Any, Callable, Iterator

import keras
import numpy as np

from data_pipeline.augment import Augmenter
from data_pipeline.dataset import check_seed, validate_images, validate_labels
from common.errors import DataError


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_sample_weights(weights: Any, n: int) -> np.ndarray:
    weights = np.asarray(weights)
    if weights.shape != (n,):
        raise DataError(f"sample_weights: expected shape ({n},), got {weights.shape}")
    if not np.issubdtype(weights.dtype, np.number) or np.issubdtype(weights.dtype, np.complexfloating):
        raise DataError(f"sample_weights: must be real numbers, got dtype {weights.dtype}")
    weights = weights.astype(np.float32)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise DataError("sample_weights: must be finite and >= 0")
    return weights


def _check_augmenter(augmenter: Any, num_classes: int) -> None:
    if augmenter is None:
        return
    if not callable(augmenter):
        raise DataError(f"augmenter must be callable (images, labels) -> (images, labels), got {augmenter!r}")
    if isinstance(augmenter, Augmenter) and augmenter.num_classes != num_classes:
        raise DataError(f"augmenter was built for {augmenter.num_classes} classes, stream has {num_classes}")


AUTO_WORKERS = "auto"


def auto_workers() -> int:
    """Threads preparing batches when `make_stream(workers="auto")`: two under TensorFlow, where Keras then queues
    them itself instead of through tf.data's autotuned prefetch, whose iterator took 9-23 s to shut down at the end
    of a fit on a busy CPU (epochs no slower; docs/benchmarks.md); one elsewhere: under JAX, Keras's queue prepares
    a pass it never trains on, so a threaded stream would feed other batches than the seed gives with one."""
    return 2 if keras.backend.backend() == "tensorflow" else 1


def _check_workers(workers: Any) -> int:
    if workers == AUTO_WORKERS:
        return auto_workers()
    if isinstance(workers, str):
        raise DataError(f"workers must be an integer >= 1 or {AUTO_WORKERS!r}, got {workers!r}")
    return _check_int(workers, "workers", 1)


def steps_per_epoch(n: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Batches in one pass over `n` examples (what `fit(steps_per_epoch=...)` needs with repeat=True)."""
    return n // batch_size if drop_remainder else math.ceil(n / batch_size)


class BatchStream(keras.utils.PyDataset):
    """Batches of `images` (and one-hot `labels`, `weights` when given) for `fit` / `predict`; see
    `make_stream`. Iterating it yields one pass and moves on to the next, as `fit`'s epochs do."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, batch_size: int, *,
                 augmenter: Callable[..., Any] | None = None, shuffle: bool = True, seed: int = 0,
                 repeat: bool = False, drop_remainder: bool = False, weights: np.ndarray | None = None,
                 workers: int = 1) -> None:
        super().__init__(workers=workers, use_multiprocessing=False)
        self.images, self.labels, self.weights = images, labels, weights
        self.batch_size, self.augmenter, self.shuffle, self.seed = batch_size, augmenter, shuffle, seed
        self.repeat, self.drop_remainder = repeat, drop_remainder
        self.steps = steps_per_epoch(len(images), batch_size, drop_remainder)
        self.epoch = 0
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def num_batches(self) -> int | None:
        return None if self.repeat else self.steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> Any:
        step = index if self.repeat else self.epoch * self.steps + index
        epoch, batch = divmod(step, self.steps)
        rows = self._rows(epoch)[batch * self.batch_size:(batch + 1) * self.batch_size]
        images = self.images[rows].astype(np.float32)
        if self.labels is None:
            return images
        labels = self.labels[rows]
        if self.augmenter is not None:
            keyed = isinstance(self.augmenter, Augmenter)
            images, labels = self.augmenter(images, labels, seed=(self.seed, step)) if keyed else \
                self.augmenter(images, labels)
        return (images, labels) if self.weights is None else (images, labels, self.weights[rows])

    def __iter__(self) -> Iterator[Any]:
        for index in range(self.num_batches) if self.num_batches is not None else itertools.count():
            yield self[index]
        self.on_epoch_end()

    def on_epoch_end(self) -> None:
        self.epoch += 1

    def _rows(self, epoch: int) -> np.ndarray:
        """The row order of pass `epoch` (the same for every pass when not shuffling)."""
        if not self.shuffle:
            return np.arange(len(self.images))
        order = self._order  # read once: worker threads may replace it
        if order is None or order[0] != epoch:
            order = self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.images)))
        return order[1]


def make_stream(images: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int, *,
                augmenter: Callable[..., Any] | None = None, shuffle: bool = True, seed: int = 0,
                cache: bool = True, repeat: bool = False, drop_remainder: bool = False,
                sample_weights: np.ndarray | None = None, workers: int | str = AUTO_WORKERS) -> BatchStream:
    """Batches `(images float32 (B,H,W,3) in 0..255, one-hot float32 (B,C)[, weights float32 (B,)])`.

    `augmenter`: an `Augmenter` (deterministic, keyed per batch) or any `(images, labels) -> (images,
    labels)` callable (then determinism is its own business). Sample weights are not mixed by
    CutMix/MixUp: a mixed image keeps the weight of the image it was pasted onto.
    `cache`: accepted for compatibility; the arrays are in memory and gathered per batch either way.
    `repeat`: loop forever (reshuffling each pass); use `steps_per_epoch()` to size an epoch.
    `workers`: threads preparing batches ahead of the model (1: batches are made when asked for; "auto":
    `auto_workers()`, the count under which `fit` ends on time and trains on the seed's batches).
    """
    images = validate_images(images, "stream images")
    num_classes = _check_int(num_classes, "num_classes", 2)
    labels = validate_labels(labels, len(images), num_classes, "stream labels")
    batch_size = _check_int(batch_size, "batch_size", 1)
    seed = check_seed(seed)
    workers = _check_workers(workers)
    _check_augmenter(augmenter, num_classes)
    weights = None if sample_weights is None else _check_sample_weights(sample_weights, len(images))
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    return BatchStream(images, one_hot, batch_size, augmenter=augmenter, shuffle=shuffle, seed=seed, repeat=repeat,
                       drop_remainder=drop_remainder, weights=weights, workers=workers)


def make_eval_stream(images: np.ndarray, batch_size: int) -> BatchStream:
    """Batches of images only, float32 0..255, in the input order: for `model.predict`."""
    images = validate_images(images, "eval images")
    batch_size = _check_int(batch_size, "batch_size", 1)
    return BatchStream(images, None, batch_size, shuffle=False)
