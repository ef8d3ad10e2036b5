"""Throughput of the augmented training stream, per policy, at 28x28 (embedded data) and 64x64.

Tells whether augmentation can keep a CPU/GPU trainer fed: each row is images/s of
`make_stream(..., augmenter=build_augmenter(policy, strength))` at batch size 128, measured after a
warm-up (the warm-up also pays for compiling the augmenter, reported as `startup_s`), under the Keras
backend of KERAS_BACKEND.

    python benchmarks/bench_stream.py [--data64 PATH] [--seconds 8] [--batches 40] [--policies light,augmix]
                                      [--sizes 28,64]

Numbers depend on the machine and on what else runs on it: the load average is printed first.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

DEFAULT_DATA64 = Path(__file__).resolve().parents[2] / "shared" / "data" / "bloodcells_64.npz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from data_pipeline.augment import POLICIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data64", type=Path, default=DEFAULT_DATA64, help="64x64 .npz (skipped if missing)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policy names")
    parser.add_argument("--strength", type=float, default=1.0, help="1.0 = every image augmented (worst case)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3, help="batches drawn before timing")
    parser.add_argument("--seconds", type=float, default=8.0, help="stop timing a row after this long")
    parser.add_argument("--batches", type=int, default=40, help="stop timing a row after this many batches")
    parser.add_argument("--sizes", default="28,64", help="comma-separated image sizes to measure (28 and/or 64)")
    return parser.parse_args(argv)


def measure(images, labels, num_classes: int, policy: str, args: argparse.Namespace) -> tuple[float, float]:
    """(images/s after warm-up, seconds from building the stream to the end of warm-up)."""
    from data_pipeline.augment import build_augmenter
    from data_pipeline.stream import make_stream

    started = time.perf_counter()
    augmenter = build_augmenter(policy, args.strength, num_classes, seed=0)
    stream = make_stream(images, labels, num_classes, args.batch_size, augmenter=augmenter, seed=0, repeat=True)
    batches = iter(stream)
    for _ in range(args.warmup):
        next(batches)
    warm = time.perf_counter()
    n_batches = n_images = 0
    while n_batches < args.batches and time.perf_counter() - warm < args.seconds:
        n_images += int(next(batches)[0].shape[0])
        n_batches += 1
    return n_images / (time.perf_counter() - warm), warm - started


def datasets(args: argparse.Namespace) -> list[tuple[str, object]]:
    from data_pipeline.loaders import load

    sizes = {size.strip() for size in args.sizes.split(",") if size.strip()}
    found = [("28x28", load())] if "28" in sizes else []
    if "64" in sizes and args.data64.exists():
        found.append(("64x64", load(args.data64)))
    elif "64" in sizes:
        print(f"skipping 64x64: {args.data64} not found (pass --data64 PATH)")
    return found


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    load1, load5, _ = os.getloadavg()
    print(f"cpus={os.cpu_count()} load average 1m={load1:.2f} 5m={load5:.2f}; batch={args.batch_size} "
          f"strength={args.strength} (at most {args.batches} batches / {args.seconds:g} s per row)")
    rows = []
    for size, data in datasets(args):
        train = data.split("train") if "train" in data.splits else data
        for policy in policies:
            rate, startup = measure(train.images, train.labels, data.num_classes, policy, args)
            rows.append((policy, size, rate, startup))
            print(f"  {policy:<13} {size}  {rate:9.0f} images/s  (startup {startup:.1f} s)", flush=True)
    print()
    print(f"{'policy':<13} {'size':<6} {'images/s':>9} {'startup_s':>9}")
    for policy, size, rate, startup in rows:
        print(f"{policy:<13} {size:<6} {rate:9.0f} {startup:9.1f}")


if __name__ == "__main__":
    main()
