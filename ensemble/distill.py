"""Knowledge distillation (`python -m ensemble.build --distill`): one student trained on the ensemble's soft labels.

An ensemble of M members with V TTA views costs M x V forward passes per image; a single student network
costs one. Hinton et al. (2015): training on the ensemble's probabilities (soft labels, which carry the
members' learnt class similarities) recovers much of the ensemble's accuracy at the cost of one model.

The student trains on the reference trial's own training images (same split and subsample, rebuilt
from its config) labelled by the ensemble WITH its TTA, sees random dihedral views during training (a
label-safe augmentation for cells), keeps the weights of the epoch with the best validation accuracy
(against the true validation labels), and is scored once on the test split with and without TTA. The
student is saved as `student/student.keras` inside the ensemble folder (checksummed with the rest); it
is a plain Keras model on raw 0..255 RGB like the members.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from common.metrics import accuracy


def _random_views(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image of a batch in one random dihedral view (square images)."""
    from common.inference import dihedral_view

    out = np.empty_like(images)
    choice = rng.integers(8, size=len(images))
    for view in range(8):
        rows = np.flatnonzero(choice == view)
        if rows.size:
            out[rows] = dihedral_view(images[rows], view)
    return out


def train_student(images: np.ndarray, soft_labels: np.ndarray, val_images: np.ndarray, val_labels: np.ndarray,
                  backbone: str = "compact_cnn", epochs: int = 8, batch_size: int = 128, learning_rate: float = 3e-3,
                  seed: int = 0):
    """A `backbones` classifier fit by cross-entropy to `soft_labels`; the best-validation-accuracy epoch."""
    import keras

    from backbones import build_classifier

    keras.utils.set_random_seed(seed)
    model = build_classifier(backbone, input_shape=images.shape[1:], num_classes=soft_labels.shape[1], dropout=0.1)
    steps = int(np.ceil(len(images) / batch_size)) * epochs
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(steps, 1), alpha=0.01)
    model.compile(keras.optimizers.AdamW(schedule, weight_decay=1e-4), loss="categorical_crossentropy")
    rng = np.random.default_rng(seed)
    best_accuracy, best_weights = -1.0, None
    square = images.shape[1] == images.shape[2]
    for _ in range(epochs):
        order = rng.permutation(len(images))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = _random_views(images[rows], rng) if square else images[rows]
            model.train_on_batch(batch.astype(np.float32), soft_labels[rows])
        score = accuracy(model.predict(val_images.astype(np.float32), batch_size=512, verbose=0), val_labels)
        if score > best_accuracy:
            best_accuracy, best_weights = score, model.get_weights()
    model.set_weights(best_weights)
    return model, best_accuracy


def distill_student(classifier, reference, test_images: np.ndarray, options, notes: list[str],
                    backbone: str = "compact_cnn", staging=None) -> pd.DataFrame:
    """Label the training split with the ensemble, train the student, and compare accuracy and speed."""
    from ensemble.classifier import uniform_vote
    from ensemble.data import load_split_images
    from search.trial.data import load_trial_data

    data = load_trial_data(reference.config)
    val_images = load_split_images(reference.config, reference.val_ids, reference.val_labels, split="val")
    started = time.perf_counter()
    soft = classifier.predict_proba(data.train.images, progress=options.progress)
    label_seconds = time.perf_counter() - started
    model, val_accuracy = train_student(data.train.images, soft, val_images, reference.val_labels, backbone=backbone,
                                        epochs=options.distill_epochs, seed=options.seed)
    if staging is not None:
        (staging / "student").mkdir(exist_ok=True)
        model.save(staging / "student" / "student.keras")
    y_test = reference.test_labels
    rows = []
    for name, clf in (("ensemble", classifier),
                      ("student (8 views)", uniform_vote([model], classifier.class_names_, 8)),
                      ("student (1 view)", uniform_vote([model], classifier.class_names_, 1))):
        clf.predict_proba(test_images[:64])  # warm-up: tracing is not inference speed
        started = time.perf_counter()
        probs = clf.predict_proba(test_images)
        seconds = time.perf_counter() - started
        rows.append({"model": name, "test_accuracy": accuracy(probs, y_test),
                     "images_per_s": len(test_images) / seconds})
    rows[0]["val_accuracy"] = None
    rows[1]["val_accuracy"] = rows[2]["val_accuracy"] = val_accuracy
    notes.append(f"distillation: {backbone} student, {options.distill_epochs} epoch(s) on {len(soft)} ensemble-"
                 f"labelled training images (labelling took {label_seconds:.0f} s)")
    return pd.DataFrame(rows)
