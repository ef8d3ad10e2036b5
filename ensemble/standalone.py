"""Ensemble inference with no cellsearch import beyond `common`: the one code path shared by the package and
Codabench.

`python -m ensemble.export` copies this file verbatim into the submission zip as `model.py`, with
common/errors.py and common/inference.py beside it (as a `common` package), so the code that is tested inside
the package is byte for byte the code that runs on the Codabench machine, where cellsearch is not installed.
Hence the rules for this file:

- imports: the standard library, numpy, `common.errors` and `common.inference` (numpy-only modules), and
  (lazily, inside functions) keras; TensorFlow only for its bfloat16 graph pass, when Keras runs on TensorFlow
  (so the file runs under JAX and PyTorch too, and where only TensorFlow and Keras are installed, as on
  Codabench);
- the TTA views, the members' custom layers (`ImageNetPreprocess`, and `ShiftGate` of a gated member) and the
  input rule come from common/inference.py; the layers are handed to Keras as `custom_objects` entries under
  their registered names, so models load with Keras' safe_mode ON and no global registration is clobbered;
- the combiner is applied from the plain numbers stored in `manifest.json` (voting weights, or the
  logistic-regression coefficients of the stacking meta-learner, and a temperature), not from the
  joblib pickle: unpickling a scikit-learn model across scikit-learn versions is fragile (and
  unpickling runs code), while a weighted sum or a softmax of a linear map is not. The package checks
  that both give the same probabilities.

Input rule (`prepare_images`): `common.inference.check_images` (uint8 (N,H,W,3) RGB; other numeric dtypes only
in 0..255; floats in 0..1 are refused rather than silently turned black). Images whose
(H,W) differ from the members' input size are resized, when `resize` is on (the default), with
Keras' antialiased bicubic resize (`keras.ops.image.resize`) and rounded back to uint8; aspect ratio is not
preserved, so crop non-square images first if that matters. With `resize=False` a size mismatch is an error.

Test-time BatchNorm adaptation (`adapt_bn`, manifest key "adapt_bn"; Schneider et al. 2020, "Improving
robustness against common corruptions by covariate shift adaptation"): every BatchNormalization layer
normalises with the statistics of the batch being predicted instead of the training ones, mixed as
mean = w * source_mean + (1 - w) * batch_mean (likewise the variance) with w = N / (N + n), N =
`bn_prior` pseudo-images for the source statistics and n the images in the forward call (all TTA views
of the batch). It runs on a clone of each member whose BatchNormalization layers are replaced by
`BatchStatsNormalization`; the loaded members and the files on disk are never changed. Predictions then
depend on what is predicted together: a batch of one kind of shift adapts to it, a mixed batch to the mix,
and a batch of ONE CLASS adapts the class away (a test split stored class by class, batched in order, fell
from 0.96 to 0.36 accuracy). So the images of one call are batched in a fixed random order, and a call
should hold many cells of mixed classes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import sys

import numpy as np

if not __package__:  # loaded as the export's top-level model.py: its copy of common/ lies beside it
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common.errors import EnsembleError  # noqa: E402
from common.inference import VIEW_SETS, check_images, cpu_has_bfloat16, custom_layers, stack_views  # noqa: E402

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
#: Target forward passes per member call (views x images at 28x28); larger images get fewer images.
_BATCH_PIXELS = 2048 * 28 * 28
_LOG_EPS = 1e-7
#: Inference precisions. bfloat16 runs TensorFlow's oneDNN auto-mixed-precision graph pass (convolutions
#: and matrix products in bfloat16, probabilities cast back to float32): 1.3-1.4x on CPUs with
#: AVX512_BF16 or AMX; elsewhere oneDNN would emulate it slowly, so it falls back to float32.
PRECISIONS = ("float32", "bfloat16")
_BF16_OPTION = "auto_mixed_precision_onednn_bfloat16"
#: Default weight of the source (training) BatchNorm statistics, in images, when adapting to a batch.
BN_PRIOR = 16.0


# ---------------------------------------------------------------------------------------------- files

def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_precision(manifest: dict[str, Any]) -> str:
    """The precision an ensemble was built and evaluated in (float32 for artifacts from before bfloat16)."""
    return manifest.get("inference", {}).get("precision", "float32")


def manifest_adapt_bn(manifest: dict[str, Any]) -> bool:
    """Whether predictions adapt BatchNorm to the batch (off for artifacts from before the switch)."""
    return bool(manifest.get("adapt_bn", False))


def manifest_bn_prior(manifest: dict[str, Any]) -> float:
    return float(manifest.get("bn_prior", BN_PRIOR))


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an ensemble folder, after checking every listed file's sha256.

    A missing folder, a missing or unreadable manifest, a missing file, an edited file, or a manifest
    whose required keys are gone all raise one `EnsembleError` naming the problem.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EnsembleError(f"ensemble folder not found: {folder}")
    path = folder / MANIFEST
    if not path.is_file():
        raise EnsembleError(f"{folder}: no {MANIFEST} (not an ensemble, or an incomplete one)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EnsembleError(f"{path}: not valid JSON ({exc})") from None
    required = ("format_version", "members", "combiner", "class_names", "input_size", "tta_views", "files")
    missing = [k for k in required if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise EnsembleError(f"{path}: missing key {missing[0]!r} (incomplete or edited manifest)")
    if manifest["format_version"] != FORMAT_VERSION:
        raise EnsembleError(f"{path}: format_version {manifest['format_version']!r}, this code reads "
                            f"{FORMAT_VERSION}")
    files = manifest["files"]
    needed = [m["file"] for m in manifest["members"]]
    unlisted = [f for f in needed if f not in files]
    if unlisted:
        raise EnsembleError(f"{path}: member file {unlisted[0]} has no checksum (edited manifest)")
    for name, expected in sorted(files.items()):
        target = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise EnsembleError(f"{path}: file entry {name!r} points outside the ensemble folder")
        if not target.is_file():
            raise EnsembleError(f"{folder}: missing file {name} (incomplete ensemble)")
        if sha256_file(target) != expected:
            raise EnsembleError(f"{folder}: checksum mismatch for {name} (file changed after the build)")
    return manifest


# ---------------------------------------------------------------------------------------------- input

def batch_size_for(height: int, width: int, n_views: int) -> int:
    """Images per forward call so that views x images x pixels stays near 2048 images of 28x28."""
    return int(max(1, min(1024, _BATCH_PIXELS // max(1, n_views * height * width))))


def resize_images(images: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """uint8 (N,H,W,3) -> uint8 (N,h,w,3) with antialiased bicubic resampling (Keras, any backend), chunked."""
    from keras import ops

    out = np.empty((len(images), int(size[0]), int(size[1]), 3), dtype=np.uint8)
    step = max(1, (1 << 24) // max(1, images[0].size))
    for start in range(0, len(images), step):
        chunk = ops.image.resize(images[start:start + step].astype(np.float32), (int(size[0]), int(size[1])),
                                 interpolation="bicubic", antialias=True)
        out[start:start + step] = np.clip(np.rint(ops.convert_to_numpy(chunk)), 0, 255).astype(np.uint8)
    return out


def prepare_images(images: Any, size: Sequence[int], resize: bool = True) -> np.ndarray:
    """Check a batch (`check_images`) and bring it to the members' (H,W); see the module doc."""
    images = check_images(images, "images", EnsembleError)
    target = (int(size[0]), int(size[1]))
    if images.shape[1:3] != target:
        if not resize:
            raise EnsembleError(f"images are {images.shape[1]}x{images.shape[2]} but the ensemble takes "
                                f"{target[0]}x{target[1]} (resize is off)")
        images = resize_images(images, target)
    return np.ascontiguousarray(images)


