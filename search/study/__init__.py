"""What a study is: its spec and presets, the search space, the goals, the Optuna study and where it lives."""
