"""The classification head shared by every backbone.

GAP -> BatchNorm -> Dropout -> [Dense(units, relu) -> Dropout]* -> Dense(classes) -> softmax.
BatchNorm after pooling re-centres features of a frozen pretrained backbone (whose statistics were set
on ImageNet, not on blood cells), which lets the head-only stage train at a high learning rate. The last
Dense and the softmax run in float32 so that, under mixed_float16, probabilities (and the loss computed
from them) are float32: float16 softmax saturates and sums of 8 probabilities drift from 1.
"""

from __future__ import annotations

from typing import Sequence

from keras import layers

from common.errors import BackboneError


def head_units_tuple(head_units: int | Sequence[int] | None) -> tuple[int, ...]:
    """Normalise `head_units`: 0/None -> no hidden layer, an int -> one, a sequence -> one per entry."""
    if head_units is None or head_units == 0:
        return ()
    units = (head_units,) if isinstance(head_units, int) else tuple(int(u) for u in head_units)
    if any(u < 0 for u in units):
        raise BackboneError(f"head_units must be >= 0, got {head_units!r}")
    return tuple(u for u in units if u > 0)


def build_head(features, num_classes: int, *, dropout: float = 0.2,
               head_units: int | Sequence[int] | None = 0, batchnorm: bool = True):
    """Apply the head to a 4-D feature map (KerasTensor) and return the (N, num_classes) probabilities."""
    if num_classes < 2:
        raise BackboneError(f"num_classes must be >= 2, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise BackboneError(f"dropout must be in [0, 1), got {dropout}")
    x = layers.GlobalAveragePooling2D(name="head_pool")(features)
    if batchnorm:
        x = layers.BatchNormalization(name="head_bn")(x)
    if dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    for i, units in enumerate(head_units_tuple(head_units), start=1):
        x = layers.Dense(units, activation="relu", kernel_initializer="he_normal", name=f"head_dense{i}")(x)
        if dropout:
            x = layers.Dropout(dropout, name=f"head_dropout{i}")(x)
    x = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return layers.Activation("softmax", dtype="float32", name="probs")(x)

