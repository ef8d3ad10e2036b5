"""Class names of the PBC / BloodMNIST / AN2DL blood-cell task, in label order everywhere."""

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
