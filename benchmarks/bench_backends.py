"""One default-study trial under each Keras backend, side by side: seconds per epoch and per trial.

The trial is the default study's first warm start (compact_cnn_d3, 'corrupt' 0.8, batch 128), trained for
`--epochs` epochs on one core per backend process (as the local executor runs it), then scored with its
8-view TTA like every trial. Backends run one after another, each in a fresh process (Keras picks its
backend once per process), so they do not share the CPU.

    python benchmarks/bench_backends.py [--backends jax,tensorflow,torch] [--epochs 2] [--train-images N]

`until_epoch1_s` runs from the start of `train_trial` to the end of the first epoch (data preparation, model,
compilation: tracing, XLA), `first_step_s` to the first training step; `epoch_s` is the mean of the later
epochs; `trial_s` is the whole `train_trial` (with the 8-view TTA evaluation and saving). Figures depend on what else
runs on the machine: the load average is printed with each row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRIAL = """
import json, sys, tempfile, time
from search.execution.devices import configure_backend
from bench_backends import warm_start_config

configure_backend(1)
config = warm_start_config({overrides})
config.epochs = {epochs}
config.max_train_images = {train_images}
stamps = []
started = time.perf_counter()
from search.trial.trainer import train_trial
report = lambda epoch, scores: stamps.append(time.perf_counter())
metrics = train_trial(config, tempfile.mkdtemp(), report=report).metrics
total = time.perf_counter() - started
steps = [b - a for a, b in zip([started] + stamps, stamps)]
print("RESULT " + json.dumps({{"until_epoch1_s": steps[0], "first_step_s": metrics["seconds_to_first_step"],
                              "epoch_s": sum(steps[1:]) / max(1, len(steps) - 1),
                              "trial_s": total, "val_accuracy": metrics["val_accuracy"],
                              "n_train": metrics["n_train"]}}))
"""


def warm_start_config(overrides: dict | None = None, study: str = "default"):
    """The first warm start of preset `study`, with `overrides` of its hyperparameters, as a lone trial's config
    (every image: the search cleans once before its trials). Call it after `configure_backend`."""
    from search.study.space import warm_start_trials
    from search.study.spec import load_spec
    from search.trial.run_trial import trial_config

    spec = load_spec(study)
    config = trial_config(spec, {**warm_start_trials(spec)[0][0], **(overrides or {})}, 0)
    config.exclude_file = None
    return config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="jax,tensorflow,torch", help="comma-separated Keras backends")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial (the first one compiles)")
    parser.add_argument("--train-images", type=int, default=None, help="stratified subsample (default: all)")
    return parser.parse_args(argv)


def run(backend: str, args: argparse.Namespace, overrides: dict | None = None, env: dict | None = None) -> dict:
    """The trial in a fresh process under `backend`, with `overrides` of its hyperparameters and `env` added."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", "OMP_NUM_THREADS": "1",
           "TF_NUM_INTRAOP_THREADS": "1", "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]), **(env or {})}
    code = TRIAL.format(epochs=args.epochs, train_images=args.train_images, overrides=repr(overrides or {}))
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1][:200]}
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])


def table_row(label: str, row: dict, extra: tuple[str, ...] = ()) -> str:
    """A markdown row of `run`'s timings and accuracy, then its `extra` fields and the load average (or the
    error in the first column)."""
    load = f"{os.getloadavg()[0]:.1f}"
    if "error" in row:
        return f"| {label} | failed: {row['error']} |" + " |" * (4 + len(extra)) + f" {load} |"
    cells = [f"{row[k]:.1f}" for k in ("first_step_s", "until_epoch1_s", "epoch_s", "trial_s")]
    return "| " + " | ".join([label, *cells, f"{row['val_accuracy']:.3f}", *(str(row[k]) for k in extra), load]) + " |"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"cpus={os.cpu_count()}; default study warm start 0, {args.epochs} epochs, one core per trial")
    print("| backend | first_step_s | until_epoch1_s | epoch_s | trial_s | val_accuracy | n_train | load 1m |")
    print("|---|---|---|---|---|---|---|---|")
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        print(table_row(backend, run(backend, args), ("n_train",)), flush=True)


if __name__ == "__main__":
    main()
