"""Augmentation policy names and the corruption families each policy can touch, without TensorFlow.

`search.study.spec` checks a study's policies against its `[robustness]` families with these before anything
heavy is imported; `data_pipeline.augment` builds the policies themselves.
"""

from __future__ import annotations

from typing import Any

from data_pipeline import corrupt as corruptions
from common.errors import DataError

POLICIES: tuple[str, ...] = (
    "none", "light", "randaugment", "augmix", "cutmix", "mixup", "cutmix_mixup", "gridmask", "cutout",
    "stain", "corrupt", "augmix_jsd", "corrupt_jsd",
)
#: Policies whose output labels are soft (mixtures of two one-hot rows).
MIXING_POLICIES: tuple[str, ...] = ("cutmix", "mixup", "cutmix_mixup")
#: Policies trained with a consistency loss over stacked views (`stack_views=True`, `search.trial.jsd`).
CONSISTENCY_POLICIES: tuple[str, ...] = ("augmix_jsd", "corrupt_jsd")

# The corruption family of each non-geometric RandAugment / AugMix op.
OP_FAMILIES = {
    "random_brightness": "colour", "random_color_degeneration": "colour", "random_contrast": "colour",
    "auto_contrast": "colour", "equalization": "colour", "random_sharpness": "blur",
    "random_posterization": "acquisition",
}
# Families each policy touches: (required, optional); policies missing here touch none. A required family
# training may not draw from makes `build_augmenter` refuse the policy; an optional one is left out (its ops
# or corruption kinds dropped). RandAugment / AugMix need their colour ops; sharpness and posterization are optional.
_COLOUR = frozenset({"colour"})
POLICY_FAMILIES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "light": (_COLOUR, frozenset()),
    "stain": (_COLOUR, frozenset()),
    **{policy: (frozenset(), frozenset(corruptions.FAMILIES)) for policy in ("corrupt", "corrupt_jsd")},
    **{policy: (_COLOUR, frozenset(OP_FAMILIES.values()) - _COLOUR)
       for policy in ("randaugment", "augmix", "augmix_jsd")},
}
NO_FAMILIES = (frozenset(), frozenset())


def check_policy(policy: Any) -> str:
    if not isinstance(policy, str) or policy not in POLICIES:
        raise DataError(f"unknown augmentation policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return policy


def family_names(families: Any) -> tuple[str, ...]:
    if families is None:
        return corruptions.DEFAULT_TRAIN_FAMILIES
    families = (families,) if isinstance(families, str) else tuple(families)
    unknown = [family for family in families if family not in corruptions.FAMILIES]
    if unknown:
        raise DataError(f"augmentation families: unknown corruption family {unknown[0]!r}; "
                        f"known: {', '.join(corruptions.FAMILIES)}")
    return families


def check_policy_families(policy: str, families: Any) -> tuple[str, ...]:
    """The allowed families, if they include every family `policy` needs."""
    families = family_names(families)
    outside = sorted(POLICY_FAMILIES.get(policy, NO_FAMILIES)[0] - set(families))
    if outside:
        raise DataError(f"augmentation policy {policy!r} applies the corruption family {outside[0]!r}, which "
                        f"training may not draw from (allowed families: {', '.join(families) or 'none'})")
    return families


def policy_families(policy: str, families: Any = None) -> frozenset[str]:
    """The corruption families `policy` can touch; with `families` (those training may draw from), the ones
    it touches when built with them (a family it needs is touched regardless: `build_augmenter` refuses)."""
    required, optional = POLICY_FAMILIES.get(check_policy(policy), NO_FAMILIES)
    return required | (optional if families is None else optional & set(family_names(families)))
