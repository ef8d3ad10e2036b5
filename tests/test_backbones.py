"""The backbone registry: every entry builds and predicts on raw images, preprocessing matches each
family's Keras reference, unfreezing counts blocks, weights round-trip through files, and failures
(unknown names, offline ImageNet, bad files) say what to do.

Heavy entries (EfficientNetV2-M/L, ConvNeXt-Base/Large) only run with `-m slow`.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
import urllib.error

import numpy as np
import pytest

import backbones as B
from common.errors import BackboneError, UnknownBackboneError
from common.precision import dtype_policy

keras = pytest.importorskip("keras")

REQUIRED = {
    "mobilenet_v3_small", "efficientnet_b0", "efficientnet_v2_b0", "efficientnet_v2_s", "efficientnet_v2_m",
    "efficientnet_v2_l", "convnext_tiny", "convnext_base", "convnext_large", "resnet50", "densenet121",
    "compact_cnn", "small_resnet",
}
#: Blocks per entry (stem included): the unit of unfreeze depth.
BLOCK_COUNTS = {
    "compact_cnn": 3, "compact_cnn_s2": 3, "compact_cnn_d2": 6, "compact_cnn_d3": 9, "small_resnet": 4,
    "mobilenet_v3_small": 12,
    "efficientnet_b0": 17, "efficientnet_v2_b0": 22, "efficientnet_v2_s": 41, "efficientnet_v2_m": 58,
    "efficientnet_v2_l": 80,
    "convnext_tiny": 19, "convnext_base": 37, "convnext_large": 37, "resnet50": 17, "densenet121": 59,
}


def _entries():
    return [pytest.param(n, marks=pytest.mark.slow) if B.get_backbone(n).heavy else n
            for n in B.list_backbones()]


def _raw(n: int = 3, size: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def _predict(model, x) -> np.ndarray:
    """Eager inference: no tf.function tracing, which costs seconds per big model."""
    return np.asarray(model(x, training=False))


def _ids(variables) -> set[int]:
    return {id(v) for v in variables}


def _batchnorm_vars(backbone) -> set[int]:
    return {id(v) for layer in backbone._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)
            for v in layer.weights}


def _randomize(model, seed: int = 1) -> None:
    """Give every variable (BatchNorm statistics too) non-default values, so a round trip proves something."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if "int" in str(v.dtype):
            continue
        v.assign(rng.uniform(0.5, 1.5, v.shape).astype(v.dtype))


# --- registry -----------------------------------------------------------------------------------------


def test_registry_has_required_entries_with_sane_specs():
    assert REQUIRED <= set(B.list_backbones())
    for name in B.list_backbones():
        spec = B.get_backbone(name)
        assert spec.name == name
        assert spec.min_input_size >= 1
        assert spec.lr > 0 and spec.finetune_lr > 0
    assert not B.get_backbone("small_resnet").pretrained and not B.get_backbone("compact_cnn").pretrained
    assert all(B.get_backbone(n).pretrained for n in REQUIRED - {"small_resnet", "compact_cnn"})
    assert B.list_backbones(pretrained=False) == ["compact_cnn", "compact_cnn_d2", "compact_cnn_d3", "compact_cnn_s2",
                                                  "small_resnet"]


def test_spec_is_immutable():
    spec = B.get_backbone("small_resnet")
    with pytest.raises(AttributeError):
        spec.min_input_size = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.defaults["depth"] = 5  # type: ignore[index]


def test_unknown_backbone_gives_clear_error():
    with pytest.raises(UnknownBackboneError) as info:
        B.get_backbone("resnet9000")
    message = str(info.value)
    assert message.startswith("unknown backbone 'resnet9000'; available: ")
    assert "small_resnet" in message and "efficientnet_b0" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert str(pickle.loads(pickle.dumps(info.value))) == message  # crosses process boundaries intact
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        B.build_classifier("nope")


