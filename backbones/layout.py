"""A built classifier's layout: where its backbone sub-model is and which registry entry it came from.

Kept apart from `backbones.model` (which assembles classifiers) because unfreezing and weight saving only
need to find the parts of a model that already exists; with the lookup here, neither imports the assembler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backbones.registry import BackboneSpec, get_backbone
from common.errors import BackboneError

if TYPE_CHECKING:  # keras is heavy; the lookups only read attributes of a model they are given
    import keras

BACKBONE_LAYER = "backbone"
#: Python attributes set on a built classifier (not saved): the registry name and whether the backbone
#: started from loaded weights, which decides whether set_unfreeze freezes BatchNorm by default.
SPEC_ATTR = "_cellsearch_backbone"
PRETRAINED_ATTR = "_cellsearch_weights_loaded"


def get_backbone_model(model: keras.Model) -> keras.Model:
    """The backbone sub-model of a classifier built here (or `model` itself if it is a bare backbone)."""
    if model.name == BACKBONE_LAYER:
        return model
    try:
        return model.get_layer(BACKBONE_LAYER)
    except ValueError:
        raise BackboneError(f"model {model.name!r} has no layer named {BACKBONE_LAYER!r}; "
                            "was it built with backbones.build_classifier?") from None


def backbone_spec_of(model: keras.Model, backbone: str | None = None) -> BackboneSpec:
    """The registry spec of a classifier: explicit `backbone`, else recorded at build, else its name."""
    name = backbone or getattr(model, SPEC_ATTR, None) or model.name
    return get_backbone(name)
