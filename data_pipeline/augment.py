"""Batch augmentation policies for blood-cell images, tuned by a single `strength` in [0, 1].

A hyperparameter search picks a policy name and one float; everything else is fixed here so the
search space stays small. `strength` scales both how many images of a batch are touched (each image is
augmented with probability `strength`) and how hard (magnitudes grow linearly with `strength`).
`strength == 0` is the exact identity for every policy; at `strength == 1` every image is augmented.

Every policy except 'none' starts with a random element of the dihedral group D4 (flips and exact
90-degree rotations): blood cells have no canonical orientation, so these are always label-safe and
cost nothing in image quality (no interpolation).

Policies for robustness to distribution shift (see `data_pipeline.corrupt.FAMILIES`):
- 'stain': stain jitter in the HED colour space (`data_pipeline.stain`; magnitudes: STAIN_JITTER).
- 'corrupt': with probability `strength`, one corruption per image from the families training may draw
  from (kind uniform over them, severity uniform in 1..1+round(4*strength)), plus stain jitter when
  'colour' is allowed. The corruptions are `data_pipeline.corrupt.corrupt` on the host (see below).
- 'augmix_jsd': AugMix with the Jensen-Shannon consistency loss (Hendrycks et al. 2020). Built with
  `stack_views=True`, the augmenter returns the clean (oriented) batch and JSD_VIEWS independent AugMix
  views of it stacked on the batch axis, (3B,H,W,3) with the (B,C) labels, for `search.trial.jsd`; without,
  it returns one AugMix view, like 'augmix'.
- 'corrupt_jsd': the same consistency loss over views made by 'corrupt': AugMix's recipe with the
  corruptions of the training families in place of AugMix's chains.

Families: `policy_families(policy)` declares which corruption families a policy can touch (colour jitter
and RandAugment/AugMix's colour ops: 'colour'; their sharpness op: 'blur'; their posterization, a
bit-depth quantization like JPEG: 'acquisition'). `build_augmenter(..., families=...)` refuses a policy
that needs a family training may not draw from ('light' without 'colour'), and leaves out the ops a policy
can do without (RandAugment's posterization when 'acquisition' is held out; corruption kinds of held-out
families). At run time `Augmenter.family_usage` counts, per family, the images that went through a step
of that family.

Backends: every op is `keras.ops` / `keras.random` or a Keras 3 image layer, so the same policies run under
JAX, TensorFlow and PyTorch. A call runs as one compiled function (`data_pipeline.compiled`: `jax.jit`,
`tf.function`, eager under torch) on the whole batch, never a Python loop over images.

Randomness is stateless and keyed: `Augmenter(images, labels, seed=key)` with the same key gives the same
output. Keras 3 random layers normally draw from a stateful `keras.random.SeedGenerator` (a variable, which
a jitted function cannot update in place); here every layer's generator is replaced by `_SeedStream`, which
hands out the rows of a table of seeds drawn from the call's key, in trace order (fixed Python order).
The backends' generators differ, so one key gives other draws under JAX than under TensorFlow: the same
distributions, not the same pixels (tests/test_backends.py compares the statistics).

The 'corrupt' policies draw each image's corruption kind and severity inside the compiled function and apply
the corruptions to the host batch right after it (`data_pipeline.corrupt`, numpy / PIL / scipy): JPEG
coding, PIL resampling and the slide artefacts have no `keras.ops` equivalent, and the tf.data version ran
them on the host as well (`tf.numpy_function`).

Where Keras 3.15's own layers are replaced, one reason each:
- D4 is one gather through the 8 flip/rot90 index maps: `RandomFlip("horizontal_and_vertical")` flips both
  axes on one coin, i.e. only ever rotates by 180 degrees.
- Solarization is left out of RandAugment/AugMix: its threshold makes a small factor invert almost every pixel
  of these bright-background images.
- Posterization drops 0..4 bits as strength grows: Keras' keeps randint(1, 8*factor) bits, the strongest at
  the weakest setting.
- `_AugMix` draws its chain ops per batch as tensors: Keras' picks them with Python's `random` at trace time,
  so every batch of a compiled function would get the same chains; depth is uniform in 1..3 per chain, as in
  the paper.
- `_RandAugment` runs only the chosen op per slot (`ops.switch`) instead of all 11.
- RandAugment/AugMix still hand `factor=(0, f)` to their sub-layers (one-way shifts, brightening only); the D4
  step before them makes the geometry roughly symmetric.
- 'light' passes contrast as (f, f): `RandomContrast(f)` draws from [1, 1+f] only; saturation and hue are one
  per-image 3x3 colour matrix in YIQ space (`_colour_matrices`) instead of two clipped HSV round trips.
- `_equalize` equalizes each image on its own histogram, as PIL does in the papers: Keras pools the batch's.
- `_grid_keep_masks` draws GridMask's geometry for the whole batch, keyed, without keras-cv's stateful
  per-image map and its bool cast that also erased partly covered pixels.
Measured stream rates: benchmarks/bench_stream.py.
"""

from __future__ import annotations

import functools
import numbers
import threading
from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import keras
import numpy as np
from keras import ops

from data_pipeline import corrupt as corruptions
from data_pipeline.compiled import compile_function
from common.errors import DataError
from data_pipeline.policies import (CONSISTENCY_POLICIES, MIXING_POLICIES, OP_FAMILIES, POLICIES,  # noqa: F401
                                     check_policy, check_policy_families, policy_families)
from data_pipeline.stain import hed_jitter
from common.inference import dihedral_index_maps
from common.precision import dtype_policy

JSD_VIEWS = 2                  # augmented views next to the clean one (AugMix paper)