def test_registry_import_does_not_import_keras():
    code = ("import sys, backbones; backbones.get_backbone('resnet50').pretrained; "
            "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules, 'keras imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- every entry --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _entries())
def test_entry_builds_on_raw_28px_images(name):
    """28x28 raw images in, (N, 8) float32 probabilities out; Keras apps resize up to 32 inside."""
    spec = B.get_backbone(name)
    model = B.build_classifier(name, input_shape=(28, 28, 3), num_classes=8)
    probs = _predict(model, _raw())
    assert probs.shape == (3, 8) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.all(probs >= 0)

    layer_names = [layer.name for layer in model.layers]
    assert ("resize" in layer_names) == (28 < spec.min_input_size)
    assert ("preprocess" in layer_names) == (not spec.builtin_preprocessing)
    backbone = B.get_backbone_model(model)
    assert backbone.name == B.BACKBONE_LAYER

    blocks = B.backbone_blocks(model)
    assert len(blocks) == BLOCK_COUNTS[name]
    assert sum(len(b.layers) for b in blocks) == len(backbone.layers)  # every layer in exactly one block
    assert all(any(layer.weights for layer in b.layers) for b in blocks)
    assert len({b.name for b in blocks}) == len(blocks)


@pytest.mark.parametrize("name", ["small_resnet", "compact_cnn"])
@pytest.mark.parametrize("size", [28, 64])
def test_scratch_models_keep_size_and_accept_options(name, size):
    model = B.build_classifier(name, input_shape=(size, size, 3), backbone_kwargs={"widths": (16, 32), "depth": 1})
    assert "resize" not in [layer.name for layer in model.layers]
    assert _predict(model, _raw(2, size)).shape == (2, 8)
    feature_map = B.get_backbone_model(model).output.shape
    stem_stride = 1 if size < 48 else 2
    assert feature_map[1] == size // stem_stride // 2 and feature_map[-1] == 32


def test_compact_cnn_s2_downsamples_in_its_stem():
    """The budget member: 14x14 after the stem at 28 px, same parameters as compact_cnn, a quarter of the
    work in its first stage (which is what makes 8 TTA views x 5 members affordable)."""
    full, fast = B.build_classifier("compact_cnn"), B.build_classifier("compact_cnn_s2")
    assert full.count_params() == fast.count_params()
    first = lambda m: B.get_backbone_model(m).get_layer("stage1_block1_conv").output.shape[1:3]  # noqa: E731
    assert tuple(first(full)) == (28, 28) and tuple(first(fast)) == (14, 14)
    assert B.get_backbone_model(fast).output.shape[1] == 3  # 14 -> 7 -> 3 after the two poolings


@pytest.mark.parametrize("name, depth", [("compact_cnn_d2", 2), ("compact_cnn_d3", 3)])
def test_deeper_compact_cnns_stack_convs_per_stage_at_full_resolution(name, depth):
    """The accurate and robust members: compact_cnn's stages, each with `depth` 3x3 convs, stem stride 1 at 28 px."""
    single, deep = B.build_classifier("compact_cnn"), B.build_classifier(name)
    convs = lambda m: [layer.name for layer in B.get_backbone_model(m).layers if layer.name.endswith("conv")]  # noqa: E731
    assert len(convs(deep)) == depth * len(convs(single)) == 3 * depth
    assert f"stage3_block{depth}_conv" in convs(deep)
    assert tuple(B.get_backbone_model(deep).get_layer(f"stage1_block{depth}_conv").output.shape[1:3]) == (28, 28)
    assert deep.count_params() > depth * single.count_params()


def test_resize_to_and_input_validation():
    model = B.build_classifier("small_resnet", input_shape=(28, 28, 3), resize_to=40)
    assert model.get_layer("resize").output.shape[1:3] == (40, 40)
    with pytest.raises(BackboneError, match="minimum input size"):
        B.build_classifier("mobilenet_v3_small", input_shape=(64, 64, 3), resize_to=24)
    with pytest.raises(BackboneError, match="height, width, 3"):
        B.build_classifier("small_resnet", input_shape=(28, 28, 1))
    with pytest.raises(BackboneError, match="dropout"):
        B.build_classifier("compact_cnn", dropout=1.0)
    with pytest.raises(BackboneError, match="no layer named 'backbone'"):
        B.get_backbone_model(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)], name="plain"))


def test_head_options():
    model = B.build_classifier("compact_cnn", num_classes=5, dropout=0.3, head_units=(32, 16))
    names = [layer.name for layer in model.layers]
    assert {"head_pool", "head_bn", "head_dropout", "head_dense1", "head_dense2", "logits", "probs"} <= set(names)
    assert model.get_layer("head_dense1").units == 32 and model.get_layer("head_dropout").rate == 0.3
    assert model.output.shape[-1] == 5
    plain = B.build_classifier("compact_cnn", head_units=0, dropout=0.0)
    assert not any(n.startswith(("head_dense", "head_dropout")) for n in (layer.name for layer in plain.layers))


