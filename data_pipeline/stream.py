"""tf.data streams that feed Keras models: shuffled, batched, augmented per batch, deterministic by seed.

Design choices, and why:
- The arrays stay in memory as tensors and each batch is a `tf.gather` of shuffled indices: the shuffle
  buffer holds int64 indices instead of a second copy of every image, and gathering a batch at once is
  about twice as fast as slicing element by element then batching.
- Images stay raw 0..255 (float32 from the batch on): models do their own input scaling.
- Augmentation runs on whole batches (vectorised Keras layers), in a parallel `map` with
  `deterministic=True`, then `prefetch`.
- Determinism: each batch carries a key from `tf.data.Dataset.random(seed, rerandomize_each_iteration=True)`
  and the augmenter draws all its randomness statelessly from that key. Two streams built with the same
  seed therefore give identical batches, epoch after epoch (each new pass over the data set gets new,
  still reproducible keys and a new, reproducible shuffle); different seeds differ.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from data_pipeline.augment import Augmenter
from data_pipeline.dataset import validate_images, validate_labels
from data_pipeline.errors import DataError

AUTOTUNE = tf.data.AUTOTUNE


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


def _deterministic(dataset: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    return dataset.with_options(options)


def _augment_fn(augmenter: Callable[..., Any], has_weights: bool) -> Callable[..., Any]:
    """The map function: augmenter on (images, labels) with the batch key; weights pass through unchanged."""
    keyed = isinstance(augmenter, Augmenter)

    @tf.autograph.experimental.do_not_convert
    def apply(batch: tuple[tf.Tensor, ...], key: tf.Tensor) -> tuple[tf.Tensor, ...]:
        images, labels = batch[0], batch[1]
        images, labels = augmenter(images, labels, seed=key) if keyed else augmenter(images, labels)
        return (images, labels, batch[2]) if has_weights else (images, labels)

    return apply


def steps_per_epoch(n: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Batches in one pass over `n` examples (what `fit(steps_per_epoch=...)` needs with repeat=True)."""
    return n // batch_size if drop_remainder else math.ceil(n / batch_size)


def make_stream(images: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int, *,
                augmenter: Callable[..., Any] | None = None, shuffle: bool = True, seed: int = 0,
                cache: bool = True, repeat: bool = False, drop_remainder: bool = False,
                sample_weights: np.ndarray | None = None) -> tf.data.Dataset:
    """Batches `(images float32 (B,H,W,3) in 0..255, one-hot float32 (B,C)[, weights float32 (B,)])`.

    `augmenter`: an `Augmenter` (deterministic, keyed per batch) or any `(images, labels) -> (images,
    labels)` callable (then determinism is its own business). Sample weights are not mixed by
    CutMix/MixUp: a mixed image keeps the weight of the image it was pasted onto.
    `cache`: with `shuffle=False` every pass yields the same raw batches, so they are gathered once and
    kept (as uint8); with `shuffle=True` there is nothing pass-invariant to keep (the arrays are already
    in memory) and the flag has no effect.
    `repeat`: loop forever (reshuffling each pass; shuffled batches may straddle two passes, unshuffled
    ones do not); use `steps_per_epoch()` to size an epoch.
    """
    images = validate_images(images, "stream images")
    num_classes = _check_int(num_classes, "num_classes", 2)
    labels = validate_labels(labels, len(images), num_classes, "stream labels")
    batch_size = _check_int(batch_size, "batch_size", 1)
    seed = _check_int(seed, "seed", 0)
    _check_augmenter(augmenter, num_classes)
    arrays = [tf.constant(images), tf.one_hot(labels, num_classes, dtype=tf.float32)]
    if sample_weights is not None:
        arrays.append(tf.constant(_check_sample_weights(sample_weights, len(images))))

    indices = tf.data.Dataset.range(len(images))
    if shuffle:
        indices = indices.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        indices = indices.repeat() if repeat else indices
    batches = indices.batch(batch_size, drop_remainder=drop_remainder)
    batches = batches.map(lambda idx: tuple(tf.gather(a, idx) for a in arrays),
                          num_parallel_calls=AUTOTUNE, deterministic=True)
    if not shuffle:  # identical raw batches every pass: keep them, then loop over them
        batches = batches.cache() if cache else batches
        batches = batches.repeat() if repeat else batches
    batches = batches.map(lambda images, *rest: (tf.cast(images, tf.float32), *rest),
                          num_parallel_calls=AUTOTUNE, deterministic=True)
    if augmenter is not None:
        keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        batches = tf.data.Dataset.zip(batches, keys).map(
            _augment_fn(augmenter, sample_weights is not None), num_parallel_calls=AUTOTUNE, deterministic=True)
    return _deterministic(batches.prefetch(AUTOTUNE))


def make_eval_stream(images: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Batches of images only, float32 0..255, in the input order: for `model.predict`."""
    images = validate_images(images, "eval images")
    batch_size = _check_int(batch_size, "batch_size", 1)
    stored = tf.constant(images)
    batches = tf.data.Dataset.range(len(images)).batch(batch_size).map(
        lambda idx: tf.cast(tf.gather(stored, idx), tf.float32), num_parallel_calls=AUTOTUNE, deterministic=True)
    return _deterministic(batches.prefetch(AUTOTUNE))
