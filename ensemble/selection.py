"""Choosing members from the study's trials, on validation predictions only.

- `select_top_k`: the K best trials by validation accuracy (ties: lower validation log-loss).
- `greedy_selection`: Caruana et al. (2004) forward selection WITH replacement, as auto-sklearn builds its
  ensembles: start from the best single model, repeatedly add the candidate (possibly one already in)
  whose addition most lowers the validation log-loss of the running average; the number of times a
  member was picked is its weight. Log-loss rather than accuracy because it is smooth: on a
  validation set of a thousand images accuracy ties constantly and the search would stall at random.
  Each candidate is temperature-scaled on validation first (`calibrated`): raw log-loss mostly measures
  confidence, so label-smoothed trials (under-confident by design) lost to worse but sharper ones. Measured
  on the 60-minute default search: uncalibrated selection started from the best trial (0.985 test) and put
  its other 24 picks on one weaker trial; the resulting ensemble scored 0.979.

Both guard against near-identical members (two trials with the same configuration, or a warm-started
copy): a candidate whose validation predictions agree on >= 99.5% of images AND whose probabilities
correlate >= 0.99 with an already chosen member adds cost and no diversity, so it only gets in if it
scores strictly better than simply up-weighting its twin (greedy) / than leaving it out (top-K).

All three take `sample_weight` per validation row, which is how the robust objective enters: the rows
are the clean validation images followed by their held-out-family copies, weighted so that each half
counts one half (see `ensemble.robust.ValidationRows`); without weights, every row counts the same.

Both accept an inference budget (`ensemble.budget.InferenceBudget`, anything with `allows(indices)`):
a candidate that would push the ensemble below the required images/s is passed over, so top-K takes the
best K that fit and greedy selection starts from the best candidate that fits on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from common.errors import ConfigError, EnsembleError
from common.metrics import accuracy, log_loss
from ensemble.combiners import fit_temperature
from ensemble.standalone import apply_temperature

AGREEMENT_THRESHOLD = 0.995
CORRELATION_THRESHOLD = 0.99


def similarity(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(fraction of images with the same predicted class, Pearson correlation of the probabilities)."""
    agreement = float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))
    fa, fb = a.ravel() - a.mean(), b.ravel() - b.mean()
    denominator = np.sqrt((fa @ fa) * (fb @ fb))
    correlation = float(fa @ fb / denominator) if denominator > 0 else 1.0
    return agreement, correlation


def near_identical(a: np.ndarray, b: np.ndarray, agreement: float = AGREEMENT_THRESHOLD,
                   correlation: float = CORRELATION_THRESHOLD) -> bool:
    agree, corr = similarity(a, b)
    return agree >= agreement and corr >= correlation


class Budget(Protocol):
    def allows(self, indices: Sequence[int]) -> bool: ...


@dataclass
class Selection:
    """Chosen candidate indices (distinct, in order of first pick), their weights (sum 1), and a log."""

    indices: list[int]
    weights: list[float]
    counts: list[int] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


def rank_candidates(val_probs: list[np.ndarray], y: np.ndarray, sample_weight: np.ndarray | None = None) -> list[int]:
    """Candidate indices, best first: validation accuracy, then log-loss, then index (determinism)."""
    w = sample_weight
    return sorted(range(len(val_probs)),
                  key=lambda i: (-accuracy(val_probs[i], y, w), log_loss(val_probs[i], y, w), i))


def select_top_k(val_probs: list[np.ndarray], y: np.ndarray, k: int, budget: Budget | None = None,
                 sample_weight: np.ndarray | None = None) -> Selection:
    """Up to `k` best candidates, uniform weights, skipping near-duplicates that do not lower log-loss and
    candidates the budget cannot afford."""
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    chosen: list[int] = []
    log: list[str] = []
    over_budget: list[int] = []
    for index in rank_candidates(val_probs, y, sample_weight):
        if len(chosen) == k:
            break
        if budget is not None and not budget.allows(chosen + [index]):
            over_budget.append(index)
            continue
        twins = [c for c in chosen if near_identical(val_probs[index], val_probs[c])]
        if twins:
            without = log_loss(np.mean([val_probs[c] for c in chosen], axis=0), y, sample_weight)
            with_it = log_loss(np.mean([val_probs[c] for c in chosen + [index]], axis=0), y, sample_weight)
            if with_it >= without:
                log.append(f"skipped candidate {index}: near-identical to {twins[0]} and no log-loss gain")
                continue
        chosen.append(index)
    if over_budget:
        shown = ", ".join(map(str, over_budget[:5])) + (", ..." if len(over_budget) > 5 else "")
        log.append(f"passed over {len(over_budget)} candidate(s) that did not fit the inference budget: {shown}")
    return Selection(chosen, [1.0 / len(chosen)] * len(chosen), [1] * len(chosen), log)


def calibrated(val_probs: list[np.ndarray], y: np.ndarray, sample_weight: np.ndarray | None = None
               ) -> list[np.ndarray]:
    """Each candidate's probabilities at its own validation-fitted temperature (argmax unchanged)."""
    return [apply_temperature(p, fit_temperature(p, y, sample_weight)) for p in val_probs]


def greedy_selection(val_probs: list[np.ndarray], y: np.ndarray, max_members: int, n_iterations: int = 25,
                     tolerance: float = 1e-6, budget: Budget | None = None,
                     sample_weight: np.ndarray | None = None) -> Selection:
    """Caruana forward selection with replacement (see module doc), stopping when no pick improves.

    `max_members` caps the DISTINCT members (inference cost grows with them, not with the weights).
    """
    if max_members < 1:
        raise ConfigError(f"max_members must be >= 1, got {max_members}")
    w = sample_weight
    val_probs = calibrated(val_probs, y, w)
    affordable = [i for i in rank_candidates(val_probs, y, w) if budget is None or budget.allows([i])]
    if not affordable:
        raise EnsembleError("no candidate fits the inference budget on its own")
    best = affordable[0]
    counts = {best: 1}
    total = val_probs[best].astype(np.float64).copy()
    current = log_loss(total, y, w)
    log = [f"start with candidate {best} (val log-loss {current:.4f})"]
    for step in range(1, n_iterations):
        options = list(counts) if len(counts) >= max_members else range(len(val_probs))
        if budget is not None:
            options = [i for i in options if i in counts or budget.allows(list(counts) + [i])]
        n = sum(counts.values()) + 1
        scores = {i: log_loss((total + val_probs[i]) / n, y, w) for i in options}
        for i in [i for i in scores if i not in counts]:
            twins = [c for c in counts if near_identical(val_probs[i], val_probs[c])]
            if twins and scores[i] >= min(scores.get(t, np.inf) for t in twins) - tolerance:
                del scores[i]  # up-weighting its twin does as well: no new member
        pick = min(scores, key=lambda i: (scores[i], i))
        if scores[pick] > current - tolerance:
            log.append(f"step {step}: no candidate lowers val log-loss below {current:.4f}; stop")
            break
        counts[pick] = counts.get(pick, 0) + 1
        total += val_probs[pick]
        current = scores[pick]
        log.append(f"step {step}: add candidate {pick} -> val log-loss {current:.4f}")
    indices = list(counts)
    total_count = sum(counts.values())
    return Selection(indices, [counts[i] / total_count for i in indices], [counts[i] for i in indices], log)