# ----------------------------------------------------------------------------------------- the models

def _batch_stats_layer_class():
    """BatchNormalization that normalises with the current batch's statistics mixed with its own moving
    ones (see the module doc); same weights and config as the layer it replaces, plus `prior`."""
    import keras
    from keras import ops

    class BatchStatsNormalization(keras.layers.BatchNormalization):
        def __init__(self, prior: float = BN_PRIOR, **kwargs):
            super().__init__(**kwargs)
            self.prior = float(prior)

        def call(self, inputs, training=None, mask=None):
            x = ops.cast(inputs, "float32")
            rank = len(inputs.shape)
            axis = self.axis % rank
            mean, variance = ops.moments(x, [i for i in range(rank) if i != axis])
            source = self.prior / (self.prior + ops.cast(ops.shape(x)[0], "float32"))
            mean = source * ops.cast(self.moving_mean, "float32") + (1.0 - source) * mean
            variance = source * ops.cast(self.moving_variance, "float32") + (1.0 - source) * variance
            shape = [1] * rank
            shape[axis] = inputs.shape[axis]
            y = (x - ops.reshape(mean, shape)) * ops.reshape(ops.rsqrt(variance + self.epsilon), shape)
            if self.scale:
                y = y * ops.reshape(ops.cast(self.gamma, "float32"), shape)
            if self.center:
                y = y + ops.reshape(ops.cast(self.beta, "float32"), shape)
            return ops.cast(y, self.compute_dtype)

        def get_config(self) -> dict:
            return {**super().get_config(), "prior": self.prior}

    return BatchStatsNormalization