VALUE_RANGE = (0, 255)
# Magnitudes reached at strength 1 (they scale linearly with strength).
RANDAUGMENT_MAX_FACTOR = 0.3   # keras factor: +-0.3 shear/translation (RandAugment paper max), +-108 deg rotation
AUGMIX_MAX_FACTOR = 0.3
POSTERIZE_MAX_BITS_DROPPED = 4
MIXUP_ALPHA = 0.2              # Beta(alpha, alpha) mixing weight, as in the MixUp paper for ImageNet
CUTMIX_MAX_ALPHA = 1.0         # keras CutMix samples alpha ~ U(0, factor), weight ~ Beta(alpha, alpha)
CUTOUT_MAX_AREA = 0.25         # erased patch area fraction upper bound
CUTOUT_FILL = 128.0
GRIDMASK_MAX_RATIO = 0.6       # masked square side / grid unit (area fraction up to 0.36)
GRIDMASK_ROTATION = 0.15       # fraction of 2*pi
# 'light' colour jitter at strength 1: brightness +-10% of range, contrast x[0.85, 1.15] (Keras
# RandomBrightness factor 0.1, RandomContrast factor (0.15, 0.15)), chroma x[0.82, 1.22] (saturation
# u ~ 0.5 +- 0.05, factor
# u/(1-u): the same draw as keras RandomSaturation(0.5 +- 0.05), which scaled HSV saturation) and a hue
# turn of +-2% of the circle (+-7.2 degrees; keras RandomHue(0.04) shifted HSV hue by +-0.04/2). Saturation
# and hue are one per-image 3x3 colour matrix in YIQ space (see `_colour_matrices`). HSV saturation scales
# chroma about the brightest channel, YIQ about luma, so the mean pixel change is a bit smaller (64x64 PBC,
# strength 1: 2.5 vs 3.4 of 255 for saturation + hue; brightness and contrast are unchanged).
JITTER = {"brightness": 0.1, "contrast": 0.15, "saturation": 0.05, "hue": 0.04}
# HED stain jitter at strength 1: each image's H, E, D concentrations x U[0.9, 1.1] + U[-0.1, 0.1] optical
# density (Tellez et al. 2018 use 0.05 for "HED-light", 0.2 for "HED-strong"). On 28x28 PBC cells this
# changes pixels by 8 of 255 on average (99th percentile 30), like corrupt's stain_shift at severity 2,
# and keeps the grey-level structure (grey correlation with the original > 0.99).
STAIN_JITTER = {"scale": 0.1, "bias": 0.1}
AUGMIX_CHAINS = 3
AUGMIX_MAX_DEPTH = 3           # each chain applies 1..3 ops, depth uniform per chain (AugMix paper)
# RGB -> YIQ (NTSC): Y is luma, (I, Q) the chroma plane; hue turns rotate it, saturation scales it.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
_HIST_BINS = 256
_SEEDS_PER_KEY = 128           # draws one bound key can serve (an AugMix slot traces ~40)
_MAX_SEED = 2**31 - 1
_MAX_ENGINES = 16              # compiled policy configurations kept per process (see Augmenter)
ImagesLabels = tuple[Any, Any]
PolicyFn = Callable[[Any, Any], ImagesLabels]


class _KeySeed(keras.random.SeedGenerator):
    """One given seed tensor as a `seed=` argument: `keras.random.*` accept a tensor seed only through a
    `SeedGenerator` under TensorFlow. No state variable is created (it may be built inside a traced function)."""

    def __init__(self, key: Any) -> None:  # the parent's __init__ would create a variable
        self._key = key

    def next(self, ordered: bool = True) -> Any:
        return self._key


class _SeedStream(keras.random.SeedGenerator):
    """A `SeedGenerator` whose `next()` is stateless: draw i of a bound key is row i of a seed table drawn
    from that key.

    Keras random layers ask their `generator` for a fresh seed on every random op. Bound to a per-batch key
    (and counting draws in trace order, which is fixed Python order), the same key always reproduces the
    same draws, inside `jax.jit` and `tf.function` too, where a variable could not be advanced.
    The parent's state variable is created but never used; it keeps Keras' tracking code happy and gives
    the backend's seed dtype.
    """

    def __init__(self) -> None:
        super().__init__(seed=0, name="seed_stream")
        self._frames: list[list[Any]] = []

    @contextmanager
    def bound(self, key: Any) -> Iterator[None]:
        """Draw from `key` (shape (2,) integers) inside the block (nests: an inner key is used until its
        block ends)."""
        key = ops.cast(key, self.state.dtype)
        table = keras.random.randint((_SEEDS_PER_KEY, 2), 0, _MAX_SEED, dtype="int32", seed=_KeySeed(key))
        self._frames.append([ops.cast(table, self.state.dtype), 0])
        try:
            yield
        finally:
            self._frames.pop()

    def next(self, ordered: bool = True) -> Any:
        # Broken invariants of this module's own ops, never bad input: AssertionError says "a bug here".
        if not self._frames:
            raise AssertionError("augmentation layer drew a random number outside Augmenter.__call__")
        frame = self._frames[-1]
        if frame[1] >= _SEEDS_PER_KEY:
            raise AssertionError(f"more than {_SEEDS_PER_KEY} random draws from one key")
        frame[1] += 1
        return frame[0][frame[1] - 1]

    def folded(self, key: Any, index: Any) -> Any:
        """A key for sub-stream `index` (an int or int tensor) of `key`."""
        offset = ops.stack([ops.zeros((), "int32"), ops.cast(index, "int32")])
        return ops.cast(key, "int32") + offset

    def uniform(self, shape: Any, minval: Any = 0.0, maxval: Any = 1.0) -> Any:
        return keras.random.uniform(shape, minval, maxval, dtype="float32", seed=self)

    def randint(self, shape: Any, minval: int, maxval: int) -> Any:
        return keras.random.randint(shape, minval, maxval, dtype="int32", seed=self)


