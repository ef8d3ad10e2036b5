"""Corruption families, the leave-families-out check and the held-out validation copy (`shifted_copy`)."""

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.corrupt import (CORRUPTIONS, DEFAULT_HELDOUT_FAMILIES, DEFAULT_TRAIN_FAMILIES, FAMILIES,
                                   SEVERITIES, ShiftedCopy, check_families, corrupt, family_of, shifted_copy)
from common.errors import DataError

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: the families and a shifted copy of the images saved at argv[1].
FRESH_PROCESS = """
import hashlib, json, sys
import numpy as np
from data_pipeline.corrupt import FAMILIES, check_families, shifted_copy
from tests.test_families import fingerprint
copy = shifted_copy(np.load(sys.argv[1]), ("acquisition", "artefact"), seed=7)
print(json.dumps({"families": dict(FAMILIES), "split": check_families(None, None), "sha256": fingerprint(copy)}))
"""


@pytest.fixture(scope="module")
def images(embedded) -> np.ndarray:
    """203 real validation images: not a multiple of the 20 (kind, severity) pairs of a held-out family."""
    val = embedded.splits["val"]
    return embedded.images[np.sort(np.random.default_rng(1).choice(val, 203, replace=False))]


@pytest.fixture(scope="module")
def copy(images) -> ShiftedCopy:
    return shifted_copy(images, ("acquisition", "artefact"), seed=7)


def fingerprint(copy: ShiftedCopy) -> str:
    digest = hashlib.sha256()
    for column in (copy.images, copy.source, copy.family, copy.kind, copy.severity):
        digest.update(np.ascontiguousarray(column).tobytes())
    return digest.hexdigest()


def test_family_table():
    assert dict(FAMILIES) == {
        "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
        "blur": ("gaussian_blur", "defocus_blur", "motion_blur"),
        "colour": ("brightness", "contrast", "saturate", "hue_shift", "stain_shift", "gamma"),
        "acquisition": ("jpeg_compression", "pixelate", "downsample", "haze"),
        "artefact": ("bubbles", "dust", "stain_deposit", "smudge"),
    }
    assert DEFAULT_TRAIN_FAMILIES == ("noise", "blur", "colour")
    assert DEFAULT_HELDOUT_FAMILIES == ("acquisition", "artefact")


def test_every_kind_in_exactly_one_family():
    members = Counter(kind for kinds in FAMILIES.values() for kind in kinds)
    assert set(members) == set(CORRUPTIONS) and set(members.values()) == {1}
    for family, kinds in FAMILIES.items():
        assert all(family_of(kind) == family for kind in kinds)
    assert set(DEFAULT_TRAIN_FAMILIES) | set(DEFAULT_HELDOUT_FAMILIES) == set(FAMILIES)


def test_family_of_unknown_kind_refused():
    with pytest.raises(DataError, match="unknown corruption 'fog'"):
        family_of("fog")


def test_families_split_the_same_way_on_every_call():
    assert check_families(None, None) == (DEFAULT_TRAIN_FAMILIES, DEFAULT_HELDOUT_FAMILIES)
    assert check_families(["colour", "noise", "colour"], ["artefact"]) == (("noise", "colour"), ("artefact",))
    assert check_families(["noise", "colour"], "artefact") == check_families(("colour", "noise"), ["artefact"])
    assert check_families([], ["blur"]) == ((), ("blur",))  # training without corruptions is a baseline


@pytest.mark.parametrize("train, heldout, message", [
    (["noise", "fog"], None, r"train_families: unknown corruption family 'fog'; known: noise, blur, colour, "),
    (None, ["artefacts"], r"heldout_families: unknown corruption family 'artefacts'; known: noise, "),
    (["noise", "blur"], ["blur", "artefact"], r"corruption family 'blur' is in both train_families and "),
    (None, [], r"heldout_families is empty; hold out at least one of: acquisition, artefact$"),
])
def test_check_families_errors_name_the_problem(train, heldout, message):
    with pytest.raises(DataError, match=message) as raised:
        check_families(train, heldout)
    assert "\n" not in str(raised.value)


def test_shifted_copy_has_each_image_once_per_family(images, copy):
    n = len(images)
    assert copy.images.shape == (2 * n, *images.shape[1:]) and copy.images.dtype == np.uint8
    assert copy.family.tolist() == ["acquisition"] * n + ["artefact"] * n
    np.testing.assert_array_equal(copy.source, np.tile(np.arange(n), 2))
    assert all(family_of(kind) == family for kind, family in zip(copy.kind, copy.family))
    changed = np.abs(copy.images.astype(np.int16) - images[copy.source]).mean(axis=(1, 2, 3))
    assert (changed > 0).mean() > 0.99


@pytest.mark.parametrize("family", ["acquisition", "artefact"])
def test_shifted_copy_covers_every_kind_and_severity_evenly(images, copy, family):
    rows = copy.family == family
    shares = Counter(zip(copy.kind[rows].tolist(), copy.severity[rows].tolist()))
    assert set(shares) == {(kind, s) for kind in FAMILIES[family] for s in SEVERITIES}
    pairs = len(FAMILIES[family]) * len(SEVERITIES)
    assert set(shares.values()) == {len(images) // pairs, len(images) // pairs + 1}


def test_shifted_copy_rows_are_the_named_corruption(images, copy):
    """Kinds without random draws give exactly what `corrupt` gives for the row's kind and severity."""
    for row in np.flatnonzero(np.isin(copy.kind, ["jpeg_compression", "pixelate", "downsample"]))[:30]:
        expected = corrupt(images[copy.source[row]][None], copy.kind[row], int(copy.severity[row]))
        np.testing.assert_array_equal(copy.images[row], expected[0])


def test_shifted_copy_severities_restrict_the_copy(images):
    restricted = shifted_copy(images[:40], "artefact", severities=(2, 5))
    assert set(restricted.severity.tolist()) == {2, 5} and set(restricted.family.tolist()) == {"artefact"}


def test_shifted_copy_is_deterministic_and_seeded(images, copy):
    assert fingerprint(shifted_copy(images, ("artefact", "acquisition"), seed=7)) == fingerprint(copy)
    other = shifted_copy(images, ("acquisition", "artefact"), seed=8)
    assert not np.array_equal(other.kind, copy.kind) and not np.array_equal(other.images, copy.images)


def test_shifted_copy_identical_in_a_fresh_process(images, copy, tmp_path):
    np.save(tmp_path / "images.npy", images)
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "images.npy")], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=True)
    fresh = json.loads(result.stdout)
    assert fresh["sha256"] == fingerprint(copy)
    assert {name: tuple(kinds) for name, kinds in fresh["families"].items()} == dict(FAMILIES)
    assert [tuple(side) for side in fresh["split"]] == list(check_families(None, None))


@pytest.mark.parametrize("families, message", [
    ("fog", r"shifted_copy: unknown corruption family 'fog'; known: noise, "),
    ((), r"shifted_copy: no corruption families given"),
])
def test_shifted_copy_refuses_bad_families(images, families, message):
    with pytest.raises(DataError, match=message):
        shifted_copy(images[:4], families)


def test_shifted_copy_checks_images_and_severities(images):
    with pytest.raises(DataError, match="shifted_copy"):
        shifted_copy(images[0], "blur")
    with pytest.raises(DataError, match="severity"):
        shifted_copy(images[:4], "blur", severities=(0,))
