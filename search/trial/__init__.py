"""One trial: its data, training (with the JSD consistency loss), TTA views, and the Optuna objective."""
