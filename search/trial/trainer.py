"""Train and evaluate one configuration end to end: the unit the search runs hundreds of times.

Pretrained backbones train in two stages (the head on a frozen backbone, then fine-tuning of the top
`unfreeze_fraction` of blocks at a lower learning rate); models from scratch train in one stage.
Artifacts land in the trial folder one atomic file at a time, `metrics.json` last: a folder without it
is an unfinished trial, whatever else it holds. A `Deadline` (the study's `--timeout`) ends training at an
epoch boundary, early enough for the trial to be evaluated and published in time; it and the trial's time
budget move the end of the learning-rate decay to the last epoch they leave (`search.trial.schedule`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from common.errors import TrainingDiverged
from common.atomic import atomic_write_text, atomic_write_with
from common.precision import dtype_policy
from data_pipeline.augment import build_augmenter
from data_pipeline.imbalance import class_weights, oversample_indices
from data_pipeline.stream import make_stream
from search.study.trial_config import TrialConfig
from search.execution.devices import jit_compile, training_policy
from search.study.goals import robust_score
from common.metrics import accuracy
from search.trial.views import predict_views
from search.trial.data import TrialData, load_trial_data

log = logging.getLogger(__name__)  # a worker writes its INFO lines, each epoch's deadline plan, to its log
ReportFn = Callable[[int, dict], None]  # (epoch, validation scores of that epoch)
ARTIFACT_FILES = ("config.json", "history.csv", "predictions.npz", "model.keras", "metrics.json")
EVALUATE_MARGIN = 1.5  # predict's cost per image over the validation pass's (compact_cnn_d2, 1 core: 1.45)
FLOAT32_OVER_MIXED = 2.0  # float32 predict's cost per image over mixed precision's (compact_cnn_d2, 1 core: 1.94)
FIRST_OVERHEAD_S = 5.0  # finishing overhead assumed until a finished trial has measured it
# A deadline's plan takes the next epoch and the evaluation as this much longer than measured: on a shared
# machine they can overrun the last epoch's pace by more than the backstop's slack (2% of the timeout).
DEADLINE_MARGIN = 0.1


@dataclass
class Deadline:
    """The unix time `at` by which a trial must be trained, evaluated and published, and `overhead_s`, what
    finishing the last trial took beyond predicting its images at the rate its epochs measured (building the
    predict function, restoring weights, model file, plots, uploads, storage writes); the worker updates it."""

    at: float
    overhead_s: float = FIRST_OVERHEAD_S

    def finishing_s(self, evaluate_s: float) -> float:
        """The time planned for a trained trial's evaluation (`evaluate_s`, with the margin) and publication."""
        return (1 + DEADLINE_MARGIN) * evaluate_s + self.overhead_s

    def seconds_left(self, evaluate_s: float, now: float | None = None) -> float:
        """Training time left before evaluation and publication must start to end by `at`."""
        return self.at - (time.time() if now is None else now) - self.finishing_s(evaluate_s)

    def epochs_left(self, epoch_s: float, evaluate_s: float, now: float | None = None) -> int:
        """Whole epochs as long as the last one (with the margin) that still leave evaluation and publication."""
        from search.trial.schedule import epochs_that_fit

        return epochs_that_fit(self.seconds_left(evaluate_s, now), (1 + DEADLINE_MARGIN) * epoch_s, whole=True)

    def leaves_room(self, epoch_s: float, evaluate_s: float, now: float | None = None) -> bool:
        """Whether one more epoch as long as the last one, then evaluation and publication, end by `at`."""
        return (1 + DEADLINE_MARGIN) * epoch_s <= self.seconds_left(evaluate_s, now)


_DEADLINE: ContextVar[Deadline | None] = ContextVar("trial_deadline", default=None)


@contextlib.contextmanager
def trials_end_by(deadline: Deadline | None) -> Iterator[Deadline | None]:
    """Every `train_trial` in this context honours `deadline`: the worker sets it once around its loop, so
    the objective and runner between them need not carry it."""
    token = _DEADLINE.set(deadline)
    try:
        yield deadline
    finally:
        _DEADLINE.reset(token)


