"""Ensemble building blocks on synthetic probabilities and tiny models: combiners, selection, metrics,
TTA views, input validation, the standalone runtime and the atomic artifact folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.metrics import expected_calibration_error, log_loss
from ensemble.combiners import SoftVoting, Stacking, WeightedVoting, fit_temperature, out_of_fold_proba
from ensemble.selection import greedy_selection, near_identical, select_top_k
from common.errors import ConfigError, EnsembleError
from ensemble.standalone import combine, prepare_images


def noisy_members(n: int = 400, classes: int = 4, members: int = 3, seed: int = 0):
    """Members that each know the label with different noise: (N, M, C) probabilities and labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(classes, size=n)
    logits = rng.normal(size=(n, members, classes)) * np.array([1.0, 1.5, 2.5])[:members, None]
    logits[np.arange(n), :, y] += np.array([2.0, 1.5, 0.8])[:members]
    probs = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    return probs, y


@pytest.mark.parametrize("combiner", [SoftVoting(), SoftVoting(weights=[3, 1, 0]), WeightedVoting(),
                                      Stacking(), WeightedVoting(calibrate=True), Stacking(calibrate=True)],
                         ids=["uniform", "fixed", "weighted", "stacking", "weighted_T", "stacking_T"])
def test_each_combiner_gives_probabilities_and_portable_numbers(combiner):
    X, y = noisy_members()
    probs = combiner.fit(X, y).predict_proba(X)
    assert probs.shape == (len(y), 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    params = json.loads(json.dumps(combiner.params()))  # what the manifest stores
    np.testing.assert_allclose(combine(X, params), probs, atol=1e-6)
    assert np.mean(probs.argmax(1) == y) > 0.6
    if "weights" in params:
        assert sum(params["weights"]) == pytest.approx(1.0)
        assert min(params["weights"]) >= 0


def test_fitted_weights_prefer_the_better_member():
    X, y = noisy_members()
    weights = WeightedVoting().fit(X, y).weights_
    assert weights.sum() == pytest.approx(1.0)
    accuracies = [np.mean(X[:, m].argmax(1) == y) for m in range(3)]
    assert np.argmax(weights) == np.argmax(accuracies)
    assert log_loss(WeightedVoting().fit(X, y).predict_proba(X), y) <= log_loss(X.mean(axis=1), y) + 1e-9


def test_stacking_is_scored_out_of_fold_not_on_its_training_data():
    X, y = noisy_members(n=300)
    in_sample = Stacking(C=100.0).fit(X, y).predict_proba(X)
    out_of_fold = out_of_fold_proba(Stacking(C=100.0), X, y)
    assert log_loss(out_of_fold, y) > log_loss(in_sample, y)


def test_temperature_fixes_overconfidence():
    X, y = noisy_members()
    sharp = np.exp(np.log(X[:, 2]) * 4)
    sharp /= sharp.sum(axis=1, keepdims=True)
    temperature = fit_temperature(sharp, y)
    assert temperature > 1.5
    assert expected_calibration_error(combine(sharp[:, None], {"kind": "vote", "weights": [1.0],
                                                               "temperature": temperature}), y) < \
        expected_calibration_error(sharp, y)


def test_greedy_selection_with_replacement_and_duplicate_guard():
    X, y = noisy_members(members=3)
    candidates = [X[:, 0], X[:, 0] * 0.999 + 0.00025, X[:, 1], X[:, 2]]  # candidate 1: near copy of 0
    assert near_identical(candidates[0], candidates[1])
    selection = greedy_selection(candidates, y, max_members=3, n_iterations=15)
    assert selection.indices[0] == 0 and 1 not in selection.indices
    assert sum(selection.weights) == pytest.approx(1.0)
    assert sum(selection.counts) >= len(selection.indices)
    capped = greedy_selection(candidates, y, max_members=1, n_iterations=5)
    assert capped.indices == [0]
    top = select_top_k(candidates, y, 3)
    assert 1 not in top.indices and len(top.indices) == 3


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 28, 28), np.uint8), "shape"),
    (np.zeros((2, 28, 28, 1), np.uint8), "3 colour channels"),
    (np.zeros((2, 28, 28, 4), np.uint8), "3 colour channels"),
    (np.zeros((0, 28, 28, 3), np.uint8), "no images"),
    (np.full((2, 28, 28, 3), 0.5, np.float32), "0..1"),
    (np.full((2, 28, 28, 3), 300.0), "0..255"),
    (np.array([[["a"]]]), "shape"),
])
def test_bad_images_are_refused(bad, message):
    with pytest.raises(EnsembleError, match=message):
        prepare_images(bad, (28, 28))


