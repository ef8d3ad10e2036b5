"""`EnsembleClassifier`: a scikit-learn estimator over trained Keras members, TTA and a fitted combiner.

    >>> from ensemble import load_ensemble
    >>> clf = load_ensemble("runs/default/ensemble")   # doctest: +SKIP
    >>> probs = clf.predict_proba(images)              # doctest: +SKIP
    >>> names = clf.class_names_[clf.predict(images)]  # doctest: +SKIP

`load_ensemble` verifies checksums and loads members with Keras safe_mode on; `predict_proba` takes uint8
(N,H,W,3) and returns (N, C); labels are ints (`classes_`). From members you trained yourself (used as they
are: `fit` learns only how to combine them, on validation images, never on test images):

    >>> clf = EnsembleClassifier(members=[model_a, model_b], combiner="weighted", class_names=names)  # doctest: +SKIP
    >>> clf.fit(val_images, val_labels).predict(test_images)                         # doctest: +SKIP
    >>> clf.save("my_ensemble")                                                      # doctest: +SKIP

Inputs: uint8 RGB (N,H,W,3) arrays (`standalone.prepare_images`: another size is resized to the members'
input size, antialiased bicubic, unless `resize=False`, which refuses it instead; greyscale is made RGB), or
what `python -m ensemble.predict` reads: an image file, a folder, an .npz, given as a path or a list of
paths, and PIL images (decoded and resized like the study's image files):

    >>> clf.predict("cells/")                               # doctest: +SKIP
    >>> clf.evaluate(test_images, test_labels)              # doctest: +SKIP
"""

from __future__ import annotations

import os
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone

from ensemble.artifact import atomic_folder, read_artifact, write_artifact
from ensemble.standalone import (BN_PRIOR, VIEW_SETS, TTARunner, manifest_adapt_bn, manifest_bn_prior,
                                 manifest_precision, prepare_images)
from common.errors import EnsembleError

if TYPE_CHECKING:
    import pandas as pd


