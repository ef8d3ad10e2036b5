"""Build an ensemble from a finished study: `build_ensemble(study)` or `python -m ensemble.build [--study NAME] ...`.

1. candidates: every COMPLETE trial's saved probabilities on validation, on its held-out-family shifted
   copy and on test, averaged over the --tta views (nothing is re-predicted; see ensemble.candidates);
2. the objective (ensemble.robust): "robust" (default) scores every choice below by the mean of the clean
   and the shifted validation score; "clean" by clean validation only, which is also the fallback, with
   one note, when the trials saved no shifted copy (older studies);
3. members: the --top K best by the objective's accuracy, or greedy selection with replacement on its
   log-loss (Caruana et al. 2004; at most K distinct members), both skipping near-identical members and,
   with --min-images-per-s, members the inference budget cannot afford (ensemble.budget);
4. the combiner: soft voting (uniform for topk, greedy counts for greedy), weights fit on log-loss, or
   logistic-regression stacking, each with optional temperature scaling, fit on the same validation rows
   (never on test data) and compared out-of-fold; --combiner auto takes the best;
5. evaluation, ensemble vs its best single member vs the plain average: the clean test split (saved
   predictions) and a shifted copy of it by the held-out families (`data_pipeline.corrupt.shifted_copy`,
   another seed than the validation copy's; members run on it with TTA), with accuracy by family and
   severity, ECE, and `common.robust_report.write_robustness_report`'s CSV and curves in report/;
6. the artifact folder (ensemble.artifact), written atomically; the fitted `EnsembleClassifier` is
   returned with `report_` (an `EnsembleReport`), ready to predict without reloading.

Example (a finished study; see README "2. Ensemble"):

    >>> from ensemble import build_ensemble
    >>> ens = build_ensemble("default", top=5, method="greedy", quiet=True)   # doctest: +SKIP
    >>> ens.report_.score("test_heldout"), ens.predict(images)              # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import pandas as pd

from common.cli_errors import QUIET, command_parser, run_cli, set_verbosity
from data_pipeline.corrupt import FAMILIES
from ensemble.artifact import atomic_folder, member_files
from ensemble.evaluate import CLEAN_TOLERANCE
from ensemble.robust import OBJECTIVES, ValidationRows
from ensemble.standalone import BN_PRIOR, PRECISIONS, VIEW_SETS
from common.errors import CellsearchError, EnsembleError
from search.study.location import POINTER_FILE, StudyLocation

METHODS = ("topk", "greedy")
COMBINER_CHOICES = ("auto", "vote", "weighted", "stacking")
BUILD_ATTR = "build_seconds"  # study attribute: the last build's seconds besides its refit
FIRST_BUILD_S = 150.0  # assumed until a build of the study has measured it (g60's took 166 s after its refit,
#                       most of it predicting the held-out-family test copy)
#: The test copy's seed is the trials' robust_seed plus this, so it never repeats the validation copy's draws.
TEST_SEED_OFFSET = 1
ENSEMBLE, BEST, AVERAGE = "ensemble", "best single", "plain average"


@dataclass
class BuildOptions:
    """Settings of `build_ensemble` (each also a keyword argument of it, and a CLI flag).

    top: at most this many distinct members. method: "greedy" or "topk". combiner: "auto", "vote",
    "weighted" or "stacking". tta: TTA views 1, 2, 4 or 8 (of the ones trials saved); None: the study's own
    (`study_tta`). objective: "robust"
    or "clean" (ensemble.robust); None: the study's own (`study_objective`). clean_tolerance: clean
    validation accuracy `auto` may give up for the objective (ensemble.evaluate.choose_row). calibrate:
    temperature scaling. out: artifact folder (None: <out>/<study>/ensemble, the study's `ensemble_dir`).
    heldout_eval: evaluate on the held-out-family test copy.
    min_images_per_s: inference budget on this machine. precision: "float32" or "bfloat16". adapt_bn,
    bn_prior: the artifact's test-time BatchNorm adaptation default (ensemble.standalone). seed: shuffles
    the cross-validation folds combiners are scored and calibrated on (and seeds the distilled student).
    refit: retrain the chosen members with augmentation drawn from every family, held-out ones included,
    and ship those (`ensemble.refit`); None: as the study's spec says (`[robustness] refit`). rotation:
    retrain the best member once per family left out, and report what each family left out costs
    (`report_.rotation`, report/family_rotation.csv). gate: add the most accurate clean candidate behind the
    shift gate to the candidates (`ensemble.gate`); None: with the robust objective and no inference budget.
    pointer: runs/last_study.json, to find the study when none is given.
    """

    top: int = 5
    method: str = "greedy"
    combiner: str = "auto"
    tta: int | None = None
    objective: str | None = None
    clean_tolerance: float = CLEAN_TOLERANCE
    calibrate: bool = True
    out: str | None = None
    heldout_eval: bool = True
    min_images_per_s: float | None = None
    precision: str = "float32"
    adapt_bn: bool = False
    bn_prior: float = BN_PRIOR
    seed: int = 0
    greedy_iterations: int = 25
    pointer: str = "runs/last_study.json"
    progress: bool = True  # tqdm bars
    quiet: bool = False  # no printed tables or notes (library use, benchmarks)
    distill: bool = False
    distill_epochs: int = 8
    distill_backbone: str = "compact_cnn"
    refit: bool | None = None  # retrain the members on every family (ensemble.refit); None: the study's spec
    rotation: bool = False  # measure the refit by family rotation on the best member (ensemble.refit)
    gate: bool | None = None  # the clean specialist behind the shift gate (ensemble.gate); None: when robust

    def validate(self) -> None:
        choices = (("method", METHODS), ("combiner", COMBINER_CHOICES), ("objective", (None, *OBJECTIVES)),
                   ("precision", PRECISIONS), ("tta", (None, *sorted(VIEW_SETS))))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise EnsembleError(f"--{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.top < 1:
            raise EnsembleError(f"--top must be >= 1, got {self.top}")
        if not 0 <= self.clean_tolerance <= 1:
            raise EnsembleError(f"--clean-tolerance must lie in [0, 1], got {self.clean_tolerance}")
        if self.distill and self.distill_epochs < 1:
            raise EnsembleError(f"--distill-epochs must be >= 1, got {self.distill_epochs}")
        if self.distill:
            from backbones import list_backbones

            if self.distill_backbone not in list_backbones():
                raise EnsembleError(f"--distill-backbone {self.distill_backbone!r} is not one of "
                                    f"{', '.join(list_backbones())}")
        if self.min_images_per_s is not None and not self.min_images_per_s > 0:
            raise EnsembleError(f"--min-images-per-s must be > 0, got {self.min_images_per_s}")
        if not self.bn_prior >= 0:
            raise EnsembleError(f"--bn-prior must be >= 0, got {self.bn_prior}")


def study_refit(study) -> bool:
    """Whether the study's recorded spec asks for the final refit (`[robustness] refit`)."""
    return bool(study.user_attrs.get("spec", {}).get("robustness", {}).get("refit", False))


def study_tta(study) -> int:
    """The TTA views the study's trials saved and were scored with (its recorded spec's `[budget] tta_views`)."""
    return int(study.user_attrs.get("spec", {}).get("budget", {}).get("tta_views", 8))


def study_objective(study) -> str:
    """The build objective matching the one the study searched with (its recorded spec; robust if none)."""
    from search.study.goals import ensemble_objective

    return ensemble_objective(study.user_attrs.get("spec", {}).get("algorithm", {}).get("objective", "robust"))


@dataclass
class EnsembleReport:
    """What the build measured (`ens.report_`); the same tables are CSV files in `folder`/report.

    Attributes:
        folder: the artifact folder.
        objective: the objective in effect ("clean" when the trials saved no shifted copy).
        members: one row per member: trial, backbone, selection weight, validation scores.
        combiners: one row per combiner considered: out-of-fold validation scores, test for information.
        metrics: ensemble / best single / plain average on "test" and "test_heldout": accuracy, balanced
            accuracy, macro F1, ROC AUC, ECE, log-loss.
        heldout: accuracy on the held-out-family test copy per family, per severity and overall ("all"),
            one column per model.
        robustness: the ensemble's `common.robust_report.RobustnessSummary` (clean and shifted accuracy,
            per family, per severity, ECE clean and shifted, and the family x severity `table`).
        rotation: with --rotation, the best member's family rotation (`ensemble.refit.rotation_table`).
        (heldout and robustness are None with the held-out evaluation off.)
        notes: left-out trials, fallbacks, warnings.
    """

    folder: Path
    objective: str
    members: pd.DataFrame
    combiners: pd.DataFrame
    metrics: pd.DataFrame
    heldout: pd.DataFrame | None = None
    robustness: Any = None  # common.robust_report.RobustnessSummary
    notes: list[str] = field(default_factory=list)
    rotation: pd.DataFrame | None = None

    def score(self, split: str = "test", metric: str = "accuracy", model: str = ENSEMBLE) -> float:
        """One number of `metrics`, e.g. `score("test_heldout", "ece")`, `score(model="best single")`."""
        rows = self.metrics[(self.metrics["split"] == split) & self.metrics["model"].str.startswith(model)]
        if len(rows) != 1:
            raise EnsembleError(f"no {metric} of {model!r} on {split!r} in this report")
        return float(rows[metric].iloc[0])

    def summary(self) -> str:
        """The printed summary: combiners, clean vs held-out metrics, held-out accuracy by family/severity."""
        number = lambda v: f"{v:.4f}"  # noqa: E731
        parts = [f"objective: {self.objective}",
                 "combiners (out-of-fold validation scores of the members as searched, under the objective; no test "
                 "data):",
                 self.combiners.to_string(index=False, float_format=number), "",
                 self.metrics[["model", "split", "accuracy", "balanced_accuracy", "macro_f1", "ece", "log_loss"]]
                 .to_string(index=False, float_format=number)]
        if self.heldout is not None:
            parts += ["", "held-out-family test copy, accuracy by family and severity:",
                      self.heldout.to_string(index=False, float_format=number)]
        if self.rotation is not None:
            parts += ["", "family rotation of the best member (each family left out of training in turn, scored "
                          "on it, against the member as searched; validation split):",
                      self.rotation.to_string(index=False, float_format=number)]
        return "\n".join(parts)


def _say(options: BuildOptions, message: str) -> None:
    if not options.quiet:
        print(message, flush=True)


def resolve_location(study: Any = None, pointer: str | Path = "runs/last_study.json") -> StudyLocation:
    """Where `study` lives: None (the last study `search.run` ran, from `pointer`), a study name, a
    `StudyLocation`, or anything with a `.location` (the `cellsearch` API's `Study`)."""
    if study is None or isinstance(study, str):
        return StudyLocation.find(study, pointer=pointer)
    location = getattr(study, "location", study)
    if not isinstance(location, StudyLocation):
        raise EnsembleError(f"cannot locate a study from {type(study).__name__}: pass a study name, a "
                            f"StudyLocation or a cellsearch Study")
    return location


def build_ensemble(study: Any = None, options: BuildOptions | None = None, **settings):
    """Build, evaluate and save an ensemble of a finished study; return the fitted `EnsembleClassifier`.

    Args:
        study: None (the study in runs/last_study.json), a study name, or an object locating one (see
            `resolve_location`, e.g. `cs.build_ensemble(study)` with `study.location`).
        options: a `BuildOptions`; `settings` override its fields, e.g. `top=5, method="greedy",
            combiner="auto", tta=8, out=None, objective="robust", adapt_bn=False, quiet=True`.

    Returns:
        The fitted classifier: `predict_proba`/`predict` on uint8 images right away, `report_` an
        `EnsembleReport`, `manifest_` the saved manifest; the artifact folder is `report_.folder`.

    Raises:
        EnsembleError: one line naming what is wrong (no study, no usable trial, bad setting, ...).
    """
    known = [f.name for f in dataclasses.fields(BuildOptions)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise EnsembleError(f"build_ensemble: unknown setting {unknown[0]!r} (known: {', '.join(known)})")
    options = dataclasses.replace(options or BuildOptions(), **settings)
    options.validate()
    started = time.perf_counter()
    from ensemble.candidates import artifact_store, load_candidates, open_study

    location = resolve_location(study, options.pointer)
    store = artifact_store(location)
    trials = open_study(location)
    options.objective = options.objective or study_objective(trials)
    options.refit = study_refit(trials) if options.refit is None else options.refit
    options.tta = options.tta or study_tta(trials)
    out = Path(options.out) if options.out else location.ensemble_dir
    with tempfile.TemporaryDirectory(prefix="ensemble-cache-") as cache:
        candidates, notes = load_candidates(trials, store, Path(cache), options.tta)
        _say(options, f"study {location.name!r}: {len(candidates)} candidate trial(s), TTA {options.tta} view(s)")
        rows = validation_rows(options.objective, candidates, notes)
        budget = _budget(options, candidates, store, Path(cache))
        candidates = _with_gate(options, candidates, rows, budget, store, Path(cache), notes)
        for note in notes:
            _say(options, f"  note: {note}")
        ens = _build(options, location, store, out, candidates, notes, rows, budget, Path(cache),
                     refit_deadline(trials) if options.refit else None)
    refit = ens.manifest_.get("refit")
    if refit and not refit["reused"] and not refit["unstarted"]:  # else the time measured is not what it needs
        from search.execution.driver import REFIT_ATTR

        trials.set_user_attr(REFIT_ATTR, refit["seconds"])  # the next timed search keeps it
    if not options.rotation:  # a measurement, not part of the build a timed search keeps time for
        trials.set_user_attr(BUILD_ATTR, time.perf_counter() - started - (refit["seconds"] if refit else 0.0))
    return ens


def refit_deadline(study) -> float | None:
    """When the build starts within the time the study's last timed run was given: the unix time its refit
    must end by, leaving the rest of the build the time it last took; else None (no bound)."""
    from search.execution.driver import RUN_ENDS_ATTR

    ends_at = study.user_attrs.get(RUN_ENDS_ATTR)
    if ends_at is None or time.time() >= ends_at:
        return None
    return ends_at - study.user_attrs.get(BUILD_ATTR, FIRST_BUILD_S)


def validation_rows(objective: str, candidates, notes: list[str]) -> ValidationRows:
    """The objective's validation rows; the clean ones, with a note, when the candidates do not all share
    one saved held-out-family copy."""
    reference = candidates[0]
    if objective == "clean":
        return ValidationRows.clean(reference.val_labels)
    lacking = [c.number for c in candidates if not c.shares_shifted_copy(reference)]
    if lacking:
        notes.append(f"objective robust -> clean: {len(lacking)} of {len(candidates)} trial(s) saved no held-out-"
                     "family validation copy, or another one (older trials); selecting on clean validation only")
        return ValidationRows.clean(reference.val_labels)
    return ValidationRows.robust(reference.val_labels, np.asarray(reference.shifted.source))


def _budget(options: BuildOptions, candidates, store, cache: Path):
    """The inference budget from measured member throughput, or None without --min-images-per-s."""
    if options.min_images_per_s is None:
        return None
    from ensemble.budget import make_budget, measure_candidates

    _say(options, f"inference budget: >= {options.min_images_per_s:,.0f} img/s with {options.tta} view(s), "
                  f"{options.precision}; timing each architecture on this machine")
    costs = measure_candidates(candidates, store, cache, options.tta, options.precision,
                               say=lambda line: _say(options, line))
    return make_budget(options.min_images_per_s, costs)


def _with_gate(options: BuildOptions, candidates: list, rows: ValidationRows, budget, store, cache: Path,
               notes: list[str]) -> list:
    """The candidates, plus the clean specialist behind the shift gate when the options ask for it
    (`ensemble.gate`), with a note either way."""
    from ensemble.candidates import download
    from ensemble.gate import clean_specialist, gated_candidate

    wanted = rows.objective == "robust" and budget is None if options.gate is None else options.gate
    if not wanted:
        return candidates
    if rows.objective != "robust" or budget is not None:
        notes.append("gate: not added (it needs the robust objective's held-out-family rows, and no inference "
                     "budget)")
        return candidates
    specialist = clean_specialist(candidates, rows)
    if specialist is None:
        notes.append("gate: not added (the most accurate clean candidate is also the most robust one)")
        return candidates
    try:
        model_file = specialist.model_file or download(store, specialist, "model.keras", cache / "specialist.keras")
        gated, note = gated_candidate(specialist, model_file, cache / "gate")
    except CellsearchError as exc:  # the study's data moved or changed: build without the gate, and say why
        notes.append(f"gate: not added ({exc})")
        return candidates
    notes.append(note)
    return [*candidates, gated]


def _select(options: BuildOptions, val_probs: list[np.ndarray], rows: ValidationRows, budget):
    from ensemble.selection import greedy_selection, select_top_k

    if options.method == "topk":
        return select_top_k(val_probs, rows.y, options.top, budget, sample_weight=rows.sample_weight)
    return greedy_selection(val_probs, rows.y, options.top, n_iterations=options.greedy_iterations, budget=budget,
                            sample_weight=rows.sample_weight)


def _build(options, location, store, out: Path, candidates, notes, rows: ValidationRows, budget, cache: Path,
           refit_deadline: float | None = None):
    from ensemble.candidates import download
    from ensemble.classifier import EnsembleClassifier
    from ensemble.combiners import GatedCombiner
    from ensemble.report_page import upload_ensemble_page, write_ensemble_page
    from ensemble.selection import rank_candidates

    reference = candidates[0]
    retrain = functools.partial(_refit, options, work=location.refit_dir, notes=notes, deadline=refit_deadline,
                                compile_cache=location.compile_cache_dir) if options.refit else None
    selection, members, searched, choice, combiner, refit = choose_members(options, candidates, rows, budget,
                                                                           retrain)
    member_val = [rows.stack(m.val_probs, m.shifted_probs) for m in members]
    X_val = np.stack([rows.stack(m.val_probs, m.shifted_probs) for m in searched], axis=1)
    ranked = len(members) - isinstance(combiner, GatedCombiner)  # the gate's member is never the best single
    ranking = rank_candidates(member_val[:ranked], rows.y, rows.sample_weight)
    best_position = ranking[0]
    for line in selection.log:
        _say(options, f"  selection: {line}")
    names = [m.name for m in members]
    with atomic_folder(out) as staging:
        (staging / "report").mkdir()
        for member, file in zip(members, member_files(names)):
            if member.model_file is not None:
                (staging / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(member.model_file, staging / file)
            else:
                download(store, member, "model.keras", staging / file)
        ens = EnsembleClassifier(_load_members(staging, names), combiner, reference.class_names, options.tta,
                                 calibrate=options.calibrate,
                                 precision=options.precision, adapt_bn=options.adapt_bn, bn_prior=options.bn_prior,
                                 member_names=names)
        ens.fit_member_proba(X_val, rows.y, rows.sample_weight, rows.groups)
        X_test = np.stack([m.test_probs for m in members], axis=1)
        images = _member_images(options, ens, reference, X_test, notes)
        X_test = images.get("test_runtime", X_test)
        report = _evaluate(options, staging, ens, reference, members, best_position, images, X_test, choice,
                           rows, notes)
        if options.rotation:
            report.rotation = _rotation(options, store, [members[i] for i in ranking], cache / "rotation", notes,
                                        location.compile_cache_dir)
        if report.rotation is not None:
            report.rotation.to_csv(staging / "report" / "family_rotation.csv", index=False)
        write_ensemble_page(report, ens, reference, images, X_test, f"Ensemble of study {location.name}")
        inference = _inference_entry(options, ens, selection, budget)
        extra = _manifest_extra(options, location, members, selection, rows, report, images, inference,
                                members[best_position].number, refit)
        ens.write(staging, extra, members_written=True)
    report.folder = out
    upload_ensemble_page(location, store, out / "report")
    ens.report_ = report
    _say(options, "\n" + report.summary())
    _say(options, f"\nensemble saved to {out} (report: {out / 'report' / 'index.html'})")
    return ens


class Chosen(NamedTuple):
    """What `choose_members` decides: the selection (with the gated candidate's weight, if it joined), the members
    to ship (the gated one last, if it joined), the same members as searched (what the combiner is fitted on),
    the combiner choice and the combiner for them (unfitted), and the refit's manifest entry (None without a
    refit)."""

    selection: Any
    members: list
    searched: list
    choice: Any
    combiner: Any
    refit: dict | None


def choose_members(options: BuildOptions, candidates: list, rows: ValidationRows, budget=None,
                   retrain: Callable[[list], tuple[list, dict]] | None = None) -> Chosen:
    """Select the members, choose their combiner, decide the gated candidate's weight (`ensemble.gate.
    with_gated_member`; the gated candidate, if any, is the last), then `retrain` the members (the refit).

    Everything is decided on the members as searched, and the combiner is fitted on them too: once retrained on
    every family, held-out ones included, the members have seen every validation family, so their held-out rows
    would favour whatever leans on the refit members, for a gain no unseen shift would show."""
    from ensemble.combiners import GatedCombiner, make_combiner

    val = [rows.stack(c.val_probs, c.shifted_probs) for c in candidates]
    selection = _select(options, val, rows, budget)
    members = [candidates[i] for i in selection.indices]
    vote_weights = selection.weights if options.method == "greedy" else None
    gated = len(candidates) - 1 if candidates[-1].gated and len(candidates) - 1 not in selection.indices else None
    choice = _choose_combiner(options, members, rows, vote_weights)
    if gated is not None:
        from ensemble.gate import with_gated_member

        selection = with_gated_member(selection, choice.oof, val[gated], rows, gated)
    searched, refit = members, None
    if retrain is not None:
        members, refit = retrain(members)
    combiner = make_combiner(choice.chosen, calibrate=options.calibrate, vote_weights=vote_weights,
                             random_state=options.seed)
    if gated is not None and selection.indices[-1] == gated:
        members, searched = [*members, candidates[gated]], [*searched, candidates[gated]]
        combiner = GatedCombiner(combiner, selection.weights[-1])
    return Chosen(selection, members, searched, choice, combiner, refit)


def _choose_combiner(options: BuildOptions, members: list, rows: ValidationRows, vote_weights):
    """`ensemble.evaluate.score_combiners` on the members' validation rows, with the options' settings."""
    from ensemble.evaluate import score_combiners

    X_val = np.stack([rows.stack(m.val_probs, m.shifted_probs) for m in members], axis=1)
    return score_combiners(X_val, rows, calibrate=options.calibrate, vote_weights=vote_weights,
                           preferred=options.combiner, clean_tolerance=options.clean_tolerance, seed=options.seed)


def _refit(options: BuildOptions, members: list, work: Path, notes: list[str], deadline: float | None,
           compile_cache: Path | None = None) -> tuple[list, dict]:
    """The members retrained on every family (ensemble.refit), by `deadline` if given, their notes added, and
    the seconds it took, the trials it reused and those it had no time to start, for the manifest."""
    from ensemble.refit import refit_members

    refit = refit_members(members, work, options.tta, say=lambda line: _say(options, line), deadline=deadline,
                          compile_cache=compile_cache)
    for note in refit.notes:
        _say(options, f"  note: {note}")
    notes.extend(refit.notes)
    return refit.members, {"seconds": refit.seconds, "reused": list(refit.reused), "unstarted": list(refit.unstarted)}


def _rotation(options: BuildOptions, store, ranked: list, work: Path, notes: list[str],
              compile_cache: Path | None = None) -> pd.DataFrame | None:
    """The family rotation of the best member a refit changes (its folds trained in parallel), against its
    model as searched; None, with a note, when no member's policy can leave each family out in turn."""
    from ensemble.candidates import download
    from ensemble.refit import rotation_table, rotates

    member = next((m for m in ranked if rotates(m.config)), None)
    if member is None:
        notes.append("no family rotation: no member's policy can train with each family left out in turn "
                     "(light and stain need colour; none draws from no family)")
        _say(options, f"  note: {notes[-1]}")
        return None
    _say(options, f"family rotation: trial {member.number} retrained once per family left out")
    searched = download(store, member, "model.keras", work / "searched.keras")
    return rotation_table(member.config, work, searched_model=searched, compile_cache=compile_cache)


def _load_members(staging: Path, names: list[str]) -> list:
    """The members as the artifact will load them (safe_mode on)."""
    import backbones.preprocessing  # noqa: F401  (registers the custom layer)
    from ensemble.standalone import load_member_models

    return load_member_models(staging, {"members": [{"file": file} for file in member_files(names)]},
                              custom_layer=False)


def _inference_entry(options, ens, selection, budget) -> dict:
    """Under a budget, the estimated and the measured images/s of the ensemble (precision is added by
    `EnsembleClassifier.write`)."""
    entry: dict[str, Any] = {"min_images_per_s": options.min_images_per_s}
    if budget is not None:
        from ensemble.budget import images_per_second

        costs = [budget.costs[i] for i in selection.indices]
        entry["member_seconds_per_image"] = [c.member for c in costs]
        entry["shared_seconds_per_image"] = max(c.shared for c in costs)
        entry["estimated_images_per_s"] = budget.images_per_s(selection.indices)
        entry["measured_images_per_s"] = images_per_second(ens.predict_proba, ens.input_size_)
        _say(options, f"inference: {entry['measured_images_per_s']:,.0f} img/s measured "
                      f"({entry['estimated_images_per_s']:,.0f} estimated; limit {options.min_images_per_s:,.0f})")
        if entry["measured_images_per_s"] < options.min_images_per_s:
            _say(options, "  warning: measured below the limit (other load on this machine, or the estimate was "
                          "optimistic); rebuild with a higher --min-images-per-s for a margin")
    return entry


def heldout_test_copy(config, test_images: np.ndarray):
    """The test split shifted by the trials' held-out families (`data_pipeline.corrupt.shifted_copy`),
    seeded `robust_seed + TEST_SEED_OFFSET` so it never repeats the validation copy's draws."""
    from data_pipeline.corrupt import check_families, shifted_copy

    _, heldout = check_families(config.train_families, config.heldout_families)
    return shifted_copy(test_images, heldout, seed=int(config.robust_seed) + TEST_SEED_OFFSET)


def _member_images(options, ens, reference, X_test, notes) -> dict:
    """Check the reloaded members against their saved test predictions, and predict them on the
    held-out-family test copy."""
    from ensemble.data import load_split_images

    images: dict = {}
    try:
        images["test"] = load_split_images(reference.config, reference.test_ids, reference.test_labels)
    except EnsembleError as exc:
        if options.heldout_eval or options.distill:
            raise EnsembleError(f"{exc} (pass --no-heldout-eval to skip the held-out-family evaluation)") from None
        notes.append(f"test images not loaded, no consistency check: {exc}")
        return images
    if ens.precision_ != "float32" or ens.adapt_bn:
        images["test_runtime"] = ens.member_proba(images["test"]).astype(np.float64)
        notes.append(f"clean test re-predicted as the artifact predicts ({ens.precision_}, adapt_bn "
                     f"{ens.adapt_bn}); trials saved float32 predictions without adaptation")
    check = min(256, len(images["test"]))
    runtime = ens.member_proba(images["test"][:check], adapt_bn=False)
    drift = float(np.abs(runtime - X_test[:check]).max())
    images["consistency_max_abs_diff"] = drift
    if drift > (1e-3 if ens.precision_ == "float32" else 0.1):
        notes.append(f"reloaded members differ from their saved test predictions by up to {drift:.2g} "
                     "(different hardware/precision, or not the same data)")
        _say(options, f"  warning: {notes[-1]}")
    if options.heldout_eval:
        copy = heldout_test_copy(reference.config, images["test"])
        _say(options, f"held-out-family test copy ({', '.join(sorted(set(copy.family.tolist())))}): "
                      f"{ens.n_members_} member(s) x "
                      f"{options.tta} view(s) on {len(copy.images)} images")
        started = time.perf_counter()
        images["heldout_probs"] = ens.member_proba(copy.images, progress=options.progress).astype(np.float64)
        images["images_per_second"] = len(copy.images) / (time.perf_counter() - started)
        images["heldout"] = copy
    return images


def _evaluate(options, staging: Path, ens, reference, members, best_position, images, X_test, choice, rows,
              notes) -> EnsembleReport:
    """Ensemble vs best single member vs plain average on the clean and the held-out-family test split;
    report/ files; the optional distilled student."""
    from ensemble.evaluate import comparison_rows, heldout_comparison, per_class_rows
    from common.plots import confusion_matrix_png
    from common.robust_report import write_robustness_report

    report_dir = staging / "report"
    labels = {ENSEMBLE: f"{ENSEMBLE} ({choice.chosen}, {ens.n_members_} members)",
              BEST: f"{BEST} (trial {members[best_position].number})",
              AVERAGE: f"{AVERAGE} ({ens.n_members_} members)"}

    def by_model(member_probs: np.ndarray) -> dict[str, np.ndarray]:
        probs = (ens.combiner_.predict_proba(member_probs), member_probs[:, best_position], member_probs.mean(axis=1))
        return dict(zip(labels.values(), probs))

    y_test = reference.test_labels
    splits = [("test", y_test, by_model(X_test))]
    heldout = images.get("heldout")
    if heldout is not None:
        splits.append(("test_heldout", y_test[heldout.source], by_model(images["heldout_probs"])))
    metrics = pd.DataFrame([row for split, y, probs in splits for row in comparison_rows(split, y, probs)])
    per_class = pd.concat([per_class_rows(split, y, probs, reference.class_names) for split, y, probs in splits],
                          ignore_index=True)
    clean = splits[0][2]
    confusion_matrix_png(y_test, clean[labels[ENSEMBLE]], reference.class_names, report_dir / "confusion_test.png",
                         f"{labels[ENSEMBLE]}: test")
    breakdown = robustness = None
    if heldout is not None:  # robustness.csv/.png/.json and confusion_shifted.png for the ensemble
        shifted = splits[1][2]
        breakdown = heldout_comparison(y_test, clean, shifted, heldout)
        robustness = write_robustness_report(report_dir, y_test, clean[labels[ENSEMBLE]], shifted[labels[ENSEMBLE]],
                                             heldout, list(reference.class_names), labels[ENSEMBLE])
    member_table = _member_table(members, ens, rows)
    for name, table in (("metrics", metrics), ("per_class", per_class), ("combiners", choice.table),
                        ("members", member_table), ("heldout_breakdown", breakdown)):
        if table is not None:
            table.to_csv(report_dir / f"{name}.csv", index=False)
    if options.distill:
        from ensemble.distill import distill_student

        _say(options, f"distilling a {options.distill_backbone} student for {options.distill_epochs} epoch(s)")
        distilled = distill_student(ens, reference, images["test"], options, notes,
                                    backbone=options.distill_backbone, staging=staging)
        distilled.to_csv(report_dir / "distillation.csv", index=False)
        _say(options, "\ndistillation:\n" + distilled.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    (report_dir / "notes.txt").write_text("\n".join(notes) + "\n")
    return EnsembleReport(staging, rows.objective, member_table, choice.table, metrics, breakdown, robustness, notes)


def _member_table(members, ens, rows: ValidationRows) -> pd.DataFrame:
    table = []
    for member, file in zip(members, member_files(ens.member_names)):
        table.append({"trial": member.number, "file": file, "backbone": member.config.backbone,
                      "trial_value": member.value,
                      **rows.scores(rows.stack(member.val_probs, member.shifted_probs), "val")})
    return pd.DataFrame(table)


def _manifest_extra(options, location, members, selection, rows, report: EnsembleReport, images, inference,
                    best_trial: int, refit: dict | None) -> dict:
    """The build's part of the manifest (`EnsembleClassifier.write` adds the classifier's own entries and checksums)."""
    from search.execution.storage import redact

    records = lambda frame: json.loads(frame.to_json(orient="records"))  # noqa: E731
    member_rows = records(report.members)
    for entry, member, weight, count in zip(member_rows, members, selection.weights, selection.counts):
        entry.update(selection_weight=weight, selection_count=count, n_params=member.user_attrs.get("n_params"),
                     test_accuracy_tta_saved=member.user_attrs.get("test_accuracy_tta"),
                     config={k: v for k, v in member.config.to_dict().items() if k != "extra"})
        entry.pop("file")
    reference = members[0]
    heldout = images.get("heldout")
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "study": {"name": location.name, "storage": redact(location.storage), "artifacts": location.artifacts},
        "members": member_rows,
        "best_single_trial": best_trial,
        "refit": {"families": list(FAMILIES),
                  "trials": [m.number for m in members if m.model_file is not None and not m.gated],
                  **refit} if refit is not None else None,
        "selection": {"method": options.method, "top": options.top, "log": selection.log},
        "objective": {"requested": options.objective, "used": rows.objective,
                      "heldout_families": sorted(set(reference.shifted.family.tolist()))
                      if rows.objective == "robust" else None},
        "combiners_considered": records(report.combiners),
        "inference": inference,
        "data": {"source": reference.config.data, "image_size": reference.config.image_size,
                 "center_crop": reference.config.center_crop},
        "heldout_test": None if heldout is None else {
            "families": sorted(set(heldout.family.tolist())),
            "seed": int(reference.config.robust_seed) + TEST_SEED_OFFSET, "n_images": int(len(heldout.images))},
        "metrics": records(report.metrics),
        "consistency_max_abs_diff": images.get("consistency_max_abs_diff"),
        "images_per_second_heldout_eval": images.get("images_per_second"),
        "student": ({"file": "student/student.keras", "backbone": options.distill_backbone}
                    if options.distill else None),
        "build_options": asdict(options),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", help="the study to build from (default: the last one run under --out)")
    parser.add_argument("--out", default="runs", help="output root: the study is read from <out>/<study>/ and the "
                                                      "ensemble written to <out>/<study>/ensemble")
    parser.add_argument("--ensemble", help="write the ensemble folder here instead (default <out>/<study>/ensemble)")
    parser.add_argument("--storage", help="Optuna storage URL (default: the study's, from <out>/last_study.json)")
    parser.add_argument("--artifacts", help="artifact store (default: the study's, from <out>/last_study.json)")
    parser.add_argument("--pointer", help=argparse.SUPPRESS)  # former spelling of <out>/last_study.json
    parser.add_argument("--top", type=int, default=5, help="members at most (distinct ones, for greedy)")
    parser.add_argument("--method", choices=METHODS, default="greedy",
                        help="greedy: Caruana selection with replacement on validation log-loss; topk: the best K")
    parser.add_argument("--combiner", choices=COMBINER_CHOICES, default="auto",
                        help="auto: the best out-of-fold score under the objective; vote, weighted or stacking")
    parser.add_argument("--tta", type=int, choices=sorted(VIEW_SETS),
                        help="test-time augmentation views (default: the study's own, [budget] tta_views)")
    parser.add_argument("--objective", choices=OBJECTIVES,
                        help="robust: mean of clean and held-out-family validation scores; clean (default: the "
                             "study's own objective, robust for multi)")
    parser.add_argument("--clean-tolerance", type=float, default=CLEAN_TOLERANCE,
                        help="clean validation accuracy the auto combiner may give up for the objective")
    parser.add_argument("--no-calibrate", action="store_true", help="no temperature scaling")
    parser.add_argument("--no-heldout-eval", action="store_true",
                        help="skip the held-out-family test copy (no member predictions on new images)")
    parser.add_argument("--min-images-per-s", type=float, default=None, metavar="N",
                        help="inference budget: only members whose ensemble (with --tta views) predicts at least N "
                             "images/s on this machine, measured per architecture (default: no budget)")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="inference precision saved with the artifact; bfloat16 needs a CPU with AVX512_BF16 "
                             "or AMX (else float32 is used)")
    parser.add_argument("--adapt-bn", action="store_true",
                        help="save the artifact with test-time BatchNorm adaptation on")
    parser.add_argument("--bn-prior", type=float, default=BN_PRIOR,
                        help="weight of the members' own BatchNorm statistics, in images")
    parser.add_argument("--seed", type=int, default=0,
                        help="cross-validation fold seed (combiner scoring and temperature; the distilled student)")
    parser.add_argument("--distill", action="store_true", help="also train one student on the ensemble's soft labels")
    parser.add_argument("--distill-epochs", type=int, default=8, help="the student's epochs")
    parser.add_argument("--distill-backbone", default="compact_cnn", help="the student's backbone")
    parser.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                        help="retrain the chosen members with augmentation from every corruption family, held-out "
                             "ones included, and ship those (default: the study's [robustness] refit); the "
                             "held-out-family test scores then cover families the members trained on")
    parser.add_argument("--rotation", action="store_true",
                        help="measure the refit: retrain the best member once per corruption family left out and "
                             "report its accuracy on that family against the member as searched (5 trainings)")
    parser.add_argument("--gate", action=argparse.BooleanOptionalAction, default=None,
                        help="add the most accurate clean candidate behind the shift gate, which lets it vote only "
                             "on images whose brightness, contrast and sharpness look like the training images' "
                             "(default: with the robust objective and no --min-images-per-s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def options_from_args(args: argparse.Namespace) -> BuildOptions:
    return BuildOptions(top=args.top, method=args.method, combiner=args.combiner, tta=args.tta,
                        objective=args.objective, clean_tolerance=args.clean_tolerance,
                        calibrate=not args.no_calibrate, out=args.ensemble,
                        heldout_eval=not args.no_heldout_eval, min_images_per_s=args.min_images_per_s,
                        precision=args.precision, adapt_bn=args.adapt_bn, bn_prior=args.bn_prior, seed=args.seed,
                        pointer=args.pointer or str(Path(args.out) / POINTER_FILE),
                        progress=not args.no_progress and args.verbosity > QUIET, quiet=args.verbosity == QUIET,
                        distill=args.distill, distill_epochs=args.distill_epochs,
                        distill_backbone=args.distill_backbone, refit=args.refit,
                        rotation=args.rotation, gate=args.gate)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, BuildOptions]:
    parser = command_parser("python -m ensemble.build", __doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return args, options_from_args(args)


def run(args: argparse.Namespace) -> int:
    """`cellsearch build` and `python -m ensemble.build`."""
    set_verbosity(args.verbosity)
    options = options_from_args(args)
    options.validate()
    ens = build_ensemble(StudyLocation.find(args.study, out=args.out, storage=args.storage,
                                            artifacts=args.artifacts, pointer=options.pointer), options)
    if options.quiet:
        print(ens.report_.folder)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv)[0])


if __name__ == "__main__":
    sys.exit(run_cli(main))
