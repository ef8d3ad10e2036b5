"""The learning-rate schedule ends where the time runs out: Keras' cosine decay until then, continuous when its
end moves, and followed by the compiled train step of the configured backend."""

import time

import keras
import numpy as np
import pandas as pd
import pytest

from search.study.trial_config import TrialConfig
from search.trial.schedule import AnnealToTime, epochs_that_fit
from search.trial.trainer import train_trial

CURVE = dict(initial_learning_rate=1e-4, decay_steps=90, warmup_target=1e-2, warmup_steps=10, alpha=0.01)


def _tracked(**curve) -> AnnealToTime:
    schedule = AnnealToTime(**{**CURVE, **curve})
    schedule.track(keras.optimizers.SGD(schedule))
    return schedule


def _rates(schedule, steps) -> np.ndarray:
    return np.array([float(keras.ops.convert_to_numpy(schedule(step))) for step in steps])


def test_until_its_end_moves_the_schedule_is_keras_cosine_decay_step_for_step():
    steps = range(0, 120)
    expected = _rates(keras.optimizers.schedules.CosineDecay(**CURVE), steps)
    assert np.array_equal(_rates(_tracked(), steps), expected)
    schedule = _tracked()
    schedule.end_at(now=40, end=200)  # more time than the curve needs changes nothing
    assert np.array_equal(_rates(schedule, steps), expected)


def test_a_moved_end_keeps_the_rate_continuous_and_reaches_the_floor_there():
    schedule, original = _tracked(), _tracked()
    schedule.end_at(now=40, end=60)
    rates = _rates(schedule, range(0, 80))  # training only goes forward: steps before the move are not kept
    assert rates[40] == pytest.approx(_rates(original, [40])[0])
    assert rates[60] == pytest.approx(CURVE["warmup_target"] * CURVE["alpha"])
    assert np.all(np.diff(rates[40:61]) < 0) and np.all(rates[60:] == rates[60])
    schedule.end_at(now=50, end=55)  # a second move starts from where the first one had got to
    again = _rates(schedule, range(0, 60))
    assert again[50] == pytest.approx(rates[50]) and again[55] == pytest.approx(rates[60])


def test_epochs_that_fit_counts_whole_epochs_for_a_deadline_and_the_crossing_one_for_a_budget():
    assert epochs_that_fit(25.0, 10.0, whole=True) == 2
    assert epochs_that_fit(25.0, 10.0, whole=False) == 3
    assert epochs_that_fit(-1.0, 10.0, whole=True) == 0


def test_the_compiled_train_step_follows_a_moved_end():
    """SGD on a loss whose gradient is 1 moves the weight by exactly the rate of each step: the weight after
    training is minus the sum of the rates the compiled step used."""
    steps_per_epoch, epochs = 4, 6
    schedule = AnnealToTime(initial_learning_rate=1e-3, decay_steps=steps_per_epoch * epochs - 4, warmup_target=0.1,
                            warmup_steps=4, alpha=0.01)
    optimizer = keras.optimizers.SGD(schedule)
    schedule.track(optimizer)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    model.compile(optimizer=optimizer, loss=lambda y_true, y_pred: keras.ops.mean(y_pred))

    class EndAfterThree(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                schedule.end_at(now=2 * steps_per_epoch, end=3 * steps_per_epoch)

    model.fit(np.ones((steps_per_epoch, 1)), np.zeros((steps_per_epoch, 1)), batch_size=1, epochs=3, verbose=0,
              shuffle=False, callbacks=[EndAfterThree()])
    applied = -float(keras.ops.convert_to_numpy(model.layers[0].kernel)[0, 0])
    reference = _rates(keras.optimizers.schedules.CosineDecay(1e-3, steps_per_epoch * epochs - 4, alpha=0.01,
                                                             warmup_target=0.1, warmup_steps=4), range(8))
    moved = _rates(schedule, range(8, 12))
    assert moved[-1] < reference[-1] / 2  # the rates the move gave are well below the original curve's
    assert applied == pytest.approx(reference.sum() + moved.sum(), rel=1e-5)


def test_a_trial_cut_by_its_time_budget_ends_its_schedule_at_the_floor_even_after_a_slow_epoch(tmp_path):
    config = TrialConfig(backbone="compact_cnn", epochs=200, batch_size=64, learning_rate=3e-3, max_train_images=320,
                         augment_policy="none", tta_views=1, seed=0, time_budget_s=20.0,
                         early_stopping_patience=1000)  # a budget JAX's compiling first epoch stays well inside
    began = time.perf_counter()  # before train_trial's own clock starts

    def third_epoch_passes_the_budget(epoch, scores):  # slower than any plan made after the second epoch
        if epoch == 2:
            time.sleep(max(0.0, config.time_budget_s + 2.0 - (time.perf_counter() - began)))

    result = train_trial(config, tmp_path, report=third_epoch_passes_the_budget)
    history = pd.read_csv(tmp_path / "history.csv")
    assert 3 <= result.metrics["epochs_run"] < config.epochs
    assert result.metrics["schedule_epochs"] == result.metrics["epochs_run"]
    rates = history["learning_rate"].to_numpy()
    assert rates[-1] == pytest.approx(0.01 * config.learning_rate)  # annealed, not stopped down the 200-epoch curve
    assert rates[1] > 0.5 * config.learning_rate
