"""Hyperparameter search over backbones, augmentation and optimisation, on Optuna, with local worker processes
or Ray actors."""