@dataclass(frozen=True)
class TrialResult:
    directory: Path
    metrics: dict


def _evaluated_images(config: TrialConfig, data: TrialData) -> int:
    """Images `_evaluate` predicts: every TTA view of the validation, test and held-out-family copies."""
    return config.tta_views * sum(len(part.images) for part in (data.val, data.test, data.val_shifted))


def _callbacks(config: TrialConfig, data: TrialData, report: ReportFn | None, epoch_offset: int, epochs: int,
               started: float, timings: dict, schedule, steps_per_epoch: int, deadline: Deadline | None = None) -> list:
    """The epoch monitor, then early stopping, which watches only the second half of the stage's epochs:
    under the cosine schedule's high learning rate and heavy augmentation, early epochs spike (bench_robust
    v4: a warm start whose twin ran on to 0.940 val_robust stopped at epoch 11 of 24 on a spike at epoch 4,
    and kept that epoch's 0.902)."""
    import keras

    from search.trial.schedule import epochs_that_fit

    score_shift = config.early_stopping_monitor == "val_robust"

    class Monitor(keras.callbacks.Callback):
        """Scores each epoch (on the held-out-family copy too, when the objective needs it), reports it,
        stops on NaN, enforces the time budget and the deadline, and moves the learning rate's floor to the
        epoch where they will stop training (logging each epoch's final rate). Runs before EarlyStopping,
        which reads what it adds. The deadline's evaluation cost is a timed prediction scaled to the images
        `_evaluate` predicts: the held-out-family copy's, which takes `_evaluate`'s path, or else the
        validation pass, whose compiled test step runs faster than predict (x EVALUATE_MARGIN); a model
        trained in mixed precision is evaluated in float32 (x FLOAT32_OVER_MIXED)."""

        epoch_began = test_began = 0.0
        image_s = 0.0  # seconds per predicted image

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_began = time.perf_counter()

        def on_test_begin(self, logs=None):
            self.test_began = time.perf_counter()

        def on_test_end(self, logs=None):
            self.image_s = EVALUATE_MARGIN * (time.perf_counter() - self.test_began) / len(data.val.images)

        def on_train_batch_begin(self, batch, logs=None):
            timings.setdefault("first_step", time.perf_counter() - started)

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                raise TrainingDiverged(f"loss became {loss} at step {batch}")

        def on_epoch_end(self, epoch, logs=None):
            if score_shift:
                began = time.perf_counter()
                shifted = predict_views(self.model, data.val_shifted.images, 1)[0]
                self.image_s = (time.perf_counter() - began) / len(data.val_shifted.images)
                logs["val_corrupted_accuracy"] = accuracy(shifted, data.val_shifted_labels)
                logs["val_robust"] = robust_score(logs["val_accuracy"], logs["val_corrupted_accuracy"])
            if report is not None:
                report(epoch_offset + epoch, {k: float(v) for k, v in logs.items() if k.startswith("val_")})
            now = time.perf_counter()
            timings.setdefault("first_epoch", now - started)
            if config.time_budget_s and now - started > config.time_budget_s and self.annealed(epoch):
                self.model.stop_training = True
            evaluate_s = 0.0
            if deadline is not None:
                evaluate_s = timings["evaluate_estimate"] = self.image_s * _evaluated_images(config, data) * (
                    1.0 if self.model.compute_dtype == "float32" else FLOAT32_OVER_MIXED)  # evaluated in float32
                if not deadline.leaves_room(now - self.epoch_began, evaluate_s):
                    self.model.stop_training = timings["deadline"] = True
                log.info("epoch %d took %.1f s; evaluation about %.1f s; %.1f s left to train%s", epoch_offset + epoch,
                         now - self.epoch_began, evaluate_s, deadline.seconds_left(evaluate_s),
                         ": stops at the deadline" if timings.get("deadline") else "")
            if epoch and not self.model.stop_training:
                self.end_schedule_in_time(epoch, now, evaluate_s)
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(schedule((epoch + 1) * steps_per_epoch)))

        def annealed(self, epoch) -> bool:
            """Whether `epoch` ran the schedule's last step: a trial past its time budget stops there, so an
            epoch slower than planned costs one more epoch, not the annealing (the first one's time includes
            compiling, and no plan exists yet)."""
            return epoch == 0 or schedule.end <= (epoch + 1) * steps_per_epoch

        def end_schedule_in_time(self, epoch, now, evaluate_s):
            """Move the learning rate's floor to the last epoch the time budget and the deadline leave (from
            the second epoch on: the first one's time includes compiling); the budget leaves at least one."""
            epoch_s, fits = now - self.epoch_began, []
            if config.time_budget_s:
                fits.append(max(1, epochs_that_fit(config.time_budget_s - (now - started), epoch_s, whole=False)))
            if deadline is not None:
                fits.append(deadline.epochs_left(epoch_s, evaluate_s))
            if fits:
                last = min(epochs, epoch + 1 + min(fits))
                schedule.end_at((epoch + 1) * steps_per_epoch, last * steps_per_epoch)
                timings["schedule_epochs"] = epoch_offset + round(schedule.end / steps_per_epoch)

    stopper = keras.callbacks.EarlyStopping(
        monitor=config.early_stopping_monitor, mode="max", patience=config.early_stopping_patience,
        restore_best_weights=True, start_from_epoch=epochs // 2,
    )
    return [Monitor(), stopper]


