"""The shift gate: the study's most accurate clean member, voting only on images like its training data.

Robust selection leaves that member out (typically a `light` one): it is the best on clean images and
breaks under shift. Wrapped in the gate (`common.inference.shift_gate_layer_class`) it votes as usual on
images whose brightness, contrast and sharpness statistics lie as close to the clean training images' as
95% of the clean validation images do, and casts a uniform vote (no preference) on the others, so the
ensemble can take it for clean accuracy while shifted images are left to the robust members. The gate is
fitted on clean images only: it has seen no corruption family, so it is tuned to none.

A uniform vote would change no image's predicted class but lower the confidence of every ensemble it joins, so
selection by log-loss would never take the gated member. `with_gated_member` decides on validation accuracy
instead, once the combiner of the members as searched is chosen (before any refit, which would train them on
the held-out families): the gated member joins only at a weight that raises clean accuracy and costs no
held-out-family accuracy beyond the validation sample's noise, and its vote is mixed into the combiner's
probabilities where it votes (`ensemble.combiners.GatedCombiner`, `standalone.mix_gated`).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> train = rng.integers(96, 160, (200, 8, 8, 3), dtype=np.uint8)
    >>> gate = fit_gate(train, train[:50])
    >>> bool(inside(gate, train[:50]).mean() >= 0.9), bool(inside(gate, train[:50] // 4).any())
    (True, False)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ensemble.candidates import Candidate
    from ensemble.robust import ValidationRows
    from ensemble.selection import Selection

GATE_WEIGHTS = (0.25, 1 / 3, 0.5)  # vote weights tried for the gated member beside the selected ones
GATE_QUANTILE = 0.95  # of clean validation images the gate lets through: the usual operating point of a detector
MAX_FIT_IMAGES = 5000  # training images the statistics are fitted on (a seeded sample)


def statistics(images: np.ndarray, batch: int = 1024) -> np.ndarray:
    """`common.inference.image_statistics` of uint8 (N,H,W,3) images as a float64 array, in batches."""
    from keras import ops

    from common.inference import image_statistics

    return np.concatenate([ops.convert_to_numpy(image_statistics(images[i:i + batch]))
                           for i in range(0, len(images), batch)]).astype(np.float64)


def fit_gate(train_images: np.ndarray, val_images: np.ndarray, quantile: float = GATE_QUANTILE,
             seed: int = 0) -> dict:
    """The gate's numbers: the location and (Ledoit-Wolf shrunk) precision of the training images'
    statistics, and the Mahalanobis distance within which `quantile` of the clean validation images lie."""
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(seed)
    if len(train_images) > MAX_FIT_IMAGES:
        train_images = train_images[np.sort(rng.choice(len(train_images), MAX_FIT_IMAGES, replace=False))]
    fitted = LedoitWolf().fit(statistics(train_images))
    squared = fitted.mahalanobis(statistics(val_images))  # scikit-learn returns squared distances
    return {"location": fitted.location_.tolist(), "precision": fitted.precision_.tolist(),
            "threshold": float(np.sqrt(np.quantile(squared, quantile)))}


def inside(gate: dict, images: np.ndarray) -> np.ndarray:
    """(N,) bool: which images the gate lets the member vote on (as the layer decides)."""
    offset = statistics(images) - np.asarray(gate["location"])
    return np.einsum("ni,ij,nj->n", offset, np.asarray(gate["precision"]), offset) <= gate["threshold"] ** 2


def gated_model(model, gate: dict):
    """`model` behind the gate: a Keras model on the same raw 0..255 images."""
    import keras

    from backbones.preprocessing import ShiftGate

    images = keras.Input(model.input_shape[1:], name="images")
    return keras.Model(images, ShiftGate(**gate, name="shift_gate")([images, model(images)]),
                       name=f"{model.name}_gated")


def clean_specialist(candidates: list[Candidate], rows: ValidationRows) -> Candidate | None:
    """The candidate with the best clean validation accuracy, unless it is also the best on the robust
    objective (then gating it would only throw its robustness away)."""
    from common.metrics import accuracy
    from ensemble.selection import rank_candidates

    clean = [accuracy(c.val_probs, c.val_labels) for c in candidates]
    best_clean = int(np.argmax(clean))
    best_robust = rank_candidates([rows.stack(c.val_probs, c.shifted_probs) for c in candidates], rows.y,
                                  rows.sample_weight)[0]
    return None if best_clean == best_robust else candidates[best_clean]


def gated_candidate(specialist: Candidate, model_file: Path, work: Path) -> tuple[Candidate, str]:
    """`specialist` behind a gate fitted on its study's clean split, as a candidate with the gated model's
    predictions on the validation split, its held-out-family copy and the test split; and a note saying how
    much of each the gate lets through. The gate decides alike for every dihedral view, so those predictions are
    the specialist's saved ones where it lets an image through and the uniform vote elsewhere, with nothing
    predicted again."""
    from backbones import load_model
    from common.errors import EnsembleError
    from search.trial.data import load_trial_data

    data = load_trial_data(specialist.config)
    same = (np.array_equal(data.val.ids.astype(str), specialist.val_ids)
            and np.array_equal(data.test.ids.astype(str), specialist.test_ids)
            and specialist.shifted is not None and np.array_equal(data.val_shifted.source, specialist.shifted.source))
    if not same:
        raise EnsembleError(f"the gate: trial {specialist.number}'s split is not the study's data any more")
    gate = fit_gate(data.train.images, data.val.images)
    model = gated_model(load_model(model_file, compile=False), gate)
    gated = dataclasses.replace(specialist, gated=True)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{gated.name}.keras"
    model.save(path)
    images = {"val": data.val.images, "shifted": data.val_shifted.images, "test": data.test.images}
    saved = {"val": specialist.val_probs, "shifted": specialist.shifted_probs, "test": specialist.test_probs}
    lets = {k: inside(gate, v) for k, v in images.items()}
    probs = {k: np.where(lets[k][:, None], saved[k], 1.0 / saved[k].shape[1]) for k in images}
    share = {k: float(v.mean()) for k, v in lets.items()}
    note = (f"gate: trial {specialist.number} ({specialist.config.backbone}, {specialist.config.augment_policy}; the "
            f"best clean validation accuracy) joins the candidates gated: it votes on {share['val']:.0%} of the "
            f"clean validation images, {share['shifted']:.0%} of their held-out-family copy and "
            f"{share['test']:.0%} of the test images")
    return dataclasses.replace(gated, val_probs=probs["val"], shifted_probs=probs["shifted"], test_probs=probs["test"],
                               model_file=path), note


def with_gated_member(selection: Selection, base_val: np.ndarray, gated_val: np.ndarray, rows: ValidationRows,
                      gated: int) -> Selection:
    """`selection` with candidate `gated` (its probabilities `gated_val` on the robust objective's validation
    rows) added at the weight of GATE_WEIGHTS whose mix with the ensemble's own out-of-fold probabilities
    `base_val` (`standalone.mix_gated`, at the temperature `GatedCombiner` fits) has the best clean validation
    accuracy among those that raise it and lose no held-out-family accuracy beyond its noise (one standard
    error of the paired difference, `evaluate.paired_gain`, each image's copies counted as one sample); the
    other weights are scaled down. Unchanged, with a log line, when no weight qualifies. The member is there
    for clean accuracy and the noise bound guards robustness: trading clean accuracy for held-out accuracy
    inside that bound, as the objective would, only trades noise."""
    from common.metrics import accuracy
    from ensemble.combiners import fit_gated_temperature
    from ensemble.evaluate import paired_gain
    from ensemble.selection import Selection

    from ensemble.standalone import mix_gated

    n = rows.n_clean
    temperature = fit_gated_temperature(gated_val, rows.y, rows.sample_weight)
    mixed = {w: mix_gated(base_val, gated_val, w, temperature) for w in (0.0, *GATE_WEIGHTS)}
    clean = {w: accuracy(p[:n], rows.y[:n]) for w, p in mixed.items()}
    shifted = {w: accuracy(p[n:], rows.y[n:], rows.sample_weight[n:]) for w, p in mixed.items()}
    heldout = rows.heldout()
    noise = {w: paired_gain(p[n:], mixed[0.0][n:], heldout)[1] for w, p in mixed.items()}
    allowed = [w for w in GATE_WEIGHTS if clean[w] > clean[0.0] and shifted[w] >= shifted[0.0] - noise[w]]
    best = max(allowed, key=lambda w: (clean[w], shifted[w], -w), default=0.0)
    line = (f"gated candidate {gated} (temperature {temperature:.2f}): clean / held-out-family validation accuracy of "
            f"the members as searched {clean[0.0]:.4f} / {shifted[0.0]:.4f} without it, "
            + ", ".join(f"{clean[w]:.4f} / {shifted[w]:.4f} (noise {noise[w]:.4f}) at weight {w:.2f}"
                        for w in GATE_WEIGHTS))
    if best == 0.0:
        return Selection(selection.indices, selection.weights, selection.counts, [*selection.log, line + "; left out"])
    return Selection([*selection.indices, gated], [(1 - best) * w for w in selection.weights] + [best],
                     [*selection.counts, 0], [*selection.log, line + f"; added at weight {best:.2f}"])
