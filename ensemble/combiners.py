"""Combiners: scikit-learn estimators that turn members' probabilities into the ensemble's.

Every combiner takes X of shape (N, M, C) (N images, M members, C classes: each member's TTA-averaged
probabilities) so that the sample axis comes first and scikit-learn's `cross_val_predict`, `clone` and
fold splitters work on it unchanged. They are fit on the VALIDATION split only; the test split is never
seen by `fit` (build.py passes val arrays only, and the tests check it).

- `SoftVoting`: a fixed weighted mean (uniform, or e.g. greedy-selection counts). Nothing to fit.
- `WeightedVoting`: weights on the simplex that minimise validation log-loss (softmax-parametrised, so
  they stay >= 0 and sum to 1, optimised with L-BFGS).
- `Stacking`: multinomial logistic regression on the members' log-probabilities (log, because a
  log-linear pool of probabilities is what a linear model can express; raw probabilities saturate).
- `GatedCombiner`: any of them over all members but the last, mixed with the last (a gated clean member,
  ensemble.gate) at a fixed weight where its gate lets it vote, its probabilities temperature-scaled first.

`calibrate=True` adds temperature scaling: one scalar T fit by minimising the log-loss of out-of-fold
combined probabilities on validation (out-of-fold, so a fitted combiner's in-sample over-confidence
does not bias T). `params()` returns the plain numbers the standalone runtime needs (see standalone.py).

`fit` takes optional `sample_weight` and `groups`: under the robust objective the build fits on the
validation images plus their held-out-family shifted copies (ensemble.robust), each half weighing the
same, and an image and its copies always fall in the same cross-validation fold (otherwise out-of-fold
scores would leak). The folds are scikit-learn's `StratifiedGroupKFold`, shuffled with each combiner's
`random_state` (`ensemble.build --seed`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from common.errors import ConfigError, DataError
from common.metrics import log_loss
from ensemble.standalone import _LOG_EPS, abstains, apply_temperature, combine

COMBINERS = ("vote", "weighted", "stacking")


def check_member_probs(X: Any, n_members: int | None = None) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 3:
        raise DataError(f"expected member probabilities of shape (N, M, C), got {X.shape}")
    if n_members is not None and X.shape[1] != n_members:
        raise DataError(f"expected {n_members} members, got {X.shape[1]}")
    return X


def folds(y: np.ndarray, groups: np.ndarray | None = None, random_state: int = 0, n_splits: int = 5
          ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs of shuffled `StratifiedGroupKFold` folds: the rows of a group (an image and
    its shifted copies) share a fold; without groups every row is its own group.

    At most as many folds as the rarest class has groups, so that every class is in every fold; if some class
    has a single group, no split can do that, and the folds are plain shuffled group folds instead. The
    folds of the same rows are computed once per process (read-only arrays): every combiner, and every
    fold's temperature fit, asks for them again, and the splitter's greedy search takes a third of a second
    for a few thousand rows."""
    y = np.asarray(y, dtype=np.int64)
    groups = np.arange(len(y)) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    return list(_folds(y.tobytes(), groups.astype(np.int64).tobytes(), random_state, n_splits))


@functools.lru_cache(maxsize=32)
def _folds(y_bytes: bytes, groups_bytes: bytes, random_state: int, n_splits: int
           ) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    y, groups = np.frombuffer(y_bytes, dtype=np.int64), np.frombuffer(groups_bytes, dtype=np.int64)
    unique, first = np.unique(groups, return_index=True)
    counts = np.bincount(y[first])
    smallest = int(counts[counts > 0].min())
    if smallest >= 2:
        n_splits, strata = min(n_splits, smallest), y
    else:
        n_splits, strata = min(n_splits, len(unique)), np.zeros_like(y)
    if n_splits < 2:
        raise DataError(f"cross-validation needs at least 2 images (groups), got {len(unique)}")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=random_state)
    pairs = tuple(splitter.split(np.zeros(len(y)), strata, groups))
    for pair in pairs:
        for part in pair:
            part.flags.writeable = False
    return pairs


