"""What annealing to the time a trial has buys: the default study's first warm start (compact_cnn_d3, 'corrupt'
0.8, 24 epochs) under a time budget that stops it part-way, with the end of its learning-rate decay moved to the
last epoch that fits (what the trainer does) and left where it was (the trainer before 2026-12-05).

Both arms run at the same time, each on its own core as the search's workers do, so they share the machine's
load; a third arm (`--full`) trains all epochs without a budget. Each row: epochs run, the epoch the decay
ended at, the learning rate of the last epoch, and clean and held-out-family TTA accuracy.

    python benchmarks/bench_anneal.py [--budget 600] [--seed 0] [--full]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_backends import ROOT

sys.path.insert(0, str(ROOT))
from search.execution.devices import WorkerDevices, pin_environment  # noqa: E402
from search.execution.devices_plan import usable_cores  # noqa: E402

TRIAL = """
import json, sys
import pandas as pd
from search.execution.devices import configure_backend
from bench_backends import warm_start_config

configure_backend(1)
if {fixed}:
    from search.trial.schedule import AnnealToTime
    AnnealToTime.end_at = lambda self, now, end: None  # the decay ends where it was planned
config = warm_start_config()
config.time_budget_s, config.seed = {budget}, {seed}
from search.trial.trainer import train_trial
folder = sys.argv[1]
metrics = train_trial(config, folder).metrics
metrics["last_learning_rate"] = float(pd.read_csv(folder + "/history.csv")["learning_rate"].iloc[-1])
print("RESULT " + json.dumps(metrics))
"""
COLUMNS = ("epochs_run", "schedule_epochs", "last_learning_rate", "train_seconds", "val_accuracy_tta",
           "test_accuracy_tta", "val_corrupted_accuracy_tta")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=600.0, help="the trial's time budget in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full", action="store_true", help="also train all epochs without a budget (third core "
                                                            "if there is one, else after the others)")
    return parser.parse_args(argv)


def start_pinned(code: str, core: int, folder: Path, name: str) -> subprocess.Popen:
    """`code` in a fresh process on `core` with one thread, as a search worker runs, given `folder/<name>` as its
    argument and its output in `folder/<name>.log` (a pipe nobody drains could stall it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]),
           "TF_CPP_MIN_LOG_LEVEL": "3", **pin_environment(WorkerDevices(cpu_cores=[core], cpu_threads=1))}
    with open(folder / f"{name}.log", "w") as log:
        return subprocess.Popen([sys.executable, "-c", code, str(folder / name)], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)


def start(arm: str, args: argparse.Namespace, core: int, folder: Path) -> subprocess.Popen:
    """The arm's trial on `core`, its output in `folder/<arm>.log`."""
    budget = None if arm == "full" else args.budget
    return start_pinned(TRIAL.format(fixed=arm == "fixed", budget=budget, seed=args.seed), core, folder, arm)


def result(process: subprocess.Popen, log: Path) -> dict:
    process.wait()
    lines = log.read_text().strip().splitlines() or ["no output"]
    if process.returncode != 0:
        return {"error": lines[-1][:200]}
    return json.loads([line for line in lines if line.startswith("RESULT ")][-1][7:])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench_anneal_"))
    arms = ["fixed", "moved"] + (["full"] if args.full else [])
    cores = usable_cores()
    print(f"cpus={len(cores)}; default study warm start 0, seed {args.seed}, time budget {args.budget:.0f} s, "
          f"one core per arm, {os.environ.get('KERAS_BACKEND', 'tensorflow')}")
    print("| arm | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    running = {arm: start(arm, args, cores[i % len(cores)], folder) for i, arm in enumerate(arms[:max(2, len(cores))])}
    rows = {arm: result(process, folder / f"{arm}.log") for arm, process in running.items()}
    for arm in arms[len(running):]:
        rows[arm] = result(start(arm, args, cores[0], folder), folder / f"{arm}.log")
    for arm in arms:
        row = rows[arm]
        cells = [f"failed: {row['error']}"] if "error" in row else [
            f"{row[k]:.2e}" if k == "last_learning_rate" else f"{row[k]:.4f}" if isinstance(row[k], float)
            else str(row[k]) for k in COLUMNS]
        print(f"| {arm} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