def test_image_size_rule():
    images = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    resized = prepare_images(images, (28, 28))
    assert resized.shape == (3, 28, 28, 3) and resized.dtype == np.uint8
    flat = np.full((1, 96, 96, 3), 77, np.uint8)
    assert np.all(prepare_images(flat, (28, 28)) == 77)  # antialiased resize keeps flat colours
    with pytest.raises(EnsembleError, match="resize is off"):
        prepare_images(images, (28, 28), resize=False)
    floats = prepare_images(images.astype(np.float64), (96, 96))
    assert floats.dtype == np.uint8 and np.array_equal(floats, images)


def test_tensor_views_match_the_numpy_dihedral_views():
    from keras import ops

    from common.inference import dihedral_view, stack_views

    images = np.random.default_rng(1).integers(0, 256, (2, 5, 5, 3)).astype(np.float32)
    stacked = ops.convert_to_numpy(stack_views(ops.convert_to_tensor(images), range(8)))
    expected = np.concatenate([dihedral_view(images, index) for index in range(8)])
    np.testing.assert_array_equal(stacked, expected)


def test_a_saved_preprocessing_layer_loads_through_the_standalone_runtime(tmp_path):
    import keras
    from keras import ops

    from backbones.preprocessing import ImageNetPreprocess
    from common.inference import PREPROCESS_LAYER_NAME, preprocess_layer_class
    from ensemble.standalone import load_member_models

    assert ImageNetPreprocess is preprocess_layer_class()  # the package registers the runtime's one class
    assert keras.saving.get_registered_name(ImageNetPreprocess) == PREPROCESS_LAYER_NAME
    x = np.random.default_rng(2).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    for mode in ("tf", "torch", "caffe", "unit"):
        inputs = keras.Input((4, 4, 3))
        keras.Model(inputs, ImageNetPreprocess(mode)(inputs)).save(tmp_path / f"{mode}.keras")
        loaded, = load_member_models(tmp_path, {"members": [{"file": f"{mode}.keras"}]})
        np.testing.assert_allclose(ops.convert_to_numpy(loaded(x)),
                                   ops.convert_to_numpy(ImageNetPreprocess(mode)(x)), rtol=1e-6)
        assert loaded.layers[-1].get_config()["mode"] == mode


def test_tta_runner_stacks_views_and_members():
    import keras

    from common.inference import dihedral_view
    from ensemble.standalone import TTARunner

    inputs = keras.Input((6, 6, 3))
    models = []
    for seed in (0, 1):
        keras.utils.set_random_seed(seed)
        x = keras.layers.Flatten()(inputs)
        models.append(keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x)))
    images = np.random.default_rng(3).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    runner = TTARunner(models, range(8), batch_size=2)
    probs = runner.view_probs(images)
    assert probs.shape == (8, 5, 2, 4)
    for view in range(8):
        for m, model in enumerate(models):
            expected = model.predict(dihedral_view(images, view).astype(np.float32), verbose=0)
            np.testing.assert_allclose(probs[view, :, m], expected, atol=1e-5)
    with pytest.raises(EnsembleError, match="square"):
        TTARunner([keras.Model(i := keras.Input((4, 6, 3)), keras.layers.Dense(2)(keras.layers.Flatten()(i)))],
                  range(8))


