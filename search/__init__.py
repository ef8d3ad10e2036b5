"""Hyperparameter search over backbones, augmentation and optimisation, on Optuna (and Ray Tune)."""

import warnings

# Heartbeats, retries and grouped TPE are "experimental" in Optuna's terms but are exactly what a
# fault-tolerant parallel search needs; their warnings would only bury real messages.
warnings.filterwarnings("ignore", message=r".*(is experimental|experimental feature)")
