"""Hyperparameter search over backbones, augmentation and optimisation, on Optuna (and Ray Tune)."""
