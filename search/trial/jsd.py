"""AugMix's Jensen-Shannon consistency loss (Hendrycks et al. 2020, "AugMix", section 3).

The training stream of a consistency policy yields each batch as the clean images followed by JSD_VIEWS
augmented views of them, stacked on the batch axis, with the clean batch's labels
(`data_pipeline.augment.build_augmenter(..., stack_views=True)`). `JSDTrainer` wraps the classifier for
`fit` only: one forward pass over the stacked batch (as the paper's code, so batch normalisation sees all
views), loss = the compiled loss (cross-entropy) on the clean view + JSD_WEIGHT x JSD(p_clean, p_aug1,
p_aug2). Validation batches are plain and get the plain loss; the classifier's own weights are trained,
so it is what gets saved and predicts, with no trace of the wrapper.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from data_pipeline.augment import JSD_VIEWS

JSD_WEIGHT = 12.0  # lambda of the paper
_EPSILON = 1e-7    # the paper clamps the mixture to [1e-7, 1] before its log


def jensen_shannon(*probabilities: Any) -> Any:
    """Mean over the batch of the generalised Jensen-Shannon divergence of k class distributions (B,C):
    (1/k) sum_i KL(p_i || M), M = mean_i p_i; 0 when all are equal, > 0 otherwise (natural log)."""
    probabilities = [ops.cast(p, "float32") for p in probabilities]
    log_mixture = ops.log(ops.clip(sum(probabilities) / len(probabilities), _EPSILON, 1.0))
    divergences = [ops.sum(p * (ops.log(ops.clip(p, _EPSILON, 1.0)) - log_mixture), axis=-1) for p in probabilities]
    return ops.mean(sum(divergences)) / len(probabilities)


class JSDTrainer(keras.Model):
    """Trains `classifier` (softmax outputs) on stacked (clean, augmented...) batches with the JSD loss."""

    def __init__(self, classifier: keras.Model, weight: float = JSD_WEIGHT, views: int = 1 + JSD_VIEWS,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.classifier = classifier
        self.weight = weight
        self.views = views

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        return self.classifier(inputs, training=training)

    def compute_loss(self, x: Any = None, y: Any = None, y_pred: Any = None, sample_weight: Any = None,
                     training: bool = True) -> Any:
        if not training:  # validation batches; also the stacked batch Keras builds JAX/PyTorch metrics with
            return super().compute_loss(x, y, y_pred[: ops.shape(y)[0]], sample_weight, training=training)
        views = ops.split(y_pred, self.views, axis=0)
        loss = super().compute_loss(x, y, views[0], sample_weight, training=training)
        return loss + ops.cast(self.weight * jensen_shannon(*views), loss.dtype)

    def compute_metrics(self, x: Any, y: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        """Metrics on the clean view (the first rows) only."""
        return super().compute_metrics(x, y, y_pred[: ops.shape(y)[0]], sample_weight)