def _seeded(layer: keras.layers.Layer, stream: _SeedStream) -> keras.layers.Layer:
    """Point `layer` and all its nested Keras layers at `stream` instead of their stateful generators."""
    for sub in layer._flatten_layers(include_self=True, recursive=True):  # Keras has no public walker
        if isinstance(getattr(sub, "generator", None), keras.random.SeedGenerator):
            sub.generator = stream
    return layer


def _posterize_factor(strength: float) -> tuple[int, int]:
    """Bits kept by RandomPosterization: (8, 8) = identity at strength ~0, randint(4, 8) at strength 1."""
    low = 8 - round(POSTERIZE_MAX_BITS_DROPPED * strength)
    return (low, 8)


def _without_solarization(names: list[str]) -> list[str]:
    return [name for name in names if name != "solarization"]


def _ops_within(names: list[str], families: tuple[str, ...] | None) -> list[str]:
    """The ops of `names` that are geometric or of an allowed family (all of them for `families=None`)."""
    if families is None:
        return list(names)
    return [name for name in names if name not in OP_FAMILIES or OP_FAMILIES[name] in families]


def _op_families(names: list[str]) -> tuple[str, ...]:
    return tuple(sorted({OP_FAMILIES[name] for name in names if name in OP_FAMILIES}))


def _per_image(values: Any, rank: int) -> Any:
    """(B,) values shaped (B,1,...,1) to broadcast over a rank-`rank` batch."""
    return ops.reshape(values, (-1,) + (1,) * (rank - 1))


def _select(mask: Any, a: Any, b: Any) -> Any:
    """Per-image `where`: row i of the result is a[i] if mask[i] else b[i] (mask has shape (B,))."""
    return ops.where(_per_image(mask, len(a.shape)), a, b)


def _apply_colour_matrices(images: Any, matrices: Any) -> Any:
    """Each pixel's RGB vector times its image's (3,3) matrix (B,3,3), `out = M @ rgb`, clipped to 0..255."""
    return ops.clip(ops.einsum("bhwc,bdc->bhwd", images, matrices), *VALUE_RANGE)


def _equalize(images: Any) -> Any:
    """Histogram equalization of each channel of each image (B,H,W,C), float 0..255, in one pass.

    Same lookup table as keras `Equalization` (256 bins, cdf rescaled from its first non-empty bin,
    rounded; a channel with <= 1 non-empty bin is left as is), but per image, as PIL's `equalize` in the
    RandAugment/AugMix papers: Keras pools the histogram over the whole batch. All B*C histograms are one
    `segment_sum` over bin indices offset by 256 per (image, channel), and the lookup is one `take`.
    """
    batch, channels = ops.shape(images)[0], images.shape[-1]
    rows = batch * channels
    bins = ops.cast(ops.floor(ops.clip(images, 0.0, _HIST_BINS - 1.0)), "int32")  # Keras truncates: same bins
    offsets = ops.reshape(ops.arange(rows, dtype="int32") * _HIST_BINS, (-1, 1, 1, channels))
    index = ops.reshape(bins + offsets, (-1,))
    hist = ops.reshape(ops.segment_sum(ops.ones_like(index, "float32"), index, num_segments=rows * _HIST_BINS),
                       (rows, _HIST_BINS))
    cdf = ops.cumsum(hist, axis=1)
    cdf_min = ops.min(ops.where(cdf > 0, cdf, ops.max(cdf)), axis=1, keepdims=True)
    spread = cdf[:, -1:] - cdf_min
    lut = ops.clip(ops.round((cdf - cdf_min) * 255.0 / ops.maximum(spread, 1.0)), 0.0, 255.0)
    equalized = ops.reshape(ops.take(ops.reshape(lut, (-1,)), index), ops.shape(images))
    degenerate = ops.reshape(ops.sum(ops.cast(hist > 0, "int32"), axis=1) <= 1, (-1, 1, 1, channels))
    return ops.where(degenerate, images, equalized)


class _Equalization(keras.layers.Equalization):
    """keras `Equalization` per image (see `_equalize`)."""

    def transform_images(self, images: Any, transformation: Any = None, training: bool = True) -> Any:
        return _equalize(ops.cast(images, "float32")) if training else images


class _Brightness(keras.layers.RandomBrightness):
    """keras `RandomBrightness` without its in-place `images += delta`, which under PyTorch changed the
    caller's tensor (the clean view of a stacked batch)."""

    def transform_images(self, images: Any, transformation: Any, training: bool = True) -> Any:
        if not training:
            return images
        return ops.clip(images + ops.cast(transformation["rgb_delta"], images.dtype), *self.value_range)


def _replace_ops(layer: keras.layers.Layer, strength: float) -> None:
    """Swap a Keras RandAugment/AugMix's posterization for a sane one, its equalization for the per-image
    one and its brightness for the out-of-place one (see the module docstring)."""
    layer.random_brightness = _Brightness(layer.random_brightness.factor, value_range=VALUE_RANGE,
                                          name="random_brightness")
    layer.random_posterization = keras.layers.RandomPosterization(
        factor=_posterize_factor(strength), value_range=VALUE_RANGE)
    # explicit name: the default ("__equalization") is not a valid TF scope name
    layer.equalization = _Equalization(value_range=VALUE_RANGE, name="equalization")


