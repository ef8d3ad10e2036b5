"""Build an ensemble from a finished study: `python -m ensemble.build [--study NAME] [--top 5] ...`.

1. candidates: every COMPLETE trial's saved val/test probabilities, averaged over the --tta views
   (nothing is re-predicted; see ensemble.candidates);
2. members: the --top K best by validation accuracy, or greedy selection with replacement on validation
   log-loss (Caruana et al. 2004; at most K distinct members), both skipping near-identical members and,
   with --min-images-per-s, members the inference budget cannot afford (ensemble.budget);
3. combiners: soft voting (uniform for topk, greedy counts for greedy), weights fit on validation
   log-loss, and logistic-regression stacking, each with optional temperature scaling, all fit on
   validation only and compared out-of-fold on validation; with the corruption suite on, each is also
   fit on validation plus a down-weighted corrupted copy of it (ensemble.robust) and --combiner auto
   takes the most robust one whose clean validation accuracy is within --clean-tolerance of the best;
4. evaluation on the clean test split (saved predictions) and on a corrupted copy of it (member models
   run on the corrupted images with TTA): ensemble vs best single member vs plain average;
5. the artifact folder (see ensemble.artifact), written atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ensemble.cli import run_cli
from ensemble.standalone import PRECISIONS, VIEW_SETS, EnsembleError

METHODS = ("topk", "greedy")
COMBINER_CHOICES = ("auto", "vote", "weighted", "stacking")
PREPROCESSING_NOTE = ("members take raw RGB 0..255 (uint8 cast to float32); resizing and normalisation are "
                      "layers inside each model (custom layer 'cellsearch>ImageNetPreprocess', re-declared in "
                      "ensemble/standalone.py); other image sizes are resized to input_size with antialiased "
                      "bicubic resampling; TTA views are the dihedral views listed in 'views', probabilities "
                      "averaged per member before combining")


@dataclass
class BuildOptions:
    study: str | None = None
    storage: str | None = None
    artifacts: str | None = None
    pointer: str = "runs/last_study.json"
    top: int = 5
    method: str = "greedy"
    combiner: str = "auto"
    tta: int = 8
    calibrate: bool = True
    out: str | None = None
    corrupt_severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    corrupted_val_weights: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3)
    clean_tolerance: float = 0.002
    min_images_per_s: float | None = None  # inference budget (this machine, --tta views, --precision)
    precision: str = "float32"  # inference precision of the artifact: float32 | bfloat16
    seed: int = 0
    greedy_iterations: int = 25
    progress: bool = True  # tqdm bars
    quiet: bool = False  # no printed tables or notes (library use, benchmarks)
    distill: bool = False
    distill_epochs: int = 8
    distill_backbone: str = "compact_cnn"

    def validate(self) -> None:
        if self.top < 1:
            raise EnsembleError(f"--top must be >= 1, got {self.top}")
        if self.method not in METHODS:
            raise EnsembleError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.combiner not in COMBINER_CHOICES:
            raise EnsembleError(f"--combiner must be one of {COMBINER_CHOICES}, got {self.combiner!r}")
        if self.tta not in VIEW_SETS:
            raise EnsembleError(f"--tta must be one of {sorted(VIEW_SETS)}, got {self.tta}")
        if self.distill and self.distill_epochs < 1:
            raise EnsembleError(f"--distill-epochs must be >= 1, got {self.distill_epochs}")
        if self.distill:
            from backbones import list_backbones

            if self.distill_backbone not in list_backbones():
                raise EnsembleError(f"--distill-backbone {self.distill_backbone!r} is not one of "
                                    f"{', '.join(list_backbones())}")
        bad = [s for s in self.corrupt_severities if s not in (1, 2, 3, 4, 5)]
        if bad:
            raise EnsembleError(f"--corrupt-severities must be in 1..5, got {bad[0]}")
        negative = [w for w in self.corrupted_val_weights if not w >= 0]
        if negative:
            raise EnsembleError(f"--corrupted-val-weights must be >= 0, got {negative[0]}")
        if self.min_images_per_s is not None and not self.min_images_per_s > 0:
            raise EnsembleError(f"--min-images-per-s must be > 0, got {self.min_images_per_s}")
        if self.precision not in PRECISIONS:
            raise EnsembleError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0 <= self.clean_tolerance < 1:
            raise EnsembleError(f"--clean-tolerance must be in [0, 1), got {self.clean_tolerance}")

    @property
    def robust(self) -> bool:
        """Fit combiners on a corrupted validation copy too (needs the corruption suite switched on)."""
        return bool(self.corrupt_severities) and any(w > 0 for w in self.corrupted_val_weights)


@dataclass
class BuildResult:
    folder: Path
    manifest: dict
    comparison: pd.DataFrame
    combiners: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def _say(options: BuildOptions, message: str) -> None:
    if not options.quiet:
        print(message, flush=True)


def _select(options: BuildOptions, val_probs: list[np.ndarray], y_val: np.ndarray, budget=None):
    from ensemble.selection import greedy_selection, select_top_k

    if options.method == "topk":
        return select_top_k(val_probs, y_val, options.top, budget)
    return greedy_selection(val_probs, y_val, options.top, n_iterations=options.greedy_iterations, budget=budget)


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


def _member_entry(candidate, selection, position: int, y_val: np.ndarray) -> dict:
    from ensemble.combiners import log_loss

    config = candidate.config
    return {
        "trial": candidate.number, "file": _member_file(candidate),
        "backbone": config.backbone, "trial_value": candidate.value,
        "val_accuracy": float(np.mean(candidate.val_probs.argmax(1) == y_val)),
        "val_log_loss": log_loss(candidate.val_probs, y_val),
        "test_accuracy_tta_saved": candidate.user_attrs.get("test_accuracy_tta"),
        "selection_weight": selection.weights[position], "selection_count": selection.counts[position],
        "n_params": candidate.user_attrs.get("n_params"),
        "config": {k: v for k, v in config.to_dict().items() if k not in ("extra",)},
    }


def build_ensemble(options: BuildOptions) -> BuildResult:
    """Build, evaluate and save an ensemble (see the module doc). Returns the saved folder and tables."""
    options.validate()
    from ensemble.candidates import artifact_store, load_candidates, locate_study, open_study

    location = locate_study(options.study, options.storage, options.artifacts, options.pointer)
    study = open_study(location)
    store = artifact_store(location)
    out = Path(options.out) if options.out else Path(options.pointer).parent / location.study / "ensemble"
    with tempfile.TemporaryDirectory(prefix="ensemble-cache-") as cache:
        candidates, notes = load_candidates(study, store, Path(cache), options.tta)
        _say(options, f"study {location.study!r}: {len(candidates)} candidate trial(s), TTA {options.tta} view(s)")
        for note in notes:
            _say(options, f"  note: {note}")
        budget = _budget(options, candidates, store, Path(cache))
        return _build(options, location, store, out, candidates, notes, budget)


def _build(options, location, store, out: Path, candidates, notes, budget) -> BuildResult:
    from ensemble.candidates import download
    from ensemble.evaluate import comparison_rows, per_class_rows, score_combiners
    from ensemble.selection import rank_candidates

    reference = candidates[0]
    y_val, y_test = reference.val_labels, reference.test_labels
    class_names = reference.class_names
    selection = _select(options, [c.val_probs for c in candidates], y_val, budget)
    for line in selection.log:
        _say(options, f"  selection: {line}")
    members = [candidates[i] for i in selection.indices]
    best_index = rank_candidates([c.val_probs for c in candidates], y_val)[0]
    best = candidates[best_index]
    X_val = np.stack([m.val_probs for m in members], axis=1)
    X_test = np.stack([m.test_probs for m in members], axis=1)
    best_position = selection.indices.index(best_index)

    from ensemble.artifact import COMBINER_FILE, atomic_folder, write_manifest

    with atomic_folder(out) as staging:
        report = staging / "report"
        report.mkdir()
        for member in members:
            download(store, member, "model.keras", staging / _member_file(member))
        classifier = _load_members(staging, members, options)
        images = _member_images(options, classifier, reference, X_test, notes)
        if "test_runtime" in images:
            X_test = images["test_runtime"]
        vote_weights = selection.weights if options.method == "greedy" else None
        choice = score_combiners(X_val, y_val, X_test, y_test, calibrate=options.calibrate,
                                 vote_weights=vote_weights, preferred=options.combiner,
                                 X_val_corrupted=images.get("val_corrupted"),
                                 X_test_corrupted=images.get("test_corrupted"),
                                 corrupted_weights=options.corrupted_val_weights,
                                 clean_tolerance=options.clean_tolerance)
        combiner = classifier.combiner = choice.fitted[choice.chosen]
        names = (f"ensemble ({choice.chosen}, {len(members)} members)", f"best single (trial {best.number})",
                 f"plain average ({len(members)} members)")

        def by_model(X: np.ndarray, best_probs: np.ndarray) -> dict[str, np.ndarray]:
            return dict(zip(names, (combiner.predict_proba(X), best_probs, X.mean(axis=1))))

        clean = by_model(X_test, best.test_probs)
        rows = comparison_rows("test", y_test, clean)
        per_class_frames = [per_class_rows("test", y_test, clean, class_names)]
        import joblib

        joblib.dump(combiner, staging / COMBINER_FILE)
        from ensemble.metrics import save_confusion_png

        save_confusion_png(clean[names[0]], y_test, class_names, report / "confusion_test.png", f"{names[0]}: test")
        extra = _evaluate_on_images(options, staging, classifier, reference, best_position, images, names, notes)
        rows += extra.get("rows", [])
        per_class_frames += extra.get("per_class", [])
        comparison = pd.DataFrame(rows)
        comparison.to_csv(report / "metrics.csv", index=False)
        pd.concat(per_class_frames, ignore_index=True).to_csv(report / "per_class.csv", index=False)
        choice.table.to_csv(report / "combiners.csv", index=False)
        for key in ("breakdown", "distill"):
            if key in extra:
                extra[key].to_csv(report / f"{'corruption_breakdown' if key == 'breakdown' else 'distillation'}.csv",
                                  index=False)
        (report / "notes.txt").write_text("\n".join(notes + selection.log) + "\n")
        inference = _inference_entry(options, classifier, selection, budget)
        manifest = _manifest(options, location, members, selection, combiner, choice, class_names, reference,
                             comparison, best, y_val, extra, inference)
        manifest = write_manifest(staging, manifest)
    float_format = lambda v: f"{v:.4f}"  # noqa: E731
    _say(options, "\ncombiners (chosen on out-of-fold validation, clean and corrupted copies; test shown for "
                  "information only):")
    _say(options, choice.table.to_string(index=False, float_format=float_format))
    _say(options, "\n" + comparison.to_string(index=False, float_format=float_format))
    if "distill" in extra:
        _say(options, "\ndistillation:\n" + extra["distill"].to_string(index=False, float_format=float_format))
    _say(options, f"\nensemble saved to {out}")
    return BuildResult(out, manifest, comparison, choice.table, notes)


def _member_file(candidate) -> str:
    return f"members/trial_{candidate.number:05d}.keras"


def _load_members(staging: Path, members, options):
    """The members as the artifact will load them (safe_mode on), behind a classifier whose combiner is
    set once it is chosen."""
    import backbones.preprocessing  # noqa: F401  (registers the custom layer)
    from ensemble.classifier import EnsembleClassifier
    from ensemble.standalone import load_member_models

    models = load_member_models(staging, {"members": [{"file": _member_file(m)} for m in members]},
                                custom_layer=False)
    return EnsembleClassifier(models, None, members[0].class_names, options.tta, precision=options.precision)


def _inference_entry(options, classifier, selection, budget) -> dict:
    """Precision in effect and, under a budget, the estimated and the measured images/s of the ensemble."""
    entry = {"precision": classifier.precision_, "tta_views": options.tta,
             "min_images_per_s": options.min_images_per_s}
    if budget is not None:
        from ensemble.budget import images_per_second

        costs = [budget.costs[i] for i in selection.indices]
        entry["member_seconds_per_image"] = [c.member for c in costs]
        entry["shared_seconds_per_image"] = max(c.shared for c in costs)
        entry["estimated_images_per_s"] = budget.images_per_s(selection.indices)
        entry["measured_images_per_s"] = images_per_second(classifier.predict_proba, classifier.input_size)
        _say(options, f"inference: {entry['measured_images_per_s']:,.0f} img/s measured "
                      f"({entry['estimated_images_per_s']:,.0f} estimated; limit {options.min_images_per_s:,.0f})")
        if entry["measured_images_per_s"] < options.min_images_per_s:
            _say(options, "  warning: measured below the limit (other load on this machine, or the estimate was "
                          "optimistic); rebuild with a higher --min-images-per-s for a margin")
    return entry


def _member_images(options, classifier, reference, X_test, notes) -> dict:
    """Check the reloaded members against their saved test predictions, and predict them on the corrupted
    copies of the test split and (robust validation) of the validation split."""
    from data_pipeline.corrupt import corrupt_dataset
    from ensemble.data import load_split_images

    images: dict = {}
    try:
        images["test"] = load_split_images(reference.config, reference.test_ids, reference.test_labels)
    except EnsembleError as exc:
        if options.corrupt_severities or options.distill:
            raise EnsembleError(f"{exc} (pass --corrupt-severities none to skip the corrupted evaluation)") from None
        notes.append(f"test images not loaded, no consistency check: {exc}")
        return images
    if classifier.precision_ != "float32":
        images["test_runtime"] = classifier.member_proba(images["test"]).astype(np.float64)
        notes.append(f"clean test re-predicted in {classifier.precision_} (trials saved float32 predictions); "
                     "the best single member's row is its saved float32 result")
    check = min(256, len(images["test"]))
    runtime = images["test_runtime"] if "test_runtime" in images else classifier.member_proba(images["test"][:check])
    drift = float(np.abs(runtime[:check] - X_test[:check]).max())
    images["consistency_max_abs_diff"] = drift
    if drift > (1e-3 if classifier.precision_ == "float32" else 0.1):
        notes.append(f"reloaded members differ from their saved test predictions by up to {drift:.2g} "
                     "(different hardware/precision, or not the same data)")
        _say(options, f"  warning: {notes[-1]}")
    if not options.corrupt_severities:
        return images
    splits = [("test", reference.test_ids, reference.test_labels, options.seed)]
    if options.robust:
        splits.append(("val", reference.val_ids, reference.val_labels, options.seed + 1))
    for split, ids, labels, seed in splits:
        clean = images["test"] if split == "test" else load_split_images(reference.config, ids, labels, "val")
        corrupted, kinds, severities = corrupt_dataset(clean, options.corrupt_severities, seed=seed)
        _say(options, f"corrupted {split} copy (severities {list(options.corrupt_severities)}): "
                      f"{classifier.n_members} member(s) x {options.tta} view(s) on {len(corrupted)} images")
        started = time.perf_counter()
        images[f"{split}_corrupted"] = classifier.member_proba(corrupted, progress=options.progress).astype(np.float64)
        if split == "test":
            images["images_per_second"] = len(corrupted) / (time.perf_counter() - started)
            images["test_kinds"], images["test_severities"] = kinds, severities
    return images


def _evaluate_on_images(options, staging, classifier, reference, best_position, images, names, notes) -> dict:
    """Rows for the corrupted test copy (ensemble vs best single vs plain average), and optional distillation."""
    from ensemble.evaluate import comparison_rows, corruption_breakdown, per_class_rows
    from ensemble.metrics import save_confusion_png

    ensemble_name, best_name, average_name = names
    result: dict = {"input_size": list(classifier.input_size)}
    result.update({k: images[k] for k in ("consistency_max_abs_diff", "images_per_second") if k in images})
    y_test = reference.test_labels
    if "test_corrupted" in images:
        member_probs = images["test_corrupted"]
        probs = {ensemble_name: classifier.combiner.predict_proba(member_probs),
                 best_name: member_probs[:, best_position], average_name: member_probs.mean(axis=1)}
        result["rows"] = comparison_rows("test_corrupted", y_test, probs)
        result["per_class"] = [per_class_rows("test_corrupted", y_test, probs, reference.class_names)]
        result["breakdown"] = corruption_breakdown(y_test, images["test_kinds"], images["test_severities"], probs)
        save_confusion_png(probs[ensemble_name], y_test, reference.class_names,
                           staging / "report" / "confusion_test_corrupted.png", f"{ensemble_name}: corrupted test")
    if options.distill:
        from ensemble.distill import distill_student

        _say(options, f"distilling a {options.distill_backbone} student for {options.distill_epochs} epoch(s)")
        result["distill"] = distill_student(classifier, reference, images["test"], options, notes,
                                            backbone=options.distill_backbone, staging=staging)
    return result


def _manifest(options, location, members, selection, combiner, choice, class_names, reference, comparison,
              best, y_val, extra, inference) -> dict:
    from ensemble.artifact import COMBINER_FILE, library_versions
    from search.storage import redact

    return {
        "format_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "study": {"name": location.study, "storage": redact(location.storage), "artifacts": location.artifacts},
        "members": [_member_entry(m, selection, i, y_val) for i, m in enumerate(members)],
        "best_single_trial": best.number,
        "selection": {"method": options.method, "top": options.top, "log": selection.log},
        "combiner": combiner.params(),
        "combiner_file": COMBINER_FILE,
        "combiners_considered": json.loads(choice.table.to_json(orient="records")),
        "robust_validation": {
            "corrupted_val_weights": list(options.corrupted_val_weights) if options.robust else [0.0],
            "clean_tolerance": options.clean_tolerance,
            "chosen_weight": float(choice.table.loc[choice.table["chosen"], "corrupted_weight"].iloc[0]),
        },
        "tta_views": options.tta,
        "views": list(VIEW_SETS[options.tta]),
        "inference": inference,
        "class_names": list(class_names),
        "input_size": extra["input_size"],
        "data": {"source": reference.config.data, "image_size": reference.config.image_size,
                 "center_crop": reference.config.center_crop},
        "preprocessing": PREPROCESSING_NOTE,
        "metrics": json.loads(comparison.to_json(orient="records")),
        "consistency_max_abs_diff": extra.get("consistency_max_abs_diff"),
        "images_per_second_corrupted_eval": extra.get("images_per_second"),
        "student": ({"file": "student/student.keras", "backbone": options.distill_backbone,
                     "results": json.loads(extra["distill"].to_json(orient="records"))}
                    if "distill" in extra else None),
        "build_options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()},
        "versions": library_versions(),
    }


def parse_severities(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none", "0"):
        return ()
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise EnsembleError(f"--corrupt-severities: expected e.g. 3 or 1,2,3,4,5 or none, got {text!r}") from None


def parse_weights(text: str) -> tuple[float, ...]:
    if text.strip().lower() in ("", "none"):
        return (0.0,)
    try:
        return tuple(float(s) for s in text.split(","))
    except ValueError:
        raise EnsembleError(f"--corrupted-val-weights: expected e.g. 0,0.01,0.1 or none, got {text!r}") from None


def parse_args(argv: list[str] | None) -> BuildOptions:
    parser = argparse.ArgumentParser(prog="python -m ensemble.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", help="study name (default: the one in runs/last_study.json)")
    parser.add_argument("--storage", help="Optuna storage URL (default: from runs/last_study.json)")
    parser.add_argument("--artifacts", help="artifact store (default: from runs/last_study.json)")
    parser.add_argument("--pointer", default="runs/last_study.json", help="last-study pointer written by search.run")
    parser.add_argument("--top", type=int, default=5, help="members (distinct, for greedy) at most (default 5)")
    parser.add_argument("--method", choices=METHODS, default="greedy")
    parser.add_argument("--combiner", choices=COMBINER_CHOICES, default="auto")
    parser.add_argument("--tta", type=int, choices=sorted(VIEW_SETS), default=8, help="TTA views (default 8)")
    parser.add_argument("--no-calibrate", action="store_true", help="no temperature scaling")
    parser.add_argument("--out", help="output folder (default runs/<study>/ensemble)")
    parser.add_argument("--corrupt-severities", default="1,2,3,4,5",
                        help="severities of the corrupted test copy, e.g. 3 or 1,2,3,4,5, or none")
    parser.add_argument("--corrupted-val-weights", default="0,0.01,0.03,0.1,0.3",
                        help="weights of the corrupted validation copy tried when fitting combiners "
                             "(robust validation; 'none' or 0: fit on clean validation only)")
    parser.add_argument("--clean-tolerance", type=float, default=0.002,
                        help="a more robust combiner may lose at most this much clean validation accuracy")
    parser.add_argument("--min-images-per-s", type=float, default=None, metavar="N",
                        help="inference budget: only members whose ensemble (with --tta views) predicts at least N "
                             "images/s on this machine, measured per architecture")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="inference precision saved with the artifact; bfloat16 needs a CPU with AVX512_BF16 "
                             "or AMX (else float32 is used)")
    parser.add_argument("--seed", type=int, default=0, help="corruption and fold seed")
    parser.add_argument("--distill", action="store_true", help="also train one student on the ensemble's soft labels")
    parser.add_argument("--distill-epochs", type=int, default=8)
    parser.add_argument("--distill-backbone", default="compact_cnn", help="student backbone (default compact_cnn)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    return BuildOptions(study=args.study, storage=args.storage, artifacts=args.artifacts, pointer=args.pointer,
                        top=args.top, method=args.method, combiner=args.combiner, tta=args.tta,
                        calibrate=not args.no_calibrate, out=args.out,
                        corrupt_severities=parse_severities(args.corrupt_severities),
                        corrupted_val_weights=parse_weights(args.corrupted_val_weights),
                        clean_tolerance=args.clean_tolerance, seed=args.seed,
                        min_images_per_s=args.min_images_per_s, precision=args.precision,
                        progress=not args.no_progress, distill=args.distill, distill_epochs=args.distill_epochs,
                        distill_backbone=args.distill_backbone)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    options.validate()
    build_ensemble(options)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
