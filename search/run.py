"""Run a hyperparameter search: `python -m search.run [--study default] [--trials 100] ...`.

Running the same command again continues the study until it holds `--trials` finished trials.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from search.cli_errors import run_cli
from search.config import ConfigError
from search.spec import StudySpec, load_spec, validate_spec


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
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")
    return parser.parse_args(argv)


def apply_overrides(spec: StudySpec, args: argparse.Namespace) -> StudySpec:
    """CLI flags win over the spec file."""
    overrides = {
        ("budget", "trials"): args.trials, ("budget", "timeout_s"): args.timeout,
        ("storage", "url"): args.storage, ("storage", "artifacts"): args.artifacts,
        ("executor", "kind"): args.executor, ("executor", "workers"): args.workers,
        ("executor", "gpus"): args.gpus, ("executor", "cpus"): args.cpus, ("executor", "address"): args.address,
        ("data", "path"): args.data,
    }
    for (section, key), value in overrides.items():
        if value is not None:
            setattr(getattr(spec, section), key, value)
    if args.reseed_top is not None and args.reseed_top < 1:
        raise ConfigError(f"invalid --reseed-top value {args.reseed_top}: need at least 1")
    spec.out = args.out or spec.out
    spec.name = args.name or spec.name
    validate_spec(spec, "command line")
    return spec


def remember_last_study(spec: StudySpec, storage_url: str, artifacts: str) -> None:
    """`python -m ensemble.build` with no flags builds from the study run last under the same output root."""
    import json

    from data_pipeline.atomic import atomic_write_text

    pointer = {"study": spec.name, "storage": storage_url, "artifacts": artifacts}
    atomic_write_text(Path(spec.out) / "last_study.json", json.dumps(pointer, indent=2))


def _plan_reseeds(spec: StudySpec, study, top: int) -> None:
    """Enqueue the copies and shrink the budget to exactly the waiting trials: a reseed run adds no search."""
    from search.reseed import enqueue_reseeds, waiting_count
    from search.study import finished_count

    copied = enqueue_reseeds(study, top)
    waiting = waiting_count(study)
    spec.budget.trials = finished_count(study) + waiting
    print(f"reseeding: copies of trial(s) {copied or 'none (all already copied)'} enqueued; "
          f"{waiting} waiting trial(s) to run")


def _describe(device) -> str:
    if device.gpu is not None:
        return f"gpu {device.gpu}"
    cores = f" on core(s) {','.join(map(str, device.cpu_cores))}" if device.cpu_cores else ""
    return f"cpu x{device.cpu_threads}{cores}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = apply_overrides(load_spec(args.study), args)
    if spec.data.path and not Path(spec.data.path).exists():
        raise ConfigError(f"data path not found: {spec.data.path} (set --data or 'data.path')")

    from search.executors.devices_plan import parse_gpus, plan_workers, usable_cores
    from search.report import write_report
    from search.storage import default_storage_url, open_artifact_store, open_storage
    from search.study import finished_count, prepare_study

    storage_url = spec.storage.url or default_storage_url(spec.study_dir)
    artifacts = spec.storage.artifacts or str(spec.study_dir / "artifacts")
    storage = open_storage(storage_url, heartbeat_interval=spec.storage.heartbeat_interval,
                           grace_period=spec.storage.grace_period, max_retry=spec.storage.max_retry)
    open_artifact_store(artifacts)
    study = prepare_study(spec, storage)
    if args.reseed_top is not None:
        _plan_reseeds(spec, study, args.reseed_top)
    remember_last_study(spec, storage_url, artifacts)
    deadline = time.time() + spec.budget.timeout_s if spec.budget.timeout_s else None
    gpus = parse_gpus(spec.executor.gpus)
    print(f"study {spec.name!r}: storage {storage_url}, artifacts {artifacts}, executor {spec.executor.kind}")
    if spec.executor.kind == "ray":
        from search.executors.ray_tune import run_ray

        run_ray(spec, storage_url, artifacts, gpus, deadline, show_progress=not args.no_progress)
    else:
        from search.executors.local import run_local

        remaining = max(spec.budget.trials - finished_count(study), 1)
        devices = plan_workers(gpus, spec.executor.workers, usable_cores(spec.executor.cpus))[:remaining]
        print(f"{len(devices)} worker(s): " + ", ".join(_describe(d) for d in devices))
        run_local(spec, study, storage_url, artifacts, devices, deadline, show_progress=not args.no_progress)
    table = write_report(study, spec.study_dir / "report")
    print(table.to_string(index=False) if len(table) else "no completed trial yet")
    print(f"report: {spec.study_dir / 'report'}   dashboard: optuna-dashboard {storage_url}"
          f" --artifact-dir {artifacts}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