def adapt_batch_norm(model, prior: float = BN_PRIOR):
    """A clone of `model` (nested models included) whose BatchNormalization layers use batch statistics
    (see the module doc). Other layers are shared with `model`, read only; `model` is not changed."""
    import keras

    if prior < 0:
        raise EnsembleError(f"bn_prior must be >= 0, got {prior}")
    layer_class = _batch_stats_layer_class()
    replaced = []

    def swap(layer):
        if not isinstance(layer, keras.layers.BatchNormalization):
            return layer
        new = layer_class(prior=prior, **layer.get_config())
        replaced.append((layer, new))
        return new

    clone = keras.models.clone_model(model, clone_function=swap, recursive=True)
    for old, new in replaced:
        new.set_weights(old.get_weights())
    return clone


def load_member_models(folder: str | os.PathLike, manifest: dict[str, Any], custom_layer: bool = True) -> list:
    """Load the member `.keras` files with safe_mode on. `custom_layer` supplies the re-declared custom
    layers (off when backbones.preprocessing is imported and has registered them already)."""
    import keras

    custom = custom_layers() if custom_layer else None
    models = []
    for member in manifest["members"]:
        path = Path(folder) / member["file"]
        try:
            model = keras.saving.load_model(path, custom_objects=custom, compile=False, safe_mode=True)
        except Exception as exc:  # Keras raises many types for a bad file
            raise EnsembleError(f"cannot load member {member['file']}: {type(exc).__name__}: {exc}") from None
        models.append(model)
    return models


def usable_precision(precision: str) -> str:
    """`precision` if this machine runs it natively, else float32 (bfloat16 emulation would be slower). The
    bfloat16 pass is TensorFlow's: under another Keras backend inference stays float32."""
    import keras

    if precision not in PRECISIONS:
        raise EnsembleError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    native = cpu_has_bfloat16() and keras.backend.backend() == "tensorflow"
    return precision if precision == "float32" or native else "float32"


class _GraphPrecision:
    """Switches the bfloat16 graph pass on around one call and back afterwards.

    TensorFlow reads the optimizer option whenever a function runs, process-wide, so it is set per call
    rather than once: training or other models in the same process stay in float32.
    """

    def __init__(self, precision: str) -> None:
        self.on = precision == "bfloat16"

    def __enter__(self):
        if self.on:
            import tensorflow as tf

            self._before = tf.config.optimizer.get_experimental_options().get(_BF16_OPTION, False)
            tf.config.optimizer.set_experimental_options({_BF16_OPTION: True})
        return self

    def __exit__(self, *exc) -> None:
        if self.on:
            import tensorflow as tf

            tf.config.optimizer.set_experimental_options({_BF16_OPTION: self._before})


