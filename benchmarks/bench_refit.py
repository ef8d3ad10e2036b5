"""What a final refit on every corruption family buys, measured by family rotation (ensemble.refit).

A member is retrained once per corruption family, on all the other families, and scored on the family left
out; the member as the search trained it (the spec's training families) is trained beside the folds and
scored on every family. Per family the table prints the fold's clean validation accuracy, its accuracy on the
family it never saw, the searched member's accuracy on that family (and whether it trained on it), and the
gain. The trainings run in parallel, one per core (or GPU).

    python benchmarks/bench_refit.py [--spec quick] [--warm-start 0] [--epochs N] [--train-images N]

The member is the spec's warm start number `--warm-start` (quick's first: compact_cnn_d2 with `corrupt`).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="quick", help="shipped spec name or .toml path")
    parser.add_argument("--warm-start", type=int, default=0, help="which warm start of the spec is the member")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: the warm start's)")
    parser.add_argument("--train-images", type=int, default=None, help="stratified training subsample")
    parser.add_argument("--families", default=None, help="comma-separated families to rotate (default: all)")
    parser.add_argument("--csv", default=None, help="also write the table here")
    return parser.parse_args(argv)


def member_config(args: argparse.Namespace):
    from search.study.space import warm_start_trials
    from search.study.spec import load_spec
    from search.trial.run_trial import trial_config

    spec = load_spec(args.spec)
    config = trial_config(spec, warm_start_trials(spec)[args.warm_start][0], 0)
    changes = {"exclude_file": None, "max_train_images": args.train_images}
    if args.epochs:
        changes["epochs"] = args.epochs
    return dataclasses.replace(config, **changes)


def main(argv: list[str] | None = None) -> None:
    from ensemble.refit import rotation_table

    args = parse_args(argv)
    config = member_config(args)
    families = args.families.split(",") if args.families else None
    print(f"member: {config.backbone}, {config.augment_policy} {config.augment_strength}, {config.epochs} epochs, "
          f"trained on {config.train_families}", flush=True)
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        table = rotation_table(config, Path(scratch), families)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    unseen = table[~table["searched_trained_on_it"]]
    print(f"families the searched member never saw, mean accuracy: folds {unseen['heldout_accuracy_tta'].mean():.4f}, "
          f"searched member {unseen['searched_accuracy_tta'].mean():.4f}")
    print(f"clean validation accuracy: folds {table['val_accuracy_tta'].mean():.4f} (mean), searched member "
          f"{table['searched_val_accuracy_tta'].iloc[0]:.4f}")
    if args.csv:
        table.to_csv(args.csv, index=False)
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
