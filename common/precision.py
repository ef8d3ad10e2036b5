"""The Keras dtype policy as a scope: set for a block of work, the caller's own policy back afterwards."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Build layers under the Keras dtype policy `name` inside the block, and restore the previous one after it.

    >>> import keras
    >>> with dtype_policy("mixed_bfloat16"):
    ...     keras.config.dtype_policy().name
    'mixed_bfloat16'
    >>> keras.config.dtype_policy().name
    'float32'
    """
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