class EnsembleClassifier(ClassifierMixin, BaseEstimator):
    """Members (Keras models on raw 0..255 RGB) x TTA views -> a combiner -> class probabilities.

    `__init__` only stores its arguments (scikit-learn's contract: `get_params`, `set_params` and `clone`
    see exactly these); `fit` / `fit_member_proba` learn, `load_ensemble` restores a fitted one.

    Args:
        members: the trained member Keras models, all with the same input shape (used as they are).
        combiner: "vote", "weighted", "stacking" (see `ensemble.combiners`) or such an estimator; `fit`
            fits a clone of it.
        class_names: one name per class in label order (None: "0", "1", ...).
        tta_views: 1, 2, 4 or 8 dihedral views averaged per member before combining.
        calibrate: temperature scaling when `combiner` is given by name.
        batch_size: images per compiled forward call (None: about 2048 views of 28x28 per call).
        resize: resize images of another size (True) or refuse them (False).
        precision: "float32", or "bfloat16" on CPUs with native bfloat16 (else float32; the one in effect
            is `precision_`).
        adapt_bn: default of `predict_proba(adapt_bn=...)`: BatchNorm layers normalise with the statistics of
            the batch being predicted (Schneider et al. 2020; see `ensemble.standalone`).
        bn_prior: weight of the members' own BatchNorm statistics, in images, when adapting.
        member_names: file stems of the members in a saved artifact (None: "member_00", ...).

    Attributes (set by `fit`, `fit_member_proba` or `load_ensemble`):
        classes_: int labels 0..C-1, what `predict` returns; `class_names_[label]` is the class name.
        class_names_: (C,) array of class names.
        members_: the member models. combiner_: the fitted combiner. n_members_: M.
        weights_: (M,) member weights of a voting combiner; None for stacking.
        input_size_: (H, W) the members take. precision_: the precision in effect.
        manifest_: the artifact's manifest (None until saved by the build or loaded).
        report_: `ensemble.build.EnsembleReport` when made by `build_ensemble`, else None.

    Example:
        >>> import keras, numpy as np
        >>> from ensemble import EnsembleClassifier
        >>> inputs = keras.Input((8, 8, 3))
        >>> flat = keras.layers.Flatten()(inputs)
        >>> members = [keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(flat)) for _ in range(2)]
        >>> images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
        >>> clf = EnsembleClassifier(members, combiner="vote", tta_views=2).fit(images, np.arange(12) % 3)
        >>> clf.predict_proba(images).shape, clf.classes_.tolist(), clf.get_params()["tta_views"]
        ((12, 3), [0, 1, 2], 2)
    """

    def __init__(self, members: Sequence = (), combiner: Any = "weighted", class_names: Sequence[str] | None = None,
                 tta_views: int = 8, calibrate: bool = True, batch_size: int | None = None, resize: bool = True,
                 precision: str = "float32", adapt_bn: bool = False, bn_prior: float = BN_PRIOR,
                 member_names: Sequence[str] | None = None):
        self.members = members
        self.combiner = combiner
        self.class_names = class_names
        self.tta_views = tta_views
        self.calibrate = calibrate
        self.batch_size = batch_size
        self.resize = resize
        self.precision = precision
        self.adapt_bn = adapt_bn
        self.bn_prior = bn_prior
        self.member_names = member_names

    # ------------------------------------------------------------------------------------------ fitting

    def fit(self, X, y, sample_weight=None, groups=None) -> "EnsembleClassifier":
        """Fit the combiner on the members' TTA probabilities of validation images `X` (uint8 (N,H,W,3))."""
        self._check_members()
        return self.fit_member_proba(self.member_proba(X, adapt_bn=False), y, sample_weight, groups)

    def fit_member_proba(self, member_probs, y, sample_weight=None, groups=None) -> "EnsembleClassifier":
        """Fit the combiner on precomputed (N, M, C) member probabilities (e.g. the ones trials saved).

        `sample_weight` and `groups` go to the combiner (rows of one group share a cross-validation fold).
        """
        from ensemble.combiners import make_combiner

        self._check_members()
        template = (make_combiner(self.combiner, calibrate=self.calibrate) if isinstance(self.combiner, str)
                    else clone(self.combiner))
        member_probs = np.asarray(member_probs)
        if member_probs.ndim != 3 or member_probs.shape[1] != len(self.members):
            raise EnsembleError(f"member probabilities must be (N, {len(self.members)}, C), got {member_probs.shape}")
        try:
            fitted = template.fit(member_probs, y, sample_weight=sample_weight, groups=groups)
        except ValueError as exc:
            raise EnsembleError(f"cannot fit the {template.kind} combiner: {exc}") from None
        return self._set_fitted(fitted)

    def _check_members(self) -> None:
        if len(self.members) == 0:
            raise EnsembleError("an ensemble needs at least one member model")
        if self.tta_views not in VIEW_SETS:
            raise EnsembleError(f"tta_views must be one of {sorted(VIEW_SETS)}, got {self.tta_views}")

    def _set_fitted(self, combiner) -> "EnsembleClassifier":
        """The learned attributes from a fitted combiner (shared by fitting and loading)."""
        self._check_members()
        n_classes = int(combiner.n_classes_)
        names = self.class_names if self.class_names is not None else [str(c) for c in range(n_classes)]
        if len(names) != n_classes or combiner.n_members_ != len(self.members):
            raise EnsembleError(f"combiner takes {combiner.n_members_} member(s) x {combiner.n_classes_} classes; "
                                f"the ensemble has {len(self.members)} member(s) and {len(names)} class name(s)")
        self.members_ = list(self.members)
        self.combiner_ = combiner
        self.n_members_ = len(self.members_)
        self.classes_ = np.arange(n_classes)
        self.class_names_ = np.asarray([str(n) for n in names])
        self.weights_ = np.asarray(combiner.weights_) if hasattr(combiner, "weights_") else None
        runner = self._runner(False)
        self.input_size_ = tuple(runner.input_shape[:2])
        self.precision_ = runner.precision
        self.manifest_ = getattr(self, "manifest_", None)
        self.report_ = getattr(self, "report_", None)
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "combiner_")

    def _check_fitted(self) -> None:
        if not hasattr(self, "combiner_"):
            raise EnsembleError("this EnsembleClassifier is not fitted: call fit(...) or use load_ensemble(path)")

    # --------------------------------------------------------------------------------------- predicting

    def _runner(self, adapt_bn: bool) -> TTARunner:
        """The compiled TTA runner for the current parameters (rebuilt after `set_params`)."""
        key = (tuple(id(m) for m in self.members), self.tta_views, self.batch_size, self.precision, adapt_bn,
               self.bn_prior if adapt_bn else None)
        cache = self.__dict__.setdefault("_runners", {})
        if key not in cache:
            cache[key] = TTARunner(self.members, VIEW_SETS[self.tta_views], self.batch_size, self.precision,
                                   adapt_bn=adapt_bn, bn_prior=self.bn_prior)
        return cache[key]

    def _read(self, images) -> tuple[np.ndarray, np.ndarray | None]:
        """Any accepted input as an image array, with the true labels when the input carries them."""
        from data_pipeline.dataset import to_rgb

        if isinstance(images, (str, os.PathLike)):
            from ensemble.inputs import read_inputs

            found = read_inputs(images, self._manifest())
            return to_rgb(found.images, str(images)), found.labels
        if _is_image(images):
            return self._read([images])
        if isinstance(images, (list, tuple)) and images and any(_is_image(x) or isinstance(x, (str, os.PathLike))
                                                                for x in images):
            return np.concatenate([self._one(x) for x in images]), None
        return to_rgb(images), None

    def _manifest(self) -> dict:
        """What reading image files needs (input size, the study's centre crop, class names): the manifest of a
        saved ensemble, else the same keys from the members."""
        manifest = getattr(self, "manifest_", None)
        if manifest:
            return manifest
        names = self.class_names if self.class_names is not None else []
        return {"input_size": list(self._runner(False).input_shape[:2]), "class_names": list(names)}

    def _one(self, item) -> np.ndarray:
        """One list element: a path (whatever it holds), a PIL image, or one (H,W,3) array."""
        from data_pipeline.loaders import pil_to_array
        from ensemble.inputs import center_crop

        if _is_image(item):
            manifest = self._manifest()
            return pil_to_array(item, tuple(manifest["input_size"]), center_crop(manifest))[None]
        if isinstance(item, (str, os.PathLike)):
            return self._read(item)[0]
        return np.asarray(item)[None]

    def view_member_proba(self, images, *, adapt_bn: bool | None = None, progress: bool = False) -> np.ndarray:
        """(V, N, M, C): every member's probabilities on every TTA view (diagnostics and tests)."""
        from tqdm.auto import tqdm

        runner = self._runner(self.adapt_bn if adapt_bn is None else bool(adapt_bn))
        images = prepare_images(self._read(images)[0], runner.input_shape[:2], self.resize)
        with tqdm(total=len(images), unit="img", disable=not progress, desc="predict") as bar:
            return runner.view_probs(images, on_batch=bar.update)

    def member_proba(self, images, *, adapt_bn: bool | None = None, progress: bool = False) -> np.ndarray:
        """(N, M, C): each member's TTA-averaged probabilities (what the combiner consumes)."""
        return self.view_member_proba(images, adapt_bn=adapt_bn, progress=progress).mean(axis=0)

    def predict_proba(self, images, *, adapt_bn: bool | None = None, progress: bool = False) -> np.ndarray:
        """(N, C) ensemble probabilities of `images` (an array, path(s), a folder or PIL images).

        `adapt_bn` None uses the `adapt_bn` parameter (the manifest's for a loaded ensemble); True adapts
        BatchNorm to this call's batches (each `batch_size` images with their TTA views), False never.
        """
        self._check_fitted()
        return self._combine(self.member_proba(images, adapt_bn=adapt_bn, progress=progress))

    def _combine(self, member_probs: np.ndarray) -> np.ndarray:
        return np.asarray(self.combiner_.predict_proba(member_probs), dtype=np.float32)

    def predict(self, images, *, adapt_bn: bool | None = None, progress: bool = False) -> np.ndarray:
        """(N,) int labels (`classes_`); `class_names_[labels]` for names."""
        return self.predict_proba(images, adapt_bn=adapt_bn, progress=progress).argmax(axis=1)

    def evaluate(self, images, labels=None, *, adapt_bn: bool | None = None) -> "pd.DataFrame":
        """The metrics table of the ensemble and of each member on labelled images: accuracy, balanced
        accuracy, macro F1, ROC AUC, ECE, log-loss (`common.metrics.summary`, scikit-learn's metrics).

        `labels`: integers or class names; None takes them from the input (a class-per-folder tree, an .npz
        with labels).
        """
        import pandas as pd

        from data_pipeline.dataset import encode_labels, validate_labels
        from common.metrics import summary

        self._check_fitted()
        images, found = self._read(images)
        if labels is None and found is not None:
            known = found >= 0
            images, labels = images[known], found[known]
        if labels is None or len(labels) == 0:
            raise EnsembleError("evaluate needs labels: pass them, or a class-per-folder tree or a labelled .npz")
        encoded, _ = encode_labels(labels, self.class_names_, "evaluate labels")
        y = validate_labels(encoded, len(images), len(self.class_names_), "evaluate labels")
        member_probs = self.member_proba(images, adapt_bn=adapt_bn)
        rows = {"ensemble": summary(self._combine(member_probs), y)}
        for index, name in enumerate(self._member_labels()):
            rows[name] = summary(member_probs[:, index], y)
        return pd.DataFrame.from_dict(rows, orient="index").rename_axis("model")

    def _member_labels(self) -> list[str]:
        return list(self.member_names or [f"member_{i:02d}" for i in range(len(self.members))])

    def _repr_html_(self) -> str:
        """A notebook cell showing the ensemble: classes, members, combiner, views, input size."""
        if not hasattr(self, "combiner_"):
            return f"<p><b>EnsembleClassifier</b> (not fitted): {len(self.members)} member model(s)</p>"
        weights = self.weights_ if self.weights_ is not None else [None] * self.n_members_
        members = ", ".join(name if w is None else f"{name} ({w:.2f})" for name, w in zip(self._member_labels(),
                                                                                        weights))
        rows = {"classes": f"{len(self.class_names_)}: {', '.join(self.class_names_)}", "members": members,
                "combiner": getattr(self.combiner_, "kind", type(self.combiner_).__name__),
                "TTA views": self.tta_views, "input size": "x".join(map(str, self.input_size_)),
                "precision": self.precision_}
        if self.report_ is not None:
            rows["artifact"] = str(self.report_.folder)
        body = "".join(f"<tr><th style='text-align:left'>{escape(key)}</th><td style='text-align:left'>"
                       f"{escape(str(value))}</td></tr>" for key, value in rows.items())
        return f"<table><caption><b>EnsembleClassifier</b></caption>{body}</table>"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the artifact folder (manifest with checksums, members, combiner) atomically; see
        `ensemble.artifact`. Load it with `load_ensemble(path)`. The build information of a built or loaded
        classifier's manifest is kept; its report/ folder stays where the build wrote it."""
        self._check_fitted()
        with atomic_folder(path) as staging:
            self.write(staging, {k: v for k, v in (self.manifest_ or {}).items() if k not in ("files", "student")})
        return Path(path)

    def write(self, folder: Path, extra: dict[str, Any] | None = None, members_written: bool = False) -> dict:
        """Write the fitted classifier's files into `folder` (members unless `members_written`, combiner,
        manifest with `extra` build information) and return the manifest, also kept as `manifest_`."""
        self._check_fitted()
        entries = {"combiner": self.combiner_.params(), "class_names": self.class_names_.tolist(),
                   "input_size": list(self.input_size_), "tta_views": int(self.tta_views),
                   "views": list(VIEW_SETS[self.tta_views]), "adapt_bn": bool(self.adapt_bn),
                   "bn_prior": float(self.bn_prior),
                   "inference": {"precision": self.precision_, "tta_views": int(self.tta_views)}}
        self.manifest_ = write_artifact(folder, self.members_, self._member_labels(), self.combiner_, entries, extra,
                                        members_written)
        return self.manifest_


