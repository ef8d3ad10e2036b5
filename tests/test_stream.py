"""Batch streams on real blood-cell images: shapes, pairing, determinism by seed, eval order, errors, and
training a Keras model under the current backend."""

import itertools

import numpy as np
import pytest
from keras import ops

from data_pipeline.augment import build_augmenter
from common.errors import DataError
from data_pipeline.stream import make_eval_stream, make_stream, steps_per_epoch

N_CLASSES = 8


@pytest.fixture(scope="module")
def subset(embedded):
    idx = np.random.default_rng(1).choice(len(embedded), 200, replace=False)
    return embedded.images[idx], embedded.labels[idx]


def _batches(stream, limit=None):
    return [[ops.convert_to_numpy(t) for t in batch] for batch in itertools.islice(stream, limit)]


def _identical(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


def test_batches_have_model_ready_shapes_and_dtypes(subset):
    images, labels = subset
    batches = _batches(make_stream(images, labels, N_CLASSES, 64, seed=0))
    assert all(b[0].dtype == np.float32 and b[0].shape[1:] == (28, 28, 3) for b in batches)
    assert all(b[1].dtype == np.float32 and b[1].shape[1:] == (N_CLASSES,) for b in batches)
    assert [len(b[0]) for b in batches] == [64, 64, 64, 8]
    assert len(batches) == steps_per_epoch(200, 64)
    dropped = _batches(make_stream(images, labels, N_CLASSES, 64, drop_remainder=True))
    assert [len(b[0]) for b in dropped] == [64, 64, 64] == [64] * steps_per_epoch(200, 64, drop_remainder=True)


def test_shuffled_images_keep_their_labels_and_raw_values(subset):
    images, labels = subset
    label_of = {img.tobytes(): lab for img, lab in zip(images, labels)}
    seen = []
    for batch_images, batch_labels in _batches(make_stream(images, labels, N_CLASSES, 50, seed=3)):
        for image, one_hot in zip(batch_images, batch_labels):
            key = image.astype(np.uint8).tobytes()
            assert np.array_equal(image, image.round()) and image.max() <= 255  # raw 0..255, not rescaled
            assert one_hot.sum() == 1 and one_hot.argmax() == label_of[key]
            seen.append(key)
    assert sorted(seen) == sorted(label_of)  # every image exactly once
    assert seen != [img.tobytes() for img in images]  # and shuffled


def test_same_seed_same_augmented_batches_over_epochs_other_seed_differs(subset):
    images, labels = subset

    def stream(seed):
        return make_stream(images, labels, N_CLASSES, 64, seed=seed,
                           augmenter=build_augmenter("cutmix_mixup", 0.8, N_CLASSES, seed=7))

    first, again, other = stream(5), stream(5), stream(6)
    epoch1, epoch1_again = _batches(first), _batches(again)
    assert _identical(epoch1, epoch1_again)
    assert not _identical(epoch1, _batches(other))
    epoch2, epoch2_again = _batches(first), _batches(again)  # a new pass: new shuffle and new keys...
    assert not _identical(epoch1, epoch2)
    assert _identical(epoch2, epoch2_again)  # ...still reproducible


def test_randaugment_stream_is_deterministic(subset):
    images, labels = subset
    streams = [make_stream(images[:128], labels[:128], N_CLASSES, 32, seed=2,
                           augmenter=build_augmenter("randaugment", 1.0, N_CLASSES)) for _ in range(2)]
    first, second = (_batches(s) for s in streams)
    assert _identical(first, second)
    assert not np.array_equal(first[0][0], first[0][0].round())  # interpolation happened: augmented


def test_sample_weights_travel_with_their_images(subset):
    images, labels = subset
    weights = np.arange(len(images), dtype=np.float32)
    index_of = {img.tobytes(): i for i, img in enumerate(images)}
    for batch_images, _, batch_weights in _batches(make_stream(images, labels, N_CLASSES, 64, sample_weights=weights)):
        assert batch_weights.dtype == np.float32
        assert [index_of[img.astype(np.uint8).tobytes()] for img in batch_images] == batch_weights.tolist()


def test_repeat_runs_past_one_epoch_and_unshuffled_stream_is_in_order(subset):
    images, labels = subset
    repeated = _batches(make_stream(images, labels, N_CLASSES, 64, repeat=True), limit=10)
    assert len(repeated) == 10
    ordered = _batches(make_stream(images, labels, N_CLASSES, 64, shuffle=False, repeat=True), limit=5)
    assert np.array_equal(ordered[0][0], images[:64]) and np.array_equal(ordered[4][0], images[:64])
    assert len(ordered[3][0]) == 8  # unshuffled passes do not straddle: the short batch stays


def test_eval_stream_keeps_order_and_values(subset):
    images, _ = subset
    out = np.concatenate(list(make_eval_stream(images, 48)))
    assert out.dtype == np.float32
    assert np.array_equal(out, images.astype(np.float32))


def test_stream_trains_a_keras_model_on_soft_labels(subset):
    import keras

    images, labels = subset
    model = keras.Sequential([keras.Input((28, 28, 3)), keras.layers.Rescaling(1 / 255),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(N_CLASSES, "softmax")])
    model.compile("adam", "categorical_crossentropy")
    stream = make_stream(images, labels, N_CLASSES, 64, augmenter=build_augmenter("cutmix", 1.0, N_CLASSES))
    history = model.fit(stream, epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"][0])
    assert model.predict(make_eval_stream(images, 64), verbose=0).shape == (len(images), N_CLASSES)


def test_fit_trains_the_same_with_the_default_stream_threads_as_with_one(subset):
    """A default stream may prepare batches in threads: the model must see the same batches, in order."""
    import keras

    from data_pipeline.stream import auto_workers

    if auto_workers() == 1:
        pytest.skip(f"streams default to one worker under {keras.backend.backend()}")
    images, labels = subset

    def trained(workers):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((28, 28, 3)), keras.layers.Rescaling(1 / 255),
                                  keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(N_CLASSES, "softmax")])
        model.compile(keras.optimizers.SGD(0.5), "categorical_crossentropy")
        stream = make_stream(images, labels, N_CLASSES, 32, seed=4, workers=workers,
                             augmenter=build_augmenter("corrupt", 0.8, N_CLASSES, seed=2))
        model.fit(stream, epochs=3, verbose=0, shuffle=False)
        return [ops.convert_to_numpy(w) for w in model.weights], stream.epoch

    (one, one_epochs), (two, two_epochs) = trained(1), trained("auto")
    assert one_epochs == two_epochs >= 3  # the same passes, so the same shuffles and augmentation keys
    assert all(np.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(one, two))


