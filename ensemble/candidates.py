"""The study's finished trials as ensemble candidates: their saved validation/test view probabilities.

Nothing is re-predicted here: every COMPLETE trial uploaded `predictions.npz` (per-view probabilities on
val and test, in dihedral view order, and, from trials of the robustness protocol on, on the validation
split's held-out-family shifted copy: `shifted_view_probs` with `shifted_source/family/kind/severity`) to
the study's artifact store, which is exactly what selection, combiner fitting and the clean test
evaluation need. Model files are downloaded later, for the chosen
members only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ensemble.standalone import VIEW_SETS
from common.errors import EnsembleError
from search.study.trial_config import TrialConfig
from search.study.location import StudyLocation
from common.robust_report import ShiftedRows

@dataclass
class Candidate:
    """One COMPLETE trial with its TTA-averaged probabilities for the requested views."""

    number: int
    value: float | None
    user_attrs: dict
    config: TrialConfig
    class_names: tuple[str, ...]
    val_ids: np.ndarray
    val_labels: np.ndarray
    val_probs: np.ndarray  # (N_val, C), mean over the requested views
    test_ids: np.ndarray
    test_labels: np.ndarray
    test_probs: np.ndarray  # (N_test, C)
    saved_views: int
    shifted_probs: np.ndarray | None = None  # (S, C) on the validation's held-out-family copy, view mean
    shifted: ShiftedRows | None = None  # which image, family, kind and severity each shifted row is
    model_file: Path | None = None  # a local model.keras (a refit or gated member), else the trial's in the store
    gated: bool = False  # the trial's model behind the shift gate (ensemble.gate)

    def shares_shifted_copy(self, other: "Candidate") -> bool:
        """Whether both saved predictions on the same held-out-family validation copy."""
        if self.shifted is None or other.shifted is None:
            return False
        return all(np.array_equal(getattr(self.shifted, f), getattr(other.shifted, f))
                   for f in ("source", "family", "kind", "severity"))

    @property
    def backbone(self) -> str:
        return self.config.backbone

    @property
    def name(self) -> str:
        """Its member file's stem: `trial_<number>`, `_gated` added behind the shift gate."""
        return f"trial_{self.number:05d}" + ("_gated" if self.gated else "")


