"""Load the supported formats into an `ImageDataset`; the class count and names always come from the data.

- AN2DL competition `.npz`: `images` (N,H,W,3) uint8 and `labels` (N,), (N,1) or one-hot (N,C), integers or
  class names, optional `class_names` and `ids`/`files`.
- MedMNIST `.npz`: `train_/val_/test_images|labels[|files]`; its splits are kept.
- A folder with one sub-folder per class of JPEG/PNG files.
- A CSV of file names and labels beside the images (the Kaggle layout), see `load_csv`.
- In-memory arrays, see `from_arrays`.
Greyscale images ((N,H,W), (N,H,W,1), L-mode files) are made RGB with one `DataWarning`.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.atomic import atomic_path
from common.errors import DataError, DataWarning
from data_pipeline.classes import canonical_name, class_order, default_class_names
from data_pipeline.dataset import SPLIT_NAMES, ImageDataset, encode_labels, to_rgb, validate_labels

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
DEFAULT_DATA = Path(__file__).parent / "data" / "bloodcells_28.npz"
#: Side in pixels that image files (folders, CSV) are resized to when no `image_size` is given.
DEFAULT_IMAGE_SIZE = 64
#: CSV header names (case-insensitive) of the file-name and the label column, first match wins.
FILE_COLUMNS = ("filename", "file", "file_name", "image", "image_id", "path", "id")
LABEL_COLUMNS = ("label", "class", "class_name", "target", "category", "diagnosis")
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def default_data_path() -> Path:
    """The embedded 28x28 PBC data set (Acevedo et al. 2020, CC BY 4.0) shipped with the package."""
    return DEFAULT_DATA


def load(path: str | os.PathLike | None = None, *, image_size: int | None = None,
         center_crop: int | None = None) -> ImageDataset:
    """Load a data set from an `.npz`, a class-per-folder tree or a `.csv` of files and labels; None means
    the embedded default.

    `image_size` (default 64) and `center_crop` apply to image files (folders, CSV); npz data is used as stored.
    """
    path = Path(path) if path is not None else DEFAULT_DATA
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    size = image_size or DEFAULT_IMAGE_SIZE
    if path.is_dir():
        return load_folder(path, image_size=size, center_crop=center_crop)
    if path.suffix.lower() == ".npz":
        return load_npz(path)
    if path.suffix.lower() == ".csv":
        return load_csv(path, image_size=size, center_crop=center_crop)
    raise DataError(f"{path}: unsupported data file (expected an .npz, a .csv of files and labels, or a folder "
                    f"of class folders)")


def _open_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None


def _num_classes(label_arrays: list[np.ndarray]) -> int:
    """One-hot width, else the largest integer label + 1: labels 0..K-1 make K classes."""
    first = label_arrays[0]
    if first.ndim == 2 and first.shape[1] > 1:
        return first.shape[1]
    sizes = [np.size(labels) for labels in label_arrays]
    return max(int(np.max(labels)) for labels, n in zip(label_arrays, sizes) if n) + 1 if any(sizes) else 0


def _labels_and_names(arrays: dict[str, np.ndarray], label_keys: list[str], path: Path
                      ) -> tuple[list[np.ndarray], tuple[str, ...]]:
    """Integer labels of each key and the class names: `class_names` when stored, else the name labels,
    else defaults for the integer label range."""
    stored = tuple(str(c) for c in arrays["class_names"]) if "class_names" in arrays else None
    parts = [np.asarray(arrays[key]) for key in label_keys]
    if any(part.dtype.kind in "USO" for part in parts):
        encoded, names = encode_labels(np.concatenate([part.reshape(-1) for part in parts]), stored,
                                       f"{path}:labels")
        return np.split(encoded, np.cumsum([part.size for part in parts])[:-1]), names
    return parts, stored or default_class_names(_num_classes(parts))


def load_npz(path: str | os.PathLike) -> ImageDataset:
    """Load an AN2DL-style or MedMNIST-style `.npz` (detected by its keys)."""
    path = Path(path)
    arrays = _open_npz(path)
    if "train_images" in arrays:
        return _from_medmnist(arrays, path)
    if "images" in arrays:
        return _from_an2dl(arrays, path)
    raise DataError(f"{path}: no 'images' or 'train_images' key (found {sorted(arrays)})")


def _from_an2dl(arrays: dict[str, np.ndarray], path: Path) -> ImageDataset:
    if "labels" not in arrays:
        raise DataError(f"{path}: has 'images' but no 'labels'")
    (labels,), names = _labels_and_names(arrays, ["labels"], path)
    ids = arrays.get("ids", arrays.get("files"))
    return ImageDataset(to_rgb(arrays["images"], f"{path}:images"), labels, names, ids, source=str(path))


def _from_medmnist(arrays: dict[str, np.ndarray], path: Path) -> ImageDataset:
    present = [s for s in SPLIT_NAMES if f"{s}_images" in arrays]
    for split in present:
        if f"{split}_labels" not in arrays:
            raise DataError(f"{path}: has '{split}_images' but no '{split}_labels'")
    all_labels, names = _labels_and_names(arrays, [f"{s}_labels" for s in present], path)
    images, labels, ids, splits, start = [], [], [], {}, 0
    for split, split_labels in zip(present, all_labels):
        split_images = arrays[f"{split}_images"]
        n = len(split_images)
        labels.append(validate_labels(split_labels, n, len(names), f"{path}:{split}_labels"))
        files = arrays.get(f"{split}_files")
        ids.append(files.astype(str) if files is not None else np.char.add(f"{split}_", np.arange(n).astype(str)))
        images.append(split_images)
        splits[split] = np.arange(start, start + n)
        start += n
    shapes = {im.shape[1:] for im in images}
    if len(shapes) > 1:
        raise DataError(f"{path}: splits have different image shapes {sorted(shapes)}")
    return ImageDataset(to_rgb(np.concatenate(images), f"{path}:images"), np.concatenate(labels), names,
                        np.concatenate(ids), splits, source=str(path))


def from_arrays(images, labels, class_names: Sequence[str] | None = None, source: str = "arrays") -> ImageDataset:
    """A data set from in-memory arrays: uint8 (N,H,W,3) images (greyscale converted), labels as integers
    (0..K-1) or class names; `class_names` fixes the names and their order."""
    encoded, names = encode_labels(labels, class_names, f"{source}: labels")
    if names is None:
        names = default_class_names(_num_classes([np.asarray(encoded)]))
    return ImageDataset(to_rgb(images, f"{source}: images"), encoded, names, source=source)


def save_npz(dataset: ImageDataset, path: str | os.PathLike) -> Path:
    """Write `dataset` as an AN2DL-layout `.npz` with its class names and ids (atomically), for `load`."""
    with atomic_path(path) as tmp:
        np.savez(tmp, images=dataset.images, labels=dataset.labels, class_names=np.array(dataset.class_names),
                 ids=dataset.ids)
    return Path(path)


def _to_array(img: Image.Image, image_size: int | tuple[int, int] | None, center_crop: int | None) -> np.ndarray:
    img = img.convert("RGB")
    if center_crop:
        width, height = img.size
        side = min(center_crop, width, height)
        left, top = (width - side) // 2, (height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if image_size:
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def pil_to_array(img: Image.Image, image_size: int | tuple[int, int] | None = None,
                 center_crop: int | None = None) -> np.ndarray:
    """One PIL image as RGB uint8 (H,W,3), optionally centre-cropped then resized (bicubic; (H,W) or a side)."""
    if not isinstance(img, Image.Image):
        raise DataError(f"expected a PIL image, got {type(img).__name__}")
    return _to_array(img, image_size, center_crop)


def _read_image(path: Path, image_size: int | None, center_crop: int | None) -> tuple[np.ndarray, bool]:
    """The decoded image and whether the file was greyscale."""
    try:
        with Image.open(path) as img:
            return _to_array(img, image_size, center_crop), img.mode in GREY_MODES
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"unreadable image {path}: {exc}") from None


def load_image_file(path: str | os.PathLike, image_size: int | None = None,
                    center_crop: int | None = None) -> np.ndarray:
    """Decode one image file to RGB uint8 (H,W,3), optionally centre-cropped then resized (bicubic)."""
    return _read_image(Path(path), image_size, center_crop)[0]


def _read_images(files: list[Path], image_size: int, center_crop: int | None, source: Path,
                 workers: int = 8) -> np.ndarray:
    """Decode `files` in threads; one warning when some of them were greyscale."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = list(pool.map(lambda f: _read_image(f, image_size, center_crop), files))
    grey = sum(was_grey for _, was_grey in decoded)
    if grey:
        warnings.warn(f"{source}: {grey} of {len(files)} images are greyscale, converted to RGB", DataWarning,
                      stacklevel=3)
    return np.stack([image for image, _ in decoded])


