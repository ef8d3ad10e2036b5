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
from pathlib import Path

import numpy as np

from common.errors import EnsembleError
from common.metrics import accuracy
from ensemble.inputs import Inputs, read_inputs
from ensemble.standalone import PRECISIONS, read_manifest
from common.cli_errors import QUIET, command_parser, run_cli, set_verbosity

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
    inputs = read_inputs(args.input, manifest, args.center_crop)  # checked uint8 images, before TensorFlow
    from ensemble.classifier import load_ensemble

    classifier = load_ensemble(folder, batch_size=args.batch_size, precision=args.precision, adapt_bn=args.adapt_bn)
    probs = classifier.predict_proba(inputs.images, progress=not args.no_progress and args.verbosity > QUIET)
    frame = predictions_frame(inputs, probs, classifier.class_names_.tolist())
    if args.out:
        from common.atomic import atomic_write_with

        atomic_write_with(args.out, lambda p: frame.to_csv(p, index=False, float_format="%.6f"))
        summary = f"{len(frame)} prediction(s) written to {args.out}"
        if inputs.labels is not None and (inputs.labels >= 0).any():
            known = inputs.labels >= 0
            summary += f"; accuracy on labelled images {accuracy(probs[known], inputs.labels[known]):.4f}"
        if args.verbosity > QUIET:
            print(summary, file=sys.stderr)
    else:
        frame.to_csv(sys.stdout, index=False, float_format="%.6f")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli(main))