def _optimizer(config: TrialConfig, learning_rate: float, total_steps: int, warmup_steps: int):
    import keras

    from search.trial.schedule import AnnealToTime

    schedule = AnnealToTime(
        initial_learning_rate=learning_rate / 100, decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=learning_rate, warmup_steps=warmup_steps, alpha=0.01,
    )
    decay = config.weight_decay or None
    if config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(schedule)
    elif config.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)
    elif config.optimizer == "lion":
        optimizer = keras.optimizers.Lion(schedule, weight_decay=decay)
    else:
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True, weight_decay=decay)
    schedule.track(optimizer)
    return optimizer, schedule


def _compile(model, config: TrialConfig, learning_rate: float, epochs: int, steps_per_epoch: int):
    """Compile `model` for one stage; returns the stage's learning-rate schedule."""
    import keras

    warmup = int(config.warmup_epochs * steps_per_epoch) if epochs > 1 else 0
    optimizer, schedule = _optimizer(config, learning_rate, epochs * steps_per_epoch, warmup)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
        jit_compile=jit_compile(config.jit_compile),
    )
    return schedule


def _stages(config: TrialConfig, pretrained: bool) -> list[tuple[str, float, int, float]]:
    """(name, unfreeze fraction, epochs, learning rate) for each fit() call: the schedule of
    `backbones.gradual_unfreeze_stages`, in three fine-tuning steps when `gradual_unfreeze` is set."""
    from backbones import gradual_unfreeze_stages

    if not pretrained:
        return [("scratch", 1.0, config.epochs, config.learning_rate)]
    finetune_lr = config.learning_rate * config.finetune_lr_factor
    steps = 3 if config.gradual_unfreeze else 1
    schedule = gradual_unfreeze_stages(config.epochs, config.unfreeze_fraction, steps, config.head_epochs)
    return [(stage.name, stage.fraction, stage.epochs, config.learning_rate if stage.name == "head" else finetune_lr)
            for stage in schedule]


def _training_arrays(config: TrialConfig, data: TrialData) -> tuple[np.ndarray, np.ndarray]:
    images, labels = data.train.images, data.train.labels
    if config.oversample:
        keep = oversample_indices(labels, seed=config.seed)
        images, labels = images[keep], labels[keep]
    return images, labels


