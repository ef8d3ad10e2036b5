"""Group a backbone's layers into blocks, so unfreeze depth means the same thing for every family.

Counting layers would make "unfreeze the top 30%" mean wildly different things (DenseNet has 427 layers,
ConvNeXt-Tiny 133, and a ResNet block has ten layers where a ConvNeXt block has seven). Counting the
architecture's own repeated blocks does not. Each family names its block layers with a recognisable
prefix; `prefix_grouping` turns a "layer name -> block key" function into a grouping:

- a layer whose name yields a key joins that block (blocks are ordered by first appearance);
- a layer yielding None joins the block currently open: the stem (block 0) before the first block,
  otherwise the block before it (transition layers such as DenseNet's `pool2_*`, auto-named activations
  such as MobileNetV3's `re_lu_3`, and trailing layers such as EfficientNet's `top_conv`);
- a group without weights is folded into the next one, so every block has something to train.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import keras

STEM = "stem"

BlockKey = Callable[[str], "str | None"]


@dataclass(frozen=True)
class Block:
    """One unit of unfreezing: a name and the backbone's top-level layers in it."""

    name: str
    layers: tuple["keras.layers.Layer", ...]


def prefix_grouping(block_key: BlockKey) -> Callable[["keras.Model"], list[Block]]:
    """A grouping function that assigns layers to blocks by `block_key(layer.name)`."""

    def group(backbone: "keras.Model") -> list[Block]:
        order: list[str] = [STEM]
        members: dict[str, list] = {STEM: []}
        current = STEM
        for layer in backbone.layers:
            key = block_key(layer.name)
            if key is not None:
                if key not in members:
                    order.append(key)
                    members[key] = []
                current = key
            members[current].append(layer)
        return _merge_weightless([(name, members[name]) for name in order])

    return group


def _merge_weightless(groups: list[tuple[str, list]]) -> list[Block]:
    """Fold groups without weights into the next group (the last one into the previous group).

    A "block" that trains nothing would make fractions uneven: e.g. a stem holding only the InputLayer
    (models whose first conv already belongs to stage 1) or a weight-free trailing pooling layer.
    """
    merged: list[tuple[str, list]] = []
    pending: list = []
    for name, layers in groups:
        pending = pending + layers
        if any(layer.weights for layer in pending):
            merged.append((name, pending))
            pending = []
    if pending:
        if merged:
            merged[-1] = (merged[-1][0], merged[-1][1] + pending)
        else:
            merged.append((STEM, pending))
    return [Block(name, tuple(layers)) for name, layers in merged]


def _regex_key(pattern: str, fmt: Callable[[re.Match], str] | None = None) -> BlockKey:
    compiled = re.compile(pattern)

    def key(name: str) -> str | None:
        match = compiled.search(name)
        if match is None:
            return None
        return fmt(match) if fmt else match.group(1)

    return key


#: EfficientNet v1/v2: `block1a_dwconv`, `block6h_add`; stem_* before, top_* after (joins the last block).
efficientnet_key = _regex_key(r"^(block\d+[a-z]+)_")

#: ResNet and DenseNet: `conv2_block1_1_conv`; conv1/pool1 form the stem; DenseNet's `pool2_*`
#: transition layers and final `bn`/`relu` join the block before them.
resnet_key = _regex_key(r"^(conv\d+_block\d+)_")

#: MobileNetV3: the first inverted-residual block is `expanded_conv_*` (no number), later ones
#: `expanded_conv_3_*`; auto-named activations between them join the open block.
mobilenet_v3_key = _regex_key(r"^expanded_conv_(?:(\d+)_)?", lambda m: f"expanded_conv_{m.group(1) or 0}")


def _convnext_key(name: str) -> str | None:
    """ConvNeXt: `convnext_tiny_stage_2_block_5_*`; `downsampling_block_i` opens stage i+1.

    The downsampling layer (LayerNorm + strided conv) precedes stage i+1 and changes its width, so it is
    grouped with that stage's first block rather than with the previous stage's last one.
    """
    match = re.search(r"_stage_(\d+)_block_(\d+)_", name)
    if match:
        return f"stage{match.group(1)}_block{match.group(2)}"
    match = re.search(r"_downsampling_block_(\d+)$", name)
    if match:
        return f"stage{int(match.group(1)) + 1}_block0"
    return None


convnext_key: BlockKey = _convnext_key

#: The from-scratch models in `backbones.scratch` name their layers `stage2_block1_conv1` etc.
scratch_key = _regex_key(r"^(stage\d+_block\d+)_")

efficientnet_blocks = prefix_grouping(efficientnet_key)
resnet_blocks = prefix_grouping(resnet_key)
mobilenet_v3_blocks = prefix_grouping(mobilenet_v3_key)
convnext_blocks = prefix_grouping(convnext_key)
scratch_blocks = prefix_grouping(scratch_key)
