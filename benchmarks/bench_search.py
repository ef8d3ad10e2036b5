"""Timed searches on this machine: what a budget buys, and how well workers scale.

    python benchmarks/bench_search.py search --minutes 60            # studies/default.toml, all workers
    python benchmarks/bench_search.py search --study accurate --minutes 45 --name bench_accurate
    python benchmarks/bench_search.py efficiency --minutes 5         # 1 worker vs 2 workers, same budget

`--minutes` is the search's `--timeout`: no trial starts after it, running ones finish (the printed
wall_seconds says how long it took). `search` prints trials completed/pruned/failed, the best single
trial's test accuracy, seconds from a trial's start to its first training step, and how busy each core
was. `efficiency` runs the same fixed-cost trials (one backbone, fixed epochs, no pruning) for the same
wall-clock budget three ways and prints the ratios of finished trials:

- 1 worker on 1 core (one device) vs 2 workers on 2 cores (one device each): how the search scales with
  devices, the CPU image of 1 GPU vs 2 GPUs;
- 1 worker on both cores vs 2 workers on 2 cores: what splitting one machine into workers buys over
  TensorFlow's own intra-op threading.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
FIXED_COST_SPACE = """
[data]
max_train_images = 3000
[space]
backbones = ["compact_cnn"]
augment_policies = ["light"]
batch_size = [128]
epochs = [2, 2]
[algorithm]
pruner = "none"
sampler = "random"
[budget]
trials = 1000
tta_views = 1
"""


def cpu_times() -> list[tuple[int, int]]:
    """(busy, total) jiffies per core from /proc/stat."""
    rows = []
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + values[4]
            rows.append((sum(values) - idle, sum(values)))
    return rows


def busy_fractions(before, after) -> list[float]:
    return [(b1 - b0) / max(t1 - t0, 1) for (b0, t0), (b1, t1) in zip(before, after)]


def run_search(out: Path, name: str, minutes: float, workers: int | None, extra_spec: str | None,
               cpus: int | None = None, study: str = "default") -> float:
    if extra_spec is not None:
        out.mkdir(parents=True, exist_ok=True)
        spec = out / f"{name}.toml"
        base = (ROOT / "studies" / "default.toml").read_text()
        spec.write_text(_override(base, extra_spec))
        study = str(spec)
    command = [sys.executable, "-m", "search.run", "--study", study, "--out", str(out), "--name", name,
               "--timeout", str(minutes * 60), "--no-progress"]
    command += ["--workers", str(workers)] if workers else []
    command += ["--cpus", str(cpus)] if cpus else []
    started = time.time()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.time() - started


def _override(base: str, extra: str) -> str:
    """Drop the sections `extra` redefines (and warm starts, which would break a fixed space)."""
    replaced = {line.strip() for line in extra.splitlines() if line.startswith("[")}
    kept, skipping = [], False
    for line in base.splitlines():
        if line.startswith("["):
            skipping = line.strip() in replaced or line.strip() == "[[warm_start]]"
        if not skipping:
            kept.append(line)
    return "\n".join(kept) + "\n" + extra


def summarize(out: Path, name: str) -> dict:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / name / 'study.db'}")
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    first_steps = [t.user_attrs["seconds_to_first_step"] for t in complete if "seconds_to_first_step" in t.user_attrs]
    return {
        "trials_complete": len(complete),
        "trials_pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "trials_failed": sum(t.state == TrialState.FAIL for t in trials),
        "best_trial": best.number if best else None,
        "best_val_accuracy_tta": best.value if best else None,
        "best_trial_test_accuracy": best.user_attrs.get("test_accuracy") if best else None,
        "best_trial_test_accuracy_tta": best.user_attrs.get("test_accuracy_tta") if best else None,
        "max_test_accuracy_tta": max((t.user_attrs.get("test_accuracy_tta", 0) for t in complete), default=None),
        "median_seconds_to_first_step": statistics.median(first_steps) if first_steps else None,
        "best_params": best.params if best else None,
    }


def bench_search(args) -> None:
    before = cpu_times()
    seconds = run_search(args.out, args.name, args.minutes, args.workers, None, study=args.study)
    busy = busy_fractions(before, cpu_times())
    result = {"wall_seconds": round(seconds, 1), "core_busy": [round(b, 3) for b in busy],
              **summarize(args.out, args.name)}
    print(json.dumps(result, indent=2))


def bench_efficiency(args) -> None:
    counts = {}
    for workers, cpus in ((1, 1), (1, 2), (2, 2)):
        name = f"efficiency_{workers}w_{cpus}c"
        before = cpu_times()
        run_search(args.out, name, args.minutes, workers, FIXED_COST_SPACE, cpus=cpus)
        busy = busy_fractions(before, cpu_times())
        summary = summarize(args.out, name)
        counts[workers, cpus] = summary["trials_complete"] + summary["trials_pruned"] + summary["trials_failed"]
        print(f"{workers} worker(s) on {cpus} core(s): {counts[workers, cpus]} trials in {args.minutes} min, "
              f"core busy {[round(b, 2) for b in busy]}", flush=True)
    print(f"scaling with devices: 2 workers on 2 cores finished {counts[2, 2] / max(counts[1, 1], 1):.2f}x "
          f"the trials of 1 worker on 1 core")
    print(f"same machine: 2 one-core workers finished {counts[2, 2] / max(counts[1, 2], 1):.2f}x the trials "
          f"of 1 worker using both cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("search", "efficiency"))
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--name", default="bench_default")
    parser.add_argument("--study", default="default", help="search mode: a spec name or path")
    args = parser.parse_args()
    args.out = args.out.resolve()
    bench_search(args) if args.mode == "search" else bench_efficiency(args)


if __name__ == "__main__":
    main()
