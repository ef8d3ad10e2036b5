"""Load the three supported formats into an `ImageDataset`.

- AN2DL competition `.npz`: `images` (N,H,W,3) uint8 and `labels` (N,), (N,1) or one-hot (N,C).
- MedMNIST `.npz`: `train_/val_/test_images|labels[|files]`; its splits are kept.
- A folder with one sub-folder per class of JPEG/PNG files.
"""

from __future__ import annotations

import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_pipeline.classes import BLOOD_CELL_CLASSES, FOLDER_ALIASES
from data_pipeline.dataset import SPLIT_NAMES, ImageDataset, validate_labels
from data_pipeline.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
DEFAULT_DATA = Path(__file__).parent / "data" / "bloodcells_28.npz"


def default_data_path() -> Path:
    """The embedded 28x28 PBC data set (Acevedo et al. 2020, CC BY 4.0) shipped with the package."""
    return DEFAULT_DATA


def load(path: str | os.PathLike | None = None, *, image_size: int | None = None,
         center_crop: int | None = None) -> ImageDataset:
    """Load a data set from an `.npz` file or a class-per-folder tree; None means the embedded default.

    `image_size` and `center_crop` apply to folders of full-size images (npz data is used as stored).
    """
    path = Path(path) if path is not None else DEFAULT_DATA
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_dir():
        return load_folder(path, image_size=image_size or 64, center_crop=center_crop)
    if path.suffix.lower() == ".npz":
        return load_npz(path)
    raise DataError(f"{path}: unsupported data file (expected an .npz file or a folder of class folders)")


def _default_class_names(num_classes: int) -> tuple[str, ...]:
    if num_classes == len(BLOOD_CELL_CLASSES):
        return BLOOD_CELL_CLASSES
    return tuple(f"class_{i}" for i in range(num_classes))


def _open_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None


def _num_classes(arrays: dict[str, np.ndarray], label_keys: list[str]) -> int:
    if "class_names" in arrays:
        return len(arrays["class_names"])
    first = np.asarray(arrays[label_keys[0]])
    if first.ndim == 2 and first.shape[1] > 1:
        return first.shape[1]
    top = max(int(np.max(arrays[k])) for k in label_keys if np.size(arrays[k]))
    return max(top + 1, len(BLOOD_CELL_CLASSES))


def load_npz(path: str | os.PathLike) -> ImageDataset:
    """Load an AN2DL-style or MedMNIST-style `.npz` (detected by its keys)."""
    path = Path(path)
    arrays = _open_npz(path)
    if "train_images" in arrays:
        return _from_medmnist(arrays, path)
    if "images" in arrays:
        return _from_an2dl(arrays, path)
    raise DataError(f"{path}: no 'images' or 'train_images' key (found {sorted(arrays)})")


def _class_names_from(arrays: dict[str, np.ndarray], num_classes: int) -> tuple[str, ...]:
    if "class_names" in arrays:
        return tuple(str(c) for c in arrays["class_names"])
    return _default_class_names(num_classes)


def _from_an2dl(arrays: dict[str, np.ndarray], path: Path) -> ImageDataset:
    if "labels" not in arrays:
        raise DataError(f"{path}: has 'images' but no 'labels'")
    num_classes = _num_classes(arrays, ["labels"])
    ids = arrays.get("ids", arrays.get("files"))
    return ImageDataset(arrays["images"], arrays["labels"], _class_names_from(arrays, num_classes), ids,
                        source=str(path))


def _from_medmnist(arrays: dict[str, np.ndarray], path: Path) -> ImageDataset:
    present = [s for s in SPLIT_NAMES if f"{s}_images" in arrays]
    for split in present:
        if f"{split}_labels" not in arrays:
            raise DataError(f"{path}: has '{split}_images' but no '{split}_labels'")
    num_classes = _num_classes(arrays, [f"{s}_labels" for s in present])
    images, labels, ids, splits, start = [], [], [], {}, 0
    for split in present:
        split_images = arrays[f"{split}_images"]
        if np.ndim(split_images) == 3:  # MedMNIST greyscale sets: (N,H,W)
            raise DataError(f"{path}: '{split}_images' has shape {split_images.shape}; expected (N,H,W,3) RGB")
        n = len(split_images)
        split_labels = validate_labels(arrays[f"{split}_labels"], n, num_classes, f"{path}:{split}_labels")
        files = arrays.get(f"{split}_files")
        ids.append(files.astype(str) if files is not None else np.char.add(f"{split}_", np.arange(n).astype(str)))
        images.append(split_images)
        labels.append(split_labels)
        splits[split] = np.arange(start, start + n)
        start += n
    shapes = {im.shape[1:] for im in images}
    if len(shapes) > 1:
        raise DataError(f"{path}: splits have different image shapes {sorted(shapes)}")
    return ImageDataset(np.concatenate(images), np.concatenate(labels), _class_names_from(arrays, num_classes),
                        np.concatenate(ids), splits, source=str(path))


def load_image_file(path: str | os.PathLike, image_size: int | None = None,
                    center_crop: int | None = None) -> np.ndarray:
    """Decode one image file to RGB uint8 (H,W,3), optionally centre-cropped then resized (bicubic)."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if center_crop:
                width, height = img.size
                side = min(center_crop, width, height)
                left, top = (width - side) // 2, (height - side) // 2
                img = img.crop((left, top, left + side, top + side))
            if image_size and img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"unreadable image {path}: {exc}") from None


def _class_order(folders: list[str]) -> list[str]:
    """Known blood-cell folders follow the canonical label order; anything else is alphabetical."""
    canonical = [FOLDER_ALIASES.get(f, f) for f in folders]
    if set(canonical) <= set(BLOOD_CELL_CLASSES):
        return sorted(folders, key=lambda f: BLOOD_CELL_CLASSES.index(FOLDER_ALIASES.get(f, f)))
    return sorted(folders)


def list_image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_folder(path: str | os.PathLike, image_size: int = 64, center_crop: int | None = None,
                workers: int = 8) -> ImageDataset:
    """Load `path/<class>/*.jpg|png` with one label per sub-folder; ids are paths relative to `path`."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    folders = _class_order([d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")])
    if len(folders) < 2:
        raise DataError(f"{root}: expected one sub-folder per class, found {len(folders)}")
    files: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        found = list_image_files(root / folder)
        if not found:
            raise DataError(f"{root}: class folder '{folder}' has no images")
        files += found
        labels += [label] * len(found)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        images = list(pool.map(lambda f: load_image_file(f, image_size, center_crop), files))
    names = tuple(FOLDER_ALIASES.get(f, f) for f in folders)
    ids = np.array([str(f.relative_to(root)) for f in files])
    return ImageDataset(np.stack(images), np.array(labels), names, ids, source=str(root))
