"""The ensemble artifact: one folder, written atomically, verified on load.

    <out>/
      manifest.json          members, weights, combiner numbers, TTA views, classes, input size,
                             preprocessing note, library versions, sha256 of every other file
      members/trial_NNNNN.keras
      combiner.joblib        the fitted scikit-learn combiner (meta-learner for stacking)
      report/                metrics.csv, per_class.csv, combiners.csv, confusion_*.png, ...

The folder is built as a hidden temporary sibling and renamed into place only once complete, so a failed
build never leaves a complete-looking artifact and never destroys an existing one (the old folder is moved
aside, the new one renamed in, and only then is the old one deleted; if the second rename fails the old
one is put back). `load_ensemble` re-checks every checksum before anything is loaded; note that checksums
catch accidental damage and edits, not a forger who also rewrites the manifest: load only artifacts you
trust (joblib files, like any pickle, run code when loaded).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from ensemble.standalone import MANIFEST, EnsembleError, manifest_precision, read_manifest, sha256_file

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


def load_ensemble(folder: str | os.PathLike, *, resize: bool = True, batch_size: int | None = None,
                  precision: str | None = None):
    """Verify and load a built ensemble as an `EnsembleClassifier` (Keras safe_mode on).

    `precision` None runs in the precision the ensemble was built and evaluated in (manifest
    "inference"), float32 when this CPU has no native bfloat16.

    Raises `EnsembleError` for a missing, incomplete or modified artifact, before loading anything.
    """
    import joblib

    import backbones.preprocessing  # noqa: F401  (registers the members' custom layer)
    from ensemble.classifier import EnsembleClassifier
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
    precision = precision or manifest_precision(manifest)
    classifier = EnsembleClassifier(models, combiner, tuple(manifest["class_names"]), int(manifest["tta_views"]),
                                    batch_size=batch_size, resize=resize, precision=precision)
    if tuple(classifier.input_size) != tuple(manifest["input_size"]):
        raise EnsembleError(f"{folder}: members take {classifier.input_size}, manifest says "
                            f"{manifest['input_size']}")
    classifier.manifest = manifest
    return classifier
