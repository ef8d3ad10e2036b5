"""Grids of example images for the report pages: sample cells per class, what cleaning removed, the most
confidently wrong predictions (the corruption grid's rows come from search.reports.study_page, above the data
layer that defines the corruptions).

Every grid is one `image_grid_png` call on rows of (image, caption) cells, so the pages share one look; the
row builders only choose the images. Cells are drawn with nearest-neighbour scaling, so a 28x28 cell shows
its real pixels instead of a blur.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from common.plots import new_figure, save_png

Cell = tuple[np.ndarray | None, str]  # an image (H, W, 3) uint8, or None for an empty cell, and its caption
Row = tuple[str, list[Cell]]  # a row label and its cells
HELD_OUT = "held out"
MIN_WIDTH_INCHES = 6.0
CAPTION_CHARS = 15  # what fits under a 1-inch cell at the caption font size


def short(name: str, chars: int = CAPTION_CHARS, keep_end: bool = False) -> str:
    """`name` cut to `chars` characters with an ellipsis (its end kept for ids, whose file name is at the end),
    so captions of neighbouring cells do not overlap."""
    if len(name) <= chars:
        return name
    return "\u2026" + name[1 - chars:] if keep_end else name[:chars - 1] + "\u2026"


def image_grid_png(rows: Sequence[Row], path: str | Path, title: str = "", cell_inches: float = 0.9,
                   label_inches: float = 1.6) -> None:
    """One figure of `rows`; row labels saying HELD_OUT are drawn in red. Every cell is drawn into one Axes
    laid out in inches: an Axes per cell made a 126-cell grid take a second."""
    columns = max(len(cells) for _, cells in rows)
    lines = [max(caption.count("\n") + 1 if caption else 0 for _, caption in cells) for _, cells in rows]
    below = max(lines[1:], default=0)  # caption lines between rows; the first row's sit under the title
    pitch = cell_inches * 1.08  # a cell and the gap to the next
    used = label_inches + pitch * columns
    width = max(used, MIN_WIDTH_INCHES)  # room for the title; the cells stay on the left
    top, gap = (0.3 if title else 0.05) + 0.13 * lines[0], 0.05 + 0.13 * below
    height = top + 0.1 + len(rows) * cell_inches + (len(rows) - 1) * gap
    figure, (axis,) = new_figure(width, height)
    axis.set_position((0, 0, 1, 1))
    axis.axis("off")
    for r, (label, cells) in enumerate(rows):
        y = top + r * (cell_inches + gap)  # the row's upper edge, from the figure's top
        for c, (image, caption) in enumerate(cells):
            x = label_inches + c * pitch
            if image is not None:
                axis.imshow(image, extent=(x, x + cell_inches, y + cell_inches, y), interpolation="nearest",
                            aspect="auto")
            if caption:
                axis.text(x + cell_inches / 2, y - 0.03, caption, fontsize=7, ha="center", va="bottom")
        axis.text(label_inches - 0.12 * cell_inches, y + cell_inches / 2, label, fontsize=8, ha="right",
                  va="center", color="tab:red" if HELD_OUT in label else "black")
    axis.set_xlim(0, width)
    axis.set_ylim(height, 0)
    if title:
        figure.suptitle(title, fontsize=10, y=1 - 0.06 / height, va="top")
    save_png(figure, path, tight=False)


def class_sample_rows(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], per_class: int = 8,
                      seed: int = 0) -> list[Row]:
    """A few images of each class, drawn at random (by `seed`), one row per class with its image count."""
    rng = np.random.default_rng(seed)
    rows = []
    for index, name in enumerate(class_names):
        members = np.flatnonzero(labels == index)
        chosen = np.sort(rng.choice(members, min(per_class, len(members)), replace=False))
        rows.append((f"{name}\n({len(members)})", [(images[i], "") for i in chosen]))
    return rows


def cleaning_rows(report: pd.DataFrame, images_by_id: dict[str, np.ndarray], class_names: Sequence[str],
                  per_reason: int = 8) -> list[Row]:
    """Up to `per_reason` removed images per reason (a cleaning report's `kept == False` rows), captioned
    with their label and id."""
    rows = []
    removed = report[~report["kept"].astype(bool)]
    for reason, group in removed.groupby("reason", sort=False):
        cells = [(images_by_id.get(str(row.id)),
                  f"{short(class_names[int(row.label)])}\n{short(str(row.id), keep_end=True)}")
                 for row in group.head(per_reason).itertuples()]
        rows.append((f"{reason}\n({len(group)})", cells))
    return rows



def confidently_wrong_rows(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                           count: int = 24, columns: int = 8) -> list[Row]:
    """The `count` wrong predictions of highest confidence, most confident first, captioned true class, "as"
    predicted class, confidence; empty when nothing is wrong."""
    predicted, confidence = probs.argmax(axis=1), probs.max(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    cells = [(images[i], f"{short(class_names[labels[i]])}\nas {short(class_names[predicted[i]])}\n{confidence[i]:.2f}")
             for i in wrong]
    return [(f"#{start + 1}-{start + len(cells[start:start + columns])}", cells[start:start + columns])
            for start in range(0, len(cells), columns)]