# --- preprocessing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["caffe", "torch", "tf"])
def test_preprocess_layer_matches_keras_reference(mode):
    from keras.applications import imagenet_utils

    x = _raw(2, 8)
    expected = imagenet_utils.preprocess_input(x.copy(), mode=mode)
    got = np.asarray(B.ImageNetPreprocess(mode)(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name, reference", [
    ("resnet50", "keras.applications.resnet50"),
    ("densenet121", "keras.applications.densenet"),
])
def test_declared_outside_preprocessing_matches_family(name, reference):
    import importlib

    model = B.build_classifier(name, input_shape=(32, 32, 3))
    x = _raw(2, 32)
    expected = importlib.import_module(reference).preprocess_input(x.copy())
    got = np.asarray(model.get_layer("preprocess")(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def _builtin_preprocessing_output(backbone, x):
    """Apply the backbone's leading Rescaling/Normalization layers (its built-in preprocessing)."""
    out = x
    for layer in backbone.layers[1:]:
        if not isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)):
            break
        out = layer(out)
    return np.asarray(out)


_REFERENCE = {
    "tf": lambda x: x / 127.5 - 1.0,
    "tf128": lambda x: x / 128.0 - 1.0,  # EfficientNetV2-S/M/L: Rescaling(1/128, offset=-1)
    "torch": lambda x: (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]),
    "unit": lambda x: x / 255.0,  # EfficientNet v1 without weights: Normalization holds mean 0 / var 1
}


@pytest.mark.parametrize("name, reference", [
    ("mobilenet_v3_small", "tf"),
    ("efficientnet_v2_b0", "torch"),
    ("efficientnet_v2_s", "tf128"),  # Keras picks V2 preprocessing by model name: guards the rename
    ("convnext_tiny", "torch"),
    ("efficientnet_b0", "unit"),
])
def test_builtin_preprocessing_matches_declaration(name, reference):
    spec = B.get_backbone(name)
    assert spec.builtin_preprocessing
    assert reference.startswith(spec.preprocessing_mode) or name == "efficientnet_b0"
    backbone = B.build_backbone(name, (32, 32, 3))
    x = _raw(2, 32)
    np.testing.assert_allclose(_builtin_preprocessing_output(backbone, x), _REFERENCE[reference](x),
                               rtol=1e-4, atol=1e-4)


# --- unfreezing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["small_resnet", "mobilenet_v3_small"])
def test_unfreeze_depth_counts_blocks(name):
    model = B.build_classifier(name, input_shape=(32, 32, 3))
    backbone = B.get_backbone_model(model)
    all_trainable = _ids(backbone.trainable_weights)  # fresh model: everything trainable
    head = _ids(model.trainable_weights) - all_trainable
    bn = _batchnorm_vars(backbone)
    assert head and bn & all_trainable

    B.set_unfreeze(model, 0.0)
    assert backbone.trainable_weights == []
    assert _ids(model.trainable_weights) == head

    B.set_unfreeze(model, 1.0, freeze_batchnorm=True)
    assert _ids(backbone.trainable_weights) == all_trainable - bn
    assert _ids(model.trainable_weights) == head | (all_trainable - bn)
    assert not any(layer.trainable for layer in backbone._flatten_layers()
                   if isinstance(layer, keras.layers.BatchNormalization))

    counts = []
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        result = B.set_unfreeze(model, fraction, freeze_batchnorm=True)
        counts.append(len(backbone.trainable_weights))
        assert result.n_unfrozen == B.blocks_to_unfreeze(fraction, result.n_blocks)
    assert counts == sorted(counts) and 0 < counts[2] < counts[-1]

    # Half means the top half: the last block trains, the stem does not.
    B.set_unfreeze(model, 0.5, freeze_batchnorm=True)
    blocks = B.backbone_blocks(model)
    assert all(layer.trainable for layer in blocks[-1].layers
               if not isinstance(layer, keras.layers.BatchNormalization))
    assert not any(layer.trainable for layer in blocks[0].layers)


