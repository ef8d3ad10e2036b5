"""Packaging: the declared dependencies (core and extras) are the imported ones, the heavy optional ones are
extras, and a built wheel, installed non-editable, finds the shipped study specs and the embedded data and runs
the `cellsearch` command from any working directory (not through the source tree)."""

import ast
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from common.errors import ConfigError
from search.study.spec import STUDIES_DIR, load_spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGES = ("common", "search", "ensemble", "backbones", "data_pipeline", "cellsearch", "studies")
PRESETS = ("quick", "medium", "best")
# Needed at run time without an import statement in the packages (see the comment in pyproject.toml): imported
# through common.errors.require_extra, or used by another package (SQLAlchemy's driver), or a command.
USED_WITHOUT_IMPORT = {"plotly", "psycopg", "sqlalchemy", "optuna-dashboard", "boto3", "ray"}
#: Imported only under that Keras backend (data_pipeline.compiled), which a user installs to choose it.
KERAS_BACKENDS = {"jax", "torch"}
#: Optional features: extra -> the distributions it adds (the rest of the extras are tooling: dev, gpu, all, and
#: the Keras backends jax and torch).
FEATURE_EXTRAS = {"ray": {"ray"}, "postgres": {"psycopg", "sqlalchemy"}, "plots": {"plotly"}, "s3": {"boto3"}}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules() -> set[str]:
    """Top-level third-party modules imported anywhere in the shipped packages."""
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - set(PACKAGES) - KERAS_BACKENDS


def _names(requirements: list[str]) -> set[str]:
    return {_normalise(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements}


def test_declared_dependencies_are_exactly_the_imported_ones():
    extras = PYPROJECT["project"]["optional-dependencies"]
    core = _names(PYPROJECT["project"]["dependencies"])
    declared = core | set().union(*(_names(extras[name]) for name in FEATURE_EXTRAS))
    providers = metadata.packages_distributions()
    used = set(USED_WITHOUT_IMPORT)
    for module in _imported_modules():
        dists = {_normalise(d) for d in providers.get(module, [module])} & declared
        assert dists, f"{module} is imported but no distribution providing it is declared"
        used |= dists
    assert declared == used, f"declared but never used: {sorted(declared - used)}"


def test_optional_features_are_extras_and_dev_installs_them_all():
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    for extra, dists in FEATURE_EXTRAS.items():
        assert _names(extras[extra]) == dists, extra
        assert not dists & _names(project["dependencies"]), f"{extra} is also a hard dependency"
    assert extras["all"] == [f"cellsearch[{','.join(FEATURE_EXTRAS)}]"]
    assert "cellsearch[all,jax]" in extras["dev"]
    for backend in KERAS_BACKENDS:  # a backend other than TensorFlow is one extra away
        assert _names(extras[backend]) == {backend}, backend
    assert project["scripts"] == {"cellsearch": "cellsearch.cli:console"}


def test_specs_are_package_data_and_presets_load():
    assert "*.toml" in PYPROJECT["tool"]["setuptools"]["package-data"]["studies"]
    shipped = {p.name for p in STUDIES_DIR.iterdir()}
    assert {f"{name}.toml" for name in ("default", *PRESETS)} <= shipped
    for name in PRESETS:
        spec = load_spec(name)
        assert spec.name == name and spec.budget.timeout_s and spec.warm_start
    with pytest.raises(ConfigError, match=r"study spec not found: .*nope\.toml \(shipped specs: .*quick"):
        load_spec("nope")


# Run in the installed copy, from another folder: the source tree must not be importable.
CHECK_INSTALLED = """
import sys
from pathlib import Path
root, target = Path(sys.argv[1]), Path(sys.argv[2])
assert all(Path(p or ".").resolve() != root for p in sys.path), sys.path
import cellsearch, data_pipeline.loaders, search.study.spec, studies
for module in (cellsearch, data_pipeline.loaders, search.study.spec, studies):
    assert Path(module.__file__).resolve().is_relative_to(target), module.__file__
from search.study.trial_config import ConfigError
print(search.study.spec.load_spec("quick").name)
try:
    search.study.spec.load_spec("nope")
except ConfigError as exc:
    print(exc)
data = data_pipeline.loaders.load()
print(len(data.images), sorted(data.splits))
"""


def install_wheel(tmp_path: Path) -> Path:
    """Build the wheel offline from a copy of the sources and install it, without dependencies, into a folder
    (returned; its bin/ holds the console script)."""
    source = tmp_path / "source"  # build from a copy: the build writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "NOTICE"):
        shutil.copy(ROOT / name, source / name)
    for package in PACKAGES:
        if (ROOT / package).is_dir():
            shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source],
                   check=True, timeout=240)
    wheel = next((tmp_path / "dist").glob("cellsearch-*.whl"))
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", target, wheel], check=True, timeout=120)
    return target


@pytest.mark.timeout(300)
def test_wheel_installs_and_runs_from_another_folder(tmp_path):
    target = install_wheel(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(target), "HOME": str(tmp_path)}

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=120)

    done = run("-c", CHECK_INSTALLED, str(ROOT), str(target.resolve()))
    assert done.returncode == 0, done.stderr[-2000:]
    name, error, data = done.stdout.strip().splitlines()[-3:]
    assert name == "quick"
    assert "shipped specs: " in error and all(p in error for p in ("default", *PRESETS))
    assert data == "13673 ['test', 'train', 'val']"
    usage = run("-m", "search.run", "--study", "quick", "--help")
    assert usage.returncode == 0 and "--study" in usage.stdout, usage.stderr[-2000:]
    script = [str(target / "bin" / "cellsearch")]  # the console script pip wrote
    listed = subprocess.run([*script, "studies"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and listed.stdout.startswith("accurate ") and "quick " in listed.stdout, listed.stderr
    version = subprocess.run([*script, "--version"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == f"cellsearch {PYPROJECT['project']['version']}", version.stderr
