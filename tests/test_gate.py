"""The shift gate (ensemble.gate): fitted on clean images only, it lets a member vote on images like its training
data and casts a uniform vote on shifted ones, decides alike for every TTA view, loads with Keras' safe_mode in
the package and in the export's runtime, and joins an ensemble only when validation accuracy rises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.inference import dihedral_view
from ensemble.gate import fit_gate, gated_model, inside, with_gated_member
from ensemble.robust import ValidationRows
from ensemble.selection import Selection

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def split(embedded):
    rng = np.random.default_rng(0)
    order = rng.permutation(len(embedded.images))
    return embedded.images[order[:3000]], embedded.images[order[3000:3600]]


@pytest.fixture(scope="module")
def gate(split):
    return fit_gate(*split)


def small_model(size: int = 28, classes: int = 8):
    import keras

    inputs = keras.Input((size, size, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(pooled))


def test_the_gate_lets_through_its_share_of_clean_images_and_stops_shifted_ones(split, gate, embedded):
    from data_pipeline.corrupt import FAMILIES, shifted_copy

    _, val = split
    held_back = embedded.images[np.random.default_rng(1).permutation(len(embedded.images))[4000:4600]]
    assert inside(gate, val).mean() == pytest.approx(0.95, abs=0.01)  # the quantile it was fitted at
    assert inside(gate, held_back).mean() == pytest.approx(0.95, abs=0.04)  # clean images it never saw
    severe = shifted_copy(held_back, list(FAMILIES), seed=0, severities=(5,))
    for family in FAMILIES:
        assert inside(gate, severe.images[severe.family == family]).mean() < 0.5, family
    assert not inside(gate, (held_back // 3).astype(np.uint8)).any()  # a much darker lab


def test_a_gated_member_votes_unchanged_inside_and_uniformly_outside_for_every_view(split, gate):
    _, val = split
    model = small_model()
    images = np.concatenate([val[:40], (val[:40] // 3).astype(np.uint8)])
    lets = inside(gate, images)
    assert lets[:40].sum() > 30 and not lets[40:].any()
    wrapped = gated_model(model, gate)
    for view in range(8):
        batch = dihedral_view(images, view).astype(np.float32)
        plain, gated = model.predict(batch, verbose=0), wrapped.predict(batch, verbose=0)
        np.testing.assert_allclose(gated[lets], plain[lets], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gated[~lets], 1 / 8, atol=1e-7)


def test_a_gated_member_loads_with_safe_mode_in_the_package_and_in_the_export_runtime(split, gate, tmp_path):
    from ensemble.standalone import load_member_models

    _, val = split
    wrapped = gated_model(small_model(), gate)
    wrapped.save(tmp_path / "member.keras")
    expected = wrapped.predict(val[:16].astype(np.float32), verbose=0)
    np.save(tmp_path / "images.npy", val[:16])
    manifest = {"members": [{"file": "member.keras"}]}
    loaded = load_member_models(tmp_path, manifest, custom_layer=False)[0]  # the package's registration
    np.testing.assert_allclose(loaded.predict(val[:16].astype(np.float32), verbose=0), expected, atol=1e-6)
    script = ("import sys, numpy as np; sys.path.insert(0, 'ensemble'); import standalone; "  # as model.py runs
              f"m = standalone.load_member_models({str(tmp_path)!r}, {manifest!r})[0]; "
              f"np.save({str(tmp_path / 'out.npy')!r}, m.predict(np.load({str(tmp_path / 'images.npy')!r})"
              ".astype('float32'), verbose=0)); print('backbones' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("False")  # loaded without the package's registration
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-6)


def rows_and_probs():
    """Four clean validation rows and their four shifted copies; the selection is right on three clean and
    all shifted rows, the gated candidate on every clean row and uniform on the shifted ones."""
    y = np.array([0, 1, 2, 0])
    rows = ValidationRows.robust(y, source=np.arange(4))
    member = np.eye(3)[[0, 1, 1, 0, 0, 1, 2, 0]] * 0.6 + 0.4 / 3
    gated = np.concatenate([np.eye(3)[y] * 0.9 + 0.1 / 3, np.full((4, 3), 1 / 3)])
    return rows, member, gated


def test_the_gated_candidate_joins_at_the_weight_that_raises_validation_accuracy():
    rows, member, gated = rows_and_probs()
    chosen = with_gated_member(Selection([0], [1.0], [1]), member, gated, rows, 1)
    # at 0.25 and 1/3 the member still outvotes it on the clean row it gets wrong; at 0.5 it does not
    assert chosen.indices == [0, 1] and chosen.weights == [0.5, 0.5] and chosen.counts == [1, 0]
    assert "added at weight 0.50" in chosen.log[-1]
    assert np.mean((0.5 * member + 0.5 * gated).argmax(1) == rows.y) == 1.0


def test_a_gated_candidate_that_raises_nothing_stays_out():
    rows, member, gated = rows_and_probs()
    wrong = np.concatenate([np.full((4, 3), 1 / 3), np.full((4, 3), 1 / 3)])
    wrong[:4, 2] += 0.5
    kept = with_gated_member(Selection([0], [1.0], [1]), member, wrong, rows, 1)
    assert kept.indices == [0] and kept.weights == [1.0] and kept.log[-1].endswith("left out")


def heldout_case(fixed: int, broken: int):
    """40 clean rows the gated candidate gets right and the base gets wrong on 4, unsure, and their 40 shifted
    copies: the base is confident on each, except on `fixed` + `broken` near ties that any gated vote decides: the
    gated candidate is right on the `fixed` ones and wrong on the `broken` ones, and abstains elsewhere."""
    y = np.arange(40) % 2
    rows = ValidationRows.robust(y, source=np.arange(40))
    base = np.eye(2)[np.concatenate([y, y])] * 0.98 + 0.01
    base[:4] = np.eye(2)[1 - y[:4]] * 0.2 + 0.4  # wrong, at 0.6: any gated vote outweighs it
    gated = np.concatenate([np.eye(2)[y] * 0.98 + 0.01, np.full((40, 2), 0.5)])
    for row in range(fixed + broken):
        right = row < fixed
        base[40 + row] = [0.51, 0.49] if y[row] == int(right) else [0.49, 0.51]
        gated[40 + row] = np.eye(2)[y[row] if right else 1 - y[row]] * 0.98 + 0.01
    return rows, base, gated


def test_a_heldout_loss_within_the_validation_noise_does_not_keep_the_gated_candidate_out():
    rows, base, gated = heldout_case(fixed=5, broken=6)  # one shifted row lost among eleven that change
    chosen = with_gated_member(Selection([0], [1.0], [1]), base, gated, rows, 1)
    assert chosen.indices == [0, 1], chosen.log[-1]
    assert "0.9000 / 0.8750 without it" in chosen.log[-1] and "1.0000 / 0.8500 (noise 0.0839)" in chosen.log[-1]


def test_a_heldout_loss_beyond_the_validation_noise_keeps_the_gated_candidate_out():
    rows, base, gated = heldout_case(fixed=0, broken=6)
    kept = with_gated_member(Selection([0], [1.0], [1]), base, gated, rows, 1)
    assert kept.indices == [0] and kept.log[-1].endswith("left out")
    assert "1.0000 / 0.8500 (noise 0.0572)" in kept.log[-1]


def test_the_weight_with_the_best_clean_accuracy_wins_when_its_heldout_loss_is_within_the_noise():
    """40 clean rows: the base is wrong on two the gated candidate fixes at any weight, and on one only 0.5 fixes;
    at 0.5 the gated candidate also fixes two of the 40 shifted copies and breaks four (a net loss of two, inside
    the noise of six changes). The objective (clean + held-out) would keep 0.25; the clean accuracy takes 0.5."""
    y = np.arange(40) % 2
    rows = ValidationRows.robust(y, source=np.arange(40))
    truth = np.concatenate([y, y])

    def right_at(p, row):  # the row's probabilities, p on its true class
        return np.eye(2)[truth[row]] * (2 * p - 1) + (1 - p)

    base = np.array([right_at(0.98, row) for row in range(80)])
    gated = np.concatenate([base[:40], np.full((40, 2), 0.5)])
    for row, p in [(0, 0.4), (1, 0.4), (2, 0.2)]:  # at 0.4 fixed by every weight, at 0.2 by 0.5 only
        base[row] = right_at(p, row)
    for row in (40, 41):  # shifted: the base wrong, the gated candidate right: fixed at 0.5 only
        base[row], gated[row] = right_at(0.2, row), right_at(0.98, row)
    for row in (42, 43, 44, 45):  # shifted: the base right, the gated candidate wrong: broken at 0.5 only
        base[row], gated[row] = right_at(0.8, row), right_at(0.02, row)
    chosen = with_gated_member(Selection([0], [1.0], [1]), base, gated, rows, 1)
    assert "0.9250 / 0.9500 without it" in chosen.log[-1], chosen.log[-1]
    assert "0.9750 / 0.9500 (noise 0.0000) at weight 0.25" in chosen.log[-1]
    assert "1.0000 / 0.9000" in chosen.log[-1] and chosen.log[-1].endswith("added at weight 0.50")
    assert chosen.indices == [0, 1] and chosen.weights == [0.5, 0.5]


def test_the_noise_counts_an_images_held_out_copies_as_one_sample():
    from ensemble.evaluate import paired_gain

    y = np.arange(40) % 2
    copies = {"of 20 images": ValidationRows.robust(y[:20], source=np.tile(np.arange(20), 2)),
              "of 40 images": ValidationRows.robust(y, source=np.arange(40))}
    base = np.eye(2)[y] * 0.9 + 0.05
    flipped = base.copy()
    flipped[[0, 1, 20, 21]] = flipped[[0, 1, 20, 21], ::-1]  # two images' copies both, or four images' one copy
    noise = {k: paired_gain(flipped, base, rows.heldout())[1] for k, rows in copies.items()}
    assert np.array_equal(copies["of 20 images"].heldout().y, y)
    assert noise["of 20 images"] > 1.3 * noise["of 40 images"] > 0


def test_a_gated_combiner_mixes_the_last_member_into_the_base_combiner_and_saves_its_numbers():
    from ensemble.combiners import GatedCombiner, Stacking
    from ensemble.standalone import apply_temperature, combine

    rng = np.random.default_rng(0)
    X = rng.dirichlet(np.ones(3), size=(60, 3))
    y = X[:, 2].argmax(1)  # the last member is right on every row, but unsure
    gated = GatedCombiner(Stacking(), weight=1 / 3).fit(X, y)
    base = Stacking().fit(X[:, :2], y)
    temperature = gated.params()["gated_temperature"]
    assert temperature < 0.5  # so its probabilities are sharpened before the mix
    scaled = apply_temperature(X[:, 2], temperature)
    np.testing.assert_allclose(gated.predict_proba(X), 2 / 3 * base.predict_proba(X[:, :2]) + scaled / 3, atol=1e-6)
    np.testing.assert_allclose(combine(X, gated.params()), gated.predict_proba(X), atol=1e-6)  # the export's path
    assert gated.kind == "stacking" and gated.n_members_ == 3


def test_an_ensemble_with_a_gated_member_saves_loads_and_predicts_alike_in_the_export_runtime(split, gate, embedded,
                                                                                            tmp_path):
    from ensemble import EnsembleClassifier, load_ensemble
    from ensemble.combiners import GatedCombiner, make_combiner
    from ensemble.standalone import Model

    train, val = split
    labels = embedded.labels[np.random.default_rng(0).permutation(len(embedded.images))[3000:3600]]
    members = [small_model(), gated_model(small_model(), gate)]
    ens = EnsembleClassifier(members, GatedCombiner(make_combiner("vote"), 1 / 3), tta_views=2).fit(val, labels)
    images = np.concatenate([val[:20], (val[:20] // 3).astype(np.uint8)])  # the gate abstains on the dark half
    probs = ens.predict_proba(images)
    base = ens.member_proba(images)[:, 0]
    np.testing.assert_allclose(probs[20:], base[20:], atol=1e-6)  # abstained: the other member's vote alone
    assert not np.allclose(probs[:20], base[:20], atol=1e-4)
    ens.save(tmp_path / "ens")
    np.testing.assert_allclose(load_ensemble(tmp_path / "ens").predict_proba(images), probs, atol=1e-6)
    np.testing.assert_allclose(Model(tmp_path / "ens").predict_proba(images), probs, atol=1e-6)


def test_the_gate_is_decided_on_the_members_as_searched_and_carried_through_the_refit():
    """A refit that trains on the held-out families makes the member right, by a hair, on shifted rows where the
    gated candidate is wrong: decided after the refit the gate would be refused for those rows, but they are
    rows no shipped member has left unseen, so the weight chosen on the members as searched ships."""
    import types

    from ensemble.build import BuildOptions, _choose_combiner, choose_members
    from ensemble.combiners import GatedCombiner

    y = np.arange(40) % 2
    rows = ValidationRows.robust(y, source=np.arange(40))
    right, wrong = np.eye(2)[y] * 0.98 + 0.01, np.eye(2)[1 - y] * 0.2 + 0.4
    clean = np.where(np.arange(40)[:, None] < 4, wrong, right)  # the member is wrong on four clean rows
    searched = np.where(np.arange(40)[:, None] < 6, wrong, right)  # ... and on six shifted ones
    refit = searched.copy()
    refit[:6] = np.eye(2)[y[:6]] * 0.02 + 0.49  # right after the refit, at 0.51
    gated_shifted = np.where(np.arange(40)[:, None] < 6, np.eye(2)[1 - y] * 0.98 + 0.01, 0.5)
    member = types.SimpleNamespace(val_probs=clean, shifted_probs=searched, gated=False)
    gated = types.SimpleNamespace(val_probs=right, shifted_probs=gated_shifted, gated=True)
    retrained = types.SimpleNamespace(val_probs=clean, shifted_probs=refit, gated=False)
    options = BuildOptions(method="topk", top=1)

    plain = choose_members(options, [member, gated], rows)
    shipped = choose_members(options, [member, gated], rows, retrain=lambda members: ([retrained], {"seconds": 1.0}))
    assert isinstance(shipped.combiner, GatedCombiner) and shipped.members == [retrained, gated]
    assert shipped.selection == plain.selection and shipped.refit == {"seconds": 1.0}
    after = _choose_combiner(options, [retrained], rows, None).oof
    stacked = rows.stack(gated.val_probs, gated.shifted_probs)
    assert with_gated_member(Selection([0], [1.0], [1]), after, stacked, rows, 1).log[-1].endswith("left out")