def test_atomic_folder_keeps_the_old_artifact_when_a_build_fails(tmp_path):
    from ensemble.artifact import atomic_folder

    out = tmp_path / "ensemble"
    with atomic_folder(out) as staging:
        (staging / "manifest.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as staging:
            (staging / "manifest.json").write_text("new, half built")
            raise RuntimeError("build failed")
    assert (out / "manifest.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ensemble"]  # no staging or backup left
    with atomic_folder(out) as staging:
        (staging / "manifest.json").write_text("new")
    assert (out / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ensemble"]


def _predictions(y: np.ndarray, accuracy: float, confidence: float, seed: int) -> np.ndarray:
    """Probabilities that put `confidence` on a class that is right for an `accuracy` share of rows."""
    rng = np.random.default_rng(seed)
    n_classes = 8
    predicted = np.where(rng.random(len(y)) < accuracy, y, (y + rng.integers(1, n_classes, len(y))) % n_classes)
    probs = np.full((len(y), n_classes), (1 - confidence) / (n_classes - 1))
    probs[np.arange(len(y)), predicted] = confidence
    return probs


def test_greedy_selection_is_not_fooled_by_under_confident_accurate_members():
    # A label-smoothed trial is accurate but under-confident; raw log-loss would favour a sharp, worse one.
    y = np.random.default_rng(0).integers(0, 8, 2000)
    accurate_soft = _predictions(y, 0.97, 0.5, seed=1)
    worse_sharp = _predictions(y, 0.90, 0.99, seed=2)
    selection = greedy_selection([accurate_soft, worse_sharp], y, max_members=2, n_iterations=10)
    weights = dict(zip(selection.indices, selection.weights))
    assert weights[0] > 0.5


def test_an_image_and_its_shifted_copies_share_a_fold():
    from ensemble.combiners import folds
    from ensemble.robust import ValidationRows

    X, y = noisy_members(60, seed=4)
    source = np.concatenate([np.arange(60), np.arange(60)])  # two held-out families: each image twice
    rows = ValidationRows.robust(y, source)
    assert len(rows.y) == 180 and rows.sample_weight[:60].tolist() == [1.0] * 60
    assert rows.sample_weight[60:].tolist() == [0.5] * 120  # each half weighs the same
    np.testing.assert_array_equal(rows.y[60:], y[source])
    for train, test in folds(rows.y, rows.groups):
        assert not set(rows.groups[train]) & set(rows.groups[test])
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(180))
    oof = out_of_fold_proba(Stacking(), rows.stack(X, X[source]), rows.y, rows.sample_weight, rows.groups)
    assert oof.shape == (180, X.shape[2])


def test_the_fold_seed_reaches_the_splitter_and_keeps_classes_in_every_fold():
    from ensemble.combiners import folds, make_combiner

    X, y = noisy_members(80, seed=5)
    groups = np.concatenate([np.arange(80), np.arange(80)])  # each image and one shifted copy
    rows_y = y[groups]
    same = [test.tolist() for _, test in folds(rows_y, groups, random_state=3)]
    assert same == [test.tolist() for _, test in folds(rows_y, groups, random_state=3)]
    assert same != [test.tolist() for _, test in folds(rows_y, groups, random_state=4)]
    for test in same:
        assert set(rows_y[test]) == set(y)  # stratified: every class in every fold
    oof = {seed: out_of_fold_proba(make_combiner("stacking", random_state=seed), X, y) for seed in (1, 1, 2)}
    assert len(oof) == 2 and not np.allclose(oof[1], oof[2])
    rare = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2])  # class 2 has one image: unstratifiable, still 5 folds
    assert len(folds(rare)) == 5


def test_folds_are_the_splitters_own_computed_once_and_read_only():
    from sklearn.model_selection import StratifiedGroupKFold

    from ensemble.combiners import folds

    _, y = noisy_members(90, seed=6)
    names = np.array([f"cell-{i % 90}" for i in range(180)])  # any group labels: an image and its copy
    rows_y = y[np.arange(180) % 90]
    splitter = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=7)
    expected = [test.tolist() for _, test in splitter.split(np.zeros(180), rows_y, names)]
    first = folds(rows_y, names, random_state=7)
    assert [test.tolist() for _, test in first] == expected
    again = folds(rows_y, names, random_state=7)
    assert all(a[1] is b[1] for a, b in zip(first, again))  # the same arrays, not a second search
    with pytest.raises(ValueError, match="read-only"):
        first[0][1][0] = 0


