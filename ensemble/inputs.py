"""What `python -m ensemble.predict` and `EnsembleClassifier.predict(path)` read: an `.npz` (AN2DL or MedMNIST
layout), a class-per-folder tree or a flat folder of images, or one image file, as uint8 RGB images with ids and,
when the input carries them, true labels (-1 where unknown).

Image files are decoded and resized the way the study's loaders do (PIL bicubic, after the study's centre crop
if it used one); every check runs before TensorFlow is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import EnsembleError
from common.inference import check_images

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


@dataclass
class Inputs:
    images: np.ndarray
    ids: np.ndarray
    labels: np.ndarray | None  # true labels when the input carries them (-1 where unknown)


def _labels(values, n: int, n_classes: int) -> np.ndarray | None:
    if values is None:
        return None
    values = np.asarray(values)
    if values.ndim == 2 and values.shape[1] == n_classes and n_classes > 1:
        values = values.argmax(axis=1)
    values = values.reshape(-1)
    if len(values) != n or not np.issubdtype(values.dtype, np.number):
        return None
    return values.astype(np.int64)


def read_npz(path: Path, n_classes: int) -> Inputs:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise EnsembleError(f"{path}: not a readable .npz file ({exc})") from None
    if "images" in arrays:
        images = check_images(arrays["images"], f"{path}:images", EnsembleError)
        ids = arrays.get("ids", arrays.get("files"))
        ids = np.arange(len(images)).astype(str) if ids is None or len(ids) != len(images) else ids.astype(str)
        return Inputs(images, ids, _labels(arrays.get("labels"), len(images), n_classes))
    splits = [s for s in ("train", "val", "test") if f"{s}_images" in arrays]
    if not splits:
        raise EnsembleError(f"{path}: no 'images' or '<split>_images' key (found {sorted(arrays)})")
    images, ids, labels = [], [], []
    for split in splits:
        part = check_images(arrays[f"{split}_images"], f"{path}:{split}_images", EnsembleError)
        files = arrays.get(f"{split}_files")
        images.append(part)
        ids.append(files.astype(str) if files is not None and len(files) == len(part)
                   else np.char.add(f"{split}_", np.arange(len(part)).astype(str)))
        found = _labels(arrays.get(f"{split}_labels"), len(part), n_classes)
        labels.append(found if found is not None else np.full(len(part), -1))
    if len({p.shape[1:] for p in images}) > 1:
        raise EnsembleError(f"{path}: splits have different image shapes")
    return Inputs(np.concatenate(images), np.concatenate(ids), np.concatenate(labels))


def _decode(files: list[Path], size: tuple[int, int], center_crop: int | None) -> np.ndarray:
    from concurrent.futures import ThreadPoolExecutor

    from common.errors import DataError
    from data_pipeline.loaders import load_image_file

    def one(path: Path) -> np.ndarray:
        image = load_image_file(path, None, center_crop)
        if image.shape[:2] != size:
            from PIL import Image

            image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BICUBIC))
        return image

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            return np.stack(list(pool.map(one, files)))
    except DataError as exc:
        raise EnsembleError(str(exc)) from None


def center_crop(manifest: dict, override: int | None = None) -> int | None:
    """The centre crop image files get before resizing: `override`, else the one the training data had."""
    return override if override is not None else (manifest.get("data") or {}).get("center_crop")


def read_folder(path: Path, manifest: dict, crop: int | None = None) -> Inputs:
    """Class-per-folder when every image sits in a first-level sub-folder, else a flat (recursive) folder."""
    from data_pipeline.classes import canonical_name

    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise EnsembleError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    size = tuple(manifest["input_size"])
    images = _decode(files, size, center_crop(manifest, crop))
    ids = np.array([f.relative_to(path).as_posix() for f in files])
    names = {name: i for i, name in enumerate(manifest["class_names"])}
    folders = [f.relative_to(path).parts[0] if len(f.relative_to(path).parts) > 1 else None for f in files]
    labels = None
    if all(folders):
        canonical = [canonical_name(f) for f in folders]
        if all(c in names for c in canonical):
            labels = np.array([names[c] for c in canonical])
    return Inputs(images, ids, labels)


def read_inputs(path: str | Path, manifest: dict, crop: int | None = None) -> Inputs:
    """An .npz, an image folder or one image file; `crop` overrides the centre crop of image files."""
    path = Path(path)
    if not path.exists():
        raise EnsembleError(f"input not found: {path}")
    if path.is_dir():
        return read_folder(path, manifest, crop)
    if path.suffix.lower() == ".npz":
        return read_npz(path, len(manifest["class_names"]))
    if path.suffix.lower() in IMAGE_SUFFIXES:
        images = _decode([path], tuple(manifest["input_size"]), center_crop(manifest, crop))
        return Inputs(images, np.array([path.name]), None)
    raise EnsembleError(f"{path}: unsupported input (an .npz, an image folder or an image file "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))})")
