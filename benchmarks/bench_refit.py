"""What a final refit on every corruption family buys, measured by family rotation (ensemble.refit).

A member is retrained once per corruption family, on all the other families, and scored on the family left
out; the member as the search trained it (the spec's training families) is trained once and scored on every
family. Per family the table prints the fold's clean validation accuracy, its accuracy on the family it never
saw, the searched member's accuracy on that family (and whether it trained on it), and the difference. One
process, one core.

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
    return parser.parse_args(argv)


def member_config(args: argparse.Namespace):
    from search.execution.devices import configure_backend
    from search.study.space import warm_start_trials
    from search.study.spec import load_spec
    from search.trial.run_trial import trial_config

    configure_backend(1)
    spec = load_spec(args.spec)
    config = trial_config(spec, warm_start_trials(spec)[args.warm_start][0], 0)
    changes = {"exclude_file": None, "max_train_images": args.train_images}
    if args.epochs:
        changes["epochs"] = args.epochs
    return dataclasses.replace(config, **changes)


def searched_member_scores(config, folder: Path, families: list[str]) -> list[float]:
    """Train the member as the search did (its training families), then its TTA accuracy on each family's
    corrupted copy of the validation split."""
    import keras

    from common.metrics import accuracy
    from data_pipeline.corrupt import shifted_copy
    from search.trial.data import load_trial_data
    from search.trial.trainer import train_trial
    from search.trial.views import predict_views

    train_trial(config, folder)
    model, val = keras.models.load_model(folder / "model.keras"), load_trial_data(config).val
    scores = []
    for family in families:
        copy = shifted_copy(val.images, [family], seed=config.robust_seed)
        views = predict_views(model, copy.images, config.tta_views)
        scores.append(accuracy(views.mean(axis=0), val.labels[copy.source]))
    return scores


def main(argv: list[str] | None = None) -> None:
    from data_pipeline.corrupt import check_families
    from ensemble.refit import rotation_table

    args = parse_args(argv)
    config = member_config(args)
    families = args.families.split(",") if args.families else None
    print(f"member: {config.backbone}, {config.augment_policy} {config.augment_strength}, {config.epochs} epochs, "
          f"trained on {config.train_families}", flush=True)
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        table = rotation_table(config, Path(scratch) / "folds", families)
        table["searched_member_accuracy_tta"] = searched_member_scores(config, Path(scratch) / "searched",
                                                                       list(table["heldout_family"]))
    table["searched_member_saw_it"] = table["heldout_family"].isin(check_families(config.train_families,
                                                                                  config.heldout_families)[0])
    table["refit_gain"] = table["heldout_accuracy_tta"] - table["searched_member_accuracy_tta"]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