def test_robust_scores_are_the_mean_of_clean_and_shifted():
    from ensemble.robust import ValidationRows

    y = np.array([0, 1, 2, 3])
    source = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    clean, shifted = np.eye(4)[y], np.eye(4)[[0, 0, 0, 0, 0, 0, 0, 3]]  # shifted: 3 of 8 right
    rows = ValidationRows.robust(y, source)
    scores = rows.scores(rows.stack(clean, shifted))
    assert scores["val_accuracy"] == 1.0 and scores["val_shifted_accuracy"] == 0.375
    assert scores["val_objective_accuracy"] == pytest.approx((1.0 + 0.375) / 2)
    plain = ValidationRows.clean(y)
    assert plain.stack(clean, None) is clean and plain.scores(clean)["val_objective_accuracy"] == 1.0
    with pytest.raises(EnsembleError, match="source indices"):
        ValidationRows.robust(y, np.array([4]))


def test_robust_objective_prefers_the_member_that_survives_the_shift():
    from ensemble.robust import ValidationRows

    y = np.random.default_rng(0).integers(0, 8, 1000)
    source = np.arange(1000)
    clean_star = [_predictions(y, 0.97, 0.9, seed=1), _predictions(y, 0.40, 0.9, seed=2)]  # collapses under shift
    steady = [_predictions(y, 0.95, 0.9, seed=3), _predictions(y, 0.85, 0.9, seed=4)]
    rows = ValidationRows.robust(y, source)
    val = [rows.stack(*clean_star), rows.stack(*steady)]
    assert select_top_k([clean_star[0], steady[0]], y, 1).indices == [0]  # clean objective
    assert select_top_k(val, rows.y, 1, sample_weight=rows.sample_weight).indices == [1]
    assert greedy_selection([clean_star[0], steady[0]], y, 1).indices == [0]
    assert greedy_selection(val, rows.y, 1, sample_weight=rows.sample_weight).indices == [1]


def test_the_best_objective_score_is_chosen_then_the_simpler_kind():
    from ensemble.evaluate import choose_row

    def row(kind, accuracy, loss):
        return {"combiner": kind, "kind": kind, "val_oof_objective_accuracy": accuracy,
                "val_oof_objective_log_loss": loss}

    rows = [row("vote", 0.80, 0.50), row("weighted", 0.80, 0.50), row("stacking", 0.79, 0.40)]
    assert choose_row(rows)["combiner"] == "vote"
    assert choose_row(rows, "stacking")["combiner"] == "stacking"
    rows[2]["val_oof_objective_accuracy"] = 0.81
    assert choose_row(rows)["combiner"] == "stacking"
    with pytest.raises(ConfigError, match="unknown combiner"):
        choose_row(rows, "median")


def test_the_robust_choice_gives_up_at_most_the_clean_tolerance():
    from ensemble.evaluate import choose_row

    rows = [{"combiner": "vote", "kind": "vote", "val_oof_accuracy": 0.9765, "val_oof_objective_accuracy": 0.856,
             "val_oof_objective_log_loss": 0.52},
            {"combiner": "stacking", "kind": "stacking", "val_oof_accuracy": 0.9597,
             "val_oof_objective_accuracy": 0.887, "val_oof_objective_log_loss": 0.33}]
    assert choose_row(rows)["combiner"] == "stacking"  # no limit: the objective alone
    assert choose_row(rows, clean_tolerance=0.005)["combiner"] == "vote"
    assert choose_row(rows, clean_tolerance=0.02)["combiner"] == "stacking"


