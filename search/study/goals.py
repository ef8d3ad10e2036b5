"""The search objectives a spec can choose (`algorithm.objective`), defined once for every executor.

- `robust` (default): the mean of clean and held-out-family validation accuracy, both with TTA. It is the
  accuracy expected when half the images to come are shifted in ways nobody trained for: linear, so one
  point of clean accuracy trades for exactly one point under shift, and neither can be ignored (a model
  that collapses under shift loses half its score; one that is robust but inaccurate on clean cells does
  too). Each epoch reports the same mean without TTA, so pruners compare like with like.
- `clean`: clean validation accuracy with TTA (each epoch: without TTA); `val_accuracy_tta`, its former name,
  is still read from specs. The ensemble build uses the same names (`robust`, `clean`).
- `multi`: two objectives, clean and held-out-family accuracy with TTA, for Optuna's multi-objective
  samplers; nothing is reported per epoch (Optuna cannot prune multi-objective studies) and the Pareto
  front goes into the study report.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The names users choose from (the CLI's choices, `cs.search(objective=...)`).
OBJECTIVE_NAMES = ("robust", "clean", "multi")
#: Former names, still accepted in specs and options.
ALIASES = {"val_accuracy_tta": "clean"}
#: Every accepted spelling (what a spec may say).
OBJECTIVES = (*OBJECTIVE_NAMES, *ALIASES)


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
    "clean": Objective("clean", ("val_accuracy_tta",), "val_accuracy", "val_accuracy"),
    "multi": Objective("multi", ("val_accuracy_tta", "val_corrupted_accuracy_tta"), None, "val_robust"),
}
assert tuple(_OBJECTIVES) == OBJECTIVE_NAMES


def canonical_objective(name: str) -> str:
    """`name` under its current spelling (`val_accuracy_tta` -> `clean`); unknown names fail in one line."""
    from common.errors import ConfigError

    name = ALIASES.get(name, name)
    if name not in _OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r} (choose one of {', '.join(OBJECTIVE_NAMES)})")
    return name


def get_objective(name: str) -> Objective:
    return _OBJECTIVES[canonical_objective(name)]


def early_stopping_monitor(name: str) -> str:
    return get_objective(name).monitor


def ensemble_objective(name: str) -> str:
    """The ensemble build's objective for a study searched with `name`: `clean` for `clean`, else `robust`
    (`multi` weighs clean and held-out accuracy, and the robust mean is that weighing's single score)."""
    return "clean" if canonical_objective(name) == "clean" else "robust"
