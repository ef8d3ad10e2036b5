"""What a worker's glibc malloc settings (`common.malloc.malloc_environment`) buy: one CPU trial with
glibc's defaults and one with the settings, each on its own core as the search's workers run, both at once
(`--alone`: one after the other, nothing else running). Each row: wall seconds, CPU seconds in user space and
in the kernel, minor page faults (from `os.wait4`), and the trial's own training seconds and first epoch.

The trial is the `quick` preset's first warm start (compact_cnn_d2, `corrupt` 0.8) for `--epochs` epochs with
one TTA view, the same seed in both arms, so both learn the same weights.

    python benchmarks/bench_malloc.py [--epochs 3] [--alone]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_backends import ROOT

sys.path.insert(0, str(ROOT))
from common.malloc import malloc_environment  # noqa: E402
from search.execution.devices import WorkerDevices, pin_environment  # noqa: E402

TRIAL = """
import json, sys
from search.execution.devices import configure_backend
from bench_backends import warm_start_config

configure_backend(1)
from search.trial.trainer import train_trial

config = warm_start_config({{"epochs": {epochs}}}, "quick")
config.tta_views = 1
print("RESULT " + json.dumps(train_trial(config, sys.argv[1]).metrics))
"""
ARMS = ("glibc defaults", "worker settings")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--alone", action="store_true", help="one arm after the other instead of both at once")
    return parser.parse_args(argv)


def start(arm: str, epochs: int, core: int, folder: Path) -> tuple[subprocess.Popen, float]:
    """The arm's trial on `core` (output in `folder`, so no undrained pipe stalls it) and its start time."""
    env = dict(os.environ)
    env.update(pin_environment(WorkerDevices(cpu_cores=(core,), cpu_threads=1)),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]), TF_CPP_MIN_LOG_LEVEL="3")
    if arm == ARMS[0]:
        env = {k: v for k, v in env.items() if k not in malloc_environment(1)}
    with open(folder / f"{core}.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-c", TRIAL.format(epochs=epochs), str(folder / str(core))],
                                   env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return process, time.perf_counter()


def finish(process: subprocess.Popen, started: float, log: Path) -> dict:
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    lines = log.read_text().strip().splitlines() or ["no output"]
    if status != 0:
        return {"error": lines[-1][:200]}
    metrics = json.loads([line for line in lines if line.startswith("RESULT ")][-1][7:])
    return {"wall_s": wall, "user_s": usage.ru_utime, "kernel_s": usage.ru_stime, "minor_faults": usage.ru_minflt,
            "train_s": metrics["train_seconds"], "first_epoch_s": metrics["seconds_to_first_epoch"],
            "val_accuracy": metrics["val_accuracy"]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not sys.platform.startswith("linux"):
        sys.exit("bench_malloc: glibc's malloc settings are Linux-only")
    if mine := sorted(k for k in os.environ if k.startswith("MALLOC_")):
        sys.exit(f"bench_malloc: unset {', '.join(mine)} first: workers then keep their own, and both arms would match")
    folder = Path(tempfile.mkdtemp(prefix="bench_malloc_"))
    cores = sorted(os.sched_getaffinity(0))
    together = not args.alone and len(cores) >= 2
    print(f"cpus={len(cores)}; quick warm start 0 (compact_cnn_d2, corrupt), {args.epochs} epoch(s), one core per "
          f"arm, {'both at once' if together else 'one after the other'}")
    rows = {}
    if together:
        running = {arm: (start(arm, args.epochs, cores[i], folder), cores[i]) for i, arm in enumerate(ARMS)}
        rows = {arm: finish(*started, folder / f"{core}.log") for arm, (started, core) in running.items()}
    else:
        for arm in ARMS:
            rows[arm] = finish(*start(arm, args.epochs, cores[0], folder), folder / f"{cores[0]}.log")
    columns = ("wall_s", "user_s", "kernel_s", "minor_faults", "train_s", "first_epoch_s", "val_accuracy")
    print("| arm | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for arm, row in rows.items():
        cells = [f"failed: {row['error']}"] if "error" in row else [
            f"{row[k]:.4f}" if k == "val_accuracy" else f"{row[k]:.1f}" if isinstance(row[k], float) else str(row[k])
            for k in columns]
        print(f"| {arm} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