class TTARunner:
    """All members on all TTA views of a batch in ONE compiled call.

    The views are made inside one Keras model (`keras.ops`, so any backend) and stacked along the batch axis,
    so each member runs once per batch on views x images inputs: far fewer, larger kernels than
    `model.predict` per view and member, and no Python and no numpy copies of the views in between; Keras
    compiles it (`predict_on_batch`: jit under JAX, a tf.function under TensorFlow). `precision` "bfloat16"
    runs the call through the bfloat16 graph pass (see PRECISIONS) when the CPU has it. `adapt_bn` runs
    clones of the members that normalise with each batch's statistics (`adapt_batch_norm`, `bn_prior`).
    """

    def __init__(self, models: Sequence, views: Sequence[int], batch_size: int | None = None,
                 precision: str = "float32", adapt_bn: bool = False, bn_prior: float = BN_PRIOR) -> None:
        self.precision = usable_precision(precision)
        if not models:
            raise EnsembleError("an ensemble needs at least one member model")
        shapes = {tuple(m.input_shape[1:]) for m in models}
        if len(shapes) != 1:
            raise EnsembleError(f"members take different input shapes {sorted(shapes)}")
        self.input_shape = tuple(int(d) for d in shapes.pop())
        height, width = self.input_shape[:2]
        self.views = tuple(int(v) for v in views)
        if any(v % 4 in (1, 3) for v in self.views) and height != width:
            raise EnsembleError(f"90-degree TTA views need square inputs, members take {height}x{width}")
        self.adapt_bn = bool(adapt_bn)
        self.models = [adapt_batch_norm(m, bn_prior) for m in models] if adapt_bn else list(models)
        self.batch_size = batch_size or batch_size_for(height, width, len(self.views))
        self._model = self._views_model()

    def _views_model(self):
        """A model mapping (n,H,W,3) float32 to (V,n,M,C) probabilities of every member on every view; a
        subclassed model, because members of one architecture share layer names a functional graph refuses."""
        import keras
        from keras import ops

        views = self.views

        class ViewsModel(keras.Model):
            def __init__(self, members):
                super().__init__(name="tta_views")
                self.members = members

            def call(self, x):
                batch = stack_views(x, views) if len(views) > 1 else x
                outputs = ops.stack([ops.cast(m(batch, training=False), "float32") for m in self.members], axis=1)
                return ops.reshape(outputs, (len(views), -1, len(self.members), outputs.shape[-1]))

        return ViewsModel(self.models)

    def batches(self, images: np.ndarray) -> Iterator[tuple[slice | np.ndarray, np.ndarray]]:
        """Yield (rows, (V,n,M,C) probabilities) per batch of uint8 (N,H,W,3) images of the right size;
        `rows` index `images`. With `adapt_bn` the batches draw the images in a fixed random order (seed 0),
        so that input stored class by class does not make one-class batches."""
        order = np.random.default_rng(0).permutation(len(images)) if self.adapt_bn else None
        for start in range(0, len(images), self.batch_size):
            rows = slice(start, start + self.batch_size)
            rows = rows if order is None else np.sort(order[rows])
            with _GraphPrecision(self.precision):
                probs = np.asarray(self._model.predict_on_batch(images[rows].astype(np.float32)))
            yield rows, probs

    def view_probs(self, images: np.ndarray, on_batch=None) -> np.ndarray:
        """(V,N,M,C) probabilities of every member on every view; `on_batch(n)` after each batch of n."""
        out = None
        for rows, probs in self.batches(images):
            if out is None:
                out = np.empty((probs.shape[0], len(images)) + probs.shape[2:], dtype=np.float32)
            out[:, rows] = probs
            if on_batch is not None:
                on_batch(probs.shape[1])
        return out


# --------------------------------------------------------------------------------------- the combiner