def test_selection_respects_the_inference_budget():
    from ensemble.budget import InferenceBudget, MemberCost, make_budget

    y = np.random.default_rng(0).integers(0, 8, 1000)
    # candidates 0 and 1 are the most accurate but slow; 2-4 are fast and a little worse
    probs = [_predictions(y, a, 0.9, seed=s) for s, a in enumerate((0.97, 0.96, 0.93, 0.92, 0.91))]
    rates = {0: 100.0, 1: 150.0, 2: 1000.0, 3: 1200.0, 4: 1500.0}
    costs = {i: MemberCost(member=1 / r, shared=0.0) for i, r in rates.items()}
    budget = make_budget(300.0, costs)
    assert budget.images_per_s([2, 3]) == pytest.approx(1 / (1 / 1000 + 1 / 1200))
    assert budget.images_per_s([2, 2, 2]) == pytest.approx(1000.0)  # a member picked again runs once

    unlimited = select_top_k(probs, y, 3)
    limited = select_top_k(probs, y, 3, budget)
    assert unlimited.indices == [0, 1, 2] and limited.indices == [2, 3, 4]
    assert budget.allows(limited.indices) and not budget.allows([0])
    assert "passed over 2 candidate(s) that did not fit the inference budget: 0, 1" in limited.log

    greedy = greedy_selection(probs, y, max_members=3, budget=budget)
    assert greedy.indices[0] == 2 and budget.allows(greedy.indices)
    assert greedy_selection(probs, y, max_members=3).indices[0] == 0
    loose = InferenceBudget(90.0, costs)
    assert select_top_k(probs, y, 2, loose).indices == [0, 2]  # 0 and 1 together fall below 90 img/s

    with pytest.raises(EnsembleError, match=r"fastest candidate predicts 1,500 img/s"):
        make_budget(5000.0, costs)


def test_member_cost_splits_the_shared_part_of_a_fused_call():
    from ensemble.budget import InferenceBudget, MemberCost

    cost = MemberCost.from_timings(one=200e-6, two=370e-6)  # 170 us per member + 30 us per call
    assert cost.member == pytest.approx(170e-6) and cost.shared == pytest.approx(30e-6)
    five = InferenceBudget(1000.0, {i: cost for i in range(5)})
    assert five.images_per_s(range(5)) == pytest.approx(1 / (30e-6 + 5 * 170e-6))
    assert five.allows(range(5)) and not InferenceBudget(1200.0, five.costs).allows(range(5))
    # timing noise can neither make a member nearly free nor dearer than it is alone
    assert MemberCost.from_timings(one=200e-6, two=210e-6).member == pytest.approx(150e-6)
    assert MemberCost.from_timings(one=200e-6, two=500e-6) == MemberCost(200e-6, 0.0)


def test_bfloat16_inference_is_close_to_float32_and_stays_scoped():
    """bfloat16 under TensorFlow where the CPU has it (this project's CPU has AVX512_BF16), float32 elsewhere;
    either way float32 calls before and after give the same numbers: the graph option is switched per call."""
    from backbones import build_classifier
    from common.inference import cpu_has_bfloat16
    from ensemble.standalone import TTARunner, usable_precision

    import keras

    keras.utils.set_random_seed(0)
    model = build_classifier("compact_cnn", (28, 28, 3), 8)
    images = np.random.default_rng(0).integers(0, 256, (300, 28, 28, 3), dtype=np.uint8)
    before = TTARunner([model], range(8)).view_probs(images)
    half = TTARunner([model], range(8), precision="bfloat16")
    native = cpu_has_bfloat16() and keras.backend.backend() == "tensorflow"  # the pass is TensorFlow's
    assert half.precision == ("bfloat16" if native else "float32")
    low = half.view_probs(images)
    after = TTARunner([model], range(8)).view_probs(images)
    np.testing.assert_array_equal(before, after)
    np.testing.assert_allclose(low, before, atol=0.05)
    assert np.mean(low.argmax(-1) == before.argmax(-1)) >= 0.95
    if half.precision == "bfloat16":
        assert np.abs(low - before).max() > 0  # the pass really ran
    with pytest.raises(EnsembleError, match="precision must be one of"):
        usable_precision("float16")