def fit_temperature(probs: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """The T in [0.05, 20] minimising the log-loss of softmax(log p / T) (1-D bounded search on log T)."""
    loss = lambda t: log_loss(apply_temperature(probs, t), y, sample_weight)  # noqa: E731
    result = minimize_scalar(lambda log_t: loss(float(np.exp(log_t))), bounds=(np.log(0.05), np.log(20.0)),
                             method="bounded")
    temperature = float(np.exp(result.x))
    # keep T = 1 unless scaling actually helps (a flat objective would otherwise pick an arbitrary T)
    return temperature if loss(temperature) < loss(1.0) - 1e-9 else 1.0


class _Combiner(ClassifierMixin, BaseEstimator):
    """Shared fit/predict logic: subclasses implement `_fit_base`, `_base_params`."""

    kind = ""
    random_state = 0  # what combiners pickled before the parameter existed report (their folds were seed 0)

    def fit(self, X, y, sample_weight=None, groups=None):
        # One BLAS thread: these matrices are tiny, and on a busy 2-core machine OpenBLAS threads
        # spin-waiting for each other made a logistic-regression fit 10x slower, not faster.
        with threadpool_limits(1):
            return self._fit(X, y, sample_weight, groups)

    def _fit(self, X, y, sample_weight, groups):
        X = check_member_probs(X)
        y = np.asarray(y, dtype=np.int64)
        if len(X) != len(y):
            raise DataError(f"{len(X)} samples but {len(y)} labels")
        weight = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weight.shape != (len(y),) or np.any(weight < 0) or weight.sum() <= 0:
            raise DataError(f"sample_weight must be {len(y)} non-negative numbers, not all 0")
        self.n_members_, self.n_classes_ = X.shape[1], X.shape[2]
        self.classes_ = np.arange(self.n_classes_)
        self.n_fit_samples_ = len(y)
        self.temperature_ = 1.0
        if getattr(self, "calibrate", False) and len(y) >= 4:
            uncalibrated = clone(self).set_params(calibrate=False)
            oof = cross_val_predict(uncalibrated, X, y, cv=folds(y, groups, self.random_state),
                                    method="predict_proba", params=_fold_params(weight, groups))
            self.temperature_ = fit_temperature(oof, y, weight)
        self._fit_base(X, y, weight)
        return self

    def _fit_base(self, X: np.ndarray, y: np.ndarray, weight: np.ndarray) -> None:
        raise NotImplementedError

    def _base_params(self) -> dict[str, Any]:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """JSON-ready numbers that `standalone.combine` applies identically to `predict_proba`."""
        check_is_fitted(self, "n_members_")
        return {"kind": self.kind, **self._base_params(), "temperature": float(self.temperature_)}

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self, "n_members_")
        X = check_member_probs(X, self.n_members_)
        return combine(X, self.params()).astype(np.float64)

    def predict(self, X) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1)


class SoftVoting(_Combiner):
    """Weighted mean of member probabilities with given weights (None: uniform); normalised to sum 1."""

    kind = "vote"

    def __init__(self, weights=None, calibrate: bool = False, random_state: int = 0):
        self.weights = weights
        self.calibrate = calibrate
        self.random_state = random_state

    def _fit_base(self, X, y, weight):
        weights = np.ones(X.shape[1]) if self.weights is None else np.asarray(self.weights, dtype=np.float64)
        if weights.shape != (X.shape[1],) or np.any(weights < 0) or weights.sum() <= 0:
            raise DataError(f"weights must be {X.shape[1]} non-negative numbers, not all 0; got {self.weights}")
        self.weights_ = weights / weights.sum()

    def _base_params(self):
        return {"weights": [float(w) for w in self.weights_]}


