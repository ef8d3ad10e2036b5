"""Executors run a prepared study's trials in parallel: `local` worker processes or Ray Tune."""
