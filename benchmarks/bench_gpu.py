"""The default study on a GPU under JAX (no TensorFlow needed), against the same study on the CPU.

One script for a borrowed GPU machine with no internet, at most ~10 minutes: it runs the default study on the
embedded data for `--minutes` with `--workers` trial processes sharing the GPU(s) (as the search places them:
JAX allocating memory on demand, each worker capped at its share, and JAX's persistent compilation cache in
`<out>/jax_cache` shared by all, so a graph compiled once loads from disk in the next trial), builds the
ensemble, and prints:
finished (COMPLETE or PRUNED) trials per hour, compile seconds per trial (`seconds_to_first_step`), GPU
utilisation and memory sampled by `nvidia-smi` every second, the ensemble's clean and held-out-family test
accuracy, then the same study's trials per hour on the CPU (`--cpu-minutes`, GPUs hidden) and the ratio.

    KERAS_BACKEND=jax python benchmarks/bench_gpu.py [--minutes 6] [--workers 4] [--cpu-minutes 1.5] [--out runs]
        [--mixed-precision bfloat16]

On a CPU, `--spec quick --minutes 4 --workers 2 --cpu-minutes 0` runs the whole script in about 5 minutes.

Target (issue 19): at least 50 finished default-study trials in 10 minutes on one H200, ensemble included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=6.0, help="GPU search time (no new trial after it)")
    parser.add_argument("--workers", type=int, default=4, help="trial processes sharing the GPU(s)")
    parser.add_argument("--cpu-minutes", type=float, default=1.5, help="CPU search time for the ratio (0: skip)")
    parser.add_argument("--out", default="runs", help="output root")
    parser.add_argument("--name", default="bench_gpu")
    parser.add_argument("--spec", default="default",
                        help="shipped spec or .toml (`quick` finishes trials on a CPU: a smoke run of this script)")
    parser.add_argument("--tta", type=int, default=8)
    parser.add_argument("--mixed-precision", default="auto",
                        help="the search's --mixed-precision (auto: float16 on a GPU; bfloat16 to measure it)")
    return parser.parse_args(argv)


def search(args: argparse.Namespace, name: str, minutes: float, workers: int, gpus: str, env: dict) -> float:
    """Run `python -m search.run` on the default study; returns its wall seconds."""
    command = [sys.executable, "-m", "search.run", "--spec", args.spec, "--study", name, "--out", args.out,
               "--timeout", str(int(minutes * 60)), "--trials", "1000", "--workers", str(workers),
               "--gpus", gpus, "--mixed-precision", args.mixed_precision, "--no-progress"]
    started = time.time()
    with open(Path(args.out) / f"{name}.log", "w") as log:
        subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    return time.time() - started


class GpuSampler:
    """`nvidia-smi` utilisation and memory, one line a second, in the background."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.process = None
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-l", "1"], stdout=open(path, "w"), stderr=subprocess.DEVNULL)

    def stop(self) -> dict:
        if self.process is None:
            return {"gpu_util_mean": None, "gpu_memory_mib_max": None}
        self.process.terminate()
        self.process.wait()
        rows = [line.split(",") for line in self.path.read_text().splitlines() if line.count(",") == 1]
        util = [float(u) for u, _ in rows]
        memory = [float(m) for _, m in rows]
        return {"gpu_util_mean": round(sum(util) / max(1, len(util)), 1), "gpu_memory_mib_max": max(memory or [0])}


def study_figures(name: str, args: argparse.Namespace, seconds: float) -> dict:
    import cellsearch as cs

    trials = cs.load_study(name, out=args.out).optuna_study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    compile_s = [t.user_attrs["seconds_to_first_step"] for t in trials
                 if t.user_attrs.get("seconds_to_first_step") is not None]
    return {"finished": len(finished), "complete": sum(t.state.name == "COMPLETE" for t in trials),
            "failed": sum(t.state.name == "FAIL" for t in trials), "search_s": round(seconds),
            "trials_per_hour": round(len(finished) * 3600 / max(seconds, 1.0), 1),
            "compile_s_per_trial": round(sum(compile_s) / len(compile_s), 1) if compile_s else None}


def ensemble_figures(name: str, args: argparse.Namespace) -> dict:
    import numpy as np

    import cellsearch as cs
    from benchmarks.bench_robust import test_data

    study = cs.load_study(name, out=args.out)
    started = time.time()
    ens = cs.build_ensemble(study, tta=args.tta, quiet=True, progress=False,
                            pointer=str(Path(args.out) / f"{name}_last.json"))
    test, shifted = test_data(study)
    clean = float(np.mean(ens.predict(test.images) == test.labels))
    heldout = float(np.mean(ens.predict(shifted.images) == test.labels[shifted.source]))
    return {"ensemble_s": round(time.time() - started), "members": len(ens.report_.members),
            "test_clean": round(clean, 4), "test_heldout": round(heldout, 4)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    os.environ.update(KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    sampler = GpuSampler(Path(args.out) / f"{args.name}_nvidia_smi.csv")
    seconds = search(args, args.name, args.minutes, args.workers, "auto", os.environ.copy())
    result = {"gpu": {**study_figures(args.name, args, seconds), **sampler.stop()}}
    from cellsearch.errors import CellsearchError

    try:
        result["gpu"].update(ensemble_figures(args.name, args))
    except CellsearchError as exc:  # e.g. no trial finished in time: the search figures still count
        result["gpu"]["ensemble_error"] = str(exc)
    print(json.dumps(result, indent=1), flush=True)
    if args.cpu_minutes > 0:
        cpu_env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        cpu_seconds = search(args, f"{args.name}_cpu", args.cpu_minutes, min(os.cpu_count() or 1, 8), "none", cpu_env)
        result["cpu"] = study_figures(f"{args.name}_cpu", args, cpu_seconds)
        result["gpu_over_cpu_trials_per_hour"] = round(
            result["gpu"]["trials_per_hour"] / max(result["cpu"]["trials_per_hour"], 0.1), 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