def test_unfreeze_is_independent_of_previous_state():
    """Re-applying a fraction must undo earlier per-layer freezes (Keras skips `x.trainable = True`
    when it is already True, which would otherwise leave blocks frozen)."""
    model = B.build_classifier("small_resnet")
    backbone = B.get_backbone_model(model)
    B.set_unfreeze(model, 1.0, freeze_batchnorm=False)
    everything = _ids(backbone.trainable_weights)
    for fraction in (0.5, 0.0, 0.3, 1.0):
        B.set_unfreeze(model, fraction, freeze_batchnorm=True)
    B.set_unfreeze(model, 1.0, freeze_batchnorm=False)
    assert _ids(backbone.trainable_weights) == everything


def test_batchnorm_default_follows_loaded_weights(tmp_path):
    scratch = B.build_classifier("small_resnet")
    B.set_unfreeze(scratch, 1.0)  # from scratch: BatchNorm statistics must be learnt
    backbone = B.get_backbone_model(scratch)
    assert _batchnorm_vars(backbone) & _ids(backbone.trainable_weights)

    path = B.save_backbone_weights(scratch, tmp_path / "sr.weights.h5")
    tuned = B.build_classifier("small_resnet", weights=path)
    assert B.get_backbone_model(tuned).trainable_weights == []  # loaded weights start head-only
    B.set_unfreeze(tuned, 1.0)  # loaded weights: fine-tuning keeps BatchNorm frozen
    assert not _batchnorm_vars(B.get_backbone_model(tuned)) & _ids(B.get_backbone_model(tuned).trainable_weights)


def test_unfreeze_takes_effect_after_recompile():
    """The contract the trainer relies on: set_unfreeze, compile, fit."""
    rng = np.random.default_rng(0)
    x, y = _raw(32), keras.utils.to_categorical(rng.integers(0, 8, 32), 8)
    model = B.build_classifier("compact_cnn", backbone_kwargs={"widths": (8, 16)})
    backbone = B.get_backbone_model(model)
    conv = backbone.get_layer("stage1_block1_conv").kernel
    moving_mean = backbone.get_layer("stage1_block1_bn").moving_mean

    B.set_unfreeze(model, 0.0)
    model.compile(keras.optimizers.Adam(1e-2), "categorical_crossentropy")
    before = conv.numpy().copy()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    np.testing.assert_array_equal(conv.numpy(), before)

    B.set_unfreeze(model, 1.0, freeze_batchnorm=True)
    model.compile(keras.optimizers.Adam(1e-2), "categorical_crossentropy")
    stats = moving_mean.numpy().copy()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert not np.array_equal(conv.numpy(), before)
    np.testing.assert_array_equal(moving_mean.numpy(), stats)  # frozen BatchNorm: no statistics update


def test_unfreeze_helpers():
    assert [B.blocks_to_unfreeze(f, 17) for f in (0, 0.01, 0.5, 1)] == [0, 1, 9, 17]
    with pytest.raises(BackboneError, match="fraction"):
        B.blocks_to_unfreeze(1.5, 10)
    stages = B.gradual_unfreeze_stages(epochs=7, final_fraction=0.6, steps=3, head_epochs=2)
    assert [(s.start_epoch, s.end_epoch) for s in stages] == [(0, 2), (2, 5), (5, 7), (7, 9)]
    assert [round(s.fraction, 3) for s in stages] == [0.0, 0.2, 0.4, 0.6]
    assert [s.name for s in stages] == ["head", "finetune_1", "finetune_2", "finetune_3"]
    single = B.gradual_unfreeze_stages(epochs=2, final_fraction=0.5, steps=1, head_epochs=1)
    assert [(s.name, s.epochs, s.fraction) for s in single] == [("head", 1, 0.0), ("finetune", 2, 0.5)]


def test_unfreeze_finds_spec_after_save_and_load(tmp_path):
    model = B.build_classifier("small_resnet", input_shape=(28, 28, 3), resize_to=32)
    x = _raw(4)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = B.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    assert B.set_unfreeze(loaded, 0.5).n_blocks == BLOCK_COUNTS["small_resnet"]
    renamed = B.build_classifier("compact_cnn", model_name="trial_7")
    with pytest.raises(UnknownBackboneError):
        B.set_unfreeze(keras.Model(renamed.input, renamed.output, name="trial_7"), 0.5)
    assert B.set_unfreeze(renamed, 0.5).n_blocks == 3  # recorded at build time


def test_preprocess_layer_survives_keras_save(tmp_path):
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, B.ImageNetPreprocess("caffe")(inputs))
    model.save(tmp_path / "p.keras")
    loaded = B.load_model(tmp_path / "p.keras")
    x = _raw(2, 8)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


