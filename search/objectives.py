"""The search objectives a spec can choose (`algorithm.objective`), defined once for every executor.

- `robust` (default): the mean of clean and held-out-family validation accuracy, both with TTA. It is the
  accuracy expected when half the images to come are shifted in ways nobody trained for: linear, so one
  point of clean accuracy trades for exactly one point under shift, and neither can be ignored (a model
  that collapses under shift loses half its score; one that is robust but inaccurate on clean cells does
  too). Each epoch reports the same mean without TTA, so pruners compare like with like.
- `val_accuracy_tta`: clean validation accuracy with TTA (each epoch: without TTA).
- `multi`: two objectives, clean and held-out-family accuracy with TTA, for Optuna's multi-objective
  samplers; nothing is reported per epoch (Optuna cannot prune multi-objective studies) and the Pareto
  front goes into the study report.
"""

from __future__ import annotations

from dataclasses import dataclass

OBJECTIVES = ("robust", "val_accuracy_tta", "multi")


def robust_score(clean: float, shifted: float) -> float:
    return 0.5 * (float(clean) + float(shifted))


@dataclass(frozen=True)
class Objective:
    name: str
    final_keys: tuple[str, ...]  # trial metrics that become the Optuna value(s)
    epoch_key: str | None  # the per-epoch score pruners see (None: no pruning)
    monitor: str  # the per-epoch score early stopping keeps the best weights of

    @property
    def directions(self) -> list[str]:
        return ["maximize"] * len(self.final_keys)

    @property
    def metric_names(self) -> list[str]:
        """Names optuna-dashboard shows instead of "Objective 0" (`study.set_metric_names`)."""
        return list(self.final_keys)

    def values(self, metrics: dict) -> float | list[float]:
        values = [float(metrics[key]) for key in self.final_keys]
        return values[0] if len(values) == 1 else values


_OBJECTIVES = {
    "robust": Objective("robust", ("val_robust_tta",), "val_robust", "val_robust"),
    "val_accuracy_tta": Objective("val_accuracy_tta", ("val_accuracy_tta",), "val_accuracy", "val_accuracy"),
    "multi": Objective("multi", ("val_accuracy_tta", "val_corrupted_accuracy_tta"), None, "val_robust"),
}
assert tuple(_OBJECTIVES) == OBJECTIVES


def get_objective(name: str) -> Objective:
    from search.config import ConfigError

    if name not in _OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r} (choose one of {', '.join(OBJECTIVES)})")
    return _OBJECTIVES[name]


def early_stopping_monitor(name: str) -> str:
    return get_objective(name).monitor
