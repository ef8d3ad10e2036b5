"""The whole job in a few lines of Python: search, build an ensemble, predict."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from cellsearch._study import Study
from search.location import StudyLocation
from search.spec import StudySpec, load_spec, spec_from_dict


def _spec(study: str | os.PathLike | StudySpec | dict) -> StudySpec:
    if isinstance(study, StudySpec):
        return dataclasses.replace(study)
    if isinstance(study, dict):
        return spec_from_dict(study, origin="spec dict")
    return load_spec(str(study))


def search(study: str | os.PathLike | StudySpec | dict = "default", *, data: str | None = None,
           trials: int | None = None, timeout: float | None = None, out: str | None = None,
           name: str | None = None, objective: str | None = None, reseed_top: int | None = None,
           progress: bool = True, **options: Any) -> Study:
    """Run (or continue) a search and return a handle on its study.

    `study` is a shipped spec name (`"quick"`, `"default"`, `"medium"`, `"best"`, ...), a `.toml` path,
    a `StudySpec` or a dict in the spec's layout. Keyword options override the spec: `data` (an .npz or
    an image-folder tree), `trials` (finished trials the study should hold), `timeout` (seconds after
    which no trial starts), `out` (output root), `name`, `objective` (`robust`, `val_accuracy_tta`,
    `multi`), and `storage`, `artifacts`, `executor`, `workers`, `gpus`, `cpus`, `address`. Bad values
    and bad data raise a `cellsearch.errors.CellsearchError` subclass before any worker starts.

    >>> import cellsearch as cs
    >>> study = cs.search("quick", trials=4, timeout=300)        # doctest: +SKIP
    >>> study.best_trial.user_attrs["val_accuracy_tta"]          # doctest: +SKIP
    """
    from search.driver import apply_overrides, run_study

    spec = apply_overrides(_spec(study), out=out, name=name, data=data, trials=trials, timeout=timeout,
                           objective=objective, **options)
    run_study(spec, reseed_top=reseed_top, show_progress=progress)
    return Study(spec.location)


def load_study(name: str | None = None, *, out: str = "runs", storage: str | None = None,
               artifacts: str | None = None) -> Study:
    """A handle on an existing study (default: the one run last under `out`)."""
    return Study(StudyLocation.find(name, out=out, storage=storage, artifacts=artifacts))


def build_ensemble(study: Study | StudyLocation | str | None = None, **options: Any):
    """Build the ensemble of a study's best trials; returns the fitted `EnsembleClassifier` with its
    evaluation in `.report_`, saved to `out` (default `<out>/<study>/ensemble`).

    `study`: a `Study` (what `search` returns), a `StudyLocation`, a study name, or None for the study run
    last. Options are those of `python -m ensemble.build` (`top`, `method`, `combiner`, `tta`,
    `objective`, `adapt_bn`, `out`, ...).

    >>> ens = cs.build_ensemble(study, top=5)           # doctest: +SKIP
    >>> ens.report_.score("test_heldout")               # doctest: +SKIP
    """
    from ensemble.build import build_ensemble as build

    return build(study, **options)


def load_ensemble(path: str | os.PathLike, **options: Any):
    """Load a saved ensemble (checksums verified); `predict`/`predict_proba` take uint8 (N,H,W,3)."""
    from ensemble.artifact import load_ensemble as load

    return load(path, **options)
