"""Reproduce one configuration: `python -m search.train_one --config FILE [--out ROOT]`.

FILE is a trial's `config.json` (or any JSON object of `TrialConfig` fields); unspecified fields keep
their defaults. The trial's files go to <out>/train_one/<FILE's name>/, or to --trial-dir.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.cli_errors import QUIET, command_parser, run_cli, set_verbosity
from search.study.trial_config import TrialConfig


def check_before_tensorflow(config: TrialConfig) -> None:
    """Fail on a bad backbone name or data path in one line, before TensorFlow's start-up logging."""
    from backbones import get_backbone
    from common.errors import DataError

    get_backbone(config.backbone)
    if config.data and not Path(config.data).exists():
        raise DataError(f"data path not found: {config.data}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = command_parser("python -m search.train_one", __doc__)
    parser.add_argument("--config", required=True, help="JSON file of TrialConfig fields")
    parser.add_argument("--out", default="runs", help="output root")
    parser.add_argument("--trial-dir", help="the trial's folder (default: <out>/train_one/<config name>)")
    parser.add_argument("--deadline", type=float, help="unix time by which training, evaluation and saving end: "
                                                       "training stops at an epoch boundary and keeps its best epoch")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_verbosity(args.verbosity)
    config = TrialConfig.from_file(args.config)
    check_before_tensorflow(config)
    out = Path(args.trial_dir) if args.trial_dir else Path(args.out) / "train_one" / Path(args.config).stem

    from search.execution.devices import configure_backend
    from search.trial.trainer import Deadline, train_trial

    configure_backend()
    say = (lambda line: None) if args.verbosity == QUIET else print
    deadline = None if args.deadline is None else Deadline(args.deadline)
    result = train_trial(config, out, report=lambda epoch, scores: say(
        f"epoch {epoch}: " + " ".join(f"{k}={v:.4f}" for k, v in scores.items())), deadline=deadline)
    print(json.dumps(result.metrics, indent=2))
    print(f"artifacts: {result.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
