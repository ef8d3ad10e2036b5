"""The `cellsearch` command: every subcommand exists with the same common flags, the `python -m` commands share
its parsers, and each kind of bad input ends in one `error:` line within seconds, before TensorFlow is imported.
The slow test installs a built wheel and runs the README's first command, then predicts a folder of JPEGs."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cellsearch.cli import build_parser, main

SUBCOMMANDS = ("search", "build", "predict", "export", "dashboard", "studies")
MODULES = {"search": "search.run", "build": "ensemble.build", "predict": "ensemble.predict",
           "export": "ensemble.export"}


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrapped


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_the_common_flags_and_help_on_each_flag(capsys, command):
    text = _help(capsys, command)
    for flag in ("-q", "-v", "--version"):
        assert f" {flag}" in text
    if command != "studies":
        assert "--study" in text and ("--out" in text or command == "dashboard")
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    silent = [a.option_strings for a in sub._actions if not a.help and a.option_strings]
    assert not silent, f"flags without help: {silent}"


def test_defaults_are_shown_and_the_flags_mean_the_same_everywhere(capsys):
    build = _help(capsys, "build")
    assert "(default: greedy)" in build and "(default: runs)" in build
    assert "the study's own objective" in build
    search = _help(capsys, "search")
    assert "and stop training at, the last epoch boundary" in search and "{robust,clean,multi}" in search
    assert "{robust,clean}" in build


@pytest.mark.parametrize("command", sorted(MODULES))
def test_python_m_commands_share_the_subcommand_parser(command):
    import importlib

    module = importlib.import_module(MODULES[command])
    argv = ["--study", "s", "-q"] + (["--input", "x"] if command == "predict" else [])
    parsed = module.parse_args(argv)
    args = parsed[0] if isinstance(parsed, tuple) else parsed
    sub = build_parser().parse_args([command, *argv])
    assert args.study == sub.study == "s" and args.verbosity == sub.verbosity == -1


def test_version_and_verbosity_before_or_after_the_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("cellsearch ")
    assert build_parser().parse_args(["-q", "studies"]).verbosity == -1
    assert build_parser().parse_args(["studies", "-v"]).verbosity == 1
    assert build_parser().parse_args(["studies"]).verbosity == 0


def test_studies_lists_every_shipped_spec_with_its_header(capsys):
    from search.study.spec import STUDIES_DIR

    assert main(["studies"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = sorted(p.name[:-5] for p in STUDIES_DIR.iterdir() if p.name.endswith(".toml"))
    assert [line.split()[0] for line in lines] == names
    assert any(line.startswith("quick ") and "Preset `quick`" in line for line in lines)


def test_study_names_its_spec_unless_spec_is_given():
    from search.run import parse_args, spec_from_args

    quick = spec_from_args(parse_args(["--study", "quick"]))
    renamed = spec_from_args(parse_args(["--spec", "quick", "--study", "mine"]))
    assert (quick.name, renamed.name, renamed.budget.trials) == ("quick", "mine", quick.budget.trials)
    assert spec_from_args(parse_args(["--study", "quick", "--name", "old"])).name == "old"  # the former spelling
    assert spec_from_args(parse_args(["--objective", "val_accuracy_tta"])).algorithm.objective == "clean"


def test_build_defaults_to_the_studys_own_objective():
    import optuna

    from ensemble.build import study_objective

    study = optuna.create_study()
    assert study_objective(study) == "robust"
    for searched, built in (("clean", "clean"), ("val_accuracy_tta", "clean"), ("multi", "robust"),
                            ("robust", "robust")):
        study.set_user_attr("spec", {"algorithm": {"objective": searched}})
        assert study_objective(study) == built


def _cli(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom cellsearch.cli import console\nrc = console()\n"
            "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\nsys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


ERRORS = [
    (["search", "--study", "no_such_spec"], "study spec not found"),
    (["search", "--study", "quick", "--data", "{tmp}/missing.npz"], "data path not found"),
    (["search", "--study", "quick", "--objective", "nope"], "invalid choice"),
    (["search", "--study", "quick", "--image-size", "0"], "'data.image_size': 0"),
    (["build"], "no study given"),
    (["build", "--study", "gone"], "gone"),
    (["dashboard", "--study", "gone"], "gone"),
    (["predict", "--ensemble", "{tmp}", "--input", "{tmp}/x.npz"], "manifest"),
    (["predict", "--input", "{tmp}/x.npz"], "no study given"),
    (["export", "--ensemble", "{tmp}", "--out", "{tmp}/s.zip"], "manifest"),
    (["predict", "--ensemble", "{tmp}", "--input", "{tmp}", "--center-crop", "0"], "--center-crop must be >= 1"),
]


@pytest.mark.parametrize(("argv", "message"), ERRORS)
def test_each_error_is_one_line_within_seconds_before_tensorflow(tmp_path, argv, message):
    started = time.monotonic()
    done = _cli(tmp_path, *(a.format(tmp=tmp_path) for a in argv))
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 or "usage:" in done.stderr, done.stderr[-2000:]
    assert message in lines[-1] and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert time.monotonic() - started < 30


def test_unknown_backbone_in_train_one_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"backbone": "vgg99"}')
    done = subprocess.run([sys.executable, "-m", "search.train_one", "--config", str(tmp_path / "config.json")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "unknown backbone 'vgg99'" in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fresh_wheel_runs_the_readme_command_then_predicts_jpegs(tmp_path, raw_sample_dir):
    """`pip install . && cellsearch search --study quick && cellsearch build`, then `cellsearch predict` on a
    folder of JPEGs, from a wheel installed in a temporary folder, run elsewhere."""
    from test_packaging import install_wheel  # the packaging test's offline build, installed into a folder

    target = install_wheel(tmp_path)
    images = tmp_path / "work" / "images"
    images.mkdir(parents=True)
    for folder in sorted(raw_sample_dir.iterdir())[:3]:
        for jpeg in sorted(folder.glob("*.jpg"))[:2]:
            shutil.copy(jpeg, images / f"{folder.name}_{jpeg.name}")
    work = images.parent
    env = {"PATH": f"{target / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(target),
           "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    shell = "cellsearch search --study quick && cellsearch build && cellsearch predict --input images --out p.csv"
    started = time.monotonic()
    done = subprocess.run(["bash", "-c", shell], cwd=work, env=env, capture_output=True, text=True, timeout=3500)
    print(f"README command and predict: {time.monotonic() - started:.0f} s")
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert (work / "runs" / "quick" / "ensemble" / "manifest.json").is_file()
    rows = (work / "p.csv").read_text().splitlines()
    assert rows[0].startswith("id,label,class_name,prob_") and len(rows) == 1 + 6
    for noise in ("A new study created", "oneDNN", "absl::InitializeLog", "cuda"):
        assert noise not in done.stdout + done.stderr, noise


def test_tensorflow_cpp_lines_are_filtered_from_stderr_and_the_rest_passes():
    code = r"""
import os
from common.native_log import native_log_filtered
with native_log_filtered():
    import tensorflow as tf
    tf.constant(1) + 1
    os.write(2, b"I0000 00:00:1796419081.327366   22164 port.cc:153] oneDNN custom operations are on.\n")
    os.write(2, b"\rbar 1/2")
    os.write(2, b"\rbar 2/2\nerror: kept\n")
"""
    done = subprocess.run([sys.executable, "-c", code],
                          capture_output=True, timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == b"\rbar 1/2\rbar 2/2\nerror: kept\n"  # bytes: \r as written
