"""Ensembles of a finished search's trials: selection, combiners, TTA inference, artifact, CLIs.

    python -m ensemble.build                      # from runs/last_study.json; see --help
    python -m ensemble.predict --ensemble DIR --input images.npz --output predictions.csv
    python -m ensemble.export --ensemble DIR --codabench submission.zip

    from ensemble import build_ensemble, load_ensemble
    ens = build_ensemble("default")               # fitted EnsembleClassifier, saved; ens.report_ its evaluation
    clf = load_ensemble("runs/default/ensemble")  # the same from disk; .predict_proba(uint8 (N,H,W,3))
    clf.predict(images, adapt_bn=True)            # test-time BatchNorm adaptation to this batch

Importing this package does not import TensorFlow: the names below load on first access.
"""

from __future__ import annotations

from common.errors import EnsembleError
from common.lazy import lazy_exports

_LAZY = {
    "EnsembleClassifier": "ensemble.classifier",
    "load_ensemble": "ensemble.classifier",
    "BuildOptions": "ensemble.build",
    "EnsembleReport": "ensemble.build",
    "build_ensemble": "ensemble.build",
    "SoftVoting": "ensemble.combiners",
    "WeightedVoting": "ensemble.combiners",
    "Stacking": "ensemble.combiners",
    "greedy_selection": "ensemble.selection",
    "select_top_k": "ensemble.selection",
    "export_codabench": "ensemble.export",
}

__all__ = sorted(["EnsembleError", *_LAZY])

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
