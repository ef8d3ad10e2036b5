"""End-of-study report in `runs/<study>/report/`: the top trials (printed and CSV), Optuna's plots as HTML
(single objective) or the Pareto front (two objectives), the robustness report of the best trial, and
`index.html`, the one page that shows them with the data, cleaning and corruption pictures
(search.reports.study_page).

Given the artifact store, the page, the CSV, PNG, JSON and text files are also uploaded as study artifacts
so optuna-dashboard lists them (it shows PNGs inline; the page embeds its images, so it downloads as one
complete file); the plotly HTML plots are not (they load plotly.min.js from beside them, and
the dashboard draws the same plots itself). Those plots need the `plots` extra; without plotly they are
skipped with one note and the rest of the report is written.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.artifacts import download_artifact, upload_artifact
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from common.atomic import atomic_write_text, atomic_write_with
from common.errors import MissingExtraError, require_extra
from common.plots import pareto_front_png
from search.reports.report_page import PAGE_NAME
from common.robust_report import REPORT_FILES, ShiftedRows, write_robustness_report

TABLE_COLUMNS = ["number", "value", "backbone", "augment_policy", "optimizer", "learning_rate", "epochs_run",
                 "val_accuracy", "val_accuracy_tta", "val_corrupted_accuracy_tta", "val_robust_tta", "test_accuracy",
                 "test_accuracy_tta", "train_seconds", "device"]
UPLOADED_SUFFIXES = (".csv", ".png", ".json", ".txt")
REPORT_ATTR_PREFIX = "artifact:report/"


def is_multi_objective(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def objective_names(study: optuna.Study) -> list[str]:
    """Column names for the objective values: `value`, or the metric names of a multi-objective study."""
    if not is_multi_objective(study):
        return ["value"]
    return study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]


def ranked_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Complete trials, best first by the (first) objective."""
    sign = 1 if study.directions[0] == StudyDirection.MINIMIZE else -1
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(complete, key=lambda t: (sign * t.values[0], t.number))


def trials_table(study: optuna.Study, trials: list[FrozenTrial]) -> pd.DataFrame:
    """One row per trial: number, objective value(s), then the TABLE_COLUMNS it has."""
    columns = list(dict.fromkeys(["number", *objective_names(study), *TABLE_COLUMNS[2:]]))
    frame = pd.DataFrame([{**t.params, **t.user_attrs, "number": t.number,
                           **dict(zip(objective_names(study), t.values))} for t in trials])
    if frame.empty:
        return pd.DataFrame(columns=columns)
    return frame[[c for c in columns if c in frame.columns]]


def top_trials(study: optuna.Study, top: int = 10) -> pd.DataFrame:
    return trials_table(study, ranked_trials(study)[:top])


def _write_html(figure, path: Path) -> Path:
    # plotly.min.js is written once beside the plots, so they open offline
    atomic_write_with(path, lambda tmp: figure.write_html(tmp, include_plotlyjs="directory"))
    return path


def plotly_visualization():
    """optuna.visualization once plotly is importable; MissingExtraError naming the `plots` extra otherwise."""
    require_extra("plotly", "plots", "the report's interactive plots")
    from optuna import visualization

    return visualization