def _fit(model, config: TrialConfig, data: TrialData, report: ReportFn | None, started: float,
         timings: dict, pretrained: bool, deadline: Deadline | None) -> tuple[pd.DataFrame, int]:
    """Every stage's history, and the epoch whose weights the model ends with (early stopping restores the
    best watched epoch of the last stage)."""
    from backbones import set_unfreeze
    from data_pipeline.augment import CONSISTENCY_POLICIES
    from search.trial.jsd import JSDTrainer

    images, labels = _training_arrays(config, data)
    n_classes = len(data.class_names)
    consistency = config.augment_policy in CONSISTENCY_POLICIES
    augmenter = build_augmenter(config.augment_policy, config.augment_strength, n_classes, seed=config.seed,
                                families=config.augment_families(), stack_views=consistency)
    train = make_stream(images, labels, n_classes, config.batch_size, augmenter=augmenter, seed=config.seed)
    val = make_stream(data.val.images, data.val.labels, n_classes, config.batch_size, shuffle=False)
    weights = class_weights(labels, n_classes) if config.class_weighting else None
    steps = math.ceil(len(labels) / config.batch_size)
    classifier = model
    model = JSDTrainer(classifier) if consistency else classifier  # the wrapper trains the classifier's weights
    histories, epoch = [], 0
    for name, fraction, epochs, learning_rate in _stages(config, pretrained):
        set_unfreeze(classifier, fraction)
        schedule = _compile(model, config, learning_rate, epochs, steps)
        callbacks = _callbacks(config, data, report, epoch, epochs, started, timings, schedule, steps, deadline)
        fitted = model.fit(train, validation_data=val, epochs=epochs, class_weight=weights, verbose=0, shuffle=False,
                           callbacks=callbacks)
        frame = pd.DataFrame(fitted.history)
        stopper = callbacks[-1]  # a time budget can end the stage before it watched: the last epoch stays
        best_epoch = epoch + (stopper.best_epoch if stopper.best_weights is not None else len(frame) - 1)
        frame.insert(0, "epoch", range(epoch, epoch + len(frame)))
        frame.insert(1, "stage", name)
        histories.append(frame)
        epoch += len(frame)
        if timings.get("deadline") or config.time_budget_s and time.perf_counter() - started > config.time_budget_s:
            break
    return pd.concat(histories, ignore_index=True), best_epoch


def _evaluate(model, config: TrialConfig, data: TrialData) -> tuple[dict, dict]:
    """Clean val/test and held-out-family val accuracy, with and without TTA, and the arrays behind them."""
    arrays, metrics = {"class_names": np.array(data.class_names)}, {}
    for split in ("val", "test"):
        part = getattr(data, split)
        views = predict_views(model, part.images, config.tta_views)
        arrays.update({f"{split}_ids": part.ids, f"{split}_labels": part.labels, f"{split}_view_probs": views})
        metrics[f"{split}_accuracy"] = accuracy(views[0], part.labels)
        metrics[f"{split}_accuracy_tta"] = accuracy(views.mean(axis=0), part.labels)
    shifted, labels = data.val_shifted, data.val_shifted_labels
    views = predict_views(model, shifted.images, config.tta_views)
    arrays.update(shifted_view_probs=views, shifted_source=shifted.source, shifted_family=shifted.family,
                  shifted_kind=shifted.kind, shifted_severity=shifted.severity)
    tta = views.mean(axis=0)
    metrics["val_corrupted_accuracy"] = accuracy(views[0], labels)
    metrics["val_corrupted_accuracy_tta"] = accuracy(tta, labels)
    for family in sorted(set(shifted.family.tolist())):
        rows = shifted.family == family
        metrics[f"val_accuracy_{family}"] = accuracy(tta[rows], labels[rows])
    metrics["val_robust"] = robust_score(metrics["val_accuracy"], metrics["val_corrupted_accuracy"])
    metrics["val_robust_tta"] = robust_score(metrics["val_accuracy_tta"], metrics["val_corrupted_accuracy_tta"])
    return metrics, arrays


def build_trial_model(config: TrialConfig, data: TrialData):
    from backbones import build_classifier

    return build_classifier(config.backbone, input_shape=data.train.image_shape,
                            num_classes=len(data.class_names), weights=config.weights,
                            dropout=config.dropout, head_units=config.head_units)


