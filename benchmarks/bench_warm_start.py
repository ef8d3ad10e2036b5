"""One of a preset's warm starts under a few settings side by side: what a hyperparameter buys in the time a trial has.

Each arm trains the preset's warm start with one `NAME=VALUE` override (several joined by commas) under the same
time budget (the trainer anneals to the epochs that fit, as in a search), all arms at once, each on its own core as
the search's workers run, so they share the machine's load. Each row: epochs run, training seconds, and the TTA
accuracy on the clean validation and test splits and on the held-out-family validation copy.

    python benchmarks/bench_warm_start.py --study quick --budget 450 --seed 0 augment_strength=0.8 augment_strength=0.6
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from bench_anneal import result, start_pinned  # it also puts the repository on sys.path

from search.execution.devices_plan import usable_cores

TRIAL = """
import json, sys
from search.execution.devices import configure_backend
configure_backend(1)
from bench_backends import warm_start_config
config = warm_start_config({overrides}, study={study!r})
config.time_budget_s, config.seed = {budget}, {seed}
from search.trial.trainer import train_trial
print("RESULT " + json.dumps(train_trial(config, sys.argv[1]).metrics))
"""
COLUMNS = ("epochs_run", "train_seconds", "val_accuracy_tta", "test_accuracy_tta", "val_corrupted_accuracy_tta")


def parse_override(text: str) -> dict:
    """`augment_strength=0.6,dropout=0.2` as a dict, values read as JSON where they parse (else kept as text)."""
    pairs = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"bench_warm_start: expected NAME=VALUE, got {item!r}")
        try:
            pairs[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            pairs[name.strip()] = value
    return pairs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arms", nargs="+", help="one NAME=VALUE[,NAME=VALUE] override per arm")
    parser.add_argument("--study", default="quick", help="the preset whose first warm start is trained")
    parser.add_argument("--budget", type=float, default=450.0, help="each arm's time budget in seconds")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    arms = {text: parse_override(text) for text in args.arms}
    folder = Path(tempfile.mkdtemp(prefix="bench_warm_start_"))
    cores = usable_cores()
    if len(arms) > len(cores):
        raise SystemExit(f"bench_warm_start: {len(arms)} arms need as many cores; this machine has {len(cores)}")
    print(f"{args.study} warm start 0, seed {args.seed}, time budget {args.budget:.0f} s, one core per arm, "
          f"{os.environ.get('KERAS_BACKEND', 'tensorflow')}")
    print("| arm | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    running = {text: start_pinned(TRIAL.format(overrides=repr(overrides), study=args.study, budget=args.budget,
                                               seed=args.seed), cores[i], folder, f"arm{i}")
               for i, (text, overrides) in enumerate(arms.items())}
    for i, (text, process) in enumerate(running.items()):
        row = result(process, folder / f"arm{i}.log")
        cells = [f"failed: {row['error']}"] if "error" in row else [
            f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k]) for k in COLUMNS]
        print(f"| {text} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
