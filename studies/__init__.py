"""The shipped study specs (`*.toml`), package data found with importlib.resources (see search.study.spec)."""
