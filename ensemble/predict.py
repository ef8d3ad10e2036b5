"""Predict with a built ensemble: `cellsearch predict --input PATH [--study NAME | --ensemble DIR] [--out CSV]`.

PATH may be
- an `.npz`: AN2DL layout (`images`, optional `labels`, `ids`/`files`) or MedMNIST layout
  (`train_/val_/test_images`, ...: every split present is predicted, ids are `<split>_<i>` or the files);
- a folder with one sub-folder per class (true labels taken from the folder names when they match the
  ensemble's classes) or a flat folder of images (searched recursively);
- one image file (.png, .jpg, ...).
Image files are decoded to RGB and resized to the ensemble's input size the way the study's loaders do
(PIL bicubic, after the study's centre crop if it used one); arrays of another size are resized by the
ensemble (see ensemble.standalone.prepare_images).

The CSV has one row per image: id, label, class_name, then one probability column per class (and
true_label / true_class when known). Without --out it goes to stdout; the progress bar to stderr.
`--adapt-bn` re-estimates BatchNorm statistics on each batch of --batch-size images, drawn in a fixed random
order (see ensemble.standalone: the input should mix classes); `--no-adapt-bn` switches off an artifact saved
with it on.
All input checks (ensemble checksums, paths, decoding, shapes) run BEFORE TensorFlow is imported, so bad
input fails in a second with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ensemble.standalone import PRECISIONS, read_manifest
from common.errors import EnsembleError
from common.cli_errors import QUIET, command_parser, run_cli, set_verbosity

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


@dataclass
class Inputs:
    images: np.ndarray
    ids: np.ndarray
    labels: np.ndarray | None  # true labels when the input carries them (-1 where unknown)


def _check_array(images: np.ndarray, where: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3 and images.shape[-1] != 3:
        raise EnsembleError(f"{where}: images have shape {images.shape}: greyscale (N,H,W)? expected (N,H,W,3) RGB")
    if images.ndim != 4:
        raise EnsembleError(f"{where}: expected images of shape (N,H,W,3), got {images.shape}")
    if images.shape[-1] != 3:
        raise EnsembleError(f"{where}: expected 3 colour channels, got {images.shape[-1]} (shape {images.shape})")
    if len(images) == 0:
        raise EnsembleError(f"{where}: no images")
    return images


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
        images = _check_array(arrays["images"], f"{path}:images")
        ids = arrays.get("ids", arrays.get("files"))
        ids = np.arange(len(images)).astype(str) if ids is None or len(ids) != len(images) else ids.astype(str)
        return Inputs(images, ids, _labels(arrays.get("labels"), len(images), n_classes))
    splits = [s for s in ("train", "val", "test") if f"{s}_images" in arrays]
    if not splits:
        raise EnsembleError(f"{path}: no 'images' or '<split>_images' key (found {sorted(arrays)})")
    images, ids, labels = [], [], []
    for split in splits:
        part = _check_array(arrays[f"{split}_images"], f"{path}:{split}_images")
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


def predictions_frame(inputs: Inputs, probs: np.ndarray, class_names: list[str]):
    import pandas as pd

    labels = probs.argmax(axis=1)
    frame = pd.DataFrame({"id": inputs.ids, "label": labels, "class_name": np.asarray(class_names)[labels]})
    if inputs.labels is not None:
        known = inputs.labels >= 0
        frame["true_label"] = inputs.labels
        frame["true_class"] = np.where(known, np.asarray(class_names)[np.clip(inputs.labels, 0, None)], "")
    for c, name in enumerate(class_names):
        frame[f"prob_{name}"] = probs[:, c]
    return frame


def add_ensemble_arguments(parser: argparse.ArgumentParser) -> None:
    """How `predict` and `export` find the ensemble: a folder, or the one a study's build wrote."""
    parser.add_argument("--study", help="use this study's ensemble, runs/<study>/ensemble (default: the last study "
                                        "run under runs/)")
    parser.add_argument("--ensemble", help="the ensemble folder written by cellsearch build (default: the one "
                                           "--study names)")


def ensemble_folder(args: argparse.Namespace) -> Path:
    from search.study.location import StudyLocation

    return Path(args.ensemble) if args.ensemble else StudyLocation.find(args.study).ensemble_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_ensemble_arguments(parser)
    parser.add_argument("--input", required=True, help=".npz, image folder, or image file")
    parser.add_argument("--out", "--output", dest="out", help="CSV path (default: stdout)")
    parser.add_argument("--center-crop", type=int, metavar="N",
                        help="crop the centre NxN pixels of image files before resizing them to the ensemble's input, "
                             "as the training images were (default: the crop of the ensemble's training data, if any)")
    parser.add_argument("--batch-size", type=int, help="images per forward call (default: automatic)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="override the precision the ensemble was built in (bfloat16 only on CPUs with "
                             "AVX512_BF16 or AMX; else float32)")
    parser.add_argument("--adapt-bn", action=argparse.BooleanOptionalAction, default=None,
                        help="test-time BatchNorm adaptation: normalise with each batch's statistics (default: the "
                             "ensemble's manifest setting); predict a batch of similar images together")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = command_parser("python -m ensemble.predict", __doc__)
    add_arguments(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """`cellsearch predict` and `python -m ensemble.predict`."""
    set_verbosity(args.verbosity)
    if args.batch_size is not None and args.batch_size < 1:
        raise EnsembleError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.center_crop is not None and args.center_crop < 1:
        raise EnsembleError(f"--center-crop must be >= 1, got {args.center_crop}")
    folder = ensemble_folder(args)
    manifest = read_manifest(folder)  # checksums verified; no TensorFlow yet
    inputs = read_inputs(args.input, manifest, args.center_crop)
    from ensemble.standalone import prepare_images

    if inputs.images.dtype != np.uint8:  # cheap dtype/range checks before TensorFlow
        inputs.images = prepare_images(inputs.images, inputs.images.shape[1:3])
    from ensemble.artifact import load_ensemble

    classifier = load_ensemble(folder, batch_size=args.batch_size, precision=args.precision, adapt_bn=args.adapt_bn)
    probs = classifier.predict_proba(inputs.images, progress=not args.no_progress and args.verbosity > QUIET)
    frame = predictions_frame(inputs, probs, classifier.class_names_.tolist())
    if args.out:
        from common.atomic import atomic_write_with

        atomic_write_with(args.out, lambda p: frame.to_csv(p, index=False, float_format="%.6f"))
        summary = f"{len(frame)} prediction(s) written to {args.out}"
        if inputs.labels is not None and (inputs.labels >= 0).any():
            known = inputs.labels >= 0
            summary += f"; accuracy on labelled images {np.mean(frame['label'][known] == inputs.labels[known]):.4f}"
        if args.verbosity > QUIET:
            print(summary, file=sys.stderr)
    else:
        frame.to_csv(sys.stdout, index=False, float_format="%.6f")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli(main))
