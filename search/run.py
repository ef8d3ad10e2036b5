"""Run a hyperparameter search: `python -m search.run [--study default] [--trials 100] ...`.

Running the same command again continues the study until it holds `--trials` finished trials.
"""

from __future__ import annotations

import argparse
import sys

from search.cli_errors import run_cli
from search.objectives import OBJECTIVES
from search.spec import StudySpec, load_spec


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m search.run", description=__doc__)
    parser.add_argument("--study", default=None, help="spec name under studies/ or a .toml path (default: default)")
    parser.add_argument("--trials", type=int, help="total finished trials the study should hold")
    parser.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    parser.add_argument("--storage", help="Optuna storage URL (default sqlite:///<out>/<study>/study.db)")
    parser.add_argument("--artifacts", help="artifact store: folder, s3://bucket or gs://bucket")
    parser.add_argument("--executor", choices=("local", "ray"))
    parser.add_argument("--workers", type=int, help="parallel trials (default: one per GPU, else per core)")
    parser.add_argument("--gpus", help="auto, none, a count, or ids like 0,1 (a count simulates devices)")
    parser.add_argument("--cpus", type=int, help="local executor: cores to use (default: all), split between workers")
    parser.add_argument("--address", help="ray: address of an existing Ray cluster")
    parser.add_argument("--data", help="data: .npz (AN2DL or MedMNIST layout) or a class-per-folder tree")
    parser.add_argument("--out", help="output root (default runs/)")
    parser.add_argument("--name", help="study name (default: the spec's)")
    parser.add_argument("--reseed-top", type=int, metavar="K",
                        help="instead of searching, train the K best configurations once more with new seeds "
                             "(extra ensemble members; see search/reseed.py)")
    parser.add_argument("--objective", choices=OBJECTIVES,
                        help="robust (default: clean + held-out-family accuracy), val_accuracy_tta, or multi")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")
    return parser.parse_args(argv)


def best_trial_line(study) -> str:
    from search.report import ranked_trials

    ranked = ranked_trials(study)
    if not ranked:
        return "no completed trial yet"
    best = ranked[0]
    attrs = {k: best.user_attrs.get(k) for k in ("val_accuracy_tta", "val_corrupted_accuracy_tta")}
    scores = ", ".join(f"{k} {v:.4f}" for k, v in attrs.items() if v is not None)
    values = "/".join(f"{v:.4f}" for v in best.values)
    return (f"best trial: #{best.number} {values} ({scores}; {best.params.get('backbone')}, "
            f"{best.params.get('augment_policy')})")


def summary(spec: StudySpec, study) -> str:
    """The end of a run: the best trial, where the report is, and the next commands to type."""
    location = spec.location
    build = "python -m ensemble.build" + ("" if spec.out == "runs" else f" --study {spec.name} "
                                           f"--storage {location.storage} --artifacts {location.artifacts}")
    return "\n".join([
        best_trial_line(study),
        f"report:    {location.report_dir}",
        f"ensemble:  {build}   (writes {location.ensemble_dir})",
        f"predict:   python -m ensemble.predict --ensemble {location.ensemble_dir} --input IMAGES "
        f"--output predictions.csv",
        f"dashboard: {location.dashboard_command()}",
    ])


def spec_from_args(args: argparse.Namespace) -> StudySpec:
    """The spec `--study` names, with every given flag overriding it."""
    from search.driver import OVERRIDES, apply_overrides

    overrides = {key: getattr(args, key) for key in OVERRIDES}
    return apply_overrides(load_spec(args.study), out=args.out, name=args.name, **overrides)


def main(argv: list[str] | None = None) -> int:
    from search.driver import run_study

    args = parse_args(argv)
    spec = spec_from_args(args)
    study = run_study(spec, reseed_top=args.reseed_top, show_progress=not args.no_progress)
    print(summary(spec, study))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
