"""Training for robustness: HED stain jitter, corruption augmentation restricted to the training families (with
the run-time instrumentation proving no held-out family reaches training), and AugMix's JSD consistency loss
through the trainer. Real 28x28 blood-cell batches from the embedded data."""

import itertools

import numpy as np
import pytest
from keras import ops

from data_pipeline.augment import POLICIES, build_augmenter, policy_families
from data_pipeline.corrupt import DEFAULT_HELDOUT_FAMILIES, DEFAULT_TRAIN_FAMILIES, FAMILIES
from common.errors import DataError
from data_pipeline.stream import make_stream

N_CLASSES = 8
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@pytest.fixture(scope="module")
def batch(embedded):
    idx = np.random.default_rng(1).choice(len(embedded), 32, replace=False)
    return embedded.images[idx].astype(np.float32), np.eye(N_CLASSES, dtype=np.float32)[embedded.labels[idx]]


def _drawn_families(embedded, families, batches=24, policy="corrupt"):
    """Family usage after `batches` batches of 32 through a stream (the augmenter's compiled function)."""
    augmenter = build_augmenter(policy, 1.0, N_CLASSES, seed=0, families=families,
                                stack_views=policy == "corrupt_jsd")
    idx = np.random.default_rng(2).choice(len(embedded), 256, replace=False)
    stream = make_stream(embedded.images[idx], embedded.labels[idx], N_CLASSES, 32, augmenter=augmenter,
                         repeat=True)
    for images, _ in itertools.islice(stream, batches):
        assert images.shape == (32 * augmenter.views, 28, 28, 3)
    return augmenter.family_usage


@pytest.mark.parametrize("policy", ["corrupt", "corrupt_jsd"])
def test_corrupt_never_applies_a_held_out_family(embedded, policy):
    usage = _drawn_families(embedded, ("noise", "blur", "colour"), policy=policy)
    assert all(usage[family] == 0 for family in DEFAULT_HELDOUT_FAMILIES), usage
    assert all(usage[family] > 0 for family in ("noise", "blur", "colour")), usage


def test_instrumentation_sees_every_family_it_is_allowed(embedded):
    """The negative control: allowed everything, the same run does reach the families held out above."""
    usage = _drawn_families(embedded, tuple(FAMILIES), batches=12)
    assert set(usage) == set(FAMILIES) and min(usage.values()) > 0, usage


def test_policy_families_table():
    assert policy_families("light") == policy_families("stain") == {"colour"}
    for policy in ("none", "cutmix", "mixup", "cutmix_mixup", "gridmask", "cutout"):
        assert policy_families(policy) == frozenset()
    for policy in ("randaugment", "augmix", "augmix_jsd"):
        assert policy_families(policy) == {"colour", "blur", "acquisition"}
        assert policy_families(policy, DEFAULT_TRAIN_FAMILIES) == {"colour", "blur"}
    for policy in ("corrupt", "corrupt_jsd"):
        assert policy_families(policy) == set(FAMILIES)
        assert policy_families(policy, ["noise"]) == {"noise"}
    assert {"stain", "corrupt", "augmix_jsd", "corrupt_jsd"} <= set(POLICIES)


@pytest.mark.parametrize("policy", ["light", "stain", "randaugment", "augmix", "augmix_jsd"])
def test_refuses_a_policy_that_needs_a_held_out_family(policy):
    with pytest.raises(DataError) as error:
        build_augmenter(policy, 0.5, N_CLASSES, families=("noise", "blur"))
    message = str(error.value)
    assert "\n" not in message and repr(policy) in message and "'colour'" in message


def test_unknown_family_is_refused():
    with pytest.raises(DataError, match="unknown corruption family 'fog'"):
        build_augmenter("corrupt", 0.5, N_CLASSES, families=("noise", "fog"))


def test_optional_families_are_left_out_not_refused(batch):
    images, labels = batch
    augmenter = build_augmenter("randaugment", 1.0, N_CLASSES, families=("colour",))
    for key in range(6):
        augmenter(images, labels, seed=key)
    assert set(augmenter.family_usage) == {"colour"}
    assert build_augmenter("corrupt", 0.5, N_CLASSES, families=()).policy == "corrupt"


def test_hed_round_trip_is_near_identity(batch):
    from data_pipeline.stain import hed_to_rgb, rgb_to_hed

    images = batch[0]
    assert np.abs(ops.convert_to_numpy(hed_to_rgb(rgb_to_hed(images))) - images).max() < 1e-2


def _stain_jitter(images, strength, key=(3, 1)):
    from data_pipeline.augment import _make_stain_jitter, _SeedStream

    stream = _SeedStream()
    with stream.bound(np.array(key, np.int32)):
        return ops.convert_to_numpy(_make_stain_jitter(strength, stream)(images))


def test_stain_jitter_identity_at_zero_and_keeps_structure_at_one(batch):
    images = batch[0]
    assert np.abs(_stain_jitter(images, 0.0) - images).max() < 1e-2
    jittered = _stain_jitter(images, 1.0)
    change = np.abs(jittered - images)
    assert 2 < change.mean() < 20 and (change.reshape(len(images), -1).mean(axis=1) > 0.5).all()
    grey_in, grey_out = images @ LUMA, jittered @ LUMA
    correlations = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(grey_in, grey_out)]
    assert min(correlations) > 0.95


