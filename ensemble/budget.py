"""An inference budget for member selection: `--min-images-per-s`, as AutoGluon's `infer_limit` does.

Accuracy favours big members and many TTA views; a lab's throughput requirement caps both. Rather than
guess from parameter counts, each candidate's images/s with the ensemble's TTA views and precision is
measured on this machine by timing the trial's own saved model in the fused TTA runner on random images,
once per architecture (trials that share backbone and head cost the same whatever their weights). An
ensemble's cost is the sum of its distinct members' seconds per image (the fused runner calls the members
one after another; a member greedy selection picks twice still runs once), so selection keeps only member
sets whose estimated throughput reaches the limit. The build then measures the ensemble it made.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ensemble.standalone import VIEW_SETS, EnsembleError


@dataclass
class InferenceBudget:
    """Seconds per image of each candidate alone, and the images/s the ensemble must reach."""

    min_images_per_s: float
    seconds_per_image: dict[int, float]

    def images_per_s(self, indices: Iterable[int]) -> float:
        cost = sum(self.seconds_per_image[i] for i in set(indices))
        return float("inf") if cost == 0 else 1.0 / cost

    def allows(self, indices: Iterable[int]) -> bool:
        return self.images_per_s(indices) >= self.min_images_per_s


def images_per_second(predict: Callable[[np.ndarray], object], input_size: tuple[int, int],
                      n_images: int = 2048, repeats: int = 2, seed: int = 0) -> float:
    """Best-of-`repeats` images/s of `predict` on random uint8 images, after one warm-up call (tracing,
    oneDNN kernel selection)."""
    images = np.random.default_rng(seed).integers(0, 256, (n_images, *input_size, 3), dtype=np.uint8)
    predict(images[: min(n_images, 256)])
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        predict(images)
        best = min(best, time.perf_counter() - started)
    return n_images / best


def architecture(candidate) -> tuple:
    """What a member's inference cost depends on: the backbone and its head (not the weights)."""
    return candidate.config.backbone, candidate.config.head_units


def measure_candidates(candidates, store, cache: Path, tta_views: int, precision: str,
                       n_images: int = 2048, say: Callable[[str], None] = print) -> dict[int, float]:
    """Images/s of each candidate alone with `tta_views` views in `precision`, timed once per architecture."""
    import keras

    import backbones.preprocessing  # noqa: F401  (registers the members' custom layer)
    from ensemble.candidates import download
    from ensemble.standalone import TTARunner

    groups: dict[tuple, list[int]] = {}
    for index, candidate in enumerate(candidates):
        groups.setdefault(architecture(candidate), []).append(index)
    rates: dict[int, float] = {}
    for key, indices in groups.items():
        sample = candidates[indices[0]]
        path = download(store, sample, "model.keras", cache / f"timing_{sample.number:05d}.keras")
        model = keras.saving.load_model(path, safe_mode=True)
        runner = TTARunner([model], VIEW_SETS[tta_views], precision=precision)
        rate = images_per_second(runner.view_probs, runner.input_shape[:2], n_images)
        say(f"  budget: {key[0]} (head {key[1]}) {rate:,.0f} img/s alone with {tta_views} view(s), "
            f"{runner.precision} ({len(indices)} candidate(s))")
        rates.update({i: rate for i in indices})
    return rates


def make_budget(min_images_per_s: float, rates: dict[int, float]) -> InferenceBudget:
    """The budget, or one clear error when not even the fastest candidate alone reaches it."""
    fastest = max(rates.values())
    if fastest < min_images_per_s:
        raise EnsembleError(f"--min-images-per-s {min_images_per_s:g}: the fastest candidate predicts "
                            f"{fastest:,.0f} img/s alone; lower the limit, use fewer TTA views, or search "
                            "faster backbones (e.g. studies/fast.toml)")
    return InferenceBudget(min_images_per_s, {i: 1.0 / r for i, r in rates.items()})
