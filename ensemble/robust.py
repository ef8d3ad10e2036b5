"""The selection objective: clean validation, or clean validation plus its held-out-family shifted copy.

Every search trial predicts (besides the clean validation split) a copy of it shifted by the corruption
families it was NOT trained against (`data_pipeline.corrupt.shifted_copy`: each validation image once per
held-out family, kinds and severities balanced and seeded), and saves those probabilities
(`shifted_view_probs`). The ensemble is chosen on the same rows, so nothing is re-predicted and no test
image is ever seen:

- objective "robust" (default): the rows are the clean validation images followed by their shifted copies,
  weighted so that the clean half and the shifted half count equally: a score is the MEAN of the clean
  and the shifted validation score (accuracy, or log-loss), as the search's `robust` trial objective is.
  Equal halves rather than pooled rows, because the copy holds one image per held-out family: pooling
  would weight robustness by how many families are held out (the clean score would shrink to a third of
  the objective with two families). The same weights serve greedy selection (log-loss), top-K ranking (accuracy,
  then log-loss), combiner fitting
  (sample weights; an image and its copies always share a cross-validation fold, so no out-of-fold score
  is fit on its own image) and the `auto` combiner choice (out-of-fold accuracy, then log-loss).
- objective "clean": the clean validation rows only, unweighted; also what a study whose trials saved no
  shifted copy (older studies) falls back to.

Held-out families are unseen by the members' training augmentation, and the ensemble's choices are made
on their validation copy; the test copy of the same families (other random draws, another seed) measures
the result (`ensemble.build`, `common.robust_report`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.errors import EnsembleError
from common.metrics import accuracy, log_loss

OBJECTIVES = ("robust", "clean")


@dataclass(frozen=True)
class ValidationRows:
    """The validation rows choices are scored on: `n_clean` clean images, then their shifted copies.

    Example:
        >>> import numpy as np
        >>> rows = ValidationRows.robust(np.array([0, 1]), source=np.array([0, 0, 1, 1]))
        >>> rows.y.tolist(), rows.sample_weight.tolist(), rows.groups.tolist()
        ([0, 1, 0, 0, 1, 1], [1.0, 1.0, 0.5, 0.5, 0.5, 0.5], [0, 1, 0, 0, 1, 1])
    """

    objective: str
    y: np.ndarray  # labels of every row
    n_clean: int
    sample_weight: np.ndarray | None = None  # None: every row counts the same (clean objective)
    groups: np.ndarray | None = None  # the clean image each row comes from

    @classmethod
    def clean(cls, y_val: np.ndarray) -> "ValidationRows":
        return cls("clean", np.asarray(y_val, dtype=np.int64), len(y_val))

    @classmethod
    def robust(cls, y_val: np.ndarray, source: np.ndarray) -> "ValidationRows":
        """Clean rows (weight 1) and shifted rows (`source[j]`: the clean row copy j was made from; weight
        n_clean / n_shifted, so that each half weighs the same)."""
        y_val, source = np.asarray(y_val, dtype=np.int64), np.asarray(source, dtype=np.int64)
        if len(source) == 0 or source.min() < 0 or source.max() >= len(y_val):
            raise EnsembleError(f"shifted copy: source indices must lie in 0..{len(y_val) - 1}")
        n, s = len(y_val), len(source)
        weight = np.concatenate([np.ones(n), np.full(s, n / s)])
        return cls("robust", np.concatenate([y_val, y_val[source]]), n, weight,
                   np.concatenate([np.arange(n), source]))

    def stack(self, clean: np.ndarray, shifted: np.ndarray | None) -> np.ndarray:
        """One candidate's (or member set's) probabilities on these rows."""
        if self.objective == "clean":
            return clean
        stacked = np.concatenate([clean, shifted])
        if len(stacked) != len(self.y):
            raise EnsembleError(f"{len(stacked)} rows of probabilities for {len(self.y)} validation rows")
        return stacked

    def heldout(self) -> "ValidationRows":
        """The shifted rows alone, each still grouped with the clean image it was made from."""
        if self.objective != "robust":
            raise EnsembleError("the clean objective's validation rows have no shifted copy")
        n = self.n_clean
        return ValidationRows(self.objective, self.y[n:], 0, self.sample_weight[n:], self.groups[n:])

    def scores(self, probs: np.ndarray, prefix: str = "val") -> dict[str, float]:
        """Accuracy and log-loss on the clean rows, the shifted rows and the objective (their mean)."""
        n = self.n_clean
        out = {f"{prefix}_accuracy": accuracy(probs[:n], self.y[:n]),
               f"{prefix}_log_loss": log_loss(probs[:n], self.y[:n])}
        if self.objective == "robust":
            out[f"{prefix}_shifted_accuracy"] = accuracy(probs[n:], self.y[n:])
            out[f"{prefix}_shifted_log_loss"] = log_loss(probs[n:], self.y[n:])
        out[f"{prefix}_objective_accuracy"] = accuracy(probs, self.y, self.sample_weight)
        out[f"{prefix}_objective_log_loss"] = log_loss(probs, self.y, self.sample_weight)
        return out