@pytest.mark.parametrize("policy", ["stain", "corrupt"])
def test_strength_zero_is_identity_and_nothing_is_counted(batch, policy):
    images, labels = batch
    augmenter = build_augmenter(policy, 0.0, N_CLASSES, seed=1)
    out_images, out_labels = augmenter(images, labels, seed=4)
    assert np.array_equal(ops.convert_to_numpy(out_images), images)
    assert np.array_equal(ops.convert_to_numpy(out_labels), labels)
    assert not augmenter.family_usage


@pytest.mark.parametrize("policy", ["augmix_jsd", "corrupt_jsd"])
def test_stacked_views_for_jsd(batch, policy):
    images, labels = batch
    stacked, out_labels = build_augmenter(policy, 1.0, N_CLASSES, stack_views=True)(images, labels, seed=2)
    clean, first, second = np.split(ops.convert_to_numpy(stacked), 3)
    assert np.array_equal(ops.convert_to_numpy(out_labels), labels)
    assert np.array_equal(np.sort(clean, axis=None), np.sort(images, axis=None))  # clean view: only D4
    assert not np.array_equal(first, clean) and not np.array_equal(first, second)
    identity, _ = build_augmenter(policy, 0.0, N_CLASSES, stack_views=True)(images, labels, seed=2)
    assert np.array_equal(ops.convert_to_numpy(identity), np.concatenate([images] * 3))
    with pytest.raises(DataError, match="stack_views"):
        build_augmenter("augmix", 1.0, N_CLASSES, stack_views=True)


def test_jensen_shannon_zero_for_equal_positive_otherwise():
    from search.trial.jsd import jensen_shannon

    p = np.random.default_rng(0).dirichlet(np.ones(N_CLASSES), size=16).astype(np.float32)
    q = np.roll(p, 1, axis=1)
    assert float(jensen_shannon(p, p, p)) == pytest.approx(0.0, abs=1e-6)
    mixture = (p + 2 * q) / 3
    expected = np.mean(np.sum(p * np.log(p / mixture) + 2 * q * np.log(q / mixture), axis=1)) / 3
    assert float(jensen_shannon(p, q, q)) == pytest.approx(expected, rel=1e-4) and expected > 0.01


def test_jsd_trainer_loss_is_clean_cross_entropy_plus_weighted_jsd():
    import keras

    from search.trial.jsd import JSD_WEIGHT, JSDTrainer, jensen_shannon

    rng = np.random.default_rng(1)
    clean, first, second = (rng.dirichlet(np.ones(N_CLASSES), size=8).astype(np.float32) for _ in range(3))
    labels = np.eye(N_CLASSES, dtype=np.float32)[rng.integers(0, N_CLASSES, 8)]
    trainer = JSDTrainer(keras.Sequential([keras.Input((N_CLASSES,)), keras.layers.Softmax()]))
    trainer.compile(loss="categorical_crossentropy")
    stacked = np.concatenate([clean, first, second])
    cross_entropy = float(ops.convert_to_numpy(keras.losses.categorical_crossentropy(labels, clean)).mean())
    loss = float(trainer.compute_loss(y=labels, y_pred=stacked, training=True))
    assert loss == pytest.approx(cross_entropy + JSD_WEIGHT * float(jensen_shannon(clean, first, second)), rel=1e-5)
    assert float(trainer.compute_loss(y=labels, y_pred=clean, training=False)) == pytest.approx(cross_entropy, rel=1e-5)


def test_jsd_trainer_under_mixed_precision(batch):
    """Loss scaling, float16 compute and the stacked batch work together; the classifier alone is trained."""
    import keras

    from search.trial.jsd import JSDTrainer

    from common.precision import dtype_policy

    images, labels = batch
    with dtype_policy("mixed_float16"):
        classifier = keras.Sequential([keras.Input((28, 28, 3)), keras.layers.Rescaling(1 / 255),
                                       keras.layers.Flatten(), keras.layers.Dense(N_CLASSES),
                                       keras.layers.Activation("softmax", dtype="float32")])
        trainer = JSDTrainer(classifier)
        trainer.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
        augmenter = build_augmenter("augmix_jsd", 1.0, N_CLASSES, stack_views=True)
        stream = make_stream(images, labels.argmax(axis=1), N_CLASSES, 16, augmenter=augmenter)
        before = [w.copy() for w in classifier.get_weights()]
        history = trainer.fit(stream, validation_data=(images, labels), epochs=1, verbose=0, shuffle=False)
    assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    assert np.isfinite(history.history["loss"][0]) and "val_accuracy" in history.history
    assert any(not np.array_equal(a, b) for a, b in zip(before, classifier.get_weights()))
    assert classifier.predict(images, verbose=0).shape == (len(images), N_CLASSES)


def test_augmix_jsd_trains_through_train_trial_and_saves_a_plain_classifier(tmp_path):
    import keras

    from search.study.trial_config import TrialConfig
    from search.trial.trainer import train_trial

    config = TrialConfig(backbone="compact_cnn", epochs=1, max_train_images=256, tta_views=1, batch_size=64,
                         augment_policy="augmix_jsd")
    result = train_trial(config, tmp_path)
    assert np.isfinite(result.metrics["val_accuracy"])
    model = keras.saving.load_model(tmp_path / "model.keras")
    assert type(model).__name__ != "JSDTrainer"
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 3)).astype(np.float32)
    assert model.predict(images, verbose=0).shape == (5, N_CLASSES)