@pytest.mark.parametrize("change, message", [
    (lambda im, lab: (im[..., 0], lab), "rank 3"),
    (lambda im, lab: (im[..., :1], lab), "3 colour channels"),
    (lambda im, lab: (im / 255.0, lab), "0..1"),
    (lambda im, lab: (im, lab[:-1]), "labels for"),
    (lambda im, lab: (im, np.where(np.arange(len(lab)) == 3, 8, lab)), "out of range"),
    (lambda im, lab: (im, lab + 0.5), "integers"),
])
def test_bad_arrays_raise_data_error(subset, change, message):
    images, labels = change(*subset)
    with pytest.raises(DataError, match=message):
        make_stream(images, labels, N_CLASSES, 32)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"batch_size": True}, "batch_size"),
    ({"num_classes": 1}, "num_classes"),
    ({"sample_weights": np.ones(3)}, "sample_weights"),
    ({"sample_weights": -np.ones(200)}, "sample_weights"),
    ({"augmenter": "light"}, "callable"),
    ({"augmenter": "five classes"}, "built for 5 classes"),
    ({"seed": -1}, "seed"),
    ({"workers": 0}, "workers"),
    ({"workers": "many"}, "workers must be an integer >= 1 or 'auto'"),
])
def test_bad_settings_raise_data_error(subset, kwargs, message):
    images, labels = subset
    settings = {"num_classes": N_CLASSES, "batch_size": 32, **kwargs}
    if settings.get("augmenter") == "five classes":
        settings["augmenter"] = build_augmenter("light", 0.5, 5)
    with pytest.raises(DataError, match=message):
        make_stream(images, labels, settings.pop("num_classes"), settings.pop("batch_size"), **settings)


def test_eval_stream_validates_inputs(subset):
    with pytest.raises(DataError, match="batch_size"):
        make_eval_stream(subset[0], 0)
    with pytest.raises(DataError, match="rank"):
        make_eval_stream(subset[0][0], 8)
