"""One registry of backbones by name, in the style of timm's model registry.

Every entry is a `BackboneSpec`: everything the rest of the package needs to know about a backbone is
declared once, here, instead of being re-derived (and re-derived differently) by the trainer, the search
space and the tests: how to build it, which input preprocessing its weights expect, the smallest input it
accepts, whether ImageNet weights exist, and how its layers group into blocks for unfreezing.

Entries register themselves when `backbones.keras_apps` and `backbones.scratch` are imported, which
`backbones/__init__.py` does, so `get_backbone` always sees the full table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

from common.errors import BackboneError, UnknownBackboneError

if TYPE_CHECKING:  # keras is heavy; only type checkers need it here
    import keras

    from backbones.blocks import Block

#: Preprocessing modes, i.e. what the backbone's first layer expects, given raw 0..255 RGB input.
#: "builtin:<mode>" means the Keras constructor already contains it (nothing is added outside).
#:   tf      x / 127.5 - 1                       (range -1..1)
#:   torch   (x / 255 - mean) / std, ImageNet RGB mean/std
#:   caffe   RGB -> BGR, then x - ImageNet BGR mean (0..255 scale, no std division)
#:   unit    x / 255                              (range 0..1)
PREPROCESSING_MODES = ("tf", "torch", "caffe", "unit")


@dataclass(frozen=True)
class BackboneSpec:
    """Declarative description of one backbone.

    Attributes:
        name: registry key, e.g. "efficientnet_b0".
        family: architecture family ("efficientnet", "convnext", "resnet", ...); block grouping and
            weight quirks are per family.
        constructor: `constructor(input_shape, weights, **kwargs) -> keras.Model` returning the
            feature extractor (a 4-D feature map, no pooling, no classifier). `weights` is "imagenet" or
            None; local weight files are loaded afterwards by `backbones.weights`.
        preprocessing: one of `PREPROCESSING_MODES`, optionally prefixed "builtin:" when the
            constructor already includes it. The classifier always takes raw 0..255 RGB.
        min_input_size: smallest spatial size the backbone accepts; smaller images are resized up to it
            inside the model (Keras applications refuse inputs below 32x32).
        pretrained: True when ImageNet weights exist (such backbones train in two stages).
        block_grouping: maps the built backbone model to its ordered list of `Block`s, stem first;
            `set_unfreeze` counts fractions in these blocks, so 0.5 means "top half" for every family.
        lr: learning-rate hint for training from scratch or for the head-only stage.
        finetune_lr: learning-rate hint for fine-tuning unfrozen pretrained blocks.
        defaults: constructor keyword defaults (e.g. widths/depth of the scratch models); callers may
            override them through `build_classifier(..., backbone_kwargs=...)`.
        default_input_size: resolution at which the backbone is meant to work well; a hint only.
        heavy: slow to build or train on a CPU (tests mark these slow; search spaces may skip them).
        description: one line for listings.
    """

    name: str
    family: str
    constructor: Callable[..., "keras.Model"]
    preprocessing: str
    min_input_size: int
    pretrained: bool
    block_grouping: Callable[["keras.Model"], list["Block"]]
    lr: float = 1e-3
    finetune_lr: float = 1e-4
    defaults: Mapping[str, Any] = field(default_factory=dict)
    default_input_size: int = 224
    heavy: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        mode = self.preprocessing.removeprefix("builtin:")
        if mode not in PREPROCESSING_MODES:
            raise BackboneError(f"{self.name}: preprocessing {self.preprocessing!r} not in {PREPROCESSING_MODES}")
        if self.min_input_size < 1:
            raise BackboneError(f"{self.name}: min_input_size must be positive")
        # A read-only view keeps the frozen dataclass actually immutable (and safely shareable).
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    @property
    def builtin_preprocessing(self) -> bool:
        """True when the Keras constructor already contains the preprocessing layers."""
        return self.preprocessing.startswith("builtin:")

    @property
    def preprocessing_mode(self) -> str:
        """The preprocessing mode without the "builtin:" prefix."""
        return self.preprocessing.removeprefix("builtin:")


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec, *, overwrite: bool = False) -> BackboneSpec:
    """Add `spec` to the registry and return it; re-registering a name needs `overwrite=True`."""
    if spec.name in _REGISTRY and not overwrite:
        raise BackboneError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_backbone(name: str) -> BackboneSpec:
    """The spec registered under `name`; raises `UnknownBackboneError` listing the valid names."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownBackboneError(name, list_backbones()) from None


def list_backbones(*, pretrained: bool | None = None, family: str | None = None,
                   include_heavy: bool = True) -> list[str]:
    """Registered names, sorted; optionally only (non-)pretrained ones, one family, or light ones."""
    return sorted(
        name for name, spec in _REGISTRY.items()
        if (pretrained is None or spec.pretrained == pretrained)
        and (family is None or spec.family == family)
        and (include_heavy or not spec.heavy)
    )
