"""The Codabench export on a tiny saved ensemble: the zip carries model.py and the copied `common` runtime verbatim,
and runs in a fresh process where only TensorFlow, Keras and numpy may be imported, with the copied runtime."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

SIZE, CLASSES = 8, 3
#: What the Codabench image lacks: importing any of these fails in the submission's process (`common` must come
#: from the zip, which the test checks after the run).
NOT_ON_CODABENCH = ("backbones", "ensemble", "search", "data_pipeline", "cellsearch", "sklearn", "scipy",
                    "pandas", "joblib", "optuna", "ray", "PIL", "jax", "torch")
RUN_SUBMISSION = """
import importlib.abc, json, sys, tempfile, zipfile
import numpy as np
zipped, images, blocked = sys.argv[1], np.load(sys.argv[2]), set(sys.argv[3].split(","))
folder = tempfile.mkdtemp()
zipfile.ZipFile(zipped).extractall(folder)

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is not installed here")
        return None

sys.meta_path.insert(0, NotInstalled())
if sys.argv[4] == "import":
    sys.path.insert(0, folder)
    import model
else:  # loaded by file name, its folder not on sys.path
    import importlib.util, os
    spec = importlib.util.spec_from_file_location("model", os.path.join(folder, "model.py"))
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)
import common.inference
import keras
m = model.Model()
print(json.dumps({"proba": m.predict_proba(images).tolist(), "labels": m.predict(images).tolist(),
                  "runtime": common.inference.__file__[len(folder):], "backend": keras.backend.backend()}))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, images, probabilities): a fitted 2-member ensemble with the ImageNet preprocessing layer, saved."""
    import keras

    from backbones.preprocessing import ImageNetPreprocess
    from ensemble import EnsembleClassifier

    members = []
    for seed, mode in enumerate(("torch", "caffe")):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((SIZE, SIZE, 3))
        x = keras.layers.Conv2D(4, 3, activation="relu")(ImageNetPreprocess(mode)(inputs))
        x = keras.layers.Dense(CLASSES, activation="softmax")(keras.layers.Flatten()(x))
        members.append(keras.Model(inputs, x))
    images = np.random.default_rng(0).integers(0, 256, (24, SIZE, SIZE, 3), dtype=np.uint8)
    clf = EnsembleClassifier(members, combiner="stacking", class_names=["a", "b", "c"], tta_views=8)
    clf.fit(images, np.arange(24) % CLASSES)
    folder = tmp_path_factory.mktemp("export") / "ensemble"
    clf.save(folder)
    return folder, images, clf.predict_proba(images)


def test_the_zip_holds_model_py_and_the_runtime_verbatim(saved, tmp_path):
    from ensemble.export import RUNTIME, STANDALONE, export_codabench

    zipped = export_codabench(saved[0], tmp_path / "submission.zip", check=False)
    with zipfile.ZipFile(zipped) as archive:
        names = set(archive.namelist())
        assert archive.read("model.py") == STANDALONE.read_bytes()
        for name in ("common/errors.py", "common/inference.py"):
            assert archive.read(name) == (Path(__file__).parents[1] / name).read_bytes() == RUNTIME[name].read_bytes()
        init = ast.parse(archive.read("common/__init__.py"))
        assert not any(isinstance(node, (ast.Import, ast.ImportFrom)) for node in ast.walk(init))
    assert {"model.py", "manifest.json", "combiner.joblib", "common/__init__.py"} <= names
    assert sum(n.startswith("members/") and n.endswith(".keras") for n in names) == 2


@pytest.mark.parametrize("loading", ["import", "file"])
def test_the_submission_runs_with_tensorflow_and_keras_only_on_the_copied_runtime(saved, tmp_path, loading):
    from ensemble.export import export_codabench

    folder, images, expected = saved
    zipped = export_codabench(folder, tmp_path / "submission.zip", check=True)  # its own fresh-process smoke test
    np.save(tmp_path / "x.npy", images)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"KERAS_BACKEND": "tensorflow"}
    done = subprocess.run([sys.executable, "-c", RUN_SUBMISSION, str(zipped), str(tmp_path / "x.npy"),
                           ",".join(NOT_ON_CODABENCH), loading], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["backend"] == "tensorflow"
    assert result["runtime"] == os.sep + os.path.join("common", "inference.py")  # the copy, not the package's
    np.testing.assert_allclose(result["proba"], expected, atol=1e-4)
    assert result["labels"] == expected.argmax(axis=1).tolist()


def test_a_broken_runtime_fails_the_smoke_test(saved, tmp_path, monkeypatch):
    from common.errors import EnsembleError
    from ensemble import export

    broken = tmp_path / "inference.py"
    broken.write_text("raise ImportError('runtime missing')\n")
    monkeypatch.setitem(export.RUNTIME, "common/inference.py", broken)
    with pytest.raises(EnsembleError, match="smoke test: ImportError: runtime missing"):
        export.export_codabench(saved[0], tmp_path / "submission.zip", check=True)
    assert not (tmp_path / "submission.zip").exists()