def load_ensemble(folder: str | os.PathLike, *, resize: bool = True, batch_size: int | None = None,
                  precision: str | None = None, adapt_bn: bool | None = None) -> EnsembleClassifier:
    """Verify and load a built ensemble as a fitted `EnsembleClassifier` (Keras safe_mode on).

    `precision` None runs in the precision the ensemble was built and evaluated in (manifest
    "inference"), float32 when this CPU has no native bfloat16; `adapt_bn` None follows the manifest's
    "adapt_bn" (False for artifacts from before it existed).

    Raises `EnsembleError` for a missing, incomplete or modified artifact, before loading anything.

    Example:
        >>> from ensemble import load_ensemble
        >>> clf = load_ensemble("runs/default/ensemble")  # doctest: +SKIP
        >>> clf.predict(images[:4]), clf.manifest_["adapt_bn"]  # doctest: +SKIP
    """
    manifest, models, combiner = read_artifact(folder)
    classifier = EnsembleClassifier(
        models, combiner, tuple(manifest["class_names"]), int(manifest["tta_views"]), batch_size=batch_size,
        resize=resize, precision=precision or manifest_precision(manifest),
        adapt_bn=manifest_adapt_bn(manifest) if adapt_bn is None else adapt_bn, bn_prior=manifest_bn_prior(manifest),
        member_names=[Path(m["file"]).stem for m in manifest["members"]])
    classifier._set_fitted(combiner)
    if tuple(classifier.input_size_) != tuple(manifest["input_size"]):
        raise EnsembleError(f"{folder}: members take {classifier.input_size_}, manifest says "
                            f"{manifest['input_size']}")
    classifier.manifest_ = manifest
    return classifier


def _is_image(item) -> bool:
    from PIL import Image

    return isinstance(item, Image.Image)


def uniform_vote(models: Sequence, class_names: Sequence[str], tta_views: int = 8, precision: str = "float32"
                 ) -> EnsembleClassifier:
    """A fitted plain average of `models` (e.g. one distilled student, or members for a timing) with the
    ensemble's TTA and input rules; nothing is learned, so no data is needed."""
    n_classes, n_models = len(class_names), len(models)
    uniform = np.full((n_classes, n_models, n_classes), 1.0 / n_classes)
    return EnsembleClassifier(list(models), "vote", class_names, tta_views, calibrate=False,
                              precision=precision).fit_member_proba(uniform, np.arange(n_classes))
