"""Optional extras (`cellsearch[ray]`, `[postgres]`, `[s3]`): without their packages, the command that needs one
fails at once with one line naming the extra, and everything else runs without them.

Each case runs the real CLI in a subprocess where the packages cannot be imported (a sitecustomize.py on
PYTHONPATH sets `sys.modules[name] = None`, which makes `import name` raise ImportError)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from search_helpers import write_tiny_spec

BLOCKED = ("ray", "psycopg", "boto3")


def run_without_extras(folder: Path, *args: str) -> subprocess.CompletedProcess:
    site = folder / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{name!r}] = None\n"
                                                                     for name in BLOCKED))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("option, extra, feature", [
    (("--executor", "ray"), "ray", "--executor ray"),
    (("--storage", "postgresql://cellsearch:pw@127.0.0.1:5432/cellsearch"), "postgres", "a postgresql:// storage"),
    (("--artifacts", "s3://bucket/prefix"), "s3", "an s3:// artifact store"),
])
def test_a_feature_without_its_extra_fails_in_one_line(tmp_path, option, extra, feature):
    spec_path = write_tiny_spec(tmp_path)
    done = run_without_extras(tmp_path, "-m", "search.run", "--no-progress", "--study", str(spec_path), *option)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"error: {feature} needs the '{extra}' extra: pip install 'cellsearch[{extra}]'"]
    assert not (tmp_path / "runs").exists(), "work started before the check"


def test_the_local_path_imports_no_optional_extra(tmp_path):
    modules = ("cellsearch", "search.run", "search.execution.driver", "search.execution.worker",
               "search.execution.local", "search.execution.storage", "search.execution.lifecycle", "ensemble.build")
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('ok')"
    done = run_without_extras(tmp_path, "-c", code)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
