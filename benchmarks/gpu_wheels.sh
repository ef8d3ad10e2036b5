#!/bin/bash
# The wheels bench_gpu.py needs on a GPU machine without internet whose image has JAX, PyTorch, NumPy, SciPy,
# pandas, scikit-learn, Pillow, h5py and matplotlib but not the rest of cellsearch's dependencies. Run it here,
# where pip reaches the registry; it downloads, for CPython 3.12 on x86-64 Linux, the versions this
# environment has installed (the ones the tests ran with).
#
#   bash benchmarks/gpu_wheels.sh [DIR]          # default: .whl (git-ignored)
#
# There, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   KERAS_BACKEND=jax python3 benchmarks/bench_gpu.py
set -euo pipefail
dir=${1:-.whl}
packages="keras namex optree optuna alembic Mako colorlog SQLAlchemy ImageHash PyWavelets"
pins=$(python3 - $packages <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
except PackageNotFoundError as missing:
    sys.exit(f"error: {missing} is not installed here; install cellsearch first (pip install -e .)")
PY
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" $pins
echo "$(ls "$dir"/*.whl | wc -l) wheel(s) in $dir ($(du -sh "$dir" | cut -f1)): $pins"