class WeightedVoting(_Combiner):
    """Simplex weights minimising validation log-loss of the weighted mean (Caruana-style, but continuous).

    Weights are softmax(theta); `l2` pulls theta to 0 (uniform weights) so a tiny validation set does not
    put all the weight on one member by chance.
    """

    kind = "weighted"

    def __init__(self, l2: float = 1e-3, calibrate: bool = False, random_state: int = 0):
        self.l2 = l2
        self.calibrate = calibrate
        self.random_state = random_state

    def _fit_base(self, X, y, weight):
        picked = X[np.arange(len(y)), :, y]  # (N, M): each member's probability of the true class
        share = weight / weight.sum()

        def objective(theta):
            w = np.exp(theta - theta.max())
            w /= w.sum()
            p = np.clip(picked @ w, _LOG_EPS, None)
            loss = -share @ np.log(p) + self.l2 * np.sum(theta ** 2)
            # gradient through the softmax: dL/dtheta = w * (g - w.g) with g = dL/dw
            g = -share @ (picked / p[:, None])
            return loss, w * (g - w @ g) + 2 * self.l2 * theta

        result = minimize(objective, np.zeros(X.shape[1]), jac=True, method="L-BFGS-B")
        w = np.exp(result.x - result.x.max())
        self.weights_ = w / w.sum()

    def _base_params(self):
        return {"weights": [float(w) for w in self.weights_]}


class Stacking(_Combiner):
    """Logistic-regression meta-learner on standardised, concatenated member log-probabilities (N, M*C).

    Standardising matters: sharp members have log-probabilities from 0 down to -16, and an L2 penalty on
    unscaled features mostly shrinks the informative small-range ones. The scaler is folded into the
    exported coefficients, so `params()` stays a plain linear map of the raw log-probabilities.
    Newton-Cholesky: a few exact steps on M*C*C parameters instead of hundreds of L-BFGS iterations.
    """

    kind = "stacking"

    def __init__(self, C: float = 1.0, calibrate: bool = False, max_iter: int = 2000, random_state: int = 0):
        self.C = C
        self.calibrate = calibrate
        self.max_iter = max_iter
        self.random_state = random_state

    @staticmethod
    def features(X: np.ndarray) -> np.ndarray:
        return np.log(np.clip(X, _LOG_EPS, 1.0)).reshape(len(X), -1)

    def _fit_base(self, X, y, weight):
        self.meta_learner_ = make_pipeline(StandardScaler(),
                                           LogisticRegression(C=self.C, max_iter=self.max_iter,
                                                              solver="newton-cholesky"))
        # weights as given: LogisticRegression sums weighted losses, so a weight-0 row changes nothing and
        # a clean image keeps weight 1 however many shifted copies are added
        self.meta_learner_.fit(self.features(X), y, standardscaler__sample_weight=weight,
                               logisticregression__sample_weight=weight)
        scaler, regression = self.meta_learner_[0], self.meta_learner_[-1]
        classes = regression.classes_
        coef = regression.coef_ / scaler.scale_
        intercept = regression.intercept_ - coef @ scaler.mean_
        if len(classes) != X.shape[2] or coef.shape[0] == 1:
            # a class absent from validation (or a binary task): expand to one row per class, absent
            # classes get a very low score, so the numbers apply like the other combiners'
            full_coef = np.zeros((X.shape[2], coef.shape[1]))
            full_intercept = np.full(X.shape[2], -30.0)
            if coef.shape[0] == 1:
                full_coef[classes[1]], full_intercept[classes[1]] = coef[0], intercept[0]
                full_intercept[classes[0]] = 0.0
            else:
                full_coef[classes], full_intercept[classes] = coef, intercept
            coef, intercept = full_coef, full_intercept
        self.coef_, self.intercept_ = coef, intercept

    def _base_params(self):
        return {"coef": self.coef_.tolist(), "intercept": self.intercept_.tolist(), "features": "log_probs"}


