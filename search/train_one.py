"""Reproduce one configuration: `python -m search.train_one --config FILE [--out DIR]`.

FILE is a trial's `config.json` (or any JSON object of `TrialConfig` fields); unspecified fields keep
their defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from search.cli_errors import run_cli
from search.config import TrialConfig


def check_before_tensorflow(config: TrialConfig) -> None:
    """Fail on a bad backbone name or data path in one line, before TensorFlow's start-up logging."""
    from backbones import get_backbone
    from data_pipeline.errors import DataError

    get_backbone(config.backbone)
    if config.data and not Path(config.data).exists():
        raise DataError(f"data path not found: {config.data}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m search.train_one", description=__doc__)
    parser.add_argument("--config", required=True, help="JSON file of TrialConfig fields")
    parser.add_argument("--out", default=None, help="trial folder (default: runs/train_one/<config name>)")
    args = parser.parse_args(argv)
    config = TrialConfig.from_file(args.config)
    check_before_tensorflow(config)
    out = Path(args.out) if args.out else Path("runs") / "train_one" / Path(args.config).stem

    from search.devices import configure_tensorflow
    from search.trainer import train_trial

    configure_tensorflow()
    result = train_trial(config, out, report=lambda epoch, scores: print(
        f"epoch {epoch}: " + " ".join(f"{k}={v:.4f}" for k, v in scores.items())))
    print(json.dumps(result.metrics, indent=2))
    print(f"artifacts: {result.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
