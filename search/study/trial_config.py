"""The exact configuration of one trial: what the search samples and what `train_one` reproduces."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "lion", "sgd")


#: Training precision: "auto" float16 mixed precision when a GPU is present, else float32; "on" float16 mixed
#: precision; "bfloat16" bfloat16 mixed precision (no loss scaling; on GPUs from Ampere on); "off" float32.
MIXED_PRECISIONS = ("auto", "on", "bfloat16", "off")


@dataclass
class TrialConfig:
    """Everything needed to train and evaluate one model, JSON-serialisable so any trial can be re-run."""

    # data
    data: str | None = None  # None: the embedded 28x28 PBC set
    image_size: int | None = None  # folders only: resize target
    center_crop: int | None = None  # folders only
    val_fraction: float = 0.1  # used when the data has no predefined split
    test_fraction: float = 0.2
    split_seed: int = 0
    split_file: str | None = None  # where a made split is saved, so all trials share it
    exclude_file: str | None = None  # JSON list of image ids cleaning removed (search.cleaning_step)
    max_train_images: int | None = None  # stratified subsample, for quick studies and tests
    # model
    backbone: str = "small_resnet"
    weights: str | None = None  # "imagenet", None, or a weights file path
    dropout: float = 0.2
    head_units: int = 0
    unfreeze_fraction: float = 1.0
    gradual_unfreeze: bool = False
    # augmentation and imbalance
    augment_policy: str = "light"
    augment_strength: float = 0.5
    class_weighting: bool = False
    oversample: bool = False
    # robustness (see data_pipeline.corrupt): which corruption families training augmentation may draw from,
    # which are held out to score the trial on shift, and the seed of the held-out validation copy
    train_families: list[str] | None = None  # None: data_pipeline.corrupt.DEFAULT_TRAIN_FAMILIES
    heldout_families: list[str] | None = None  # None: data_pipeline.corrupt.DEFAULT_HELDOUT_FAMILIES
    robust_seed: int = 0
    refit: bool = False  # the final refit: augmentation draws from every family (the held-out copy still scores)
    # optimisation
    optimizer: str = "adamw"
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 128
    label_smoothing: float = 0.0
    head_epochs: int = 2  # stage 1 (pretrained backbones only)
    epochs: int = 10  # stage 2, or the only stage for models trained from scratch
    finetune_lr_factor: float = 0.1
    warmup_epochs: float = 1.0
    early_stopping_patience: int = 5
    early_stopping_monitor: str = "val_accuracy"  # or "val_robust": mean of clean and held-out-family accuracy
    time_budget_s: float | None = None  # stop training (not evaluation) after this many seconds
    # evaluation and runtime
    tta_views: int = 8
    seed: int = 0
    mixed_precision: str = "auto"  # one of MIXED_PRECISIONS
    jit_compile: str = "auto"  # auto: XLA when a GPU is present
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        checks = {
            "optimizer": self.optimizer in OPTIMIZERS,
            "learning_rate": 0 < self.learning_rate < 10,
            "weight_decay": 0 <= self.weight_decay < 1,
            "batch_size": self.batch_size >= 1,
            "dropout": 0 <= self.dropout < 1,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "unfreeze_fraction": 0 <= self.unfreeze_fraction <= 1,
            "augment_strength": 0 <= self.augment_strength <= 1,
            "epochs": self.epochs >= 1,
            "head_epochs": self.head_epochs >= 0,
            "tta_views": self.tta_views in (1, 2, 4, 8),
            "mixed_precision": self.mixed_precision in MIXED_PRECISIONS,
            "jit_compile": self.jit_compile in ("auto", "on", "off"),
            "early_stopping_monitor": self.early_stopping_monitor in ("val_accuracy", "val_robust"),
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"invalid config value {key}={getattr(self, key)!r}")

    def augment_families(self) -> tuple[str, ...] | list[str] | None:
        """The families training augmentation may draw from: every one for a refit, else `train_families`."""
        if self.refit:
            from data_pipeline.corrupt import FAMILIES

            return tuple(FAMILIES)
        return self.train_families

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrialConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config key {unknown[0]!r}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrialConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(values.get("config", values))