def _tiny_members(n: int = 2, size: int = 8, classes: int = 3):
    import keras

    inputs = keras.Input((size, size, 3))
    flat = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    members = []
    for seed in range(n):
        keras.utils.set_random_seed(seed)
        members.append(keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(flat)))
    return members


def test_ensemble_classifier_follows_the_estimator_contract(tmp_path):
    from sklearn.base import clone

    from ensemble import EnsembleClassifier, load_ensemble
    from ensemble.standalone import read_manifest

    members = _tiny_members()
    images = np.random.default_rng(0).integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    y = np.arange(30) % 3
    clf = EnsembleClassifier(members, combiner="weighted", class_names=["a", "b", "c"], tta_views=2)
    assert clf.get_params()["tta_views"] == 2 and clf.get_params()["combiner"] == "weighted"
    assert not hasattr(clf, "classes_") and not clf.__sklearn_is_fitted__()
    with pytest.raises(EnsembleError, match="not fitted"):
        clf.predict(images)
    assert clf.fit(images, y) is clf
    assert clf.classes_.tolist() == [0, 1, 2] and clf.class_names_.tolist() == ["a", "b", "c"]
    assert clf.n_members_ == 2 and clf.weights_.sum() == pytest.approx(1.0) and clf.input_size_ == (8, 8)
    probs = clf.predict_proba(images)
    assert probs.shape == (30, 3) and set(clf.predict(images)) <= set(clf.classes_)
    np.testing.assert_allclose(clf.combiner_.predict_proba(clf.member_proba(images)), probs, atol=1e-6)
    fresh = clone(clf)  # parameters only, nothing learned
    assert fresh.get_params()["tta_views"] == 2 and not hasattr(fresh, "combiner_")
    assert clf.set_params(tta_views=1).view_member_proba(images).shape == (1, 30, 2, 3)
    clf.set_params(tta_views=2)

    folder = clf.save(tmp_path / "ens")
    manifest = read_manifest(folder)
    assert manifest["adapt_bn"] is False and manifest["tta_views"] == 2
    assert [m["file"] for m in manifest["members"]] == ["members/member_00.keras", "members/member_01.keras"]
    again = load_ensemble(folder)
    np.testing.assert_allclose(again.predict_proba(images), probs, atol=1e-6)
    assert again.class_names_.tolist() == ["a", "b", "c"] and again.manifest_["files"] == manifest["files"]
    with pytest.raises(EnsembleError, match=r"member probabilities must be \(N, 2, C\)"):
        EnsembleClassifier(members).fit_member_proba(np.ones((4, 3, 3)) / 3, np.arange(4) % 3)


def _bn_model():
    import keras

    from backbones import build_classifier

    keras.utils.set_random_seed(0)
    model = build_classifier("compact_cnn", (28, 28, 3), 8)
    warm = np.random.default_rng(1).integers(0, 256, (64, 28, 28, 3)).astype(np.float32)
    for _ in range(3):  # moving statistics of "training" images, so adapting to a shifted batch matters
        model(warm, training=True)
    return model


def test_batch_stats_layer_matches_training_mode_batch_norm():
    import keras
    from keras import ops

    from ensemble.standalone import _batch_stats_layer_class

    x = np.random.default_rng(2).normal(2.0, 3.0, (16, 5, 5, 7)).astype(np.float32)
    bn = keras.layers.BatchNormalization()
    bn(x)
    bn.gamma.assign(np.arange(7) + 1.0)
    bn.beta.assign(np.arange(7) * 0.1)
    adapted = _batch_stats_layer_class()(prior=0.0)
    adapted(x)
    adapted.set_weights(bn.get_weights())
    np.testing.assert_allclose(ops.convert_to_numpy(adapted(x)), ops.convert_to_numpy(bn(x, training=True)),
                               atol=1e-4)
    source_only = _batch_stats_layer_class()(prior=1e12)
    source_only(x)
    source_only.set_weights(bn.get_weights())
    np.testing.assert_allclose(ops.convert_to_numpy(source_only(x)), ops.convert_to_numpy(bn(x, training=False)),
                               atol=1e-4)


