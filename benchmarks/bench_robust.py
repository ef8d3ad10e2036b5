"""Robust objective vs clean objective, side by side in one run, on images shifted in ways nobody trained for.

    python benchmarks/bench_robust.py --minutes 60                 # the issue's benchmark
    python benchmarks/bench_robust.py --minutes 60 --skip-search   # re-evaluate the studies of an earlier run

Two searches of the same spec (`--study`, default `default`) run at the same time, one worker each, each
pinned to its own core (`taskset`), so both see the same machine: one with `algorithm.objective = robust`
(the default), one with `val_accuracy_tta` (the clean baseline). Each is then built into an ensemble,
selected for the same goal (`objective="robust"` and `"clean"`). Both are scored on the clean test split
and on a corrupted copy of it made with the held-out families (`robustness.heldout_families`) at every
severity, seeded as `ensemble.build` seeds its test report (never the validation copy's seed): images that
neither training, validation nor selection ever saw, with corruption families that training never saw.
Printed per family and per severity, with ECE, the ensemble's best single member, the oracle of all
candidates, the frontier of plain averages of up to 4 candidates (what any selection of them could reach),
and BatchNorm adaptation on/off. The members are compared as searched: the spec's final refit trains on the
held-out families, so it is off unless `--refit` (then the search keeps time for it and the build refits).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = {"robust": "robust", "val_accuracy_tta": "clean"}  # search objective -> ensemble selection goal


def run_searches(args) -> None:
    """Both searches at once, each on its own core; returns when both have finished."""
    cores = sorted(os.sched_getaffinity(0))
    spec, processes = search_spec(args), []
    for core, objective in zip(cores, OBJECTIVES):
        command = ["taskset", "-c", str(core), sys.executable, "-m", "search.run", "--spec", spec,
                   "--objective", objective, "--study", f"{args.name}_{objective}", "--out", args.out,
                   "--timeout", str(args.minutes * 60), "--trials", str(args.trials), "--workers", "1",
                   "--no-progress"]
        log = open(Path(args.out) / f"{args.name}_{objective}.log", "w")
        processes.append(subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    started = time.time()
    codes = [p.wait() for p in processes]
    print(f"searches finished in {time.time() - started:.0f} s, exit codes {codes}", flush=True)


def search_spec(args) -> str:
    """The spec both searches run: `--study` as shipped, or with its final refit switched off."""
    from search.study.spec import resolve_spec_path

    path = resolve_spec_path(args.study)
    if args.refit:
        return str(path)
    text, refit_on = path.read_text(encoding="utf-8"), "\nrefit = true"
    copy = Path(args.out) / f"{args.name}_spec.toml"
    copy.write_text(text.replace(refit_on, "\nrefit = false") if refit_on in text else text + "\n", encoding="utf-8")
    return str(copy)


def test_data(study):
    """The clean test split every trial of `study` saw (after cleaning), and its held-out-family copy."""
    from ensemble.build import heldout_test_copy
    from search.study.trial_config import TrialConfig
    from search.study.space import fixed_fields
    from search.study.spec import spec_from_dict
    from search.trial.data import split_dataset

    spec = spec_from_dict(study.optuna_study.user_attrs["spec"], origin="study")
    config = TrialConfig(**fixed_fields(spec))
    test = split_dataset(config).split("test")
    return test, heldout_test_copy(config, test.images)


def scores(probs_clean, probs_shifted, test, shifted) -> dict:
    from common.robust_report import robustness_table

    labels = test.labels
    table = robustness_table(labels[shifted.source], probs_clean[shifted.source], probs_shifted,
                             shifted.family, shifted.severity)
    overall = table[(table.family == "all") & (table.severity == "all")].iloc[0]
    families = table[(table.family != "all") & (table.severity == "all")]
    severities = table[(table.family == "all") & (table.severity != "all")]
    return {
        "clean": float(np.mean(probs_clean.argmax(1) == labels)),
        "heldout": float(overall.accuracy), "ece_heldout": float(overall.ece),
        "ece_clean": float(overall.clean_ece),
        "per_family": {r.family: round(float(r.accuracy), 4) for r in families.itertuples()},
        "per_severity": {str(r.severity): round(float(r.accuracy), 4) for r in severities.itertuples()},
    }


def evaluate(study_name: str, goal: str, args) -> dict:
    import cellsearch as cs

    study = cs.load_study(study_name, out=args.out)
    trials = study.optuna_study.get_trials(deepcopy=False)
    counts = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    test, shifted = test_data(study)
    started = time.time()
    ens = cs.build_ensemble(study, objective=goal, tta=args.tta, refit=args.refit, quiet=True, progress=False)
    trial_numbers = ens.report_.members["trial"].tolist()
    result = {"trials": counts, "build_seconds": round(time.time() - started), "members": trial_numbers,
              "combiner": type(ens.combiner_).__name__}
    result["candidates_oracle"] = candidates_oracle(study, test, shifted)
    for adapt in (False, True):
        clean_m, shifted_m = (ens.member_proba(images, adapt_bn=adapt) for images in (test.images, shifted.images))
        clean, corrupted = (ens.combiner_.predict_proba(m) for m in (clean_m, shifted_m))
        result["ensemble" + ("_bn_adapted" if adapt else "")] = scores(clean, corrupted, test, shifted)
        if not adapt:
            result["members_alone"] = member_scores(trial_numbers, clean_m, shifted_m, test, shifted)
    return result


def candidates_oracle(study, test, shifted) -> dict:
    """Every COMPLETE trial's model with 8-view TTA: its own scores, the oracle of all of them, and the
    frontier of what plain averages of them reach on this test copy (`average_frontier`)."""
    import tempfile

    from backbones import load_model
    from ensemble.candidates import artifact_store, download
    from search.trial.views import predict_views

    store, probs, each = artifact_store(study.location), {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for trial in study.optuna_study.get_trials(deepcopy=False):
            if trial.state.name != "COMPLETE":
                continue
            path = download(store, trial, "model.keras", Path(scratch) / f"{trial.number}.keras")
            model = load_model(path, compile=False)
            probs[trial.number] = [predict_views(model, images, 8).mean(axis=0)
                                   for images in (test.images, shifted.images)]
            each[f"trial {trial.number}"] = {k: v for k, v in scores(*probs[trial.number], test, shifted).items()
                                             if k in ("clean", "heldout")}
    labels = (test.labels, test.labels[shifted.source])
    right = [[p[split].argmax(1) == labels[split] for p in probs.values()] for split in (0, 1)]
    each["oracle"] = {"clean": float(np.any(right[0], axis=0).mean()),
                      "heldout": float(np.any(right[1], axis=0).mean())}
    each["average_frontier"] = average_frontier(probs, labels)
    return each


def average_frontier(probs: dict, labels, max_members: int = 4) -> list:
    """Plain averages of up to `max_members` candidates that no other average beats on both clean and
    held-out accuracy: what any selection of these members could reach at best, measured on test data
    that selected nothing (an analysis, never a choice)."""
    import itertools

    points = []
    for size in range(1, min(max_members, len(probs)) + 1):
        for members in itertools.combinations(sorted(probs), size):
            accuracy = [float(np.mean(sum(probs[m][split] for m in members).argmax(1) == labels[split]))
                        for split in (0, 1)]
            points.append({"members": list(members), "clean": round(accuracy[0], 4),
                           "heldout": round(accuracy[1], 4)})
    front = {}
    for p in points:  # fewest members first, so a tie keeps the smallest average
        score = (p["clean"], p["heldout"])
        if not any(q["clean"] >= score[0] and q["heldout"] >= score[1] and (q["clean"], q["heldout"]) != score
                   for q in points):
            front.setdefault(score, p)
    return sorted(front.values(), key=lambda p: p["clean"])


def member_scores(trial_numbers, clean_m, shifted_m, test, shifted) -> dict:
    """Each member alone (same TTA), and the oracle of them: right whenever any member is right."""
    rows = {f"trial {n}": scores(clean_m[:, i], shifted_m[:, i], test, shifted)
            for i, n in enumerate(trial_numbers)}
    right_clean = clean_m.argmax(axis=2) == test.labels[:, None]
    right_shifted = shifted_m.argmax(axis=2) == test.labels[shifted.source][:, None]
    rows["oracle"] = {"clean": float(right_clean.any(axis=1).mean()),
                      "heldout": float(right_shifted.any(axis=1).mean())}
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="each search's --timeout")
    parser.add_argument("--study", default="default")
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--name", default="bench_robust")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    parser.add_argument("--tta", type=int, default=8, help="TTA views of the ensembles")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--refit", action="store_true", help="search and build with the spec's final refit")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if not args.skip_search:
        run_searches(args)
    results = {objective: evaluate(f"{args.name}_{objective}", goal, args) for objective, goal in OBJECTIVES.items()}
    print(json.dumps(results, indent=2))
    (Path(args.out) / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