def list_image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_folder(path: str | os.PathLike, image_size: int = DEFAULT_IMAGE_SIZE, center_crop: int | None = None,
                workers: int = 8) -> ImageDataset:
    """Load `path/<class>/*.jpg|png` with one label per sub-folder; ids are paths relative to `path`."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    folders = class_order([d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")])
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
    images = _read_images(files, image_size, center_crop, root, workers)
    names = tuple(canonical_name(f) for f in folders)
    ids = np.array([f.relative_to(root).as_posix() for f in files])
    return ImageDataset(images, np.array(labels), names, ids, source=str(root))


def _column(columns: list[str], wanted: tuple[str, ...], what: str, path: Path) -> str:
    lowered = {c.strip().lower(): c for c in columns}
    for name in wanted:
        if name in lowered:
            return lowered[name]
    raise DataError(f"{path}: no {what} column (one of {', '.join(wanted)}; found {', '.join(columns) or 'none'})")


def _read_table(path: Path):
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({str(exc).strip().splitlines()[0]})") from None
    if frame.empty:
        raise DataError(f"{path}: no rows")
    return frame


def load_csv(path: str | os.PathLike, image_size: int = DEFAULT_IMAGE_SIZE, center_crop: int | None = None,
             workers: int = 8) -> ImageDataset:
    """Load the images a CSV lists, with their labels: the common Kaggle layout `labels.csv` + `images/`.

    Convention: a header row with a file-name column (`filename`, `file`, `image`, `image_id`, `path`,
    `id`...) and a label column (`label`, `class`, `target`...), case-insensitive. File names are relative
    to the CSV's own folder (`images/0001.png`; absolute paths are kept). Labels are class names (ordered
    like folder names) or integers 0..K-1 (named like an .npz's). Ids are the file names as written.

    Raises DataError for a missing column, an empty label, a file listed twice or not found.
    """
    path = Path(path)
    frame = _read_table(path)
    columns = [str(c) for c in frame.columns]
    file_column = _column(columns, FILE_COLUMNS, "file-name", path)
    label_column = _column(columns, LABEL_COLUMNS, "label", path)
    names = frame[file_column].str.strip()
    if (names == "").any():
        raise DataError(f"{path}: row {int(np.flatnonzero(names == '')[0]) + 2} has no file name")
    twice = names[names.duplicated()]
    if len(twice):
        raise DataError(f"{path}: file {twice.iloc[0]!r} is listed twice")
    files = [path.parent / name for name in names]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{path}: {len(missing)} listed file(s) not found, first {missing[0]} (file names are "
                        f"relative to the CSV's folder)")
    text = frame[label_column].str.strip().to_numpy()
    integers = all(re.fullmatch(r"[+-]?\d+", value) for value in text)
    labels, class_names = encode_labels(text.astype(np.int64) if integers else text.astype(str), None,
                                        f"{path}: column {label_column!r}")
    images = _read_images(files, image_size, center_crop, path, workers)
    class_names = class_names or default_class_names(_num_classes([labels]))
    return ImageDataset(images, labels, class_names, names.to_numpy(), source=str(path))