def train_trial(config: TrialConfig, out_dir: str | Path, report: ReportFn | None = None,
                deadline: Deadline | None = None, trained: Callable[[float], None] | None = None) -> TrialResult:
    """Train `config`, evaluate with and without TTA, and write the trial's artifacts to `out_dir`.

    `report(epoch, scores)` is called after every epoch with that epoch's validation scores
    (`val_accuracy`, and `val_corrupted_accuracy` / `val_robust` when early stopping monitors robustness);
    an exception it raises (a pruning signal) stops the trial before anything but the config is written.
    `deadline` (default: the one `trials_end_by` set) stops training before an epoch that would leave no
    time to evaluate and publish; the trial then keeps its best epoch, and `stopped_at_deadline` is true.
    Under a deadline, `trained(seconds)` is called when training ends, with the time planned for evaluating
    and publishing (the driver waits that long for a trained trial past the deadline's backstop).
    """
    import keras

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.json", json.dumps(config.to_dict(), indent=2))
    keras.utils.set_random_seed(config.seed)
    precision = training_policy(config.mixed_precision)
    with dtype_policy(precision):
        return _train(config, out_dir, report, deadline or _DEADLINE.get(), trained, started, precision)


def _train(config: TrialConfig, out_dir: Path, report: ReportFn | None, deadline: Deadline | None,
           trained: Callable[[float], None] | None, started: float, precision: str) -> TrialResult:
    from backbones import get_backbone

    data = load_trial_data(config)
    model = build_trial_model(config, data)
    timings: dict = {}
    history, best_epoch = _fit(model, config, data, report, started, timings, get_backbone(config.backbone).pretrained,
                               deadline)
    train_seconds = time.perf_counter() - started
    if deadline is not None:
        finishing_s = deadline.finishing_s(timings.get("evaluate_estimate", 0.0))
        log.info("trained %d epochs in %.1f s; evaluation and publication planned %.1f s", len(history),
                 train_seconds, finishing_s)
        if trained is not None:
            trained(finishing_s)
    if precision != "float32":
        model = _float32_copy(model, config, data)
    metrics, arrays = _evaluate(model, config, data)
    log.info("evaluated in %.1f s", time.perf_counter() - started - train_seconds)
    metrics.update(
        epochs_run=len(history), best_epoch=best_epoch, train_seconds=train_seconds,
        seconds_to_first_step=timings.get("first_step"), seconds_to_first_epoch=timings.get("first_epoch"),
        evaluate_estimate_s=timings.get("evaluate_estimate"), stopped_at_deadline=bool(timings.get("deadline")),
        schedule_epochs=timings.get("schedule_epochs", config.epochs),
        total_seconds=time.perf_counter() - started,
        n_train=len(data.train), n_params=int(model.count_params()), backbone=config.backbone, precision=precision,
    )
    atomic_write_with(out_dir / "history.csv", lambda p: history.to_csv(p, index=False))
    atomic_write_with(out_dir / "predictions.npz", lambda p: np.savez_compressed(p, **arrays))
    atomic_write_with(out_dir / "model.keras", functools.partial(_save_for_inference, model))
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    return TrialResult(out_dir, metrics)


def _float32_copy(model, config: TrialConfig, data: TrialData):
    """The trained model rebuilt in float32: mixed precision speeds up training, while the trial's predictions and
    saved model are float32, so the saved model reproduces the predictions the ensemble is fitted on, on any
    machine, and the ensemble picks the inference precision for the machine it runs on."""
    with dtype_policy("float32"):
        copy = build_trial_model(replace(config, weights=None), data)
    copy.set_weights(model.get_weights())
    return copy


def _save_for_inference(model, path: Path) -> None:
    """Save `model` without its optimizer and compile settings: the artifact is for prediction, and its
    learning-rate schedule (`AnnealToTime`) would otherwise make `keras.saving.load_model` need the trainer
    imported to open it."""
    compiled, model.compiled = model.compiled, False  # Keras saves the compile config of compiled models only
    try:
        model.save(path)
    finally:
        model.compiled = compiled


def is_complete(trial_dir: str | Path) -> bool:
    return (Path(trial_dir) / "metrics.json").is_file()