# --- weights ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["small_resnet", "efficientnet_b0"])
def test_weights_file_round_trip_reproduces_outputs(tmp_path, name):
    source = B.build_classifier(name, input_shape=(32, 32, 3))
    _randomize(B.get_backbone_model(source))
    path = B.save_backbone_weights(source, tmp_path / f"{name}.weights.h5")

    target = B.build_classifier(name, input_shape=(32, 32, 3), weights=str(path))
    target.get_layer("logits").set_weights(source.get_layer("logits").get_weights())
    target.get_layer("head_bn").set_weights(source.get_layer("head_bn").get_weights())
    x = _raw(4, 32)
    np.testing.assert_array_equal(_predict(B.get_backbone_model(target), x),
                                  _predict(B.get_backbone_model(source), x))
    np.testing.assert_array_equal(_predict(target, x), _predict(source, x))


def test_legacy_h5_imagenet_style_efficientnet_normalization_is_fixed(tmp_path):
    """Keras' EfficientNet (v1) ImageNet files store the std as variance; loaded from a path (where Keras'
    compensating Rescaling is absent) the variance is squared so inputs get proper torch normalization."""
    h5py = pytest.importorskip("h5py")
    from keras.src.legacy.saving import legacy_h5_format

    from backbones.preprocessing import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB

    backbone = B.build_backbone("efficientnet_b0", (32, 32, 3))
    norm = next(layer for layer in backbone.layers if isinstance(layer, keras.layers.Normalization))
    norm.adapt_mean.assign(np.array(IMAGENET_MEAN_RGB, "float32"))
    norm.adapt_variance.assign(np.array(IMAGENET_STD_RGB, "float32"))
    path = tmp_path / "efficientnetb0_notop.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, backbone)

    loaded = B.build_backbone("efficientnet_b0", (32, 32, 3), weights=path)
    x = _raw(2, 32)
    from keras.applications import imagenet_utils

    np.testing.assert_allclose(_builtin_preprocessing_output(loaded, x),
                               imagenet_utils.preprocess_input(x.copy(), mode="torch"), rtol=1e-4, atol=1e-4)


def test_bad_weights_arguments_fail_clearly(tmp_path):
    with pytest.raises(B.WeightsError, match="weights file not found"):
        B.build_classifier("small_resnet", weights=tmp_path / "missing.weights.h5")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(B.WeightsError, match="unsupported weights file"):
        B.build_classifier("small_resnet", weights=tmp_path / "w.npz")
    with pytest.raises(B.WeightsError, match="no ImageNet weights"):
        B.build_classifier("compact_cnn", weights="imagenet")
    other = B.save_backbone_weights(B.build_classifier("compact_cnn"), tmp_path / "cc.weights.h5")
    with pytest.raises(B.WeightsError, match="could not load"):
        B.build_classifier("small_resnet", weights=other)


def test_imagenet_offline_fails_fast_with_clear_message(tmp_path, monkeypatch):
    """An empty Keras cache and no network: one clear error pointing at local weight files, quickly."""
    from keras.src.backend import config as keras_config
    from keras.src.utils import file_utils

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path))  # KERAS_HOME is read at import
    monkeypatch.setattr(file_utils, "urlretrieve", no_network)  # never download, even when online
    started = time.perf_counter()
    with pytest.raises(B.WeightsUnavailableError) as info:
        B.build_classifier("mobilenet_v3_small", input_shape=(32, 32, 3), weights="imagenet")
    assert time.perf_counter() - started < 60
    message = str(info.value)
    assert "could not download ImageNet weights for backbone 'mobilenet_v3_small'" in message
    assert "Pass a local weights file path instead: weights='/path/to/" in message
    assert "download it elsewhere from https://" in message  # the exact file Keras wanted
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)


# --- mixed precision ----------------------------------------------------------------------------------


@pytest.fixture(params=["mixed_float16", "mixed_bfloat16"])
def mixed_precision(request):
    with dtype_policy(request.param):
        yield request.param


@pytest.mark.parametrize("name", ["small_resnet", "mobilenet_v3_small", "resnet50"])
def test_float32_output_under_mixed_precision(name, mixed_precision):
    model = B.build_classifier(name, input_shape=(28, 28, 3))
    assert B.get_backbone_model(model).layers[-1].compute_dtype == mixed_precision.removeprefix("mixed_")
    probs = _predict(model, _raw())
    assert probs.dtype == np.float32 and model.output.dtype == "float32"
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
