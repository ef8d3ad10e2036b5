"""Accuracy under distribution shift: predictions on a corrupted copy of a split, broken down by corruption
family and severity and compared with the clean predictions of the same images.

Used for the best trial in the study report and for the ensemble in its build report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from common.atomic import atomic_write_text, atomic_write_with
from common.errors import DataError
from common.metrics import accuracy, expected_calibration_error
from common.plots import confusion_matrix_png, new_figure, save_png

ALL = "all"
REPORT_FILES = ("robustness.csv", "robustness.png", "confusion_shifted.png", "robustness.json")


@dataclass(frozen=True)
class ShiftedRows:
    """Where each row of a corrupted copy came from: `labels[source]` are its labels."""

    source: np.ndarray
    family: np.ndarray
    kind: np.ndarray
    severity: np.ndarray

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "shifted_") -> "ShiftedRows":
        """From `predictions.npz`-style arrays (`shifted_source`, `shifted_family`, ...)."""
        return cls(**{name: np.asarray(arrays[prefix + name]) for name in ("source", "family", "kind", "severity")})


@dataclass(frozen=True)
class RobustnessSummary:
    clean_accuracy: float
    shifted_accuracy: float
    per_family: dict[str, float]
    per_severity: dict[int, float]
    ece_clean: float
    ece_shifted: float
    n_clean: int
    n_shifted: int
    table: pd.DataFrame = field(repr=False, compare=False)

    @property
    def drop(self) -> float:
        return self.clean_accuracy - self.shifted_accuracy

    def to_dict(self) -> dict:
        """Everything but the table, JSON-ready."""
        return {"clean_accuracy": self.clean_accuracy, "shifted_accuracy": self.shifted_accuracy,
                "drop": self.drop, "ece_clean": self.ece_clean, "ece_shifted": self.ece_shifted,
                "n_clean": self.n_clean, "n_shifted": self.n_shifted, "per_family": self.per_family,
                "per_severity": {str(k): v for k, v in self.per_severity.items()}}


def _matching(values: np.ndarray, wanted) -> np.ndarray:
    return np.ones(len(values), dtype=bool) if wanted == ALL else values == wanted


def _groups(family: np.ndarray, severity: np.ndarray) -> list[tuple]:
    """Every (family, severity) present, then each family, each severity, and everything (`ALL`)."""
    families, severities = list(pd.unique(family)), sorted(set(severity.tolist()))
    cells = [(f, s) for f in families for s in severities if np.any((family == f) & (severity == s))]
    return cells + [(f, ALL) for f in families] + [(ALL, s) for s in severities] + [(ALL, ALL)]


def robustness_table(labels: np.ndarray, clean_probs: np.ndarray, shifted_probs: np.ndarray,
                     family: Sequence[str], severity: Sequence[int],
                     kind: Sequence[str] | None = None) -> pd.DataFrame:
    """Accuracy on shifted rows by family x severity, per family, per severity and overall (`"all"`).

    Every argument is aligned with the shifted rows: `clean_probs[i]` is the clean prediction of the image
    shifted row `i` was made from and `labels[i]` its label, so `drop` compares the same images.
    """
    labels, family, severity = np.asarray(labels), np.asarray(family).astype(str), np.asarray(severity).astype(int)
    lengths = {len(labels), len(clean_probs), len(shifted_probs), len(family), len(severity)}
    if len(lengths) != 1 or 0 in lengths or (kind is not None and len(kind) not in lengths):
        raise DataError(f"robustness_table needs non-empty arguments of one length, got lengths {sorted(lengths)}")
    rows = []
    for f, s in _groups(family, severity):
        mask = _matching(family, f) & _matching(severity, s)
        shifted_accuracy, clean_accuracy = (accuracy(p[mask], labels[mask]) for p in (shifted_probs, clean_probs))
        row = {"family": f, "severity": s, "n": int(mask.sum()), "accuracy": shifted_accuracy,
               "clean_accuracy": clean_accuracy, "drop": clean_accuracy - shifted_accuracy,
               "ece": expected_calibration_error(shifted_probs[mask], labels[mask]),
               "clean_ece": expected_calibration_error(clean_probs[mask], labels[mask])}
        if kind is not None:
            row["kinds"] = " ".join(pd.unique(np.asarray(kind)[mask]))
        rows.append(row)
    return pd.DataFrame(rows)


def _summarise(table: pd.DataFrame, labels: np.ndarray, clean_probs: np.ndarray) -> RobustnessSummary:
    overall = table[(table.family == ALL) & (table.severity == ALL)].iloc[0]
    families = table[(table.family != ALL) & (table.severity == ALL)]
    severities = table[(table.family == ALL) & (table.severity != ALL)]
    return RobustnessSummary(
        clean_accuracy=accuracy(clean_probs, labels), shifted_accuracy=float(overall.accuracy),
        per_family={str(f): float(a) for f, a in zip(families.family, families.accuracy)},
        per_severity={int(s): float(a) for s, a in zip(severities.severity, severities.accuracy)},
        ece_clean=expected_calibration_error(clean_probs, labels), ece_shifted=float(overall.ece),
        n_clean=len(labels), n_shifted=int(overall.n), table=table)


def robustness_png(summary: RobustnessSummary, path: str | Path, title: str = "",
                   compared: pd.DataFrame | None = None, highlight: str = "") -> None:
    """Accuracy against severity, one line per family and one for all families, clean accuracy as a line.

    With `compared` (one column per model; rows "clean", then each severity over all shifted families)
    a second panel draws every model's accuracy over all families against severity, `highlight` in bold.
    """
    table = summary.table[summary.table.severity != ALL]
    figure, axes = new_figure(13 if compared is not None else 7, 4.6, columns=2 if compared is not None else 1)
    axis = axes[0]
    for name, rows in table.groupby("family", sort=False):
        style = {"color": "black", "linewidth": 2.5} if name == ALL else {}
        axis.plot(rows.severity.astype(int), rows.accuracy, "o-", label=f"{name} families" if name == ALL else name,
                  **style)
    axis.axhline(summary.clean_accuracy, color="black", linestyle="--", label=f"clean {summary.clean_accuracy:.3f}")
    axis.set_xticks(sorted(summary.per_severity))
    axis.set_xlabel("severity")
    axis.set_ylabel("accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title((f"{title}\n" if title else "") + f"clean {summary.clean_accuracy:.3f} -> shifted "
                   f"{summary.shifted_accuracy:.3f};  ECE {summary.ece_clean:.3f} -> {summary.ece_shifted:.3f}",
                   fontsize=10)
    if compared is not None:
        _compared_panel(axes[1], compared, highlight)
    save_png(figure, path)


def _compared_panel(axis, compared: pd.DataFrame, highlight: str) -> None:
    x = np.arange(len(compared))
    for name in compared.columns:
        style = {"color": "black", "linewidth": 2.8, "zorder": 3} if name == highlight else {"alpha": 0.75}
        axis.plot(x, compared[name], "o-", label=f"{name} ({compared[name].iloc[-1]:.3f} at {compared.index[-1]})",
                  **style)
    axis.set_xticks(x, [str(level) for level in compared.index])
    axis.set_xlabel("severity (all held-out families)")
    axis.set_ylabel("accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title("against its members: accuracy as the shift grows", fontsize=10)


def write_robustness_report(folder: str | Path, labels: np.ndarray, clean_probs: np.ndarray,
                            shifted_probs: np.ndarray, shifted, class_names: Sequence[str],
                            title: str = "") -> RobustnessSummary:
    """Write REPORT_FILES into `folder` for one model's (N, C) clean and (M, C) shifted probabilities.

    `shifted` is anything with `source`, `family`, `kind` and `severity` arrays over the M shifted rows
    (a `data_pipeline.corrupt.ShiftedCopy`, a `ShiftedRows`); `labels` are the N clean labels.
    """
    folder, labels, source = Path(folder), np.asarray(labels), np.asarray(shifted.source)
    table = robustness_table(labels[source], clean_probs[source], shifted_probs, shifted.family,
                             shifted.severity, shifted.kind)
    summary = _summarise(table, labels, clean_probs)
    atomic_write_with(folder / "robustness.csv", lambda p: table.to_csv(p, index=False, float_format="%.4f"))
    robustness_png(summary, folder / "robustness.png", title)
    confusion_matrix_png(labels[source], shifted_probs, class_names, folder / "confusion_shifted.png",
                         f"{title + ': ' if title else ''}corrupted copy, accuracy {summary.shifted_accuracy:.3f}")
    atomic_write_text(folder / "robustness.json", json.dumps({"title": title, **summary.to_dict()}, indent=2))
    return summary
