"""One trial end to end on the embedded real data: accuracy, artifacts, atomicity, CLI, errors."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from common.errors import ConfigError
from search.study.trial_config import TrialConfig
from search.trial.trainer import ARTIFACT_FILES, is_complete, train_trial

QUICK = dict(backbone="compact_cnn", epochs=4, batch_size=128, learning_rate=3e-3, max_train_images=4000,
             augment_policy="light", augment_strength=0.3, tta_views=4, seed=1, early_stopping_monitor="val_robust")


@pytest.fixture(scope="module")
def quick_trial(tmp_path_factory):
    reports = []
    out = tmp_path_factory.mktemp("trial")
    result = train_trial(TrialConfig(**QUICK), out, report=lambda epoch, scores: reports.append((epoch, scores)))
    return result, reports


def test_compact_cnn_learns_real_cells(quick_trial):
    result, _ = quick_trial
    assert result.metrics["val_accuracy"] > 0.80
    assert result.metrics["test_accuracy_tta"] > 0.80


def test_every_epoch_is_reported_clean_and_shifted(quick_trial):
    result, reports = quick_trial
    assert [epoch for epoch, _ in reports] == list(range(result.metrics["epochs_run"]))
    for _, scores in reports:
        assert all(0 <= scores[k] <= 1 for k in ("val_accuracy", "val_corrupted_accuracy", "val_robust"))
        assert scores["val_robust"] == pytest.approx((scores["val_accuracy"] + scores["val_corrupted_accuracy"]) / 2)
    history = pd.read_csv(result.directory / "history.csv")
    watched = history[history["epoch"] >= QUICK["epochs"] // 2]  # early stopping watches the second half
    assert result.metrics["best_epoch"] == int(watched.loc[watched["val_robust"].idxmax(), "epoch"])


def test_early_stopping_neither_stops_on_nor_keeps_a_spike_in_the_first_half():
    """Under a high learning rate and heavy augmentation, early epochs spike: the stage must run on past such a
    spike and end with the best weights of its second half."""
    import keras

    from search.trial.schedule import AnnealToTime
    from search.trial.trainer import _callbacks

    config = TrialConfig(**{**QUICK, "early_stopping_monitor": "val_accuracy", "early_stopping_patience": 2})
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
    callbacks = _callbacks(config, data=None, report=None, epoch_offset=0, epochs=12, started=0.0, timings={},
                           schedule=AnnealToTime(1e-3, decay_steps=12), steps_per_epoch=1)
    model.stop_training = False
    for callback in callbacks:
        callback.set_model(model)
        callback.on_train_begin()
    scores = [0.5, 0.99, 0.6, 0.6, 0.6, 0.6, 0.7, 0.8, 0.75, 0.7, 0.7, 0.7]
    for epoch, score in enumerate(scores):
        model.layers[0].kernel.assign([[float(epoch)]])  # the weights say which epoch they are from
        for callback in callbacks:
            callback.on_epoch_end(epoch, {"val_accuracy": score})
        if model.stop_training:
            break
    for callback in callbacks:
        callback.on_train_end()
    assert epoch == 9  # patience 2 after the second half's best (epoch 7), not after the spike at epoch 1
    assert float(model.layers[0].kernel.numpy()[0, 0]) == 7.0


def test_trial_is_scored_on_the_heldout_families(quick_trial):
    result, _ = quick_trial
    saved = np.load(result.directory / "predictions.npz")
    views, source = saved["shifted_view_probs"], saved["shifted_source"]
    assert views.shape == (QUICK["tta_views"], 2 * len(saved["val_labels"]), 8)
    assert set(saved["shifted_family"]) == {"acquisition", "artefact"}
    assert set(saved["shifted_severity"]) == {1, 2, 3, 4, 5}
    correct = views.mean(axis=0).argmax(axis=1) == saved["val_labels"][source]
    assert result.metrics["val_corrupted_accuracy_tta"] == pytest.approx(correct.mean())
    for family in ("acquisition", "artefact"):
        expected = correct[saved["shifted_family"] == family].mean()
        assert result.metrics[f"val_accuracy_{family}"] == pytest.approx(expected)
    assert result.metrics["val_robust_tta"] == pytest.approx(
        (result.metrics["val_accuracy_tta"] + result.metrics["val_corrupted_accuracy_tta"]) / 2)


def test_artifacts_are_complete_and_consistent(quick_trial):
    result, _ = quick_trial
    folder = result.directory
    assert is_complete(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(ARTIFACT_FILES)
    assert TrialConfig.from_file(folder / "config.json") == TrialConfig(**QUICK)
    history = pd.read_csv(folder / "history.csv")
    assert {"epoch", "stage", "loss", "val_accuracy"} <= set(history.columns)
    predictions = np.load(folder / "predictions.npz")
    views = predictions["test_view_probs"]
    assert views.shape == (QUICK["tta_views"], 2734, 8)
    np.testing.assert_allclose(views.sum(axis=2), 1.0, atol=1e-4)
    accuracy = np.mean(views.mean(axis=0).argmax(axis=1) == predictions["test_labels"])
    assert accuracy == pytest.approx(result.metrics["test_accuracy_tta"])
    assert json.loads((folder / "metrics.json").read_text()) == result.metrics


def test_saved_model_reproduces_saved_predictions(quick_trial):
    import keras

    result, _ = quick_trial
    model = keras.saving.load_model(result.directory / "model.keras")
    predictions = np.load(result.directory / "predictions.npz")
    from data_pipeline.loaders import load

    test = load().split("test")
    probs = model.predict(test.images[:64].astype(np.float32), verbose=0)
    np.testing.assert_allclose(probs, predictions["test_view_probs"][0, :64], atol=1e-5)


def test_the_saved_model_opens_where_only_the_backbones_are_imported(quick_trial):
    """The trial's model.keras holds no optimizer or learning-rate schedule: a notebook that imports the
    backbones (their layers) but not the trainer opens it with plain `keras.saving.load_model`."""
    result, _ = quick_trial
    script = ("import sys, keras, backbones.preprocessing; "
              "model = keras.saving.load_model(sys.argv[1]); "
              "assert 'search.trial.schedule' not in sys.modules; "
              "print(model.compiled, model.output_shape[-1])")
    done = subprocess.run([sys.executable, "-c", script, str(result.directory / "model.keras")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["False", "8"]  # the embedded data's 8 classes


class Boom(RuntimeError):
    pass


def test_exception_mid_training_leaves_no_complete_looking_artifact(tmp_path):
    def explode(epoch, accuracy):
        raise Boom("pruned or crashed")

    with pytest.raises(Boom):
        train_trial(TrialConfig(**{**QUICK, "epochs": 2, "max_train_images": 400}), tmp_path, report=explode)
    assert not is_complete(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


@pytest.mark.parametrize("backbone", [pytest.param("mobilenet_v3_small", marks=pytest.mark.slow),
                                      "compact_cnn_as_pretrained"])  # the same stages, traced in a fifth of the time
def test_two_stage_finetuning_of_a_pretrained_family(tmp_path, monkeypatch, backbone):
    from backbones import registry

    stand_in = dataclasses.replace(registry.get_backbone("compact_cnn"), name="compact_cnn_as_pretrained",
                                   pretrained=True)
    monkeypatch.setitem(registry._REGISTRY, stand_in.name, stand_in)
    config = TrialConfig(backbone=backbone, weights=None, head_epochs=1, epochs=1,
                         unfreeze_fraction=0.5, max_train_images=256, tta_views=1, batch_size=64)
    result = train_trial(config, tmp_path)
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["stage"].tolist() == ["head", "finetune"]
    assert result.metrics["epochs_run"] == 2


def test_bad_config_values_name_the_key():
    with pytest.raises(ConfigError, match="optimizer='rmsprop'"):
        TrialConfig(optimizer="rmsprop")
    with pytest.raises(ConfigError, match="unknown config key 'learnig_rate'"):
        TrialConfig.from_dict({"learnig_rate": 0.1})


def test_train_one_cli_reproduces_a_config(tmp_path):
    config = {**QUICK, "epochs": 1, "max_train_images": 400, "tta_views": 1}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "search.train_one", "--config", str(path),
                           "--trial-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert is_complete(tmp_path / "out")
    assert "val_accuracy" in done.stdout


def test_train_one_cli_reports_bad_input_in_one_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"backbone": "vgg99"}))
    done = subprocess.run([sys.executable, "-m", "search.train_one", "--config", str(path),
                           "--trial-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "unknown backbone 'vgg99'" in done.stderr


def test_a_bfloat16_trial_trains_in_bfloat16_and_is_evaluated_and_saved_in_float32(tmp_path, embedded):
    """Mixed precision is a training speed-up: the trial's predictions come from a float32 copy of the trained
    model, the saved model is that copy, and the process gets its own dtype policy back."""
    import keras

    from search.study.spec import spec_from_dict
    from search.study.space import fixed_fields

    assert fixed_fields(spec_from_dict({"executor": {"mixed_precision": "bfloat16"}}))["mixed_precision"] == "bfloat16"
    config = TrialConfig(**{**QUICK, "epochs": 1, "max_train_images": 400, "tta_views": 1,
                            "mixed_precision": "bfloat16"})
    result = train_trial(config, tmp_path)
    assert keras.config.dtype_policy().name == "float32"
    assert result.metrics["precision"] == "mixed_bfloat16"
    assert np.isfinite(pd.read_csv(result.directory / "history.csv")["loss"]).all()
    model = keras.saving.load_model(result.directory / "model.keras", compile=False)
    assert {layer.compute_dtype for layer in model._flatten_layers()} == {"float32"}
    test = embedded.split("test")
    probs = model.predict(test.images[:64].astype(np.float32), verbose=0)
    recorded = np.load(result.directory / "predictions.npz")["test_view_probs"][0, :64]
    np.testing.assert_allclose(probs, recorded, atol=1e-5)


def test_auto_precision_is_bfloat16_on_a_cpu_that_has_it_under_tensorflow():
    from common.inference import cpu_has_bfloat16
    from search.execution.devices import backend_name, has_gpu, training_policy

    assert training_policy("off") == "float32" and training_policy("bfloat16") == "mixed_bfloat16"
    native = backend_name() == "tensorflow" and cpu_has_bfloat16() and not has_gpu()
    assert training_policy("auto") == ("mixed_float16" if has_gpu() else "mixed_bfloat16" if native else "float32")


def test_an_unknown_training_precision_is_named_with_the_choices():
    from search.study.spec import spec_from_dict

    with pytest.raises(ConfigError, match=r"'executor.mixed_precision': 'fp8' \(choose one of auto, on, bfloat16, off"):
        spec_from_dict({"executor": {"mixed_precision": "fp8"}})
    with pytest.raises(ConfigError, match="mixed_precision='fp8'"):
        TrialConfig(mixed_precision="fp8")
