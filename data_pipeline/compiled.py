"""The one backend switch of the input pipeline: a Python function of tensors, compiled for the backend.

Augmentation must run as a compiled program on the whole batch (on the accelerator when there is one), and
Keras 3 has no public "compile this function" call, so this is the only place that names a backend:
`jax.jit` under JAX, `tf.function` under TensorFlow (the module's only TensorFlow import), and eager kernels
under PyTorch, where `torch.compile` would cost more to compile than a per-batch function saves.
"""

from __future__ import annotations

from typing import Callable

import keras


def compile_function(fn: Callable) -> Callable:
    """`fn` compiled for the current Keras backend; traced again only for new input shapes or dtypes."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, autograph=False)  # one trace per input shape: the ops need static image sizes
    return fn
