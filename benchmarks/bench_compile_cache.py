"""What JAX's persistent compilation cache saves a trial: the default study's first warm start under JAX, each
run in a fresh process as a search worker runs it, side by side on the same machine.

Rows, in order: the trial without a cache; with an empty cache (it fills it); again with that cache; a trial of
the same backbone and policy with other hyperparameters (learning rate, augmentation strength, weight decay,
dropout, label smoothing), with the cache and then without it. The search and the refit give their JAX workers
the cache in `<out>/jax_cache` (`search.execution.devices.pin_environment`).

    python benchmarks/bench_compile_cache.py [--epochs 2] [--train-images 2048]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from bench_backends import ROOT, run, table_row

sys.path.insert(0, str(ROOT))
from search.execution.devices import WorkerDevices, pin_environment  # noqa: E402

OTHER = {"learning_rate": 0.001, "augment_strength": 0.6, "weight_decay": 0.0005, "dropout": 0.3,
         "label_smoothing": 0.05}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial (the first one compiles)")
    parser.add_argument("--train-images", type=int, default=2048, help="stratified subsample")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="jax_cache_"))
    os.environ["KERAS_BACKEND"] = "jax"
    cache = {k: v for k, v in pin_environment(WorkerDevices(), folder).items() if k.startswith("JAX_")}  # a worker's
    rows = [("warm start 0, no cache", None, {}), ("warm start 0, empty cache", None, cache),
            ("warm start 0, cache filled", None, cache), ("other hyperparameters, cache filled", OTHER, cache),
            ("other hyperparameters, no cache", OTHER, {})]
    print(f"cpus={os.cpu_count()}; KERAS_BACKEND=jax, {args.epochs} epochs on {args.train_images} images, one core")
    print("| run | first_step_s | until_epoch1_s | epoch_s | trial_s | val_accuracy | load 1m |")
    print("|---|---|---|---|---|---|---|")
    for label, overrides, env in rows:
        print(table_row(label, run("jax", args, overrides, env)), flush=True)
    files = [f for f in folder.rglob("*") if f.is_file()]
    print(f"cache {cache}: {len(files)} entries, {sum(f.stat().st_size for f in files) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
