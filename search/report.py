"""End-of-study report: the top trials as a table (printed and CSV) and Optuna's standard plots as HTML."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from data_pipeline.atomic import atomic_write_with

TABLE_COLUMNS = ["number", "value", "backbone", "augment_policy", "optimizer", "learning_rate", "epochs_run",
                 "val_accuracy", "val_accuracy_tta", "test_accuracy", "test_accuracy_tta", "train_seconds",
                 "device"]


def top_trials(study: optuna.Study, top: int = 10) -> pd.DataFrame:
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        rows.append({"number": trial.number, "value": trial.value, **trial.params, **trial.user_attrs})
    if not rows:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    frame = pd.DataFrame(rows).sort_values("value", ascending=False).head(top)
    return frame[[c for c in TABLE_COLUMNS if c in frame.columns]].reset_index(drop=True)


def save_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optimisation history and parameter importance (importance needs >= 2 complete trials)."""
    from optuna import visualization

    saved = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = {"optimization_history": visualization.plot_optimization_history,
             "intermediate_values": visualization.plot_intermediate_values}
    if len(complete) >= 2 and len({tuple(sorted(t.params.items())) for t in complete}) >= 2:
        plots["param_importances"] = visualization.plot_param_importances
    for name, plot in plots.items():
        if not complete:
            break
        try:
            figure = plot(study)
        except (ValueError, RuntimeError) as exc:  # e.g. importance with a constant objective
            print(f"skipped plot {name}: {exc}")
            continue
        path = folder / f"{name}.html"
        # plotly.min.js is written once beside the plots, so they open offline
        atomic_write_with(path, lambda tmp: figure.write_html(tmp, include_plotlyjs="directory"))
        saved.append(path)
    return saved


def write_report(study: optuna.Study, folder: Path, top: int = 10) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    table = top_trials(study, top)
    atomic_write_with(folder / "top_trials.csv", lambda p: table.to_csv(p, index=False))
    save_plots(study, folder)
    return table
