"""Where a shipped ensemble with a gated member gains or loses clean test accuracy (ensemble.gate).

For each study: the gate is fitted again as the build fits it, and the clean test images are split into those it
lets the gated member vote on and those it rejects. On each part the table prints the shipped ensemble (its saved
combiner on the members' saved test predictions), the plain average of the same trials without the gate, and each
member alone, with the temperatures the combiner uses. Test labels explain the build here; they choose nothing.

    python benchmarks/bench_gate_cost.py [runs/last_study.json ...]

Each argument is a study pointer (`runs/last_study.json` of a run folder); paths in it are read relative to the
folder that holds the pointer's folder, as `cellsearch build` run there would read them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pointers", nargs="*", default=["runs/last_study.json"], help="study pointers")
    return parser.parse_args(argv)


def gate_cost(pointer: Path) -> dict:
    """One row: accuracies of the ensemble, the plain average and the members, overall, let through and rejected."""
    from ensemble import load_ensemble
    from ensemble.candidates import artifact_store, load_candidates, open_study
    from ensemble.gate import fit_gate, inside
    from search.study.location import StudyLocation
    from search.trial.data import load_trial_data

    location = StudyLocation.find(pointer=pointer)
    ens = load_ensemble(location.ensemble_dir)
    members = ens.manifest_["members"]
    gated = [m["file"].endswith("_gated.keras") for m in members]
    if not any(gated):
        return {"study": str(pointer), "note": "no gated member"}
    with tempfile.TemporaryDirectory() as cache:
        found, _ = load_candidates(open_study(location), artifact_store(location), Path(cache),
                                   ens.manifest_["tta_views"])
    by_number = {c.number: c for c in found}
    trials = [by_number[int(m["trial"])] for m in members]
    data = load_trial_data(trials[gated.index(True)].config)
    lets = inside(fit_gate(data.train.images, data.val.images), data.test.images)
    probs = np.stack([np.where(lets[:, None] | (not g), t.test_probs, 1.0 / t.test_probs.shape[1])
                      for g, t in zip(gated, trials)], axis=1)
    y = trials[0].test_labels
    right = {"ensemble": ens.combiner_.predict_proba(probs).argmax(1) == y,
             "plain average": np.mean([t.test_probs for t in trials], axis=0).argmax(1) == y,
             **{f"trial {t.number} ({t.config.augment_policy})": t.test_probs.argmax(1) == y for t in trials}}
    params = ens.combiner_.params()
    row = {"study": str(pointer), "rejected": f"{(~lets).sum()} of {len(y)}",
           "gated weight": round(params.get("gated_weight", 0.0), 3),
           "gated T": round(params.get("gated_temperature", 1.0), 2),
           "base T": np.round(getattr(getattr(ens.combiner_, "base_", None), "temperature_", np.nan), 2)}
    for name, ok in right.items():
        row[name] = f"{ok.mean():.4f} ({ok[lets].mean():.4f} / {ok[~lets].mean():.4f})"
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    for pointer in map(Path, args.pointers):
        pointer = pointer.resolve()
        if not pointer.is_file():
            raise SystemExit(f"bench_gate_cost: no study pointer at {pointer} (a run folder's runs/last_study.json)")
        os.chdir(pointer.parent.parent)
        rows.append(gate_cost(pointer))
    print("accuracy on the clean test split: all (let through by the gate / rejected)")
    print(pd.DataFrame(rows).T.to_string(header=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
