"""An inference budget for member selection: `--min-images-per-s`, as AutoGluon's `infer_limit` does.

Accuracy favours big members and many TTA views; a lab's throughput requirement caps both. Rather than
guess from parameter counts, each candidate's images/s with the ensemble's TTA views and precision is
measured on this machine by timing the trial's own saved model in the fused TTA runner on random images,
once per architecture (trials that share backbone and head cost the same whatever their weights). The
fused runner calls the members one after another inside one graph, after a per-call part they share
(casting, making the views, copying out), so an ensemble's seconds per image are that shared part plus
the sum of its distinct members' own parts (a member greedy selection picks twice still runs once). Both
come from timing the architecture once alone and once as two copies. Selection keeps only member sets
whose estimated throughput reaches the limit; the build then measures the ensemble it made.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ensemble.standalone import VIEW_SETS
from common.errors import EnsembleError


@dataclass(frozen=True)
class MemberCost:
    """Seconds per image of one architecture in the fused runner: its own part and the per-call part."""

    member: float
    shared: float

    @classmethod
    def from_timings(cls, one: float, two: float) -> "MemberCost":
        """From seconds per image with one copy and with two; the own part is kept within 75-100% of the
        single-copy time so that timing noise cannot make a member look nearly free."""
        member = min(max(two - one, 0.75 * one), one)
        return cls(member, one - member)


@dataclass
class InferenceBudget:
    """Each candidate's cost, and the images/s the ensemble must reach."""

    min_images_per_s: float
    costs: dict[int, MemberCost]

    def images_per_s(self, indices: Iterable[int]) -> float:
        chosen = [self.costs[i] for i in set(indices)]
        if not chosen:
            return float("inf")
        return 1.0 / (max(c.shared for c in chosen) + sum(c.member for c in chosen))

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
                       n_images: int = 1024, say: Callable[[str], None] = print) -> dict[int, MemberCost]:
    """The cost of each candidate with `tta_views` views in `precision`, timed once per architecture."""
    import backbones.preprocessing  # noqa: F401  (registers the members' custom layer)
    from ensemble.candidates import download
    from ensemble.standalone import TTARunner, load_member_models

    groups: dict[tuple, list[int]] = {}
    for index, candidate in enumerate(candidates):
        groups.setdefault(architecture(candidate), []).append(index)
    costs: dict[int, MemberCost] = {}
    for key, indices in groups.items():
        sample = candidates[indices[0]]
        name = f"timing_{sample.number:05d}.keras"
        download(store, sample, "model.keras", cache / name)
        model = load_member_models(cache, {"members": [{"file": name}]}, custom_layer=False)[0]
        seconds = []
        for copies in (1, 2):
            runner = TTARunner([model] * copies, VIEW_SETS[tta_views], precision=precision)
            seconds.append(1.0 / images_per_second(runner.view_probs, runner.input_shape[:2], n_images))
        cost = MemberCost.from_timings(*seconds)
        say(f"  budget: {key[0]} (head {key[1]}) {1 / seconds[0]:,.0f} img/s alone with {tta_views} view(s), "
            f"{runner.precision}; {1e6 * cost.member:,.0f} us/img per member + {1e6 * cost.shared:,.0f} shared "
            f"({len(indices)} candidate(s))")
        costs.update({i: cost for i in indices})
    return costs


def make_budget(min_images_per_s: float, costs: dict[int, MemberCost]) -> InferenceBudget:
    """The budget, or one clear error when not even the fastest candidate alone reaches it."""
    budget = InferenceBudget(min_images_per_s, costs)
    fastest = max(budget.images_per_s([i]) for i in costs)
    if fastest < min_images_per_s:
        raise EnsembleError(f"--min-images-per-s {min_images_per_s:g}: the fastest candidate predicts "
                            f"{fastest:,.0f} img/s alone; lower the limit, use fewer TTA views, or search "
                            "faster backbones (e.g. studies/fast.toml)")
    return budget
