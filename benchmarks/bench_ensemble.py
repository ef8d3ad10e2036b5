"""Ensemble vs best single member (clean and corrupted test split), and inference throughput.

    python benchmarks/bench_ensemble.py                         # the study in runs/last_study.json
    python benchmarks/bench_ensemble.py --study default --top 5 --method greedy
    python benchmarks/bench_ensemble.py --members 5 --images 4096   # throughput of a 5-member ensemble
    python benchmarks/bench_ensemble.py --study fast --min-images-per-s 1000 --precision bfloat16

1. Builds the ensemble with `ensemble.build` (into --out, default a temporary folder) and prints its table:
   ensemble, best single member and plain average on the clean and the corrupted test split.
2. Times inference in images/s on --images random uint8 images of the members' input size:
   - the fused runner (all members x all TTA views in one compiled call per batch), with 8 views and with 1;
   - the best single member alone, with 8 views and with 1;
   - the naive way for reference: `model.predict` once per member and per view (search.predict.predict_views).
   `--members N` cycles the built members up to N (e.g. 5 when the study has fewer distinct good trials) so
   the cost of an N-member ensemble can be measured; predictions are irrelevant for the timing.
Figures on a shared CPU vary with other load: compare rows of one run, not across runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def timing_table(folder: Path, n_images: int, n_members: int | None, repeats: int, naive: bool,
                 precision: str | None = None):
    import numpy as np
    import pandas as pd

    from ensemble import EnsembleClassifier, load_ensemble
    from ensemble.budget import images_per_second
    from ensemble.combiners import SoftVoting
    from search.predict import predict_views

    built = load_ensemble(folder, precision=precision)
    precision = built.precision_
    models = list(built.models)
    if n_members:
        models = [models[i % len(models)] for i in range(n_members)]
    combiner = built.combiner if len(models) == built.n_members else SoftVoting().fit(
        np.full((2, len(models), len(built.class_names)), 1 / len(built.class_names)), np.array([0, 1]))
    height, width = built.input_size
    best = models[0]
    rows = []
    for label, members, views in ((f"ensemble ({len(models)} members)", models, 8),
                                  (f"ensemble ({len(models)} members)", models, 1),
                                  ("best single member", [best], 8), ("best single member", [best], 1)):
        member_combiner = combiner if members is models else SoftVoting().fit(
            np.full((2, 1, len(built.class_names)), 1 / len(built.class_names)), np.array([0, 1]))
        clf = EnsembleClassifier(members, member_combiner, built.class_names, tta_views=views, precision=precision)
        rate = images_per_second(clf.predict_proba, (height, width), n_images, repeats)
        rows.append({"model": label, "runner": f"fused {precision}", "tta_views": views, "images_per_s": rate,
                     "forward_passes_per_s": rate * views * len(members)})
    if naive:
        rate = images_per_second(lambda small: [predict_views(m, small, 8) for m in models], (height, width),
                                 max(256, n_images // 8), repeats=1)
        rows.append({"model": f"ensemble ({len(models)} members)", "runner": "model.predict per view",
                     "tta_views": 8, "images_per_s": rate, "forward_passes_per_s": rate * 8 * len(models)})
    return pd.DataFrame(rows), (height, width)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study")
    parser.add_argument("--storage")
    parser.add_argument("--artifacts")
    parser.add_argument("--pointer", default="runs/last_study.json")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--method", choices=("topk", "greedy"), default="greedy")
    parser.add_argument("--combiner", default="auto")
    parser.add_argument("--corrupt-severities", default="1,2,3,4,5")
    parser.add_argument("--min-images-per-s", type=float, help="inference budget for member selection")
    parser.add_argument("--precision", help="inference precision float32 | bfloat16 (default: float32 for a build, "
                                             "the artifact's own with --ensemble)")
    parser.add_argument("--out", help="ensemble folder (default: a temporary folder, removed afterwards)")
    parser.add_argument("--ensemble", help="skip the build: time an existing ensemble folder")
    parser.add_argument("--images", type=int, default=4096, help="images for the throughput timing")
    parser.add_argument("--members", type=int, help="time an N-member ensemble (members cycled)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-naive", action="store_true", help="skip the slow model.predict-per-view reference")
    args = parser.parse_args(argv)

    from ensemble.build import BuildOptions, build_ensemble, parse_severities
    from ensemble.cli import run_cli

    with tempfile.TemporaryDirectory(prefix="bench-ensemble-") as scratch:
        folder = Path(args.ensemble) if args.ensemble else Path(args.out or Path(scratch) / "ensemble")
        if not args.ensemble:
            options = BuildOptions(study=args.study, storage=args.storage, artifacts=args.artifacts,
                                   pointer=args.pointer, top=args.top, method=args.method, combiner=args.combiner,
                                   out=str(folder), corrupt_severities=parse_severities(args.corrupt_severities),
                                   progress=False, min_images_per_s=args.min_images_per_s,
                                   precision=args.precision or "float32")
            started = time.perf_counter()
            code = run_cli(lambda _: (build_ensemble(options), 0)[1])
            if code:
                return code
            print(f"build: {time.perf_counter() - started:.1f} s")
        table, size = timing_table(folder, args.images, args.members, args.repeats, not args.no_naive,
                                   args.precision)
        print(f"\ninference on {args.images} random {size[0]}x{size[1]} images (best of {args.repeats}):")
        print(table.to_string(index=False, float_format=lambda v: f"{v:,.0f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
