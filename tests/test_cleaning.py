"""Cleaning on the real embedded images with planted duplicates, label conflicts and non-cell images."""

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_pipeline.cleaning import (
    REASONS,
    REPORT_COLUMNS,
    CleaningConfig,
    clean,
    find_exact_duplicates,
    find_near_duplicates,
    flag_outliers,
    image_features,
    outlier_scores,
)
from data_pipeline.dataset import ImageDataset
from common.errors import DataError

SIZE = 28


# --- planted data ------------------------------------------------------------------------------------


def _colour(rng):
    return rng.integers(0, 256, 3)


def _two_tone(rng, mask):
    return np.where(mask[..., None], _colour(rng), _colour(rng))


def uniform_noise(rng):
    return rng.integers(0, 256, (SIZE, SIZE, 3))


def gaussian_noise(rng):
    return rng.normal(rng.uniform(60, 200, 3), rng.uniform(10, 60), (SIZE, SIZE, 3))


def flat_colour(rng):
    return np.broadcast_to(_colour(rng), (SIZE, SIZE, 3))


def stripes(rng):
    yy, xx = np.mgrid[:SIZE, :SIZE]
    angle, period = rng.uniform(0, np.pi), rng.uniform(3, 10)
    return _two_tone(rng, np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0)


def checkerboard(rng):
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cell = rng.integers(2, 8)
    return _two_tone(rng, (yy // cell + xx // cell) % 2 == 0)


def gradient(rng):
    yy, xx = np.mgrid[:SIZE, :SIZE] / (SIZE - 1)
    angle = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(angle) + yy * np.sin(angle)
    t = ((t - t.min()) / (np.ptp(t) + 1e-9))[..., None]
    return (1 - t) * _colour(rng) + t * _colour(rng)


def clouds(rng):
    """Smooth random texture: a few random values per side, bicubically upscaled per channel."""
    coarse = rng.integers(0, 256, (rng.integers(3, 8),) * 2 + (3,)).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(coarse[..., c]).resize((SIZE, SIZE), Image.Resampling.BICUBIC))
                     for c in range(3)], -1)


