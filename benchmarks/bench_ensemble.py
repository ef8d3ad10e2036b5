"""Ensemble vs best single member (clean and corrupted test split), and inference throughput.

    python benchmarks/bench_ensemble.py                         # the study in runs/last_study.json
    python benchmarks/bench_ensemble.py --study default --top 5 --method greedy
    python benchmarks/bench_ensemble.py --members 5 --images 4096   # throughput of a 5-member ensemble
    python benchmarks/bench_ensemble.py --study fast --min-images-per-s 1000 --precision bfloat16

1. Builds the ensemble with `ensemble.build` (into --out, default a temporary folder) and prints its table:
   ensemble, best single member and plain average on the clean test split and its held-out-family copy;
   then the ensemble with and without test-time BatchNorm adaptation (--adapt-bn-batch images per call)
   on both, which is what decides the artifact's `adapt_bn` default.
2. Times inference in images/s on --images random uint8 images of the members' input size:
   - the fused runner (all members x all TTA views in one compiled call per batch), with 8 views and with 1;
   - the best single member alone, with 8 views and with 1;
   - the naive way for reference: `model.predict` once per member and per view (search.trial.views.predict_views).
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
    import pandas as pd

    from ensemble import load_ensemble
    from ensemble.budget import images_per_second
    from ensemble.classifier import uniform_vote
    from search.trial.views import predict_views

    built = load_ensemble(folder, precision=precision)
    precision = built.precision_
    models = list(built.members_)
    if n_members:
        models = [models[i % len(models)] for i in range(n_members)]
    height, width = built.input_size_
    best = models[0]
    rows = []
    for label, members, views in ((f"ensemble ({len(models)} members)", models, 8),
                                  (f"ensemble ({len(models)} members)", models, 1),
                                  ("best single member", [best], 8), ("best single member", [best], 1)):
        clf = uniform_vote(members, built.class_names_, views, precision)  # combining costs next to nothing
        rate = images_per_second(clf.predict_proba, (height, width), n_images, repeats)
        rows.append({"model": label, "runner": f"fused {precision}", "tta_views": views, "images_per_s": rate,
                     "forward_passes_per_s": rate * views * len(members)})
    if naive:
        rate = images_per_second(lambda small: [predict_views(m, small, 8) for m in models], (height, width),
                                 max(256, n_images // 8), repeats=1)
        rows.append({"model": f"ensemble ({len(models)} members)", "runner": "model.predict per view",
                     "tta_views": 8, "images_per_s": rate, "forward_passes_per_s": rate * 8 * len(models)})
    return pd.DataFrame(rows), (height, width)


def adapt_bn_table(ens, batch_size: int):
    """The ensemble with and without BatchNorm adaptation on the clean test split and its held-out-family copy
    (the build's copy: same families and seed), adapting to batches of `batch_size` images (drawn in the
    classifier's fixed random order)."""
    import pandas as pd

    from ensemble.build import heldout_test_copy
    from common.metrics import summary
    from search.study.trial_config import TrialConfig
    from search.trial.data import split_dataset

    config = TrialConfig.from_dict(ens.manifest_["members"][0]["config"])
    test = split_dataset(config).split("test")
    copy = heldout_test_copy(config, test.images)
    ens.set_params(batch_size=batch_size)  # adaptation sees one call's batch: its size matters
    rows = []
    for split, images, labels in (("test", test.images, test.labels), ("test_heldout", copy.images,
                                                                          test.labels[copy.source])):
        for adapt in (False, True):
            scores = summary(ens.predict_proba(images, adapt_bn=adapt), labels)
            rows.append({"split": split, "adapt_bn": adapt, "accuracy": scores["accuracy"], "ece": scores["ece"]})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study")
    parser.add_argument("--storage")
    parser.add_argument("--artifacts")
    parser.add_argument("--pointer", default="runs/last_study.json")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--method", choices=("topk", "greedy"), default="greedy")
    parser.add_argument("--combiner", default="auto")
    parser.add_argument("--objective", choices=("robust", "clean"), default="robust")
    parser.add_argument("--adapt-bn-batch", type=int, default=256,
                        help="images per call when comparing BatchNorm adaptation (0: skip the comparison)")
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

    from ensemble.build import BuildOptions, build_ensemble
    from search.study.location import StudyLocation
    from common.cli_errors import run_cli

    with tempfile.TemporaryDirectory(prefix="bench-ensemble-") as scratch:
        folder = Path(args.ensemble) if args.ensemble else Path(args.out or Path(scratch) / "ensemble")
        if not args.ensemble:
            options = BuildOptions(pointer=args.pointer, top=args.top, method=args.method, combiner=args.combiner,
                                   objective=args.objective, out=str(folder), progress=False,
                                   min_images_per_s=args.min_images_per_s, precision=args.precision or "float32")
            started = time.perf_counter()
            code = run_cli(lambda _: (build_ensemble(
                StudyLocation.find(args.study, storage=args.storage, artifacts=args.artifacts, pointer=args.pointer),
                options), 0)[1])
            if code:
                return code
            print(f"build: {time.perf_counter() - started:.1f} s")
        if args.adapt_bn_batch:
            from ensemble import load_ensemble

            print(f"\ntest-time BatchNorm adaptation ({args.adapt_bn_batch} images per batch):")
            table = adapt_bn_table(load_ensemble(folder, precision=args.precision), args.adapt_bn_batch)
            print(table.to_string(index=False, float_format="{:.4f}".format))
        table, size = timing_table(folder, args.images, args.members, args.repeats, not args.no_naive,
                                   args.precision)
        print(f"\ninference on {args.images} random {size[0]}x{size[1]} images (best of {args.repeats}):")
        print(table.to_string(index=False, float_format=lambda v: f"{v:,.0f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