class GatedCombiner(_Combiner):
    """`base` fitted on every member but the last, its probabilities mixed with the last member's (the gated
    clean member, `ensemble.gate`) as (1 - weight) * base + weight * last where the last votes, and left as
    they are where its gate abstains with a uniform vote (`standalone.mix_gated`).

    Example:
        >>> import numpy as np
        >>> X = np.array([[[0.9, 0.1], [0.5, 0.5]], [[0.4, 0.6], [0.0, 1.0]]])  # the gate abstains on image 0
        >>> gated = GatedCombiner(SoftVoting(), weight=0.25).fit(X, np.array([0, 1]))
        >>> gated.predict_proba(X).round(3).tolist(), gated.kind, gated.n_members_
        ([[0.9, 0.1], [0.3, 0.7]], 'vote', 2)
    """

    def __init__(self, base: Any = None, weight: float = 0.25):
        self.base = base
        self.weight = weight

    def fit(self, X, y, sample_weight=None, groups=None) -> "GatedCombiner":  # the base calibrates itself
        X = check_member_probs(X)
        if X.shape[1] < 2:
            raise DataError("a gated combiner needs the gated member and at least one other")
        self.base_ = clone(self.base).fit(X[:, :-1], y, sample_weight=sample_weight, groups=groups)
        self.gated_temperature_ = fit_gated_temperature(X[:, -1], y, sample_weight)
        self.n_members_, self.n_classes_ = X.shape[1], X.shape[2]
        self.classes_ = np.arange(self.n_classes_)
        self.n_fit_samples_ = self.base_.n_fit_samples_
        if hasattr(self.base_, "weights_"):
            self.weights_ = np.append((1 - self.weight) * np.asarray(self.base_.weights_), self.weight)
        return self

    @property
    def kind(self) -> str:
        return self.base.kind

    @property
    def random_state(self) -> int:
        return self.base.random_state

    def params(self) -> dict[str, Any]:
        """The base combiner's numbers plus `gated_weight` and `gated_temperature` (see `standalone.combine`)."""
        check_is_fitted(self, "n_members_")
        return {**self.base_.params(), "gated_weight": float(self.weight),
                "gated_temperature": float(self.gated_temperature_)}


def fit_gated_temperature(gated: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """The temperature that calibrates a gated member's probabilities on the rows it votes on (`fit_temperature`),
    so that its weight in the mix is the share of the vote it gets: a label-smoothed member is under-confident,
    and mixed unscaled into a sharpened ensemble it would count for less than its weight."""
    voted = ~abstains(gated)[:, 0]
    if not voted.any():
        return 1.0
    return fit_temperature(gated[voted], y[voted], None if sample_weight is None else sample_weight[voted])


def make_combiner(kind: str, *, calibrate: bool = False, vote_weights=None, random_state: int = 0) -> _Combiner:
    """The combiner named `kind`; `random_state` shuffles its cross-validation folds (temperature, scoring)."""
    if kind == "vote":
        return SoftVoting(weights=vote_weights, calibrate=calibrate, random_state=random_state)
    if kind == "weighted":
        return WeightedVoting(calibrate=calibrate, random_state=random_state)
    if kind == "stacking":
        return Stacking(calibrate=calibrate, random_state=random_state)
    raise ConfigError(f"unknown combiner {kind!r} (known: {', '.join(COMBINERS)})")


def _fold_params(sample_weight, groups) -> dict:
    """fit() keyword arguments that cross_val_predict slices per fold (both are per-row arrays)."""
    params = {} if sample_weight is None else {"sample_weight": np.asarray(sample_weight, dtype=np.float64)}
    return params if groups is None else {**params, "groups": np.asarray(groups)}


def out_of_fold_proba(combiner: _Combiner, X: np.ndarray, y: np.ndarray, sample_weight=None,
                      groups=None) -> np.ndarray:
    """Validation probabilities of `combiner` where each image is scored by a combiner not fit on it
    (nor on any image of its group).

    This is how stacking (and the fitted weights) are scored on validation: never on their own training
    predictions, and never on test data.
    """
    if isinstance(combiner, SoftVoting) and not combiner.calibrate:
        return clone(combiner).fit(X, y).predict_proba(X)  # nothing is fit on the labels
    params = _fold_params(sample_weight, groups)
    with threadpool_limits(1):
        return cross_val_predict(clone(combiner), X, y, cv=folds(y, groups, combiner.random_state),
                                 method="predict_proba", params=params)
