"""The final refit on every corruption family, and the family rotation that measures it.

`refit_members` retrains the members a build chose with augmentation drawn from every family, held-out ones
included, one member per worker slot (a core, or a GPU), and returns them as candidates. That leaves no
family unseen to measure the refit on, so what it buys is measured by rotation instead: hold each family
out in turn, retrain the member on all the others, and score the family left out. The folds are trial
configurations the trainer runs unchanged, so a fold differs from its member only in the families, never
in seed or hyperparameters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import numpy as np

from common.errors import DataError, EnsembleError
from data_pipeline.corrupt import FAMILIES, check_families
from data_pipeline.policies import check_policy_families, policy_families

if TYPE_CHECKING:
    import pandas as pd

    from ensemble.candidates import Candidate
    from search.study.trial_config import TrialConfig


def changes_in_refit(config: TrialConfig) -> bool:
    """Whether drawing from every family changes what the member's policy touches (`light` touches only
    colour, so a `light` member would be retrained unchanged)."""
    train, _ = check_families(config.train_families, config.heldout_families)
    return policy_families(config.augment_policy, FAMILIES) != policy_families(config.augment_policy, train)


def rotates(config: TrialConfig) -> bool:
    """Whether a refit changes the member and its policy can train with each family left out in turn."""
    try:
        rotation_configs(config)
    except DataError:
        return False
    return changes_in_refit(config)


class Refit(NamedTuple):
    """What `refit_members` returns: the members to ship, notes for the report, the trial numbers reused
    from an earlier build's refit rather than trained now, the seconds the refit took, and the trial numbers
    whose retraining the time left was too short to start."""

    members: list
    notes: list[str]
    reused: tuple[int, ...]
    seconds: float = 0.0
    unstarted: tuple[int, ...] = ()


def refit_members(members: Sequence[Candidate], work: Path, tta_views: int, say: Callable[[str], None] = print,
                  deadline: float | None = None, compile_cache: Path | None = None) -> Refit:
    """`members` retrained on every family (same configuration, seed and data split), each as a candidate
    with its new predictions and `model_file`; members whose policy the refit would not change are kept.
    A failed retraining raises `EnsembleError` naming the trial and its last line.

    Each member trains into `work/trial_<number>`; one already trained there to its end, with the same
    configuration, is reused. `deadline` (a unix time, the end of the time the user gave the run): retraining
    stops at an epoch boundary to end by it, and a member it cut short is kept as searched unless its clean
    validation accuracy is as high; a member whose retraining the time left cannot take to half its searched
    epochs and its evaluation (`seconds_worth_starting`) is not started, and is kept as searched."""
    jobs = {m.name: m for m in members if changes_in_refit(m.config) and not m.gated}
    notes = [f"refit: trial {m.number} kept as searched ({m.config.augment_policy} draws from no other family)"
             for m in members if not changes_in_refit(m.config) and not m.gated]
    if not jobs:
        return Refit(list(members), notes, ())
    started = time.perf_counter()
    configs = {name: dataclasses.replace(m.config, refit=True) for name, m in jobs.items()}
    reused = {name: work / name for name, config in configs.items() if _trained(config, work / name)}
    if reused:
        notes.append(f"refit: trial(s) {', '.join(str(jobs[n].number) for n in reused)} reused from {work} "
                     "(the same configuration, trained to the end)")
    todo = {name: config for name, config in configs.items() if name not in reused}
    if todo:
        say(f"refit: retraining {len(todo)} member(s) on every family ({', '.join(FAMILIES)})"
            + ("" if deadline is None else f", by the run's end in {deadline - time.time():.0f} s"))
    needs = {name: seconds_worth_starting(jobs[name].user_attrs) for name in todo}
    folders = {**reused, **train_configs(todo, work, "refit", "build without --refit to ship the searched members",
                                         deadline, compile_cache, needs)}
    refit = {m.number: _refit_candidate(m, folders[name], tta_views) for name, m in jobs.items() if name in folders}
    unstarted = tuple(m.number for n, m in jobs.items() if n not in folders)
    kept = [n for n, candidate in refit.items() if candidate is None] + list(unstarted)
    if kept:
        notes.append(f"refit: trial(s) {', '.join(map(str, kept))} kept as searched: the run's time ended their "
                     "retraining below their searched clean validation accuracy, or was too short to start it")
    seconds = time.perf_counter() - started
    shipped = [n for n, candidate in refit.items() if candidate is not None]
    if shipped:
        notes.append(f"refit: trial(s) {', '.join(map(str, shipped))} retrained on every family in {seconds:.0f} s; "
                     "the held-out-family scores are no longer on unseen families (the family rotation measures that)")
    return Refit([m if m.gated else refit.get(m.number) or m for m in members], notes,
                 tuple(jobs[name].number for name in reused), seconds, unstarted)


def seconds_worth_starting(trial_attrs: dict) -> float:
    """The time a retraining needs, as the search measured the trial, to reach half its searched epochs and
    evaluate: with less, it cannot end by a deadline or beat the member as searched (on a slow machine, a refit
    cut to 4 of 9 epochs lost 2.4 points of clean validation accuracy). 0 when the trial recorded no timings.

    >>> seconds_worth_starting({"epochs_run": 9, "seconds_to_first_epoch": 140.0, "train_seconds": 1260.0,
    ...                         "evaluate_estimate_s": 200.0})
    900.0
    """
    first, train, epochs = (trial_attrs.get(k) for k in ("seconds_to_first_epoch", "train_seconds", "epochs_run"))
    if first is None or train is None or not epochs:
        return 0.0
    epoch_s = (train - first) / (epochs - 1) if epochs > 1 else first
    return first + (math.ceil(epochs / 2) - 1) * epoch_s + (trial_attrs.get("evaluate_estimate_s") or 0.0)


def _trained(config: TrialConfig, folder: Path) -> bool:
    """Whether `folder` holds `config` trained to its end (not cut short by a deadline)."""
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return not metrics.get("stopped_at_deadline") and saved == json.loads(json.dumps(config.to_dict()))


def train_configs(configs: dict[str, TrialConfig], work: Path, what: str, remedy: str,
                  deadline: float | None = None, compile_cache: Path | None = None,
                  needs: dict[str, float] | None = None) -> dict[str, Path]:
    """Train each configuration with `python -m search.train_one` into `work/<name>`, one per worker slot (a
    core, or a GPU) at a time, as the search's workers are placed; each one's folder by name. The first failure
    stops the others and raises `EnsembleError` with its last line, `what` failed and the `remedy`. With a
    `deadline` (unix time), trainings end by it, and none starts with less time left than `needs` gives it
    (seconds by name; 0 if absent): those are missing from the result.
    `compile_cache`: a JAX compilation cache folder the trainings share (`devices.pin_environment`)."""
    from search.execution.devices import pin_environment
    from search.execution.devices_plan import default_workers, detect_gpus, plan_workers, usable_cores

    if not configs:
        return {}
    gpus, cores = detect_gpus(), usable_cores()
    free = plan_workers(gpus, min(len(configs), default_workers(gpus, cores)), cores)
    pending, running, trained = list(configs.items()), {}, set()
    work.mkdir(parents=True, exist_ok=True)
    while pending or running:
        if deadline is not None:
            pending = [(name, c) for name, c in pending if deadline - time.time() > (needs or {}).get(name, 0.0)]
        while pending and free:
            (name, config), slot = pending.pop(0), free.pop(0)
            file, log = work / f"{name}.json", open(work / f"{name}.log", "w")
            file.write_text(json.dumps(config.to_dict()))
            command = [sys.executable, "-m", "search.train_one", "--config", str(file), "--trial-dir",
                       str(work / name), "-q", *([] if deadline is None else ["--deadline", repr(deadline)])]
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, **pin_environment(slot, compile_cache)})
            running[process] = (name, slot, log)
        if not running:
            break
        process = _wait_any(running)
        name, slot, log = running.pop(process)
        log.close()
        free.append(slot)
        if process.returncode != 0:
            for other in running:
                other.kill()
            lines = (work / f"{name}.log").read_text().strip().splitlines() or ["no output"]
            raise EnsembleError(f"{what} {name} failed (exit {process.returncode}): {lines[-1]} (log: "
                                f"{work / name}.log); {remedy}")
        trained.add(name)
    return {name: work / name for name in configs if name in trained}


def _wait_any(running: dict) -> subprocess.Popen:
    while True:
        for process in running:
            if process.poll() is not None:
                return process
        time.sleep(0.2)


def _refit_candidate(member: Candidate, folder: Path, tta_views: int) -> Candidate | None:
    """The retrained member as a candidate; None when the run's deadline cut it short below its searched clean
    validation accuracy."""
    from common.metrics import accuracy
    from ensemble.candidates import saved_fields, view_positions
    from search.study.trial_config import TrialConfig

    with np.load(folder / "predictions.npz") as saved:
        arrays = {k: saved[k] for k in saved.files}
    positions = view_positions(int(arrays["val_view_probs"].shape[0]), tta_views)
    fields = saved_fields(arrays, positions)
    if not np.array_equal(fields["val_ids"], member.val_ids) or not np.array_equal(fields["test_ids"], member.test_ids):
        raise EnsembleError(f"refit of trial {member.number} used another data split than the search (its split "
                            "or exclusion file changed); build without --refit")
    stopped = json.loads((folder / "metrics.json").read_text()).get("stopped_at_deadline")
    if stopped and accuracy(fields["val_probs"], member.val_labels) < accuracy(member.val_probs, member.val_labels):
        return None
    return dataclasses.replace(member, config=TrialConfig.from_file(folder / "config.json"),
                               model_file=folder / "model.keras", **fields)


def family_rotation(families: Sequence[str] | None = None) -> dict[str, tuple[str, ...]]:
    """Each family (in `FAMILIES` order) -> the families its fold trains on: all the others.

    The same mapping on every call, whatever the order or repetition of `families` (None: every family), so
    the folds of different members and runs line up; an unknown name fails in one line naming it.
    """
    given = tuple(FAMILIES) if families is None else tuple(families)
    folds = {}
    for family in given:
        train, heldout = check_families([other for other in given if other != family], [family])
        folds[heldout[0]] = train
    return {family: folds[family] for family in FAMILIES if family in folds}


def rotation_configs(config: TrialConfig, families: Sequence[str] | None = None) -> dict[str, TrialConfig]:
    """`config` once per fold of `family_rotation(families)`: trained on the fold's families and scored on
    the family left out (the trial's held-out-family accuracy). A policy that needs the family left out
    (`light` needs colour) fails here, before any training."""
    folds = family_rotation(families)
    for train in folds.values():
        check_policy_families(config.augment_policy, train)
    return {family: dataclasses.replace(config, train_families=list(train), heldout_families=[family], refit=False)
            for family, train in folds.items()}


def rotation_table(config: TrialConfig, out_dir: str | Path, families: Sequence[str] | None = None,
                   searched_model: str | Path | None = None, compile_cache: Path | None = None) -> pd.DataFrame:
    """Train every fold of `config` (in parallel, each into `out_dir/<family left out>/`) and return one row per
    family: what the fold trained on, its clean validation accuracy, its accuracy on the validation split
    corrupted by the family left out (TTA as `config` says), the searched member's accuracy on the same copy,
    whether the search trained it on that family, and the fold's gain over it. `searched_model`: the member as
    the search trained it; None trains it too (`out_dir/searched/`), beside the folds. `compile_cache`: as for
    `train_configs`."""
    import pandas as pd

    searched = dataclasses.replace(config, refit=False)
    folds = rotation_configs(config, families)
    jobs = {**folds, **({"searched": searched} if searched_model is None else {})}
    folders = train_configs(jobs, Path(out_dir), "rotation fold", "see the fold's log", compile_cache=compile_cache)
    rows = []
    for family, fold in folds.items():
        metrics = json.loads((folders[family] / "metrics.json").read_text())
        rows.append({"heldout_family": family, "train_families": ", ".join(fold.train_families),
                     "val_accuracy_tta": metrics["val_accuracy_tta"],
                     "heldout_accuracy_tta": metrics["val_corrupted_accuracy_tta"]})
    table = pd.DataFrame(rows)
    model = searched_model if searched_model is not None else folders["searched"] / "model.keras"
    trained, _ = check_families(searched.train_families, searched.heldout_families)
    clean, *shifted = family_scores(searched, model, [None, *folds])
    table.insert(3, "searched_val_accuracy_tta", clean)
    table["searched_accuracy_tta"] = shifted
    table["searched_trained_on_it"] = table["heldout_family"].isin(trained)
    table["gain"] = table["heldout_accuracy_tta"] - table["searched_accuracy_tta"]
    return table


def family_scores(config: TrialConfig, model_file: str | Path, families: Sequence[str | None]) -> list[float]:
    """A saved member's TTA accuracy on its validation split corrupted by each family (None: clean), with the
    same seed as a fold's held-out copy."""
    import keras

    import backbones.preprocessing  # noqa: F401  (registers the custom layer)
    from common.metrics import accuracy
    from data_pipeline.corrupt import shifted_copy
    from search.trial.data import load_trial_data
    from search.trial.views import predict_views

    model, val = keras.models.load_model(model_file, compile=False), load_trial_data(config).val
    scores = []
    for family in families:
        if family is None:
            images, labels = val.images, val.labels
        else:
            copy = shifted_copy(val.images, [family], seed=config.robust_seed)
            images, labels = copy.images, val.labels[copy.source]
        scores.append(accuracy(predict_views(model, images, config.tta_views).mean(axis=0), labels))
    return scores
