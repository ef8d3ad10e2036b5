"""Export a built ensemble for AN2DL Codabench: `cellsearch export [--study NAME | --ensemble DIR] --out OUT.zip`.

The zip holds, at its root:
    model.py          ensemble/standalone.py verbatim: `class Model` with `__init__(self)` loading the
                      ensemble from the files beside it and `predict(self, X)` -> int labels (numpy)
    common/           common/errors.py and common/inference.py verbatim (the error classes, the TTA views,
                      the preprocessing layer and the input rule model.py imports) and a one-line __init__.py
    manifest.json     the ensemble's manifest, its checksum list cut down to the files in the zip
    members/*.keras   the member models
    combiner.joblib   the fitted scikit-learn combiner (model.py applies the manifest's numbers instead,
                      see standalone.py for why; the pickle is there for anyone re-using the ensemble)
model.py and common/ import only the standard library and numpy at load time, and keras when predicting
(TensorFlow only for its bfloat16 pass), so they run where only TensorFlow and Keras are installed and
cellsearch is not. Codabench imports model.py with its folder on sys.path, where the copied `common` is found.
By default the zip is then smoke-tested in a fresh Python process (unzipped to a temporary folder, Model()
loaded, 4 images of 96x96 predicted, the copied common/ checked to be the one imported); --no-check skips that.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from common import errors, inference
from common.errors import EnsembleError
from ensemble.predict import add_ensemble_arguments, ensemble_folder
from ensemble.standalone import MANIFEST, read_manifest
from common.cli_errors import QUIET, command_parser, run_cli, set_verbosity

STANDALONE = Path(__file__).with_name("standalone.py")
#: The runtime files of the zip: its name in the zip -> the package file copied verbatim.
RUNTIME = {"model.py": STANDALONE, "common/errors.py": Path(errors.__file__),
           "common/inference.py": Path(inference.__file__)}
RUNTIME_PACKAGE_INIT = ("common/__init__.py", '"""The error classes and inference runtime model.py imports."""\n')
SMOKE_TEST = """
import sys, zipfile, tempfile, numpy as np
folder = tempfile.mkdtemp()
zipfile.ZipFile(sys.argv[1]).extractall(folder)
sys.path.insert(0, folder)
import model
X = np.random.default_rng(0).integers(0, 256, size=(4, int(sys.argv[2]), int(sys.argv[2]), 3), dtype=np.uint8)
labels = model.Model().predict(X)
assert labels.shape == (4,) and labels.dtype.kind == "i", (labels.shape, labels.dtype)
leaked = sorted(m for m in ("backbones", "ensemble", "search", "data_pipeline", "cellsearch") if m in sys.modules)
assert not leaked, f"model.py imported cellsearch modules: {leaked}"
import common.inference
assert common.inference.__file__.startswith(folder), f"model.py used {common.inference.__file__}, not the copy"
print("labels", labels.tolist())
"""


def export_codabench(ensemble: str | Path, out: str | Path, check: bool = True, check_size: int = 96) -> Path:
    """Write the Codabench zip for the ensemble folder `ensemble` (verified first) to `out`, atomically."""
    from common.atomic import atomic_path

    ensemble, out = Path(ensemble), Path(out)
    manifest = read_manifest(ensemble)
    if out.suffix.lower() != ".zip":
        raise EnsembleError(f"--out must name a .zip file, got {out}")
    keep = {name: digest for name, digest in manifest["files"].items()
            if name.startswith("members/") or name == manifest.get("combiner_file", "combiner.joblib")}
    trimmed = {**manifest, "files": keep}
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, source in RUNTIME.items():
                archive.write(source, name)
            archive.writestr(*RUNTIME_PACKAGE_INIT)
            archive.writestr(MANIFEST, json.dumps(trimmed, indent=2))
            for name in sorted(keep):
                archive.write(ensemble / name, name)
        if check:
            done = subprocess.run([sys.executable, "-c", SMOKE_TEST, str(tmp), str(check_size)], capture_output=True,
                                  text=True, timeout=600)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise EnsembleError(f"exported model.py failed its smoke test: {tail[0]}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_ensemble_arguments(parser)
    parser.add_argument("--out", "--codabench", dest="out", default="submission.zip", help="the .zip to write")
    parser.add_argument("--no-check", action="store_true", help="skip the fresh-process smoke test")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = command_parser("python -m ensemble.export", __doc__)
    add_arguments(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """`cellsearch export` and `python -m ensemble.export`."""
    set_verbosity(args.verbosity)
    out = export_codabench(ensemble_folder(args), args.out, check=not args.no_check)
    size = out.stat().st_size / 2 ** 20
    print(out if args.verbosity == QUIET else f"Codabench submission written to {out} ({size:.1f} MiB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli(main))
