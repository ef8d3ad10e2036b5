"""The trial's learning-rate schedule: warm-up then cosine decay, whose end moves to where the time runs out.

A trial cut short by its time budget or the study's deadline used to stop part-way down the cosine, at a high
learning rate, and keep a model far from converged (a 24-epoch warm start stopped after 13 epochs scored 1.6
points below its full run). `AnnealToTime` instead re-plans at each epoch boundary how many epochs fit, and maps
the steps left onto the rest of the curve, so the learning rate stays continuous and reaches its floor by the
last epoch that runs. While everything fits, the mapping is the identity and the schedule is Keras'
`CosineDecay`, step for step.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from keras import ops


@keras.saving.register_keras_serializable(package="cellsearch")
class AnnealToTime(keras.optimizers.schedules.CosineDecay):
    """`CosineDecay` (with warm-up) evaluated at a remapped step: `base + (step - anchor) * stretch`.

    The three numbers are optimizer variables (`track` adds them), so a compiled train step, JAX's included,
    reads their current values; `end_at` changes them between epochs.

    >>> import keras
    >>> schedule = AnnealToTime(1e-5, decay_steps=90, warmup_target=1e-3, warmup_steps=10, alpha=0.01)
    >>> optimizer = keras.optimizers.Adam(schedule); schedule.track(optimizer)
    >>> schedule.end_at(now=50, end=70)   # at step 50 only 20 more steps fit: the rest of the curve in 20
    >>> round(float(schedule(70)), 8) == round(float(schedule(100)), 8) == 1e-5
    True
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._curve_end = self.warmup_steps + self.decay_steps  # the step at which the curve reaches its floor
        self.end = self._curve_end  # the step at which training now reaches it
        self._mapping: tuple | None = None

    def track(self, optimizer) -> None:
        """Keep the step mapping in `optimizer`'s variables (identity until `end_at` moves the end)."""
        start = (("anneal_anchor", 0.0), ("anneal_base", 0.0), ("anneal_stretch", 1.0))
        self._mapping = tuple(optimizer.add_variable((), initializer=keras.initializers.Constant(value),
                                                     dtype="float32", name=name) for name, value in start)

    def __call__(self, step):
        if self._mapping is None:
            return super().__call__(step)
        anchor, base, stretch = self._mapping
        return super().__call__(base + (ops.cast(step, "float32") - anchor) * stretch)

    def _curve_step(self, step: int) -> float:
        anchor, base, stretch = (float(np.asarray(variable)) for variable in self._mapping)
        return base + (step - anchor) * stretch

    def end_at(self, now: int, end: int) -> None:
        """From step `now` on, reach the curve's floor at step `end` (at most its original end)."""
        end = min(max(end, now + 1), self._curve_end)
        if end == self.end:
            return
        reached = self._curve_step(now)
        for variable, value in zip(self._mapping, (now, reached, (self._curve_end - reached) / (end - now))):
            variable.assign(value)
        self.end = end


def epochs_that_fit(seconds_left: float, epoch_s: float, whole: bool) -> int:
    """Epochs of `epoch_s` seconds that run in `seconds_left`: only whole ones (`whole`, a deadline that must
    not be passed), or up to the first one that passes it (a time budget, checked after each epoch)."""
    if epoch_s <= 0:
        return 0
    return max(0, math.floor(seconds_left / epoch_s) if whole else math.ceil(seconds_left / epoch_s))
