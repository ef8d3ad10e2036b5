#!/usr/bin/env bash
# The declared version floors of the pure-Python libraries whose API the code uses most, tested: pip installs
# the lowest keras and optuna pyproject.toml allows into a folder placed ahead of the project's environment,
# then imports every module and trains one tiny trial. Run from an environment with `pip install -e ".[dev]"`
# done; needs the package index. The compiled floors (numpy 1.26, pandas, scipy, scikit-learn) cannot be mixed
# into a NumPy 2 environment (their C API differs); they need a whole environment at the floors, TensorFlow 2.16
# included.
set -euo pipefail
cd "$(dirname "$0")/.."
floors=$(mktemp -d)
trap 'rm -rf "$floors"' EXIT
specs=$(python - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
wanted = {"keras", "optuna"}
for dep in deps:
    name, floor = re.match(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", dep).groups()
    if name in wanted:
        print(f"{name}=={floor}")
PY
)
# Arguments replace a floor, to find the real one: bash .ci/floors.sh keras==3.10.0
for override in "$@"; do specs=$(echo "$specs" | grep -v "^${override%%==*}==" || true; echo "$override"); done
echo "floors: $(echo $specs)"
python -m pip install -q --disable-pip-version-check --no-deps --target "$floors" $specs
PYTHONPATH="$floors" OMP_NUM_THREADS=1 python - <<'PY'
import json, pkgutil, importlib, tempfile
from importlib import metadata
from pathlib import Path
import keras, optuna
print("running with", {m.__name__: m.__version__ for m in (keras, optuna)})
for package in ("common", "search", "ensemble", "backbones", "data_pipeline", "cellsearch"):
    for info in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}."):
        if "ray" not in info.name and not info.name.endswith("__main__"):
            importlib.import_module(info.name)
from search.study.trial_config import TrialConfig
from search.trial.trainer import train_trial
from data_pipeline.augment import POLICIES
config = TrialConfig(backbone="compact_cnn", epochs=1, max_train_images=256, tta_views=1, augment_policy="corrupt",
                     augment_strength=0.5)
result = train_trial(config, Path(tempfile.mkdtemp()) / "trial")
print("policies:", len(POLICIES), "one trial:", json.dumps({k: round(v, 3) for k, v in result.metrics.items()
                                                            if k.startswith("val_accuracy")}))
PY
