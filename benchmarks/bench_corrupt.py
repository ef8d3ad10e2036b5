"""Time the corruption suite on the embedded test split and print the damage per kind and severity, then
time the mixed corrupted copy and the held-out validation copy (`shifted_copy`) of the validation split.

Run: python benchmarks/bench_corrupt.py
"""

from __future__ import annotations

import time

import numpy as np

from data_pipeline.corrupt import (DEFAULT_HELDOUT_FAMILIES, SEVERITIES, corrupt_dataset, corruption_suite,
                                   shifted_copy)
from data_pipeline.loaders import load


def main() -> None:
    dataset = load()
    clean = dataset.images[dataset.splits["test"]]
    print(f"{len(clean)} test images {clean.shape[1:]}; mean |change| per severity 1..5 (0..255 scale)")
    start = time.perf_counter()
    current, changes, kind_start = None, [], start
    for kind, severity, images in corruption_suite(clean):
        if kind != current:
            current, changes, kind_start = kind, [], time.perf_counter()
        changes.append(np.abs(images.astype(np.int16) - clean).mean())
        if severity == SEVERITIES[-1]:
            cells = " ".join(f"{c:6.2f}" for c in changes)
            print(f"{kind:18s} {cells}   {time.perf_counter() - kind_start:5.2f} s")
    print(f"whole suite: {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    corrupt_dataset(clean, seed=0)
    print(f"mixed corrupted copy: {time.perf_counter() - start:.1f} s")
    val = dataset.images[dataset.splits["val"]]
    start = time.perf_counter()
    shifted_copy(val, DEFAULT_HELDOUT_FAMILIES)
    print(f"held-out copy of {len(val)} validation images x {len(DEFAULT_HELDOUT_FAMILIES)} families: "
          f"{time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