def shapes(rng):
    """Clip-art: a few random ellipses and rectangles of random colours on a random background."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    image = np.broadcast_to(_colour(rng), (SIZE, SIZE, 3)).astype(float).copy()
    for _ in range(rng.integers(2, 6)):
        cy, cx = rng.uniform(0, SIZE, 2)
        ry, rx = rng.uniform(3, 12, 2)
        if rng.random() < 0.5:
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            inside = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        image[inside] = _colour(rng)
    return image


NON_CELL_KINDS = [uniform_noise, gaussian_noise, flat_colour, stripes, checkerboard, gradient, clouds, shapes]


def non_cell_images(per_kind: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images, kinds = [], []
    for make in NON_CELL_KINDS:
        for _ in range(per_kind):
            images.append(np.clip(np.rint(make(rng)), 0, 255).astype(np.uint8))
            kinds.append(make.__name__)
    return np.stack(images), np.array(kinds)


def jpeg_reencode(image: np.ndarray, quality: int = 90) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def brighten_a_few_pixels(image: np.ndarray, rng: np.random.Generator, count: int = 20) -> np.ndarray:
    changed = image.astype(np.int16)
    rows, cols = rng.integers(0, SIZE, count), rng.integers(0, SIZE, count)
    changed[rows, cols] += 1
    return np.clip(changed, 0, 255).astype(np.uint8)


def with_extra(base: ImageDataset, images: np.ndarray, labels: np.ndarray, ids: list[str]) -> ImageDataset:
    return ImageDataset(np.concatenate([base.images, images]), np.concatenate([base.labels, labels]),
                        base.class_names, np.concatenate([base.ids, ids]), base.splits, base.source)


@pytest.fixture(scope="module")
def base(embedded) -> ImageDataset:
    """1,500 real images with no exact or near duplicates among them, and a train/test split."""
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(len(embedded), 1500, replace=False))
    _, first = np.unique(embedded.images[chosen].reshape(len(chosen), -1), axis=0, return_index=True)
    data = embedded.subset(chosen[np.sort(first)])
    half = len(data) // 2
    data = data.with_splits({"train": np.arange(half), "test": np.arange(half, len(data))})
    assert (find_near_duplicates(data.images, 4) == -1).all()
    return data


# --- duplicates --------------------------------------------------------------------------------------


def test_exact_duplicates_are_grouped_with_their_originals(base):
    originals = [3, 100, 700]
    images = np.concatenate([base.images, base.images[originals], base.images[[3]]])
    groups = find_exact_duplicates(images)
    n = len(base)
    assert groups[3] == groups[n] == groups[n + 3] != -1
    assert groups[100] == groups[n + 1] != -1 and groups[700] == groups[n + 2] != -1
    assert len(set(groups[groups >= 0])) == 3 and (groups >= 0).sum() == 7


def test_near_duplicates_survive_small_changes_that_exact_hashing_misses(base):
    rng = np.random.default_rng(1)
    originals = rng.choice(len(base), 10, replace=False)
    copies = [brighten_a_few_pixels(base.images[i], rng) for i in originals[:5]]
    copies += [jpeg_reencode(base.images[i]) for i in originals[5:]]
    images = np.concatenate([base.images, np.stack(copies)])
    near = find_near_duplicates(images, max_distance=4)
    copy_positions = np.arange(len(base), len(images))
    assert (near[originals] == near[copy_positions]).all() and (near[originals] >= 0).all()
    assert (near >= 0).sum() == 20
    assert (find_exact_duplicates(images) == -1).all()


def test_clean_keeps_the_first_copy_and_reports_why_the_others_went(base):
    extra = np.stack([base.images[10], jpeg_reencode(base.images[20])])
    data = with_extra(base, extra, base.labels[[10, 20]], ["copy_of_10", "jpeg_of_20"])
    cleaned, report = clean(data, CleaningConfig(outliers=False))
    assert len(cleaned) == len(base)
    assert np.array_equal(cleaned.ids, base.ids)
    removed = report[~report.kept].set_index("id")
    assert removed.loc["copy_of_10", "reason"] == "exact_duplicate"
    assert removed.loc["jpeg_of_20", "reason"] == "near_duplicate"
    assert 0 <= removed.loc["jpeg_of_20", "score"] <= 4
    kept = report[report.kept]
    assert set(kept["index"]) == {10, 20}
    assert report.groupby("group").size().tolist() == [2, 2]


def test_label_conflict_drops_every_copy(base):
    other_label = (base.labels[[30, 40]] + 1) % base.num_classes
    extra = np.stack([base.images[30], brighten_a_few_pixels(base.images[40], np.random.default_rng(3))])
    data = with_extra(base, extra, other_label, ["relabelled_30", "relabelled_40"])
    cleaned, report = clean(data, CleaningConfig(outliers=False))
    conflicts = report[report.reason == "label_conflict"]
    assert set(conflicts["index"]) == {30, 40, len(base), len(base) + 1}
    assert not conflicts.kept.any()
    assert len(cleaned) == len(base) - 2
    assert not {base.ids[30], base.ids[40], "relabelled_30"} & set(cleaned.ids)

    lenient, _ = clean(data, CleaningConfig(outliers=False, drop_label_conflicts=False))
    assert len(lenient) == len(base)


def test_removing_every_image_is_an_error(base):
    twins = ImageDataset(np.repeat(base.images[:1], 2, axis=0), np.array([0, 1]), base.class_names)
    with pytest.raises(DataError, match="every image"):
        clean(twins, CleaningConfig(outliers=False))


# --- non-cell images ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def with_non_cells(embedded):
    """The full real set plus 320 non-cell images (40 of each kind) with random labels, in 'train'."""
    planted, kinds = non_cell_images(per_kind=40, seed=7)
    labels = np.random.default_rng(7).integers(0, embedded.num_classes, len(planted))
    ids = [f"planted_{kind}_{i}" for i, kind in enumerate(kinds)]
    data = with_extra(embedded, planted, labels, ids)
    planted_rows = np.arange(len(embedded), len(data))
    splits = dict(embedded.splits, train=np.concatenate([embedded.splits["train"], planted_rows]))
    return data.with_splits(splits), kinds


def _removed_mask(report: pd.DataFrame, n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[report.loc[~report.kept, "index"].to_numpy()] = True
    return mask


def test_outlier_detector_alone_finds_planted_non_cells_and_spares_real_cells(with_non_cells, embedded):
    data, kinds = with_non_cells
    _, report = clean(data, CleaningConfig(exact=False, near_distance=None))
    assert set(report.reason) == {"outlier"}
    removed = _removed_mask(report, len(data))
    planted, real = removed[len(embedded):], removed[:len(embedded)]
    assert planted.mean() >= 0.95
    for kind in np.unique(kinds):
        assert planted[kinds == kind].mean() >= 0.9, kind
    assert real.mean() < 0.01


def test_default_cleaning_of_real_plus_non_cells(with_non_cells, embedded):
    data, _ = with_non_cells
    cleaned, report = clean(data)
    removed = _removed_mask(report, len(data))
    assert removed[len(embedded):].mean() >= 0.95
    assert removed[:len(embedded)].mean() < 0.01
    # The real PBC set holds one byte-identical pair labelled eosinophil and neutrophil.
    conflict = report[report.id.isin(["eosinophil/EO_225902.jpg", "neutrophil/BNE_191112.jpg"])]
    assert conflict.reason.tolist() == ["label_conflict"] * 2
    for name, indices in data.splits.items():
        assert np.array_equal(cleaned.ids[cleaned.splits[name]], data.ids[indices][~removed[indices]])


def test_contamination_flags_exactly_that_share_and_lof_scores_every_image(base):
    z = outlier_scores(base.images[:400], method="lof", seed=0)
    assert z.shape == (400,) and np.isfinite(z).all()
    assert flag_outliers(z, 4.5, contamination=0.05).sum() == 20
    assert image_features(base.images[:5]).shape[0] == 5


# --- report and safety -------------------------------------------------------------------------------


def test_report_csv_is_written_and_input_left_untouched(base, tmp_path):
    data = with_extra(base, base.images[[5]], base.labels[[5]], ["copy_of_5"])
    images_before, splits_before = data.images.copy(), {k: v.copy() for k, v in data.splits.items()}
    path = tmp_path / "reports" / "cleaning.csv"
    cleaned, report = clean(data, report_path=path)
    written = pd.read_csv(path)
    assert list(written.columns) == REPORT_COLUMNS
    assert len(written) == len(report) >= 2
    assert written.id.astype(str).tolist() == report.id.tolist()
    assert set(written.reason) <= set(REASONS)
    assert written.loc[written.id == "copy_of_5", "reason"].tolist() == ["exact_duplicate"]
    assert [p.name for p in path.parent.iterdir()] == ["cleaning.csv"]
    assert np.array_equal(data.images, images_before)
    assert all(np.array_equal(data.splits[k], splits_before[k]) for k in splits_before)
    assert len(data) == len(base) + 1 and len(cleaned) < len(data)


@pytest.mark.parametrize("settings", [
    dict(near_distance=-1), dict(near_distance=65), dict(near_distance=2.5), dict(outlier_method="svm"),
    dict(outlier_z=0), dict(outlier_z="high"), dict(outlier_contamination=0.7), dict(n_estimators=0),
])
def test_bad_config_values_raise_data_error(settings):
    with pytest.raises(DataError):
        CleaningConfig(**settings)


def test_bad_arguments_to_the_low_level_functions_raise_data_error(base):
    with pytest.raises(DataError, match="distance"):
        find_near_duplicates(base.images[:10], max_distance=-2)
    with pytest.raises(DataError, match="unknown outlier method"):
        outlier_scores(base.images[:10], method="magic")
    with pytest.raises(DataError, match="at least 10 images"):
        outlier_scores(base.images[:5])
    with pytest.raises(DataError, match="ImageDataset"):
        clean(base.images)
