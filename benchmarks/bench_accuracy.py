"""Best single-model test accuracy within a training-time budget on this machine.

    python benchmarks/bench_accuracy.py --minutes 10 --backbone small_resnet

The number of epochs is chosen so the cosine schedule ends inside the budget: a short timing run measures
training images/s first, and `time_budget_s` stops training regardless if the estimate was optimistic.
Prints test accuracy with and without 8-view TTA, seconds trained and epochs run.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from search.study.trial_config import TrialConfig
from search.trial.trainer import train_trial
from search.trial.data import load_trial_data

SHARED_28 = Path(__file__).resolve().parents[2] / "shared" / "data" / "bloodcells_28.npz"


def training_images_per_second(config: TrialConfig, steps: int = 30) -> float:
    """Images/s of `fit` on real training batches (after one warm-up epoch of `steps` batches)."""
    import keras

    from backbones import build_classifier
    from data_pipeline.augment import build_augmenter
    from data_pipeline.stream import make_stream

    data = load_trial_data(config)
    model = build_classifier(config.backbone, input_shape=data.train.image_shape, num_classes=8)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="categorical_crossentropy")
    augmenter = build_augmenter(config.augment_policy, config.augment_strength, 8, seed=0)
    n = steps * config.batch_size
    stream = make_stream(data.train.images[:n], data.train.labels[:n], 8, config.batch_size, augmenter=augmenter)
    model.fit(stream, epochs=1, verbose=0)
    started = time.perf_counter()
    model.fit(stream, epochs=1, verbose=0)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--backbone", default="small_resnet")
    parser.add_argument("--data", default=str(SHARED_28) if SHARED_28.exists() else None)
    parser.add_argument("--policy", default="light")
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, help="skip the estimate and train this many epochs")
    parser.add_argument("--out", default="runs/bench_accuracy")
    args = parser.parse_args()

    base = TrialConfig(data=args.data, backbone=args.backbone, augment_policy=args.policy,
                       augment_strength=args.strength, optimizer="adamw", learning_rate=args.learning_rate,
                       weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                       batch_size=args.batch_size, dropout=0.1, early_stopping_patience=1000, seed=0)
    budget = args.minutes * 60
    rate = training_images_per_second(base)
    n_train = len(load_trial_data(base).train)
    # Validation passes and epoch overheads take ~10% on top of pure training steps.
    epochs = args.epochs or max(1, math.floor(0.9 * budget * rate / n_train))
    config = TrialConfig(**{**base.to_dict(), "epochs": epochs, "time_budget_s": budget})
    print(f"{args.backbone}: {rate:.0f} training images/s -> {epochs} epochs in a {args.minutes:g}-minute budget",
          flush=True)
    result = train_trial(config, Path(args.out) / f"{args.backbone}_{int(time.time())}")
    metrics = result.metrics
    summary = {key: metrics[key] for key in ("test_accuracy", "test_accuracy_tta", "val_accuracy",
                                             "val_accuracy_tta", "train_seconds", "epochs_run", "n_params")}
    summary["epochs_planned"] = epochs
    summary["train_images_per_second_estimate"] = round(rate, 1)
    print(json.dumps(summary, indent=2))
    print(f"artifacts: {result.directory}")


if __name__ == "__main__":
    main()
