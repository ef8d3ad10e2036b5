"""The ensemble artifact's plain files: one folder, written atomically, verified on load.

    <out>/
      manifest.json          members, weights, combiner numbers, TTA views, classes, input size,
                             preprocessing note, library versions, sha256 of every other file
      members/trial_NNNNN.keras
      combiner.joblib        the fitted scikit-learn combiner (meta-learner for stacking)
      report/                metrics.csv, per_class.csv, combiners.csv, confusion_*.png, ...

The folder is built as a hidden temporary sibling and renamed into place only once complete, so a failed
build never leaves a complete-looking artifact and never destroys an existing one (the old folder is moved
aside, the new one renamed in, and only then is the old one deleted; if the second rename fails the old
one is put back). `read_artifact` re-checks every checksum before anything is loaded; note that checksums
catch accidental damage and edits, not a forger who also rewrites the manifest: load only artifacts you
trust (joblib files, like any pickle, run code when loaded).

This module knows files, not estimators: `EnsembleClassifier.save` and `ensemble.classifier.load_ensemble`
hand it models, a combiner and manifest entries, and get them back.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

from ensemble.standalone import MANIFEST, read_manifest, sha256_file
from common.errors import EnsembleError

COMBINER_FILE = "combiner.joblib"
MEMBERS_DIR = "members"


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside `final`; on success it replaces `final`, on error it is removed."""
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not final.is_dir():
        raise EnsembleError(f"{final} exists and is not a folder")
    token = uuid.uuid4().hex[:8]
    staging = final.parent / f".{final.name}.tmp-{token}"
    staging.mkdir()
    try:
        yield staging
        old = final.parent / f".{final.name}.old-{token}"
        if final.exists():
            os.rename(final, old)
        try:
            os.rename(staging, final)
        except OSError:
            if old.exists():
                os.rename(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def library_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {"python": platform.python_version()}
    for name in ("numpy", "keras", "tensorflow", "scikit-learn", "optuna", "joblib"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` except the manifest, keyed by POSIX relative path."""
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add the checksums of everything in `folder` and write manifest.json (the last file written)."""
    manifest = {**manifest, "files": checksums(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


PREPROCESSING_NOTE = ("members take raw RGB 0..255 (uint8 cast to float32); resizing and normalisation are "
                      "layers inside each model (custom layer 'cellsearch>ImageNetPreprocess', re-declared in "
                      "ensemble/standalone.py); other image sizes are resized to input_size with antialiased "
                      "bicubic resampling; TTA views are the dihedral views listed in 'views', probabilities "
                      "averaged per member before combining; with adapt_bn, BatchNorm layers normalise with "
                      "the predicted batch's statistics mixed with their own (weight bn_prior images)")
#: Manifest keys that describe the classifier itself; `write_artifact` always recomputes them.
CORE_KEYS = ("format_version", "members", "combiner", "combiner_file", "class_names", "input_size", "tta_views",
             "views", "adapt_bn", "bn_prior", "preprocessing", "versions", "files")


def member_files(member_names: Sequence[str]) -> list[str]:
    """The members' paths inside the folder, one per name."""
    return [f"{MEMBERS_DIR}/{name}.keras" for name in member_names]


def write_artifact(folder: Path, models: Sequence, member_names: Sequence[str], combiner, entries: dict[str, Any],
                   extra: dict[str, Any] | None = None, members_written: bool = False) -> dict[str, Any]:
    """Write the member models (unless `members_written`), the combiner pickle and the manifest (last) into
    `folder`; return the manifest. `entries` are the classifier's own keys (`CORE_KEYS`, "inference"); `extra`
    adds build information: its "members" entries are merged into the per-member entries, its "inference"
    entry into the classifier's."""
    import joblib

    from ensemble.standalone import FORMAT_VERSION

    extra = {k: v for k, v in (extra or {}).items() if k not in CORE_KEYS or k == "members"}
    files = member_files(member_names)
    if len(set(files)) != len(files):
        raise EnsembleError(f"member_names must be distinct, got {list(member_names)}")
    if not members_written:
        (folder / MEMBERS_DIR).mkdir(parents=True, exist_ok=True)
        for model, name in zip(models, files):
            model.save(folder / name)
    joblib.dump(combiner, folder / COMBINER_FILE)
    given = extra.pop("members", None) or [{} for _ in files]
    manifest = {
        "format_version": FORMAT_VERSION,
        **extra,
        **entries,
        "members": [{**entry, "file": name} for entry, name in zip(given, files)],
        "combiner_file": COMBINER_FILE,
        "inference": {**extra.get("inference", {}), **entries.get("inference", {})},
        "preprocessing": PREPROCESSING_NOTE,
        "versions": library_versions(),
    }
    return write_manifest(folder, manifest)


def read_artifact(folder: str | os.PathLike) -> tuple[dict[str, Any], list, Any]:
    """(manifest, member models, fitted combiner) of an artifact folder, checksums verified first and
    members loaded with Keras safe_mode on; `EnsembleError` for a missing, incomplete, modified or
    inconsistent artifact."""
    import joblib

    import backbones.preprocessing  # noqa: F401  (registers the members' custom layer)
    from ensemble.standalone import load_member_models

    folder = Path(folder)
    manifest = read_manifest(folder)
    if COMBINER_FILE not in manifest["files"]:
        raise EnsembleError(f"{folder}: {COMBINER_FILE} has no checksum (edited manifest)")
    models = load_member_models(folder, manifest, custom_layer=False)
    try:
        combiner = joblib.load(folder / COMBINER_FILE)
    except Exception as exc:  # unpickling raises anything
        raise EnsembleError(f"cannot load {COMBINER_FILE}: {type(exc).__name__}: {exc}") from None
    if getattr(combiner, "n_members_", None) != len(models) or combiner.kind != manifest["combiner"]["kind"]:
        raise EnsembleError(f"{folder}: {COMBINER_FILE} does not match the manifest's members/combiner")
    n_classes = {int(m.output_shape[-1]) for m in models}
    if n_classes != {len(manifest["class_names"])}:
        raise EnsembleError(f"{folder}: members output {sorted(n_classes)} classes, manifest names "
                            f"{len(manifest['class_names'])}")
    return manifest, models, combiner
