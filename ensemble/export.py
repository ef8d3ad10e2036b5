"""Export a built ensemble for AN2DL Codabench: `python -m ensemble.export --ensemble DIR --codabench OUT.zip`.

The zip holds, at its root:
    model.py          ensemble/standalone.py verbatim: `class Model` with `__init__(self)` loading the
                      ensemble from the files beside it and `predict(self, X)` -> int labels (numpy)
    manifest.json     the ensemble's manifest, its checksum list cut down to the files in the zip
    members/*.keras   the member models
    combiner.joblib   the fitted scikit-learn combiner (model.py applies the manifest's numbers instead,
                      see standalone.py for why; the pickle is there for anyone re-using the ensemble)
model.py imports only the standard library, numpy, keras and tensorflow, and re-declares the members'
custom preprocessing layer, so it runs where cellsearch is not installed. By default the zip is then
smoke-tested in a fresh Python process (unzipped to a temporary folder, Model() loaded, 4 images of
96x96 predicted); --no-check skips that.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from ensemble.cli import run_cli
from ensemble.standalone import MANIFEST, EnsembleError, read_manifest

STANDALONE = Path(__file__).with_name("standalone.py")
SMOKE_TEST = """
import sys, zipfile, tempfile, numpy as np
folder = tempfile.mkdtemp()
zipfile.ZipFile(sys.argv[1]).extractall(folder)
sys.path.insert(0, folder)
import model
X = np.random.default_rng(0).integers(0, 256, size=(4, int(sys.argv[2]), int(sys.argv[2]), 3), dtype=np.uint8)
labels = model.Model().predict(X)
assert labels.shape == (4,) and labels.dtype.kind == "i", (labels.shape, labels.dtype)
leaked = sorted(m for m in ("backbones", "ensemble", "search", "data_pipeline") if m in sys.modules)
assert not leaked, f"model.py imported cellsearch modules: {leaked}"
print("labels", labels.tolist())
"""


def export_codabench(ensemble: str | Path, out: str | Path, check: bool = True, check_size: int = 96) -> Path:
    """Write the Codabench zip for the ensemble folder `ensemble` (verified first) to `out`, atomically."""
    from data_pipeline.atomic import atomic_path

    ensemble, out = Path(ensemble), Path(out)
    manifest = read_manifest(ensemble)
    if out.suffix.lower() != ".zip":
        raise EnsembleError(f"--codabench must name a .zip file, got {out}")
    keep = {name: digest for name, digest in manifest["files"].items()
            if name.startswith("members/") or name == manifest.get("combiner_file", "combiner.joblib")}
    trimmed = {**manifest, "files": keep}
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.write(STANDALONE, "model.py")
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ensemble.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ensemble", required=True, help="folder written by python -m ensemble.build")
    parser.add_argument("--codabench", required=True, help="output .zip")
    parser.add_argument("--no-check", action="store_true", help="skip the fresh-process smoke test")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = export_codabench(args.ensemble, args.codabench, check=not args.no_check)
    size = out.stat().st_size / 2 ** 20
    print(f"Codabench submission written to {out} ({size:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