def test_bn_adaptation_changes_shifted_predictions_only_when_on():
    from ensemble.standalone import TTARunner

    model = _bn_model()
    before = [w.copy() for w in model.get_weights()]
    shifted = np.clip(np.random.default_rng(3).integers(0, 256, (128, 28, 28, 3)) * 0.4 + 140, 0, 255).astype(np.uint8)
    plain = TTARunner([model], range(2)).view_probs(shifted)
    adapted = TTARunner([model], range(2), adapt_bn=True).view_probs(shifted)
    assert np.abs(adapted - plain).max() > 1e-3
    np.testing.assert_array_equal(TTARunner([model], range(2)).view_probs(shifted), plain)  # model untouched
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    prior_only = TTARunner([model], range(2), adapt_bn=True, bn_prior=1e12).view_probs(shifted)
    np.testing.assert_allclose(prior_only, plain, atol=1e-4)
    order = np.random.default_rng(5).permutation(len(shifted))  # one batch: the order changes nothing
    np.testing.assert_allclose(TTARunner([model], range(2), adapt_bn=True).view_probs(shifted[order]),
                               adapted[:, order], atol=1e-5)
    small = TTARunner([model], range(2), batch_size=32, adapt_bn=True).view_probs(shifted)
    assert small.shape == adapted.shape and np.abs(small - adapted).max() > 0  # batches of 32 adapt to less


def test_build_settings_are_checked_before_any_study_is_opened():
    from ensemble import build_ensemble

    with pytest.raises(EnsembleError, match="unknown setting 'topp'"):
        build_ensemble(None, topp=3)
    with pytest.raises(EnsembleError, match="--objective must be one of"):
        build_ensemble(None, objective="accuracy")
    with pytest.raises(EnsembleError, match="--bn-prior must be >= 0"):
        build_ensemble(None, bn_prior=-1.0)


def test_a_fitted_combiner_must_beat_voting_beyond_noise():
    from ensemble.evaluate import choose_row, paired_gain
    from ensemble.robust import ValidationRows

    y = np.arange(400) % 4
    right = np.eye(4)[y]
    wrong = np.eye(4)[(y + 1) % 4]
    rows = ValidationRows.clean(y)
    vote = np.where(np.arange(400)[:, None] < 300, right, wrong)  # 75% right
    better = np.where(np.arange(400)[:, None] < 304, right, wrong)  # 1 point more
    gain, se = paired_gain(better, vote, rows)
    assert gain == pytest.approx(0.01) and 0 < se < gain  # 4 images flipped the same way: se = 0.005
    source = np.repeat(np.arange(400), 2)
    robust = ValidationRows.robust(y, source=source)
    shifted_gain, shifted_se = paired_gain(robust.stack(better, better[source]), robust.stack(vote, vote[source]),
                                           robust)
    assert shifted_gain == pytest.approx(0.01) and shifted_se == pytest.approx(se)  # copies move with their image

    def row(kind, accuracy, gain, se):
        return {"combiner": kind, "kind": kind, "val_oof_objective_accuracy": accuracy,
                "val_oof_objective_log_loss": 0.5, "val_oof_gain": gain, "val_oof_gain_se": se}

    rows_ = [row("vote", 0.750, 0.0, 0.0), row("stacking", 0.758, 0.008, se)]
    assert choose_row(rows_)["combiner"] == "vote"  # under 2 standard errors: noise
    rows_[1].update(val_oof_objective_accuracy=0.780, val_oof_gain=0.030)
    assert choose_row(rows_)["combiner"] == "stacking"
    rows_[1].update(val_oof_objective_accuracy=0.760, val_oof_gain=0.010)
    assert choose_row(rows_, "stacking")["combiner"] == "stacking"  # asked for by name: no test
