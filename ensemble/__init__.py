"""Ensembles of a finished search's trials: selection, combiners, TTA inference, artifact, CLIs.

    python -m ensemble.build                      # from runs/last_study.json; see --help
    python -m ensemble.predict --ensemble DIR --input images.npz --output predictions.csv
    python -m ensemble.export --ensemble DIR --codabench submission.zip

    from ensemble import load_ensemble
    clf = load_ensemble("runs/default/ensemble")  # EnsembleClassifier; .predict_proba(uint8 (N,H,W,3))

Importing this package does not import TensorFlow: the names below load on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from ensemble.standalone import EnsembleError

_LAZY = {
    "EnsembleClassifier": "ensemble.classifier",
    "load_ensemble": "ensemble.artifact",
    "BuildOptions": "ensemble.build",
    "build_ensemble": "ensemble.build",
    "SoftVoting": "ensemble.combiners",
    "WeightedVoting": "ensemble.combiners",
    "Stacking": "ensemble.combiners",
    "greedy_selection": "ensemble.selection",
    "select_top_k": "ensemble.selection",
    "export_codabench": "ensemble.export",
}

__all__ = sorted(["EnsembleError", *_LAZY])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ensemble' has no attribute {name!r}")
