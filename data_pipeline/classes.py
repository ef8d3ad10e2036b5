"""Class names: the PBC / BloodMNIST / AN2DL blood-cell task's, and the rules that name a user's own classes."""

from __future__ import annotations

from typing import Iterable

BLOOD_CELL_CLASSES: tuple[str, ...] = (
    "basophil",
    "eosinophil",
    "erythroblast",
    "immature_granulocyte",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
)

# Folder names used by the PBC release and its samples, mapped to canonical names.
FOLDER_ALIASES: dict[str, str] = {"ig": "immature_granulocyte"}


def canonical_name(name: str) -> str:
    return FOLDER_ALIASES.get(name, name)


def class_order(names: Iterable[str]) -> list[str]:
    """Distinct names in label order: blood-cell names (or their aliases) in the canonical order, so a PBC
    folder keeps the labels of the .npz sets; anything else alphabetically, so the order never depends on
    which file came first."""
    distinct = sorted(set(names))
    if {canonical_name(n) for n in distinct} <= set(BLOOD_CELL_CLASSES):
        return sorted(distinct, key=lambda n: BLOOD_CELL_CLASSES.index(canonical_name(n)))
    return distinct


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """Names for integer labels that come without names: the blood-cell names for 8 classes, else class_<i>."""
    if num_classes == len(BLOOD_CELL_CLASSES):
        return BLOOD_CELL_CLASSES
    return tuple(f"class_{i}" for i in range(num_classes))