def _switch(index: Any, branches: list[Callable[[Any], Any]], images: Any) -> Any:
    """`ops.switch` over image ops that all return float32 images of the input's shape."""
    shape = images.shape
    return ops.switch(index, [lambda x, fn=fn: ops.reshape(ops.cast(fn(x), "float32"), shape) for fn in branches],
                      images)


class _RandAugment(keras.layers.RandAugment):
    """Keras RandAugment without solarization, sane posterization, per-image equalization and only the chosen
    op computed; with `families`, only the geometric ops and those of these corruption families."""

    _AUGMENT_LAYERS = _without_solarization(keras.layers.RandAugment._AUGMENT_LAYERS)

    def __init__(self, strength: float, num_ops: int = 2, families: tuple[str, ...] | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("name", "rand_augment")  # the default, "_rand_augment", is not a valid scope name
        super().__init__(value_range=VALUE_RANGE, num_ops=num_ops, factor=RANDAUGMENT_MAX_FACTOR * strength,
                         **kwargs)
        _replace_ops(self, strength)
        self._AUGMENT_LAYERS = _ops_within(self._AUGMENT_LAYERS, families)

    def transform_images(self, images: Any, transformation: Any, training: bool = True) -> Any:
        images = ops.cast(images, "float32")
        if not training:
            return images
        for i in range(self.num_ops):
            branches = [functools.partial(self._apply_op, name, op_transformation=transformation["transforms"][name])
                        for name in self._AUGMENT_LAYERS]
            images = _switch(transformation["layer_idxes"][i], branches, images)
        return images

    def _apply_op(self, name: str, images: Any, op_transformation: Any) -> Any:
        return getattr(self, name).transform_images(images, op_transformation)


class _AugMix(keras.layers.AugMix):
    """Keras AugMix with the chain ops drawn per batch as tensors (not by Python `random` at trace time),
    chain depths uniform in 1..3 (the paper's default) instead of a fixed 3 with a "skip" choice,
    per-image mixing weights as in the paper, no solarization, sane posterization and per-image
    equalization; with `families`, only the geometric ops and those of these corruption families.

    The num_chains x max_depth op slots run in one `ops.fori_loop` around one `ops.switch`, so each op is
    traced once instead of once per slot (9x less to compile). Each iteration draws from its own key,
    `folded(loop_key, slot)`. Slots past a chain's depth take the identity branch.
    """

    def __init__(self, strength: float, stream: _SeedStream, families: tuple[str, ...] | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("name", "aug_mix")
        super().__init__(value_range=VALUE_RANGE, num_chains=AUGMIX_CHAINS, chain_depth=AUGMIX_MAX_DEPTH,
                         factor=AUGMIX_MAX_FACTOR * strength, alpha=1.0, all_ops=True, **kwargs)
        _replace_ops(self, strength)
        self._augment_layers = _ops_within(_without_solarization(list(self._augment_layers)), families)
        self._stream = stream
        _seeded(self, stream)

    def get_random_transformation(self, data: Any, training: bool = True, seed: Any = None) -> Any:
        if not training:
            return None
        images = data["images"] if isinstance(data, dict) else data
        batch = ops.shape(images)[0]
        gammas = keras.random.gamma((batch, self.num_chains), alpha=self.alpha, seed=self._stream)
        return {
            "chain_mixing_weights": gammas / ops.sum(gammas, axis=-1, keepdims=True),
            "weight_sample": keras.random.beta((batch,), self.alpha, self.alpha, seed=self._stream),
            "ops": self._draw_ops(),
            "loop_key": self._stream.next(),
        }

    def _draw_ops(self) -> Any:
        """(num_chains * chain_depth,) op index per slot; index len(self._augment_layers) = identity,
        used for the slots past each chain's depth (uniform in 1..chain_depth)."""
        n_ops = len(self._augment_layers)
        chosen = self._stream.randint((self.num_chains, self.chain_depth), 0, n_ops)
        depths = self._stream.randint((self.num_chains, 1), 1, self.chain_depth + 1)
        return ops.reshape(ops.where(ops.arange(self.chain_depth) < depths, chosen, n_ops), (-1,))

    def transform_images(self, images: Any, transformation: Any, training: bool = True) -> Any:
        images = ops.cast(images, "float32")
        if not training:
            return images
        weights = ops.cast(transformation["chain_mixing_weights"], "float32")
        depth = self.chain_depth

        def slot(i: Any, state: tuple[Any, Any]) -> tuple[Any, Any]:
            chain_images, mixed = state
            chain_images = ops.cond(i % depth == 0, lambda: images, lambda: chain_images)  # a chain starts
            with self._stream.bound(self._stream.folded(transformation["loop_key"], i)):
                branches = [functools.partial(self._apply_op, name) for name in self._augment_layers]
                chain_images = _switch(ops.take(transformation["ops"], i), [*branches, lambda x: x], chain_images)
            chain_weight = _per_image(ops.take(weights, i // depth, axis=1), 4)
            mixed = ops.cond(i % depth == depth - 1, lambda: mixed + chain_weight * chain_images, lambda: mixed)
            return chain_images, mixed

        _, mixed = ops.fori_loop(0, self.num_chains * depth, slot, (images, ops.zeros_like(images)))
        keep = _per_image(ops.cast(transformation["weight_sample"], "float32"), 4)
        return ops.clip(keep * images + (1.0 - keep) * mixed, *VALUE_RANGE)

    def _apply_op(self, name: str, images: Any) -> Any:
        layer = getattr(self, name)
        return layer.transform_images(images, layer.get_random_transformation(images))


def _grid_keep_masks(images: Any, strength: float, stream: _SeedStream) -> Any:
    """(B,H,W,1) float: 0 where GridMask erases, else 1; computed for the whole batch at once.

    keras-cv GridMask's geometry with its per-image draws (grid unit in [min(H/2, 0.3W), max(H/2, 0.3W)+1],
    offsets in [0, unit) on both axes, square side = ratio * unit, rotation +-GRIDMASK_ROTATION turns), but
    evaluated analytically: a pixel is erased when its centre, rotated into the grid's frame, falls in a
    square, i.e. `(coord + offset) mod unit >= unit - side` on both grid axes. keras-cv instead draws the
    grid on a diagonal-sized canvas, rotates it bilinearly, casts it to bool (so every partly covered pixel
    is erased too) and centre-crops it, per image in a `tf.map_fn`. Rotating about the image centre
    instead of the canvas centre only shifts the grid, and the offsets are uniform anyway.
    """
    batch, height, width = ops.shape(images)[0], images.shape[1], images.shape[2]
    low, high = min(0.5 * height, 0.3 * width), max(0.5 * height, 0.3 * width) + 1.0

    def draw(minval: float, maxval: float) -> Any:
        return ops.reshape(stream.uniform((batch,), minval, maxval), (-1, 1, 1))

    unit = draw(low, high)
    side = draw(0.5 * GRIDMASK_MAX_RATIO * strength, GRIDMASK_MAX_RATIO * strength) * unit
    offset_x, offset_y = draw(0.0, 1.0) * unit, draw(0.0, 1.0) * unit
    angle = draw(-2.0 * np.pi * GRIDMASK_ROTATION, 2.0 * np.pi * GRIDMASK_ROTATION)
    y = ops.convert_to_tensor((np.arange(height, dtype=np.float32) - 0.5 * (height - 1.0))[:, None])
    x = ops.convert_to_tensor((np.arange(width, dtype=np.float32) - 0.5 * (width - 1.0))[None, :])
    cos, sin = ops.cos(angle), ops.sin(angle)
    in_x = ops.mod(cos * x - sin * y + offset_x, unit) >= unit - side
    in_y = ops.mod(sin * x + cos * y + offset_y, unit) >= unit - side
    return ops.expand_dims(1.0 - ops.cast(ops.logical_and(in_x, in_y), "float32"), -1)


def _make_gridmask(strength: float, stream: _SeedStream) -> Callable[[Any], Any]:
    """GridMask (core Keras has none; keras-cv's runs per image in a `tf.map_fn`, with stateful draws):
    whole-batch masks from `_grid_keep_masks`, erased pixels set to 0 (keras-cv's fill_value=0)."""
    def apply(images: Any) -> Any:
        return images * _grid_keep_masks(images, strength, stream)  # exact: x*1 = x, x*0 = 0
    return apply


def _colour_matrices(saturation: Any, hue_angle: Any) -> Any:
    """(B,3,3) RGB -> RGB matrices that keep luma Y and scale the (I, Q) chroma plane by `saturation`
    and rotate it by `hue_angle` (radians): saturation is a blend toward (or away from) the grey of equal
    luma, hue a turn of the colour wheel; both linear, so one matrix and one batched matmul replace
    keras' two RGB -> HSV -> RGB round trips (RandomSaturation + RandomHue).
    """
    saturation, hue_angle = ops.convert_to_tensor(saturation), ops.convert_to_tensor(hue_angle)
    cos, sin = saturation * ops.cos(hue_angle), saturation * ops.sin(hue_angle)
    one, zero = ops.ones_like(cos), ops.zeros_like(cos)
    chroma = ops.reshape(ops.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], axis=-1), (-1, 3, 3))
    to_rgb = ops.convert_to_tensor(_YIQ_TO_RGB.astype(np.float32))
    to_yiq = ops.convert_to_tensor(_RGB_TO_YIQ.astype(np.float32))
    return ops.matmul(ops.matmul(to_rgb[None], chroma), to_yiq[None])


def _make_colour_jitter(strength: float, stream: _SeedStream) -> Callable[[Any], Any]:
    """Per-image saturation and hue (magnitudes: see JITTER) as one colour matrix, clipped to 0..255."""
    def apply(images: Any) -> Any:
        batch = (ops.shape(images)[0],)
        u = stream.uniform(batch, 0.5 - JITTER["saturation"] * strength, 0.5 + JITTER["saturation"] * strength)
        max_turn = np.pi * JITTER["hue"] * strength  # keras RandomHue: +-factor/2 of the circle
        matrices = _colour_matrices(u / (1.0 - u), stream.uniform(batch, -max_turn, max_turn))
        return _apply_colour_matrices(images, matrices)
    return apply


def _make_stain_jitter(strength: float, stream: _SeedStream) -> Callable[[Any], Any]:
    """Per-image, per-stain HED scale and bias (magnitudes: see STAIN_JITTER), clipped to 0..255."""
    def apply(images: Any) -> Any:
        shape = (ops.shape(images)[0], 3)
        scale, bias = STAIN_JITTER["scale"] * strength, STAIN_JITTER["bias"] * strength
        return hed_jitter(images, stream.uniform(shape, 1.0 - scale, 1.0 + scale), stream.uniform(shape, -bias, bias))
    return apply


_ENGINES: dict[tuple, "Augmenter"] = {}


def _host_key(*parts: int) -> np.ndarray:
    """A (2,) int32 key mixed from non-negative integers (numpy's SeedSequence hash)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2)
    return (state & _MAX_SEED).astype(np.int32)


class Augmenter:
    """A policy + strength, callable on a batch `(images (B,H,W,3) float32 0..255, one-hot (B,C))`.

    Augmenters of the same configuration (policy, strength, families, views) share the first one's layers and
    compiled function, so a process compiles each configuration once (under JAX a compile takes seconds);
    `seed` and `family_usage` stay each augmenter's own.

    Call as `augmenter(images, labels, seed=key)`; `key` is an int or a pair of ints. Without a key the
    draws come from a host generator seeded with the constructor's `seed`. Returns backend tensors.
    `families`: the corruption families the policy may touch (None: the default training families).
    `stack_views` (consistency policies only): return the clean batch and JSD_VIEWS augmented views of it
    stacked on the batch axis, `views` times the batch.
    """

    def __init__(self, policy: str, strength: float, num_classes: int, seed: int | None = None,
                 families: Any = None, stack_views: bool = False) -> None:
        self.policy = check_policy(policy)
        self.strength = _check_strength(strength)
        self.num_classes = _check_num_classes(num_classes)
        self.seed = seed
        self.families = check_policy_families(policy, families)
        self.mixes_labels = self.policy in MIXING_POLICIES
        self.views = 1 + JSD_VIEWS if _check_stack_views(policy, stack_views) else 1
        self._stream = _SeedStream()
        self._fallback = np.random.default_rng(seed)
        self._usage: Counter[str] = Counter()
        self._usage_lock = threading.Lock()
        self._call_lock = threading.Lock()  # tracing (and torch's eager run) keep state on self and the stream
        self._counts: list[tuple[tuple[str, ...], Any]] = []  # (families, count) recorded while tracing
        self._plans: list[Any] = []                           # (B,) corruption kind per image, -1 = none
        self.corruption_kinds: list[tuple[str, str]] = []     # (family, kind) of the 'corrupt' policies
        self.is_identity = self.policy == "none" or self.strength == 0.0
        self._engine = _ENGINES.get(self._engine_key())
        if self._engine is None:  # the first augmenter of a configuration builds and compiles it for all
            if not self.is_identity:
                # float32 under a mixed global policy (the trainer's): 0..255 pixels lose precision in float16, and
                # Keras' composite layers (RandomColorJitter, ...) do not pass `dtype` on to their sub-layers.
                with dtype_policy("float32"):
                    self._policy_fn = _POLICY_BUILDERS[self.policy](self)
            self._compiled = compile_function(self._step)
            self._engine = _ENGINES[self._engine_key()] = self
            while len(_ENGINES) > _MAX_ENGINES:
                _ENGINES.pop(next(iter(_ENGINES)))

    def __repr__(self) -> str:
        return f"Augmenter(policy={self.policy!r}, strength={self.strength:g}, num_classes={self.num_classes})"

    @property
    def family_usage(self) -> Counter[str]:
        """Images per corruption family that went through a step of that family, since construction: per
        applied corruption for 'corrupt', per augmented image for colour jitter, and for RandAugment/AugMix
        (whose ops are drawn per batch) per augmented image for each family of ops they may draw."""
        with self._usage_lock:
            return Counter(self._usage)

    def count_usage(self, families: tuple[str, ...], images: int) -> None:
        with self._usage_lock:
            for family in families:
                self._usage[family] += images

    def __call__(self, images: Any, labels: Any, *, seed: Any = None) -> ImagesLabels:
        self._check_batch(images, labels)
        images, labels = ops.cast(images, "float32"), ops.cast(labels, "float32")
        if self.is_identity and self.views == 1:
            return images, labels
        key, engine = self._key(seed), self._engine
        with engine._call_lock:
            out_images, out_labels, counts, plan = engine._compiled(images, labels, key)
            families = [names for names, _ in engine._counts]
        for names, count in zip(families, counts):
            self.count_usage(names, int(ops.convert_to_numpy(count)))
        if plan is not None:
            out_images = self._corrupt_on_host(out_images, ops.convert_to_numpy(plan), key)
        return out_images, out_labels

    def _engine_key(self) -> tuple:
        """What the compiled function depends on (the seed only enters through the key)."""
        return self.policy, self.strength, self.families, self.views, keras.backend.backend()

    def _step(self, images: Any, labels: Any, key: Any) -> tuple[Any, Any, list[Any], Any]:
        """The compiled part of a call: images, labels, the family counts and the corruption plan (or None)."""
        self._counts, self._plans = [], []
        with self._stream.bound(key):
            out_images, out_labels = self._augment(images, labels)
        plan = None
        if self._plans:
            clean = [ops.full((ops.shape(images)[0],), -1, "int32")] if self.views > 1 else []
            plan = ops.concatenate([*clean, *self._plans], axis=0)
        out_images = ops.clip(ops.cast(out_images, "float32"), *VALUE_RANGE)
        return out_images, ops.cast(out_labels, "float32"), [count for _, count in self._counts], plan

    def _augment(self, images: Any, labels: Any) -> ImagesLabels:
        if self.is_identity:  # stacked views of an identity policy: the clean batch, `views` times
            return ops.concatenate([images] * self.views, axis=0), labels
        oriented = self._orient(images)
        if self.views == 1:
            return self._policy_fn(oriented, labels)
        views = [self._policy_fn(oriented, labels)[0] for _ in range(self.views - 1)]
        return ops.concatenate([oriented, *views], axis=0), labels

    # -- helpers used by the policy builders -------------------------------------------------------------

    def seeded(self, layer: keras.layers.Layer) -> keras.layers.Layer:
        return _seeded(layer, self._stream)

    def gate(self, images: Any) -> Any:
        """Which images of the batch to augment: each with probability `strength`."""
        return self._stream.uniform((ops.shape(images)[0],)) < self.strength

    def gated(self, augment: Callable[[Any], Any], families: tuple[str, ...] = ()) -> PolicyFn:
        """A label-preserving policy: `augment` applied to a `strength` fraction of the images, each counted
        in `family_usage` for every one of the corruption `families` `augment` touches."""
        def apply(images: Any, labels: Any) -> ImagesLabels:
            chosen = self.gate(images)
            self.counted(families, ops.sum(ops.cast(chosen, "int32")))
            return _select(chosen, augment(images), images), labels
        return apply

    def counted(self, families: tuple[str, ...], count: Any) -> None:
        """Add `count` images to each of `families` in `family_usage` once the call returns (the count is an
        output of the compiled function, so it counts under every backend)."""
        if families:
            self._counts.append((families, count))

    def planned(self, kind: Any) -> None:
        """Corrupt image i of this view with corruption kind[i] on the host after the compiled step."""
        self._plans.append(kind)

    def _orient(self, images: Any) -> Any:
        """A random D4 element per image (flip and/or exact k*90 rotation) on a `strength` fraction of them.

        Done as ONE gather through per-image pixel index maps: exact (no interpolation), and every policy
        pays for it. Non-square batches only get the four shape-preserving views (identity, half turn,
        horizontal and vertical flip).
        """
        batch, height, width, channels = ops.shape(images)[0], *images.shape[1:]
        maps = ops.convert_to_tensor(dihedral_index_maps(height, width))
        view = self._stream.randint((batch,), 0, int(maps.shape[0]))
        view = ops.where(self.gate(images), view, 0)  # view 0 is the identity
        index = ops.take(maps, view, axis=0) + ops.arange(batch, dtype="int32")[:, None] * (height * width)
        pixels = ops.take(ops.reshape(images, (-1, channels)), ops.reshape(index, (-1,)), axis=0)
        return ops.reshape(pixels, ops.shape(images))

    def _corrupt_on_host(self, images: Any, plan: np.ndarray, key: np.ndarray) -> Any:
        """Rows with plan >= 0 corrupted by their kind at a severity drawn from the key (see `_corrupt`)."""
        out = np.array(ops.convert_to_numpy(images))
        rng = np.random.default_rng(_host_key(*key, 1))
        max_severity = 1 + round((max(corruptions.SEVERITIES) - 1) * self.strength)
        severity = rng.integers(1, max_severity + 1, len(plan))
        seed = int(rng.integers(0, _MAX_SEED))
        for k, level in sorted(set(zip(plan[plan >= 0].tolist(), severity[plan >= 0].tolist()))):
            rows = np.flatnonzero((plan == k) & (severity == level))
            family, name = self._engine.corruption_kinds[k]
            out[rows] = corruptions.corrupt(np.rint(out[rows]).astype(np.uint8), name, level, seed)
            self.count_usage((family,), len(rows))
        return ops.convert_to_tensor(out)

    def _key(self, seed: Any) -> np.ndarray:
        """The (2,) int32 key of one call: from `seed` (int or pair) or the fallback generator, with the
        constructor's seed mixed in."""
        if seed is None:
            base = self._fallback.integers(0, _MAX_SEED, 2)
        else:
            base = np.asarray(ops.convert_to_numpy(seed) if not np.isscalar(seed) else seed).astype(np.int64)
            base = np.array([base, 0]) if base.ndim == 0 else base.reshape(2)
        return _host_key(*base, *(() if self.seed is None else (1, self.seed)))

    def _check_batch(self, images: Any, labels: Any) -> None:
        shape, label_shape = tuple(images.shape), tuple(labels.shape)
        if len(shape) != 4 or shape[-1] != 3:
            raise DataError(f"Augmenter: expected images (B,H,W,3), got shape {shape}")
        if len(label_shape) != 2 or label_shape[-1] != self.num_classes:
            raise DataError(f"Augmenter: expected one-hot labels (B,{self.num_classes}), got shape {label_shape}")


# -- policies: each builder gets the Augmenter and returns fn(images, labels) -> (images, labels) ----------

def _light(aug: Augmenter) -> PolicyFn:
    """Colour jitter: keras RandomBrightness, RandomContrast, then saturation + hue as one colour matrix."""
    s = aug.strength
    brightness = aug.seeded(_Brightness(JITTER["brightness"] * s, value_range=VALUE_RANGE, name="brightness"))
    c = JITTER["contrast"] * s  # a (low, high) pair: a single float gives x[1, 1+c] in Keras 3.15 (see above)
    contrast = aug.seeded(keras.layers.RandomContrast((c, c), value_range=VALUE_RANGE, name="contrast"))
    colour = _make_colour_jitter(s, aug._stream)
    return aug.gated(lambda images: colour(contrast(brightness(images, training=True), training=True)), ("colour",))


def _randaugment(aug: Augmenter) -> PolicyFn:
    layer = aug.seeded(_RandAugment(aug.strength, families=aug.families))
    return aug.gated(lambda images: layer(images, training=True), _op_families(layer._AUGMENT_LAYERS))


def _augmix(aug: Augmenter) -> PolicyFn:
    layer = _AugMix(aug.strength, aug._stream, families=aug.families)
    return aug.gated(lambda images: layer(images, training=True), _op_families(layer._augment_layers))


def _stain(aug: Augmenter) -> PolicyFn:
    return aug.gated(_make_stain_jitter(aug.strength, aug._stream), ("colour",))


def _corrupt(aug: Augmenter) -> PolicyFn:
    """Stain jitter if 'colour' is allowed, then one corruption of an allowed family on a `strength`
    fraction of the images: the kind is drawn here, the corruption applied on the host (module docstring)."""
    stain = _stain(aug) if "colour" in aug.families else None
    aug.corruption_kinds = [(family, kind) for family in aug.families for kind in corruptions.FAMILIES[family]]

    def apply(images: Any, labels: Any) -> ImagesLabels:
        if stain is not None:
            images, labels = stain(images, labels)
        if aug.corruption_kinds:
            kind = aug._stream.randint((ops.shape(images)[0],), 0, len(aug.corruption_kinds))
            aug.planned(ops.where(aug.gate(images), kind, -1))
        return images, labels

    return apply


def _cutout(aug: Augmenter) -> PolicyFn:
    high = max(CUTOUT_MAX_AREA * aug.strength, 1e-3)
    layer = aug.seeded(keras.layers.RandomErasing(
        factor=(1.0, 1.0), scale=(min(0.02, high), high), fill_value=CUTOUT_FILL, value_range=VALUE_RANGE))
    return aug.gated(lambda images: layer(images, training=True))


def _gridmask(aug: Augmenter) -> PolicyFn:
    return aug.gated(_make_gridmask(aug.strength, aug._stream))


def _cutmix_layer(aug: Augmenter) -> Callable[[Any, Any], ImagesLabels]:
    layer = aug.seeded(keras.layers.CutMix(factor=CUTMIX_MAX_ALPHA))

    def apply(images: Any, labels: Any) -> ImagesLabels:
        transformation = layer.get_random_transformation({"images": images, "labels": labels})
        # Label weight = share of pixels actually kept, not the continuous box area Keras uses.
        pasted = ops.cast(transformation["batch_masks"], "float32")
        transformation["mix_weight"] = 1.0 - ops.mean(pasted, axis=[1, 2, 3])
        return layer.transform_images(images, transformation), layer.transform_labels(labels, transformation)

    return apply


def _mixup_layer(aug: Augmenter) -> Callable[[Any, Any], ImagesLabels]:
    layer = aug.seeded(keras.layers.MixUp(alpha=MIXUP_ALPHA))

    def apply(images: Any, labels: Any) -> ImagesLabels:
        transformation = layer.get_random_transformation({"images": images, "labels": labels})
        return layer.transform_images(images, transformation), layer.transform_labels(labels, transformation)

    return apply


def _gated_mix(aug: Augmenter, mix: Callable[[Any, Any], ImagesLabels]) -> PolicyFn:
    """A label-mixing op applied to a `strength` fraction of the batch (images and labels together)."""
    def apply(images: Any, labels: Any) -> ImagesLabels:
        mixed_images, mixed_labels = mix(images, labels)
        chosen = aug.gate(images)
        return _select(chosen, mixed_images, images), _select(chosen, mixed_labels, labels)
    return apply


def _cutmix(aug: Augmenter) -> PolicyFn:
    return _gated_mix(aug, _cutmix_layer(aug))


def _mixup(aug: Augmenter) -> PolicyFn:
    return _gated_mix(aug, _mixup_layer(aug))


def _cutmix_mixup(aug: Augmenter) -> PolicyFn:
    """Per image, CutMix or MixUp with equal odds (as timm's mixup/cutmix switch)."""
    cutmix, mixup = _cutmix_layer(aug), _mixup_layer(aug)

    def either(images: Any, labels: Any) -> ImagesLabels:
        cut_images, cut_labels = cutmix(images, labels)
        mix_images, mix_labels = mixup(images, labels)
        use_cut = aug._stream.uniform((ops.shape(images)[0],)) < 0.5
        return _select(use_cut, cut_images, mix_images), _select(use_cut, cut_labels, mix_labels)

    return _gated_mix(aug, either)


def _no_op(aug: Augmenter) -> PolicyFn:
    """'none' never gets here (Augmenter short-circuits it); listed so every policy has a builder."""
    return lambda images, labels: (images, labels)


_POLICY_BUILDERS: dict[str, Callable[[Augmenter], PolicyFn]] = {
    "none": _no_op,
    "light": _light,
    "randaugment": _randaugment,
    "augmix": _augmix,
    "cutmix": _cutmix,
    "mixup": _mixup,
    "cutmix_mixup": _cutmix_mixup,
    "gridmask": _gridmask,
    "cutout": _cutout,
    "stain": _stain,
    "corrupt": _corrupt,
    "augmix_jsd": _augmix,  # one view per call; the stacked views and the loss: see CONSISTENCY_POLICIES
    "corrupt_jsd": _corrupt,
}
assert set(_POLICY_BUILDERS) == set(POLICIES)


# -- validation and the public constructor ---------------------------------------------------------------

def _check_strength(strength: Any) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:
        raise DataError(f"augmentation strength must be a number in [0, 1], got {strength!r}")
    return float(strength)


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise DataError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return num_classes


def _check_stack_views(policy: str, stack_views: bool) -> bool:
    if stack_views and policy not in CONSISTENCY_POLICIES:
        raise DataError(f"stack_views is only for the consistency policies ({', '.join(CONSISTENCY_POLICIES)}), "
                        f"not {policy!r}")
    return stack_views


def build_augmenter(policy: str, strength: float, num_classes: int, seed: int | None = None,
                    families: Any = None, *, stack_views: bool = False) -> Augmenter:
    """The augmenter for a (policy, strength) pair; see the module docstring for what each policy does.

    `seed` is folded into every key, so two augmenters with different seeds differ even on the same key.
    `families`: the corruption families training augmentation may draw from (None: the default training
    families of `data_pipeline.corrupt`); a policy that needs another one is refused.
    `stack_views`: for CONSISTENCY_POLICIES, yield the clean batch and its augmented views (see Augmenter).
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise DataError(f"augmenter seed must be an integer or None, got {seed!r}")
    return Augmenter(policy, strength, num_classes, seed, families, stack_views)
