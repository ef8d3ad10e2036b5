"""Run a hyperparameter search: `cellsearch search --study quick` (or `python -m search.run --study quick`).

`--study NAME` names the study; its spec is the shipped spec of that name (`cellsearch studies` lists them)
unless `--spec` gives another one, a shipped name or a .toml path. Running the same command again continues
the study until it holds `--trials` finished trials. `--timeout` counts from the command's start.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from common.cli_errors import NORMAL, QUIET, command_parser, run_cli, set_verbosity
from search.study.location import StudyLocation
from search.study.goals import ALIASES, OBJECTIVE_NAMES
from search.study.spec import StudySpec, load_spec
from search.study.trial_config import MIXED_PRECISIONS


def _objective(name: str) -> str:
    return ALIASES.get(name, name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", help="the study's name (default: the spec's); without --spec, also the shipped "
                                        "spec to run, e.g. quick, medium, best (a .toml path is read as --spec)")
    parser.add_argument("--spec", help="the study's spec: a shipped spec name or a .toml path (default: the one "
                                       "--study names, else default)")
    parser.add_argument("--name", help=argparse.SUPPRESS)  # former spelling: `--study SPEC --name NAME`
    parser.add_argument("--data", help="data: .npz (AN2DL or MedMNIST layout), a class-per-folder tree, or a .csv "
                                       "of file names and labels (default: the spec's; the embedded 28x28 blood "
                                       "cells)")
    parser.add_argument("--image-size", type=int, help="side in pixels that images from folders and CSVs are "
                                                       "resized to (default: the spec's, 64)")
    parser.add_argument("--out", help="output root: each study in <out>/<study>/ (default: the spec's, runs)")
    parser.add_argument("--trials", type=int, help="finished (complete or pruned) trials the study should hold "
                                                   "(default: the spec's)")
    parser.add_argument("--timeout", type=float,
                        help="seconds the whole run may take, report included: no trial starts that could not "
                             "end in time, and trials still running anneal their learning rate to, and stop "
                             "training at, the last epoch boundary that leaves time to finish, keep their best "
                             "epoch and are evaluated and saved as usual (complete unless the pruner stopped "
                             "them, so ensemble candidates); a trial still training a moment past the "
                             "deadline is stopped and queued for the next run, one already evaluating is "
                             "waited for (at most 5%% of the time given past the deadline); with the spec's "
                             "[robustness] refit, time for the build's retraining is kept too, and a build "
                             "started within the time given ends its retraining by it (default: the spec's, "
                             "none)")
    parser.add_argument("--objective", type=_objective, choices=OBJECTIVE_NAMES,
                        help="robust: mean of clean and held-out-family validation accuracy; clean; or multi "
                             "(both, as two objectives) (default: the spec's)")
    parser.add_argument("--storage", help="Optuna storage URL, or journal:PATH (default sqlite:///<out>/<study>/"
                                          "study.db)")
    parser.add_argument("--artifacts", help="artifact store: a folder or s3://bucket[/prefix] (default "
                                            "<out>/<study>/artifacts)")
    parser.add_argument("--executor", choices=("local", "ray"), help="local worker processes, or Ray actors "
                                                                     "(default: the spec's, local)")
    parser.add_argument("--workers", type=int, help="parallel trials (default: one per GPU, else per core)")
    parser.add_argument("--gpus", help="auto, none, a count, or ids like 0,1 (default: the spec's, auto)")
    parser.add_argument("--cpus", type=int, help="cores (local) or cluster CPUs (ray) this driver's workers "
                                                 "take, split between them (default: all)")
    parser.add_argument("--address", help="ray: address of an existing Ray cluster (default: start one)")
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISIONS,
                        help="training precision: auto (float16 mixed precision on a GPU, bfloat16 on a CPU with "
                             "native bfloat16 under TensorFlow, else float32), on, bfloat16 or off (default: the "
                             "spec's executor.mixed_precision, auto); trials are evaluated and saved in float32")
    parser.add_argument("--reseed-top", type=int, metavar="K",
                        help="instead of searching, train the K best configurations once more with new seeds "
                             "(extra ensemble members)")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = command_parser("python -m search.run", __doc__)
    add_arguments(parser)
    return parser.parse_args(argv)


def best_trial_line(study) -> str:
    from search.reports.study_report import ranked_trials

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
    where = "" if spec.out == "runs" else f" --out {spec.out}"
    default = StudyLocation(name=spec.name, out=spec.out)
    custom = (location.storage, location.artifacts) != (default.storage, default.artifacts)
    storage = f" --storage {location.storage} --artifacts {location.artifacts}" if custom else ""
    return "\n".join([
        best_trial_line(study),
        f"report:    {location.report_dir / 'index.html'}",
        f"ensemble:  cellsearch build --study {spec.name}{where}{storage}   (writes {location.ensemble_dir})",
        f"predict:   cellsearch predict --study {spec.name}{where} --input IMAGES --out predictions.csv",
        f"dashboard: cellsearch dashboard --study {spec.name}{where}{storage}",
        f"           (or: {location.dashboard_command()})",
    ])


def spec_from_args(args: argparse.Namespace) -> StudySpec:
    """The spec `--spec` (else `--study`) names, with every given flag overriding it."""
    from search.execution.driver import OVERRIDES, apply_overrides

    spec_name = args.spec or args.study
    study_name = args.name or (args.study if args.spec else None)
    overrides = {key: getattr(args, key) for key in OVERRIDES}
    return apply_overrides(load_spec(spec_name), out=args.out, name=study_name, **overrides)


def process_started_at() -> float:
    """Unix time this process started (Linux /proc; elsewhere now), so `--timeout` counts Python's start-up."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


def run(args: argparse.Namespace) -> int:
    """`cellsearch search` and `python -m search.run`: the search, then its summary."""
    from search.execution.driver import record_wrap_up, run_study

    set_verbosity(args.verbosity)
    spec = spec_from_args(args)
    started_at = process_started_at()
    study = run_study(spec, reseed_top=args.reseed_top, show_progress=not args.no_progress and args.verbosity > QUIET,
                      quiet=args.verbosity < NORMAL, started_at=started_at)
    print(summary(spec, study), flush=True)
    record_wrap_up(study, started_at)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli(main))