def save_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optimisation history and parameter importance (importance needs >= 2 complete trials)."""
    visualization = plotly_visualization()
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
        saved.append(_write_html(figure, folder / f"{name}.html"))
    return saved


def save_pareto_front(study: optuna.Study, folder: Path) -> list[Path]:
    """The Pareto-optimal trials (`study.best_trials`) as CSV, Optuna's Pareto plot as HTML (with plotly)
    and a PNG."""
    names = objective_names(study)
    front = sorted(study.best_trials, key=lambda t: t.number)
    table = trials_table(study, front)
    atomic_write_with(folder / "pareto_front.csv", lambda p: table.to_csv(p, index=False))
    saved = [folder / "pareto_front.csv"]
    if not front:
        return saved
    with contextlib.suppress(MissingExtraError):  # write_report notes the missing extra once
        figure = plotly_visualization().plot_pareto_front(study, target_names=names)
        saved.append(_write_html(figure, folder / "pareto_front.html"))
    if len(names) == 2:
        complete = ranked_trials(study)
        numbers = [t.number for t in complete]
        pareto_front_png(np.array([t.values for t in complete]), numbers, np.isin(numbers, table.number), names,
                         folder / "pareto_front.png", title=f"{study.study_name}: Pareto front")
        saved.append(folder / "pareto_front.png")
    return saved


def download_trial_file(store, trial: FrozenTrial, filename: str, target: Path) -> Path | None:
    """The trial's artifact named `filename` (the id its runner recorded as a user attribute) downloaded to
    `target`; None if it has none."""
    from search.trial.run_trial import ARTIFACT_ATTR_PREFIX

    artifact_id = trial.user_attrs.get(ARTIFACT_ATTR_PREFIX + filename)
    if artifact_id is None:
        return None
    download_artifact(artifact_store=store, file_path=str(target), artifact_id=artifact_id)
    return target


def best_trial_predictions(study: optuna.Study, store) -> tuple[FrozenTrial | None, dict | None, str]:
    """(best trial by the first objective, the arrays of its `predictions.npz` or None, a note saying why
    there are none)."""
    ranked = ranked_trials(study)
    if not ranked:
        return None, None, "robustness report skipped: no complete trial"
    trial = ranked[0]
    if store is None:
        return trial, None, "robustness report skipped: no artifact store given"
    with tempfile.TemporaryDirectory() as scratch:
        path = download_trial_file(store, trial, "predictions.npz", Path(scratch) / "predictions.npz")
        if path is None:
            return trial, None, f"robustness report skipped: best trial {trial.number} has no predictions.npz artifact"
        with np.load(path) as saved:
            return trial, {k: saved[k] for k in saved.files}, ""


def best_trial_robustness(study: optuna.Study, store, folder: Path) -> tuple[list[Path], str, dict | None]:
    """The robustness report of the best trial (first objective) from its `predictions.npz`: (files, a note
    saying which trial it describes or why it was skipped, the saved arrays or None)."""
    trial, arrays, note = best_trial_predictions(study, store)
    if arrays is None:
        return [], note, None
    if "shifted_view_probs" not in arrays:
        return [], f"robustness report skipped: best trial {trial.number} saved no shifted_* predictions", arrays
    views = arrays["val_view_probs"].shape[0]
    write_robustness_report(folder, arrays["val_labels"], arrays["val_view_probs"].mean(axis=0),
                            arrays["shifted_view_probs"].mean(axis=0), ShiftedRows.from_arrays(arrays),
                            arrays["class_names"].tolist(), title=f"trial {trial.number}, mean of {views} TTA views")
    return ([folder / name for name in REPORT_FILES], f"robustness report: best trial {trial.number} in {folder}",
            arrays)


def upload_report(study: optuna.Study, store, folder: Path, files: list[Path], prefix: str = "") -> dict[str, str]:
    """Upload `files` (inside `folder`) as study artifacts named `prefix` + their file name; {prefix + path in
    the report: artifact id}.

    Each id is kept in the study user attribute `artifact:report/<prefix><path>`; running the report again (a
    continued study, a rebuilt ensemble) rewrites the file under the same id, so the dashboard lists it once,
    up to date.
    """
    known, ids = study.user_attrs, {}
    for path in files:
        name = prefix + path.relative_to(folder).as_posix()
        key = REPORT_ATTR_PREFIX + name
        if key in known:
            with path.open("rb") as body:
                store.write(known[key], body)
            ids[name] = known[key]
            continue
        with tempfile.TemporaryDirectory() as scratch:  # the dashboard shows the uploaded file's own name
            named = Path(scratch) / (prefix + path.name)
            shutil.copyfile(path, named)
            ids[name] = upload_artifact(artifact_store=store, file_path=str(named), study_or_trial=study)
        study.set_user_attr(key, ids[name])
    return ids


def write_report(study: optuna.Study, folder: Path, top: int = 10, artifact_store=None) -> pd.DataFrame:
    """Write the report and its `index.html` into `folder` (and upload them as study artifacts if
    `artifact_store` is given); return the top-trials table."""
    from search.reports.study_page import write_study_page

    folder.mkdir(parents=True, exist_ok=True)
    table = top_trials(study, top)
    atomic_write_with(folder / "top_trials.csv", lambda p: table.to_csv(p, index=False))
    files, notes = [folder / "top_trials.csv"], []
    try:
        files += save_pareto_front(study, folder) if is_multi_objective(study) else save_plots(study, folder)
        plotly_visualization()
    except MissingExtraError as exc:
        notes.append(f"interactive plots skipped: {exc}")
    robustness, note, arrays = best_trial_robustness(study, artifact_store, folder / "robustness")
    notes.append(note)
    print("\n".join(notes))
    atomic_write_text(folder / "notes.txt", "\n".join(notes) + "\n")
    files += [*robustness, folder / "notes.txt"]
    files += write_study_page(study, folder, table, files, notes, (arrays, robustness, note))
    if artifact_store is not None:
        upload_report(study, artifact_store, folder, [f for f in files if f.suffix in UPLOADED_SUFFIXES
                                                      or f.name == PAGE_NAME])
    return table
