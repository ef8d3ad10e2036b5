"""The whole job in a few lines of Python: search, build an ensemble, predict, export."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from cellsearch._study import Study
from search.study.location import StudyLocation
from search.study.spec import StudySpec, load_spec, spec_from_dict

#: The file, in the study's folder, that in-memory data given to `search` is written to (workers are
#: separate processes, so they read the data from disk like any other data set).
ARRAYS_FILE = "data.npz"


def _spec(study: str | os.PathLike | StudySpec | dict) -> StudySpec:
    if isinstance(study, StudySpec):
        return dataclasses.replace(study)
    if isinstance(study, dict):
        return spec_from_dict(study, origin="spec dict")
    return load_spec(str(study))


def _arrays_path(data: Any, spec: StudySpec) -> str:
    """`data` given as `(images, labels)`, `(images, labels, class_names)` or an `ImageDataset`, written to
    the study's folder; the same data again (a continued study) reuses the file, other data is refused."""
    import numpy as np

    from data_pipeline.dataset import ImageDataset
    from common.errors import DataError
    from data_pipeline.loaders import from_arrays, load_npz, save_npz

    if isinstance(data, ImageDataset):
        dataset = data
    elif isinstance(data, (tuple, list)) and len(data) in (2, 3):
        dataset = from_arrays(*data)
    else:
        raise DataError(f"data: expected a path, (images, labels), (images, labels, class_names) or an "
                        f"ImageDataset, got {type(data).__name__}")
    path = (spec.location.folder / ARRAYS_FILE).resolve()
    if path.is_file():
        saved = load_npz(path)
        if (saved.class_names != dataset.class_names or not np.array_equal(saved.images, dataset.images)
                or not np.array_equal(saved.labels, dataset.labels)):
            raise DataError(f"study {spec.name!r} was run on other in-memory data ({path}); give another name= "
                            f"or out=")
        return str(path)
    return str(save_npz(dataset, path))


def search(study: str | os.PathLike | StudySpec | dict = "default", *, data: Any = None,
           image_size: int | None = None, trials: int | None = None, timeout: float | None = None,
           out: str | None = None, name: str | None = None, objective: str | None = None,
           reseed_top: int | None = None, progress: bool = True, **options: Any) -> Study:
    """Run (or continue) a search and return a handle on its study.

    `study` is a shipped spec name (`"quick"`, `"default"`, `"medium"`, `"best"`, ...), a `.toml` path,
    a `StudySpec` or a dict in the spec's layout. Keyword options override the spec:

    - `data`: a path (an .npz, a class-per-folder tree, or a .csv of file names and labels, see
      `data_pipeline.loaders`), or in-memory `(images, labels)` / `(images, labels, class_names)` arrays
      (labels as integers or class names), written to `<out>/<name>/data.npz` for the workers;
    - `image_size`: the side image files are resized to (spec `data.image_size`; default 64);
    - `trials` (finished trials the study should hold), `timeout` (seconds the whole run may take: trials
      running at the deadline stop at an epoch boundary and are evaluated as usual), `out` (output root),
      `name`, `objective` (`robust`, `val_accuracy_tta`, `multi`), and `storage`, `artifacts`, `executor`,
      `workers`, `gpus`, `cpus`, `address`, `mixed_precision` (`auto`, `on`, `bfloat16`, `off`).

    The class count and names come from the data. Bad values and bad data raise a
    `cellsearch.errors.CellsearchError` subclass before any worker starts.

    >>> import cellsearch as cs
    >>> study = cs.search("quick", trials=4, timeout=300)        # doctest: +SKIP
    >>> study = cs.search("quick", data=(images, labels))         # doctest: +SKIP
    >>> study.leaderboard().head()                               # doctest: +SKIP
    """
    from search.execution.driver import apply_overrides, run_study

    in_memory = data is not None and not isinstance(data, (str, os.PathLike))
    spec = apply_overrides(_spec(study), out=out, name=name, data=None if in_memory else data and str(data),
                           image_size=image_size, trials=trials, timeout=timeout, objective=objective, **options)
    if in_memory:
        spec.data.path = _arrays_path(data, spec)
    run_study(spec, reseed_top=reseed_top, show_progress=progress)
    return Study(spec.location)


def load_study(name: str | None = None, *, out: str = "runs", storage: str | None = None,
               artifacts: str | None = None) -> Study:
    """A handle on an existing study (default: the one run last under `out`)."""
    return Study(StudyLocation.find(name, out=out, storage=storage, artifacts=artifacts))


def build_ensemble(study: Study | StudyLocation | str | None = None, *, top: int = 5, method: str = "greedy",
                   combiner: str = "auto", tta: int | None = None, objective: str | None = None,
                   clean_tolerance: float = 0.005, calibrate: bool = True, out: str | None = None,
                   heldout_eval: bool = True, min_images_per_s: float | None = None, precision: str = "float32",
                   adapt_bn: bool = False, bn_prior: float = 16.0, seed: int = 0, greedy_iterations: int = 25,
                   pointer: str = "runs/last_study.json", progress: bool = True, quiet: bool = False,
                   distill: bool = False, distill_epochs: int = 8, distill_backbone: str = "compact_cnn",
                   refit: bool | None = None, rotation: bool = False, gate: bool | None = None):
    """Build the ensemble of a study's best trials; returns the fitted `EnsembleClassifier` with its
    evaluation in `.report_`, saved to `out` (default `<out>/<study>/ensemble`).

    `study`: a `Study` (what `search` returns), a `StudyLocation`, a study name, or None for the study run
    last. The keywords are the fields of `ensemble.build.BuildOptions` (documented there), with the same
    defaults: `top` members at most, chosen by `method` ("greedy" or "topk"), combined by `combiner`
    ("auto", "vote", "weighted", "stacking"), `tta` views and `objective` ("robust", "clean"; None for
    either: the study's own), `out` the artifact folder, `refit` to retrain the members on every corruption family
    (None: the study's spec), `rotation` to measure that refit by family rotation, `gate` to add the most
    accurate clean candidate behind the shift gate (None: with the robust objective and no budget).

    >>> ens = cs.build_ensemble(study, top=5)           # doctest: +SKIP
    >>> ens.report_.score("test_heldout")               # doctest: +SKIP
    """
    from ensemble.build import build_ensemble as build

    settings = {key: value for key, value in locals().items() if key not in ("study", "build")}
    return build(study, **settings)


def load_ensemble(path: str | os.PathLike, **options: Any):
    """Load a saved ensemble (checksums verified); `predict`/`predict_proba` take arrays, image paths, a
    folder or PIL images."""
    from ensemble.classifier import load_ensemble as load

    return load(path, **options)


def export_codabench(ensemble: Any, path: str | os.PathLike, *, check: bool = True) -> Path:
    """Write the AN2DL Codabench submission zip of `ensemble` (an `EnsembleClassifier`, or its saved folder)
    to `path`; `check` smoke-tests the zip in a fresh Python process (`ensemble.export`).

    >>> cs.export_codabench(ens, "submission.zip")      # doctest: +SKIP
    """
    import tempfile

    from ensemble.export import export_codabench as export

    if isinstance(ensemble, (str, os.PathLike)):
        return export(ensemble, path, check=check)
    report = getattr(ensemble, "report_", None)
    if report is not None and (Path(report.folder) / "manifest.json").is_file():
        return export(report.folder, path, check=check)
    with tempfile.TemporaryDirectory(prefix="cellsearch-export-") as folder:
        return export(ensemble.save(Path(folder) / "ensemble"), path, check=check)