def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): T > 1 softens over-confident probabilities; T = 1 returns `probs` unchanged."""
    if temperature == 1.0:
        return probs
    return _softmax(np.log(np.clip(probs, _LOG_EPS, 1.0)) / temperature)


def combine(member_probs: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """(N,M,C) TTA-averaged member probabilities -> (N,C) ensemble probabilities, from manifest numbers.

    kinds: "vote" / "weighted" (weighted mean of member probabilities) and "stacking" (multinomial
    logistic regression on the log-probabilities of all members, concatenated member by member). With
    "gated_weight", those are combined over every member but the last, and the last (the gated clean member)
    is mixed in by `mix_gated` at "gated_temperature".
    """
    if params.get("gated_weight") is not None:
        base = combine(member_probs[:, :-1], {k: v for k, v in params.items() if k != "gated_weight"})
        return mix_gated(base, member_probs[:, -1], float(params["gated_weight"]),
                         float(params.get("gated_temperature", 1.0))).astype(np.float32)
    kind = params["kind"]
    if kind in ("vote", "weighted"):
        weights = np.asarray(params["weights"], dtype=np.float64)
        probs = np.einsum("nmc,m->nc", member_probs.astype(np.float64), weights)
    elif kind == "stacking":
        features = np.log(np.clip(member_probs.astype(np.float64), _LOG_EPS, 1.0)).reshape(len(member_probs), -1)
        coef, intercept = np.asarray(params["coef"]), np.asarray(params["intercept"])
        scores = features @ coef.T + intercept
        if coef.shape[0] == 1:  # binary logistic regression: one score for class 1
            p1 = 1.0 / (1.0 + np.exp(-scores[:, 0]))
            probs = np.stack([1.0 - p1, p1], axis=1)
        else:
            probs = _softmax(scores)
    else:
        raise EnsembleError(f"unknown combiner kind {kind!r}")
    probs = apply_temperature(probs, float(params.get("temperature", 1.0)))
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def mix_gated(base: np.ndarray, gated: np.ndarray, weight: float, temperature: float = 1.0) -> np.ndarray:
    """(1 - weight) * base + weight * gated (its probabilities at `temperature`, like the base's calibrated
    ones), on the rows the gated member voted on; `base` where it abstained, so the ensemble's calibration on
    shifted images stays its own."""
    return np.where(abstains(gated), base, (1 - weight) * base + weight * apply_temperature(gated, temperature))


def abstains(gated: np.ndarray) -> np.ndarray:
    """(N,1): the rows a gated member abstained on (its gate's uniform vote, every class within 1e-3 of 1/C: a
    trained member is never that undecided)."""
    return np.all(np.abs(gated - 1.0 / gated.shape[1]) < 1e-3, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------ Codabench entry

class Model:
    """AN2DL Codabench entry point: the ensemble in this file's folder, `predict(X)` -> int labels.

    `X` is uint8 (N,H,W,3); any size is resized to the members' input size (see `prepare_images`).
    BatchNorm adaptation follows the manifest's "adapt_bn" unless `adapt_bn` overrides it.
    """

    def __init__(self, folder: str | os.PathLike | None = None, adapt_bn: bool | None = None) -> None:
        self.folder = Path(folder) if folder else Path(os.path.dirname(os.path.abspath(__file__)))
        self.manifest = read_manifest(self.folder)
        models = load_member_models(self.folder, self.manifest)
        self.runner = TTARunner(models, VIEW_SETS[int(self.manifest["tta_views"])],
                                precision=manifest_precision(self.manifest),
                                adapt_bn=manifest_adapt_bn(self.manifest) if adapt_bn is None else adapt_bn,
                                bn_prior=manifest_bn_prior(self.manifest))
        self.input_size = tuple(self.manifest["input_size"])
        self.class_names = list(self.manifest["class_names"])

    def predict_proba(self, X) -> np.ndarray:
        images = prepare_images(X, self.input_size, resize=True)
        return combine(self.runner.view_probs(images).mean(axis=0), self.manifest["combiner"])

    def predict(self, X) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1).astype(np.int64)
