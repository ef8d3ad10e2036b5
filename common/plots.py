"""Small PNG figures for trials and reports, drawn with Matplotlib's Agg canvas (no pyplot state, no display),
sized to be read inline in optuna-dashboard."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.atomic import atomic_write_with

DPI = 100


def new_figure(width: float, height: float, columns: int = 1, rows: int = 1) -> tuple[Figure, np.ndarray]:
    """A figure on its own Agg canvas and its axes: 1-D for one row, (rows, columns) otherwise."""
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure, np.atleast_1d(figure.subplots(rows, columns, squeeze=rows == 1))


def save_png(figure: Figure, path: str | Path, tight: bool = True) -> None:
    if tight:
        figure.tight_layout()
    atomic_write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))


def _stage_starts(history: pd.DataFrame, epochs: pd.Series) -> list[tuple[float, str]]:
    """(first epoch, name) of every stage, when the history holds more than one."""
    if "stage" not in history or history["stage"].nunique() < 2:
        return []
    changed = history["stage"].ne(history["stage"].shift())
    return list(zip(epochs[changed], history["stage"][changed]))


def _curves(axis, history: pd.DataFrame, epochs: pd.Series, suffix: str, stages: list) -> None:
    columns = [c for c in history.columns if c.endswith(suffix) and not c.startswith("val_")]
    for column in columns + [c for c in history.columns if c.startswith("val_") and c.endswith(suffix)]:
        style = "-" if column.startswith("val_") else "--"
        axis.plot(epochs, history[column], style, marker=".", label=column)
    for k, (start, name) in enumerate(stages):
        if k:
            axis.axvline(start - 0.5, color="grey", linestyle=":", linewidth=1)
        axis.annotate(name, (start - 0.4, 1.01), xycoords=("data", "axes fraction"), va="bottom", fontsize=8,
                      color="grey")
    axis.set_xlabel("epoch")
    axis.set_ylabel(suffix)
    axis.grid(alpha=0.3)
    if axis.lines:
        axis.legend(fontsize=8)


def training_curves_png(history: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Loss and accuracy per epoch (train dashed, validation solid), stage changes marked by dotted lines."""
    epochs = history["epoch"] if "epoch" in history else pd.Series(range(len(history)))
    stages = _stage_starts(history, epochs)
    figure, axes = new_figure(9, 3.6, columns=2)
    for axis, suffix in zip(axes, ("loss", "accuracy")):
        _curves(axis, history, epochs, suffix, stages)
    if title:
        figure.suptitle(title)
    save_png(figure, path)


def confusion_matrix_png(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: str | Path,
                         title: str = "") -> None:
    """Row-normalised confusion matrix (recall per true class): colour is the rate, the text the count."""
    n = len(class_names)
    counts = np.zeros((n, n), dtype=int)
    np.add.at(counts, (np.asarray(labels), probs.argmax(axis=1)), 1)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    figure, (axis,) = new_figure(1.6 + 0.75 * n, 1.2 + 0.65 * n)
    image = axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(n), class_names, rotation=40, ha="right")
    axis.set_yticks(range(n), class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title or f"accuracy {np.trace(counts) / max(counts.sum(), 1):.3f} on {counts.sum()} images")
    for (i, j), count in np.ndenumerate(counts):
        axis.text(j, i, str(count), ha="center", va="center", fontsize=9,
                  color="white" if rates[i, j] > 0.5 else ("black" if count else "lightgrey"))
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="fraction of true class")
    save_png(figure, path)


def pareto_front_png(values: np.ndarray, numbers: Sequence[int], on_front: np.ndarray, names: Sequence[str],
                     path: str | Path, title: str = "") -> None:
    """Two objectives of every complete trial, the Pareto-optimal ones highlighted and numbered."""
    figure, (axis,) = new_figure(6, 4.8)
    axis.scatter(values[~on_front, 0], values[~on_front, 1], color="lightgrey", label="other trials")
    front = np.flatnonzero(on_front)
    front = front[np.argsort(values[front, 0])]
    axis.plot(values[front, 0], values[front, 1], "o-", color="tab:red", label="Pareto front")
    for k in front:
        axis.annotate(f"#{numbers[k]}", values[k], textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.margins(0.08)
    axis.set_xlabel(names[0])
    axis.set_ylabel(names[1])
    axis.set_title(title or f"Pareto front: {len(front)} of {len(values)} trials")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    save_png(figure, path)


def reliability_png(sets: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "",
                    n_bins: int = 15) -> None:
    """Reliability diagram (accuracy against top-label confidence, in the bins `expected_calibration_error`
    uses, so the picture and the reported ECE agree) and the confidence histogram; `sets` maps a name to
    (labels, probabilities), one line each."""
    from sklearn.calibration import calibration_curve

    from common.metrics import expected_calibration_error

    figure, (diagram, histogram) = new_figure(9, 4, columns=2)
    diagram.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    edges = np.linspace(0, 1, n_bins + 1)
    for name, (y, probs) in sets.items():
        correct, confidence = probs.argmax(axis=1) == y, probs.max(axis=1)
        rate, mean_confidence = calibration_curve(correct, confidence, n_bins=n_bins, strategy="uniform")
        ece = expected_calibration_error(probs, y, n_bins)
        (line,) = diagram.plot(mean_confidence, rate, "o-", markersize=4, label=f"{name} (ECE {ece:.3f})")
        histogram.hist(confidence, bins=edges, histtype="step", linewidth=1.5, color=line.get_color(),
                       label=f"{name}, {len(y)} images")
    diagram.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="confidence (top-class probability)", ylabel="accuracy")
    histogram.set(xlim=(0, 1), xlabel="confidence", ylabel="images")
    for axis in (diagram, histogram):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="upper left")
    if title:
        figure.suptitle(title)
    save_png(figure, path)
