"""Unfreeze depth: which top fraction of a backbone's *blocks* trains during fine-tuning.

`set_unfreeze(model, fraction)` makes the top `ceil(fraction * n_blocks)` blocks trainable (blocks from
`spec.block_grouping`, stem = block 0 at the bottom), the rest frozen, and the head always trainable.
BatchNormalization layers stay frozen while fine-tuning pretrained weights: a Keras 3 BatchNorm with
trainable=False also runs in inference mode, so small, augmented blood-cell batches cannot overwrite the
ImageNet statistics the pretrained weights depend on. Models trained from scratch keep BatchNorm
trainable (their statistics must be learnt), which is the default when no weights were loaded.

Keras 3 and trainability: `compile()` fixes the trainable variables the train step updates and the
optimizer builds its slots for them, so a change of `trainable` takes effect only after a new
`model.compile(...)` with a fresh optimizer. That is why gradual unfreezing here is a schedule of
stages for the trainer to run as separate fit() calls, not a callback that flips flags mid-fit (which
would silently do nothing until the next compile):

    for stage in gradual_unfreeze_stages(epochs=9, final_fraction=0.6, steps=3, head_epochs=2):
        set_unfreeze(model, stage.fraction)
        model.compile(optimizer=make_optimizer(lr if stage.name == "head" else finetune_lr), ...)
        model.fit(train, validation_data=val, initial_epoch=stage.start_epoch, epochs=stage.end_epoch)

This is the one schedule: the search's trainer runs it with steps=1 (head, then one fine-tuning stage) or, for
a trial with `gradual_unfreeze`, steps=3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras

from backbones.blocks import Block
from backbones.layout import PRETRAINED_ATTR, backbone_spec_of, get_backbone_model
from common.errors import BackboneError


@dataclass(frozen=True)
class UnfreezeResult:
    """What `set_unfreeze` did, for logging: block counts and the names of the trainable blocks."""

    n_blocks: int
    n_unfrozen: int
    unfrozen: tuple[str, ...]
    batchnorm_frozen: bool


def backbone_blocks(model: keras.Model, backbone: str | None = None) -> list[Block]:
    """The backbone's blocks, stem first, for a classifier (or bare backbone) of registry `backbone`."""
    spec = backbone_spec_of(model, backbone)
    return spec.block_grouping(get_backbone_model(model))


def blocks_to_unfreeze(fraction: float, n_blocks: int) -> int:
    """ceil(fraction * n_blocks): 0 -> none, any positive fraction -> at least one block, 1 -> all."""
    if not 0.0 <= fraction <= 1.0:
        raise BackboneError(f"unfreeze fraction must be in [0, 1], got {fraction}")
    return min(n_blocks, math.ceil(fraction * n_blocks - 1e-9))


def _walk(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """`layer` and every layer nested in it (ConvNeXt nests Sequential stems, for instance)."""
    return layer._flatten_layers(include_self=True, recursive=True)


def _set_trainable(layer: keras.layers.Layer, value: bool) -> None:
    """Set `trainable` on `layer` and everything nested in it, even where the flag already matches.

    `layer.trainable = True` is a no-op when `layer.trainable` is already True: TensorFlow's
    AutoTrackable.__setattr__ short-circuits `self.x = value` when `self.x is value`, so the setter does
    not run and does not propagate to sublayers frozen individually earlier (e.g. by a previous
    set_unfreeze). Calling the property setter on every nested layer avoids that trap.
    """
    setter = keras.layers.Layer.trainable.fset
    for sub in _walk(layer):
        setter(sub, value)


def set_unfreeze(model: keras.Model, fraction: float, *, freeze_batchnorm: bool | None = None,
                 backbone: str | None = None) -> UnfreezeResult:
    """Make the top `fraction` of backbone blocks trainable, the rest frozen; the head stays trainable.

    Args:
        model: a classifier from `build_classifier` (after save/load too: the spec is found by name).
        fraction: in [0, 1]; 0 trains the head only, 1 the whole backbone (see BatchNorm below).
        freeze_batchnorm: keep BatchNormalization layers frozen (and in inference mode). None: True
            when the backbone started from loaded weights (or, for a reloaded model, when its family is
            pretrained), False for a backbone trained from scratch.
        backbone: registry name, if the model's name is not one (custom `model_name`).

    Recompile the model afterwards (see the module docstring).
    """
    spec = backbone_spec_of(model, backbone)
    backbone_model = get_backbone_model(model)
    blocks = spec.block_grouping(backbone_model)
    k = blocks_to_unfreeze(fraction, len(blocks))
    if freeze_batchnorm is None:
        freeze_batchnorm = bool(getattr(model, PRETRAINED_ATTR, spec.pretrained))

    _set_trainable(model, True)  # head (and weight-free preprocessing) always trains
    if k == 0:
        _set_trainable(backbone_model, False)
        return UnfreezeResult(len(blocks), 0, (), True)
    for i, block in enumerate(blocks):
        for layer in block.layers:
            _set_trainable(layer, i >= len(blocks) - k)
    if freeze_batchnorm:
        for layer in _walk(backbone_model):
            if isinstance(layer, keras.layers.BatchNormalization):
                _set_trainable(layer, False)
    return UnfreezeResult(len(blocks), k, tuple(b.name for b in blocks[len(blocks) - k:]), freeze_batchnorm)


@dataclass(frozen=True)
class UnfreezeStage:
    """Train epochs [start_epoch, end_epoch) with the top `fraction` of blocks trainable.

    `name`: "head" (backbone frozen), "finetune" (the only fine-tuning stage) or "finetune_<i>" (i-th of several).
    """

    start_epoch: int
    end_epoch: int
    fraction: float
    name: str = "finetune"

    @property
    def epochs(self) -> int:
        return self.end_epoch - self.start_epoch


def gradual_unfreeze_stages(epochs: int, final_fraction: float = 1.0, steps: int = 3,
                            head_epochs: int = 0) -> list[UnfreezeStage]:
    """Split training into `head_epochs` of head-only training, then `steps` fine-tuning stages.

    The fine-tuning stages unfreeze `final_fraction * i / steps` for i = 1..steps and share `epochs` as
    evenly as possible (earlier stages get the remainder). Each stage is one compile()+fit() for the
    trainer; see the module docstring.

    >>> [(s.name, s.start_epoch, s.end_epoch, s.fraction) for s in gradual_unfreeze_stages(4, 0.5, 2, 1)]
    [('head', 0, 1, 0.0), ('finetune_1', 1, 3, 0.25), ('finetune_2', 3, 5, 0.5)]
    """
    if epochs < 0 or head_epochs < 0 or steps < 1:
        raise BackboneError("epochs and head_epochs must be >= 0 and steps >= 1")
    if not 0.0 <= final_fraction <= 1.0:
        raise BackboneError(f"final_fraction must be in [0, 1], got {final_fraction}")
    stages = [UnfreezeStage(0, head_epochs, 0.0, "head")] if head_epochs else []
    start = head_epochs
    steps = min(steps, epochs) or 1
    for i in range(steps):
        n = epochs // steps + (i < epochs % steps)
        if n:
            name = f"finetune_{i + 1}" if steps > 1 else "finetune"
            stages.append(UnfreezeStage(start, start + n, final_fraction * (i + 1) / steps, name))
        start += n
    return stages
