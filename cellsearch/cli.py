"""The `cellsearch` command: one subcommand per step, each a thin shell over the library function that does it.

    cellsearch search --study quick          # search (python -m search.run)
    cellsearch build                         # ensemble of the last study's best trials (python -m ensemble.build)
    cellsearch predict --input images/ --out predictions.csv
    cellsearch export --out submission.zip   # AN2DL Codabench zip
    cellsearch dashboard                     # optuna-dashboard on the last study
    cellsearch studies                       # the shipped specs

The flags mean the same everywhere: `--study` a study's name (search: also its shipped spec, unless `--spec`;
other subcommands: the study to read, by default the last one run), `--out` where the command writes (search
and build: the output root, `runs`, with each study in <out>/<study>/ and its ensemble in
<out>/<study>/ensemble; predict: the CSV; export: the zip), `-q`/`-v` less or more output, `--version`.
"""

from __future__ import annotations

import argparse
import sys

from common.cli_errors import HelpFormatter, add_common_flags, command_parser, run_cli, set_verbosity


def _add_dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", help="the study to show (default: the last one run under --out)")
    parser.add_argument("--out", default="runs", help="output root the study was written under")
    parser.add_argument("--storage", help="Optuna storage URL (default: the study's)")
    parser.add_argument("--artifacts", help="artifact store (default: the study's)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on")
    parser.add_argument("--port", type=int, default=8080, help="port to serve on")


def _dashboard(args: argparse.Namespace) -> int:
    from search.reports.dashboard import serve_dashboard
    from search.study.location import StudyLocation

    set_verbosity(args.verbosity)
    location = StudyLocation.find(args.study, out=args.out, storage=args.storage, artifacts=args.artifacts)
    serve_dashboard(location, host=args.host, port=args.port)
    return 0


def _add_studies_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no flags beyond the common ones


def _studies(args: argparse.Namespace) -> int:
    from search.study.presets import shipped_specs

    specs = shipped_specs()
    width = max(map(len, specs))
    for name, line in specs.items():
        print(name if args.verbosity < 0 else f"{name:<{width}}  {line}")
    return 0


def _subcommands() -> dict[str, tuple[str, object, object]]:
    """name -> (one-line help, add_arguments, run); imports stay light (no TensorFlow)."""
    from ensemble import build, export, predict
    from search import run

    return {
        "search": ("run or continue a hyperparameter search", run.add_arguments, run.run),
        "build": ("build the ensemble of a finished study's best trials", build.add_arguments, build.run),
        "predict": ("predict images with a built ensemble", predict.add_arguments, predict.run),
        "export": ("write the AN2DL Codabench zip of a built ensemble", export.add_arguments, export.run),
        "dashboard": ("serve a study in optuna-dashboard", _add_dashboard_arguments, _dashboard),
        "studies": ("list the shipped study specs", _add_studies_arguments, _studies),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("cellsearch", __doc__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (summary, add_arguments, run) in _subcommands().items():
        sub = commands.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter)
        add_common_flags(sub, default=argparse.SUPPRESS)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


def console() -> int:
    """The `cellsearch` console script."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(console())