def open_study(location: StudyLocation):
    """The Optuna study, read-only in spirit (no heartbeats); one clear error when it is not there."""
    import optuna

    from search.execution.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(location.storage, heartbeat_interval=None, must_exist=True)
    try:
        return optuna.load_study(study_name=location.name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise EnsembleError(f"no study {location.name!r} in {location.storage} (found: {names})") from None


def artifact_store(location: StudyLocation):
    from search.execution.storage import open_artifact_store

    if "://" not in location.artifacts and not Path(location.artifacts).is_dir():
        raise EnsembleError(f"artifact folder not found: {location.artifacts}")
    return open_artifact_store(location.artifacts)


def download(store, trial, name: str, target: Path) -> Path:
    """Fetch one of a trial's files (`artifact:<name>` user attribute) to `target`."""
    from optuna.artifacts import download_artifact

    from search.trial.objective import ARTIFACT_ATTR_PREFIX

    artifact_id = trial.user_attrs.get(ARTIFACT_ATTR_PREFIX + name)
    if artifact_id is None:
        raise EnsembleError(f"trial {trial.number} has no {name} artifact")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        download_artifact(artifact_store=store, file_path=str(target), artifact_id=artifact_id)
    except Exception as exc:  # a missing file in the store, a network error for s3/gcs, ...
        target.unlink(missing_ok=True)
        raise EnsembleError(f"trial {trial.number}: cannot download {name}: {type(exc).__name__}: {exc}") from None
    return target


def view_positions(saved_views: int, requested: int) -> list[int] | None:
    """Where the requested views sit in a trial's saved view axis, or None if some were not saved."""
    saved = VIEW_SETS.get(saved_views)
    if saved is None:
        return None
    wanted = VIEW_SETS[requested]
    if not set(wanted) <= set(saved):
        return None
    return [saved.index(v) for v in wanted]


def _shifted(arrays: dict, positions: list[int]) -> dict:
    """The candidate fields of a trial's held-out-family validation copy ({} when it saved none)."""
    keys = ("shifted_view_probs", "shifted_source", "shifted_family", "shifted_kind", "shifted_severity")
    if not all(k in arrays for k in keys):
        return {}
    return {"shifted_probs": arrays["shifted_view_probs"][positions].mean(axis=0).astype(np.float64),
            "shifted": ShiftedRows.from_arrays(arrays)}


def saved_fields(arrays: dict, positions: list[int]) -> dict:
    """A candidate's fields from a trial's saved `predictions.npz` arrays, averaged over the view `positions`."""
    return dict(class_names=tuple(str(c) for c in arrays["class_names"]),
                val_ids=arrays["val_ids"].astype(str), val_labels=arrays["val_labels"].astype(np.int64),
                val_probs=arrays["val_view_probs"][positions].mean(axis=0).astype(np.float64),
                test_ids=arrays["test_ids"].astype(str), test_labels=arrays["test_labels"].astype(np.int64),
                test_probs=arrays["test_view_probs"][positions].mean(axis=0).astype(np.float64),
                saved_views=int(arrays["val_view_probs"].shape[0]), **_shifted(arrays, positions))


def load_candidates(study, store, cache: Path, tta_views: int) -> tuple[list[Candidate], list[str]]:
    """Every COMPLETE trial that saved the requested views and shares the best trial's split and classes.

    Returns (candidates, notes): a note for every trial left out and why.
    """
    from optuna.trial import TrialState

    from search.trial.objective import ARTIFACT_ATTR_PREFIX

    if tta_views not in VIEW_SETS:
        raise EnsembleError(f"--tta must be one of {sorted(VIEW_SETS)}, got {tta_views}")
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if ARTIFACT_ATTR_PREFIX + "predictions.npz" in t.user_attrs]
    if not trials:
        raise EnsembleError(f"study {study.study_name!r} has no COMPLETE trial with saved predictions")
    trials.sort(key=lambda t: (-(t.value if t.value is not None else -np.inf), t.number))
    candidates, notes = [], []
    for trial in trials:
        folder = cache / f"trial_{trial.number:05d}"
        try:
            with np.load(download(store, trial, "predictions.npz", folder / "predictions.npz")) as saved:
                arrays = {k: saved[k] for k in saved.files}
            config = TrialConfig.from_file(download(store, trial, "config.json", folder / "config.json"))
        except (EnsembleError, OSError, ValueError) as exc:
            notes.append(f"trial {trial.number}: skipped, unreadable artifacts ({exc})")
            continue
        n_saved = int(arrays["val_view_probs"].shape[0])
        positions = view_positions(n_saved, tta_views)
        if positions is None:
            notes.append(f"trial {trial.number}: skipped, saved {n_saved} TTA view(s), --tta {tta_views} needs "
                         f"views {VIEW_SETS[tta_views]}")
            continue
        candidates.append(Candidate(number=trial.number, value=trial.value, user_attrs=dict(trial.user_attrs),
                                    config=config, **saved_fields(arrays, positions)))
    if not candidates:
        raise EnsembleError("no usable trial: " + "; ".join(notes))
    reference = candidates[0]
    kept = []
    for candidate in candidates:
        same = (candidate.class_names == reference.class_names
                and np.array_equal(candidate.val_ids, reference.val_ids)
                and np.array_equal(candidate.test_ids, reference.test_ids)
                and candidate.config.image_size == reference.config.image_size)
        if same:
            kept.append(candidate)
        else:
            notes.append(f"trial {candidate.number}: skipped, different data split, classes or image size "
                         f"than trial {reference.number}")
    return kept, notes
