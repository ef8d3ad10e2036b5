"""Find duplicates, label conflicts and non-cell images, and return a cleaned copy plus a report.

Nothing here modifies the caller's data: `clean` returns a new `ImageDataset` and a pandas report with
one row per removed or flagged image, and writes a file only when given `report_path`.

Why each step exists:
- Exact and near duplicates inflate some classes and, when copies land in different splits, leak test
  images into training (the embedded PBC set has 9 byte-identical pairs, 4 of them across splits).
- A duplicate group whose copies carry different labels cannot be trusted either way, so all copies go.
- The AN2DL competition hid non-cell images (noise, flat colours, memes) among the cells; they are
  found without labels by an IsolationForest on cheap image statistics, fitted on the data itself.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import LocalOutlierFactor
from sklearn.preprocessing import RobustScaler

from data_pipeline.dataset import ImageDataset, validate_images
from common.errors import DataError

OUTLIER_METHODS = ("isolation_forest", "lof")
REASONS = ("exact_duplicate", "near_duplicate", "label_conflict", "outlier")
REPORT_COLUMNS = ["id", "index", "label", "reason", "group", "score", "kept"]

_MAD_TO_SIGMA = 1.4826  # makes the median absolute deviation estimate a Gaussian standard deviation
_FEATURE_CLIP = 50.0  # in robust-scaled units; beyond this only "very far" matters to the forest
_PAIRWISE_CHUNK = 512  # rows per block of the Hamming-distance matrix (~30 MB per block at 14k images)
MIN_IMAGES_FOR_OUTLIERS = 10  # below this a median/MAD of scores means nothing


@dataclass(frozen=True)
class CleaningConfig:
    """What to look for and how strict to be; validated on construction (DataError on bad values).

    Defaults were measured on the embedded 13,673-image PBC set (28x28):
    - `near_distance=4`: pHash distances between distinct real cells are >= 6 bits except one visually
      identical pair at 4, while a JPEG re-encode (quality 75) or +-2 pixel noise moves a hash <= 4 bits.
    - `outlier_z=4.5`: robust z-score of the IsolationForest score. Real cells reach z > 4.5 at a rate of
      about 0.1-0.3%, planted noise/flat/texture images score z >= 4.8 even at 10% contamination.
    Set `outlier_contamination` instead when the share of outliers is known (flags exactly that share).
    """

    exact: bool = True
    near_distance: int | None = 4
    drop_label_conflicts: bool = True
    outliers: bool = True
    outlier_method: str = "isolation_forest"
    outlier_z: float = 4.5
    outlier_contamination: float | None = None
    n_estimators: int = 300
    lof_neighbors: int = 35
    seed: int = 0

    def __post_init__(self) -> None:
        if self.near_distance is not None:
            _check_distance(self.near_distance)
        _check_method(self.outlier_method)
        if not isinstance(self.outlier_z, (int, float)) or not np.isfinite(self.outlier_z) or self.outlier_z <= 0:
            raise DataError(f"outlier_z must be a positive number of robust standard deviations, got {self.outlier_z}")
        contamination = self.outlier_contamination
        if contamination is not None and not (isinstance(contamination, (int, float)) and 0 < contamination < 0.5):
            raise DataError(f"outlier_contamination must lie in (0, 0.5), got {self.outlier_contamination}")
        if self.n_estimators < 1:
            raise DataError(f"n_estimators must be >= 1, got {self.n_estimators}")
        if self.lof_neighbors < 1:
            raise DataError(f"lof_neighbors must be >= 1, got {self.lof_neighbors}")


def _check_distance(distance: int) -> None:
    if isinstance(distance, bool) or not isinstance(distance, (int, np.integer)) or not 0 <= distance <= 64:
        raise DataError(f"near-duplicate distance must be an integer number of hash bits in 0..64, got {distance!r}")


def _check_method(method: str) -> None:
    if method not in OUTLIER_METHODS:
        raise DataError(f"unknown outlier method {method!r} (choose from {', '.join(OUTLIER_METHODS)})")


# --- duplicate groups --------------------------------------------------------------------------------


def _group_ids(component: np.ndarray) -> np.ndarray:
    """Turn any per-image component label into group ids: -1 for singletons, else 0.. by first member."""
    _, first, inverse, counts = np.unique(component, return_index=True, return_inverse=True, return_counts=True)
    shared = np.flatnonzero(counts > 1)
    number = np.full(len(counts), -1, dtype=np.int64)
    number[shared[np.argsort(first[shared])]] = np.arange(len(shared))
    return number[inverse.ravel()]


def _components(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _edges_to_first_member(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges linking every grouped image to its group's first image (enough to rebuild the groups)."""
    members = np.flatnonzero(groups >= 0)
    first_of_group = {}
    for index in members:
        first_of_group.setdefault(groups[index], index)
    return members, np.array([first_of_group[groups[i]] for i in members], dtype=np.int64)


def byte_hashes(images: np.ndarray) -> np.ndarray:
    """A blake2b digest of each image's raw bytes (shape included, so 28x28 and 14x56 never collide)."""
    images = validate_images(images)
    shape = repr(images.shape[1:]).encode()
    return np.array([hashlib.blake2b(shape + image.tobytes(), digest_size=16).hexdigest() for image in images])


def find_exact_duplicates(images: np.ndarray) -> np.ndarray:
    """Group byte-identical images: returns a group id per image, -1 for images with no copy."""
    return _group_ids(byte_hashes(images))


def perceptual_hashes(images: np.ndarray) -> np.ndarray:
    """64-bit DCT perceptual hash (imagehash.phash) of each image as uint64.

    phash resizes to 32x32 before its DCT, so 28x28 inputs are upscaled by imagehash itself; hashing a
    bicubic 64x64 upscale instead gave the same distance profile on the embedded set, so none is added.
    """
    images = validate_images(images)
    bits = np.stack([imagehash.phash(Image.fromarray(image)).hash.ravel() for image in images])
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


_BYTE_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


def _popcount(values: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(values)
    return _BYTE_POPCOUNT[values.view(np.uint8)].reshape(*values.shape, 8).sum(-1)


def _close_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """All pairs i < j whose hashes differ in at most `max_distance` bits, in blocks to bound memory."""
    rows, cols = [], []
    for start in range(0, len(hashes), _PAIRWISE_CHUNK):
        block = hashes[start:start + _PAIRWISE_CHUNK]
        distance = _popcount(block[:, None] ^ hashes[None, start:])
        i, j = np.nonzero(distance <= max_distance)
        upper = j > i  # the block is compared with itself and everything after it: keep each pair once
        rows.append(i[upper] + start)
        cols.append(j[upper] + start)
    return np.concatenate(rows), np.concatenate(cols)


def find_near_duplicates(images: np.ndarray, max_distance: int = 4) -> np.ndarray:
    """Group images whose perceptual hashes differ in <= `max_distance` bits (chains join one group).

    Returns a group id per image, -1 for images with no look-alike.
    """
    _check_distance(max_distance)
    return near_duplicate_groups(perceptual_hashes(images), max_distance)


def near_duplicate_groups(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """`find_near_duplicates` on precomputed uint64 hashes: buckets for distance 0, else blockwise XOR."""
    _check_distance(max_distance)
    hashes = np.asarray(hashes, dtype=np.uint64)
    if max_distance == 0:
        return _group_ids(hashes)
    rows, cols = _close_pairs(hashes, max_distance)
    return _group_ids(_components(len(hashes), rows, cols))


# --- out-of-distribution images ----------------------------------------------------------------------


def _colour_features(rgb: np.ndarray) -> list[np.ndarray]:
    """Channel means/stds, saturation, and the mean opponent-colour (chroma) vector.

    The chroma vector (red vs green-blue, green vs blue) averages to the dominant hue direction weighted
    by colourfulness, as a saturation-weighted mean hue would, without a per-pixel HSV conversion.
    """
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # elementwise max/min of the three planes: much faster than max(-1) over a length-3 axis
    high = np.maximum(np.maximum(red, green), blue)
    low = np.minimum(np.minimum(red, green), blue)
    saturation = (high - low) / np.maximum(high, 1e-6)
    chroma = np.stack([(red - (green + blue) / 2).mean((1, 2)), (green - blue).mean((1, 2)) * np.sqrt(3) / 2], 1)
    return [rgb.mean((1, 2)), rgb.std((1, 2)), saturation.mean((1, 2))[:, None],
            saturation.std((1, 2))[:, None], chroma]


def _brightness_histogram(grey: np.ndarray, bins: int = 8) -> np.ndarray:
    index = np.minimum((grey * bins).astype(np.int64), bins - 1).reshape(len(grey), -1)
    return np.stack([(index == b).mean(1) for b in range(bins)], 1)


def _texture_features(grey: np.ndarray) -> np.ndarray:
    """Edge energy, Laplacian (fine detail), edge energy relative to contrast, and edge direction bias.

    Noise has far more fine detail per unit contrast than a cell; stripes and gradients have edges in
    one direction only, cells in all directions.
    """
    dx2 = (np.diff(grey, axis=2) ** 2).mean((1, 2))
    dy2 = (np.diff(grey, axis=1) ** 2).mean((1, 2))
    laplacian = (4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1]
                 - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:])
    edge = dx2 + dy2
    return np.stack([np.sqrt(edge), np.abs(laplacian).mean((1, 2)), edge / (grey.var((1, 2)) + 1e-6),
                     np.abs(dx2 - dy2) / (edge + 1e-6)], 1)


def _layout_features(rgb: np.ndarray) -> list[np.ndarray]:
    """Centre-minus-border colour and border variability: PBC crops centre one cell on plain background."""
    n, height, width, _ = rgb.shape
    ring = max(1, min(height, width) // 9)
    top, left = height // 4, width // 4
    centre = rgb[:, top:height - top, left:width - left].reshape(n, -1, 3)
    border = np.concatenate([rgb[:, :ring].reshape(n, -1, 3), rgb[:, -ring:].reshape(n, -1, 3),
                             rgb[:, ring:-ring, :ring].reshape(n, -1, 3),
                             rgb[:, ring:-ring, -ring:].reshape(n, -1, 3)], 1)
    return [centre.mean(1) - border.mean(1), border.std(1)]


def _channel_correlations(rgb: np.ndarray) -> np.ndarray:
    """Pairwise R/G/B correlation across pixels: stained cells vary all channels together, noise does not."""
    pixels = rgb.reshape(len(rgb), -1, 3)
    centred = pixels - pixels.mean(1, keepdims=True)
    scale = np.sqrt((centred ** 2).mean(1)) + 1e-6
    pairs = [(0, 1), (1, 2), (0, 2)]
    return np.stack([(centred[..., a] * centred[..., b]).mean(1) / (scale[:, a] * scale[:, b]) for a, b in pairs], 1)


def _features_of_block(images: np.ndarray) -> np.ndarray:
    rgb = images.astype(np.float32) / 255
    grey = rgb.mean(-1)
    parts = [*_colour_features(rgb), _brightness_histogram(grey), _texture_features(grey),
             *_layout_features(rgb), _channel_correlations(rgb)]
    return np.concatenate(parts, 1).astype(np.float32)


def image_features(images: np.ndarray, block: int = 2048) -> np.ndarray:
    """31 cheap statistics per image (colour, brightness histogram, texture, centre vs border, channel
    correlation): enough to tell a centred stained cell from noise, flat colour, stripes or clip-art,
    and fast (a few seconds for 14k images) without any pretrained network."""
    images = validate_images(images)
    return np.concatenate([_features_of_block(images[i:i + block]) for i in range(0, len(images), block)])


def robust_z(scores: np.ndarray) -> np.ndarray:
    """(score - median) / (1.4826 * MAD): a threshold in these units does not depend on the score's scale
    and is barely moved by the outliers themselves, unlike a mean/std or a fixed quantile."""
    median = np.median(scores)
    spread = _MAD_TO_SIGMA * np.median(np.abs(scores - median))
    if spread <= 0:
        spread = np.mean(np.abs(scores - median)) or 1.0
    return (scores - median) / spread


def outlier_scores(images: np.ndarray, method: str = "isolation_forest", seed: int = 0, *,
                   n_estimators: int = 300, n_neighbors: int = 35) -> np.ndarray:
    """Unusualness of each image as a robust z-score (higher = less like the rest), fitted on `images`.

    The detector is unsupervised and fitted on the data that contains the outliers. IsolationForest is
    the default because it scores by how quickly a point is separated from the bulk, so a batch of
    look-alike outliers (e.g. hundreds of noise images) still scores high. LOF compares local densities,
    so such a batch looks like a normal dense cluster: on the planted test set it recalls only ~20% of
    them; use it only when outliers are known to be scattered one-offs.
    """
    _check_method(method)
    if len(images) < MIN_IMAGES_FOR_OUTLIERS:
        raise DataError(f"outlier detection needs at least {MIN_IMAGES_FOR_OUTLIERS} images, got {len(images)} "
                        "(disable it with CleaningConfig(outliers=False))")
    features = RobustScaler().fit_transform(image_features(images))
    features = np.clip(features, -_FEATURE_CLIP, _FEATURE_CLIP)
    if method == "isolation_forest":
        forest = IsolationForest(n_estimators=n_estimators, random_state=seed, n_jobs=1).fit(features)
        raw = -forest.score_samples(features)
    else:
        lof = LocalOutlierFactor(n_neighbors=min(n_neighbors, len(features) - 1)).fit(features)
        raw = -lof.negative_outlier_factor_
    return robust_z(raw)


def flag_outliers(z_scores: np.ndarray, z_threshold: float, contamination: float | None) -> np.ndarray:
    """Boolean mask: the top `contamination` share when that is known, else z above the threshold."""
    if contamination is None:
        return z_scores > z_threshold
    count = int(round(contamination * len(z_scores)))
    mask = np.zeros(len(z_scores), dtype=bool)
    if count:
        mask[np.argsort(-z_scores, kind="stable")[:count]] = True
    return mask


# --- clean -------------------------------------------------------------------------------------------


def _duplicate_groups(digests: np.ndarray, hashes: np.ndarray | None, config: CleaningConfig) -> np.ndarray:
    """Exact and near groups merged: an image linked to another by either test joins its group."""
    n = len(digests)
    exact = _group_ids(digests) if config.exact else np.full(n, -1)
    near = near_duplicate_groups(hashes, config.near_distance) if hashes is not None else np.full(n, -1)
    exact_rows, exact_cols = _edges_to_first_member(exact)
    near_rows, near_cols = _edges_to_first_member(near)
    rows, cols = np.concatenate([exact_rows, near_rows]), np.concatenate([exact_cols, near_cols])
    return _group_ids(_components(n, rows, cols))


def _members_by_group(groups: np.ndarray) -> list[np.ndarray]:
    """Indices of each group's images in ascending order, groups in id order (one sort, not one scan each)."""
    grouped = np.flatnonzero(groups >= 0)
    grouped = grouped[np.argsort(groups[grouped], kind="stable")]
    boundaries = np.flatnonzero(np.diff(groups[grouped])) + 1
    return np.split(grouped, boundaries) if len(grouped) else []


def _duplicate_rows(labels: np.ndarray, groups: np.ndarray, digests: np.ndarray, hashes: np.ndarray | None,
                    drop_conflicts: bool) -> list[dict]:
    """Report rows for every grouped image; the first copy of a label-consistent group is kept.

    A dropped copy is an 'exact_duplicate' when byte-identical to the kept copy, else a 'near_duplicate';
    the kept copy carries the reason of the group (exact if it has any byte-identical copy).
    """
    rows = []
    for members in _members_by_group(groups):
        first = members[0]
        conflict = drop_conflicts and len(np.unique(labels[members])) > 1
        identical = digests[members] == digests[first]
        for index, is_exact in zip(members, identical):
            if conflict:
                reason = "label_conflict"
            elif index == first:
                reason = "exact_duplicate" if identical.sum() > 1 else "near_duplicate"
            else:
                reason = "exact_duplicate" if is_exact else "near_duplicate"
            distance = 0 if hashes is None else int(_popcount(hashes[index] ^ hashes[first]))
            rows.append(dict(index=int(index), reason=reason, group=int(groups[first]), score=float(distance),
                             kept=bool(index == first and not conflict)))
    return rows


def _outlier_rows(dataset: ImageDataset, candidates: np.ndarray, config: CleaningConfig) -> list[dict]:
    z = outlier_scores(dataset.images[candidates], config.outlier_method, config.seed,
                       n_estimators=config.n_estimators, n_neighbors=config.lof_neighbors)
    flagged = flag_outliers(z, config.outlier_z, config.outlier_contamination)
    return [dict(index=int(i), reason="outlier", group=-1, score=float(s), kept=False)
            for i, s in zip(candidates[flagged], z[flagged])]


def _remap_splits(splits: dict[str, np.ndarray], kept: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Translate split indices to positions in the kept rows, dropping removed images."""
    new_position = np.full(n, -1, dtype=np.int64)
    new_position[kept] = np.arange(len(kept))
    remapped = {}
    for name, indices in splits.items():
        moved = new_position[indices]
        remapped[name] = moved[moved >= 0]
    return remapped


def _report_frame(dataset: ImageDataset, rows: list[dict], removed: np.ndarray) -> pd.DataFrame:
    report = pd.DataFrame(rows, columns=["index", "reason", "group", "score", "kept"])
    report["index"] = report["index"].astype(np.int64)
    # An image can be the kept copy of a group and also an outlier: every row shows its final fate.
    report["kept"] = ~removed[report["index"].to_numpy()]
    report.insert(0, "id", dataset.ids[report["index"].to_numpy()])
    report.insert(2, "label", dataset.labels[report["index"].to_numpy()])
    report = report.astype({"group": np.int64, "score": np.float64, "kept": bool})
    return report.sort_values(["index", "reason"], kind="stable").reset_index(drop=True)[REPORT_COLUMNS]


def write_report(report: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the report as CSV atomically (temp file in the same folder, then os.replace), so a crash
    never leaves a half-written report where an old complete one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", newline="") as temp_file:
            report.to_csv(temp_file, index=False)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def clean(dataset: ImageDataset, config: CleaningConfig | None = None,
          report_path: str | os.PathLike | None = None) -> tuple[ImageDataset, pd.DataFrame]:
    """Remove duplicates, label conflicts and outliers; return (cleaned copy, report).

    Order matters: duplicates are resolved first and the outlier detector is fitted only on the
    images that survive (so z-scores are relative to them), so that many copies of one odd image
    cannot form a dense cluster that hides itself. The returned data set keeps the source's splits, re-indexed to the
    kept rows.
    The report has one row per removed or flagged image (kept copies of duplicate groups appear
    with kept=True); `score` is the hash distance to the group's first copy for duplicates and the
    robust z-score for outliers.
    """
    if not isinstance(dataset, ImageDataset):
        raise DataError(f"clean() expects an ImageDataset, got {type(dataset).__name__}")
    config = config or CleaningConfig()
    n = len(dataset)
    rows: list[dict] = []
    if config.exact or config.near_distance is not None:
        digests = byte_hashes(dataset.images)
        hashes = perceptual_hashes(dataset.images) if config.near_distance is not None else None
        groups = _duplicate_groups(digests, hashes, config)
        rows += _duplicate_rows(dataset.labels, groups, digests, hashes, config.drop_label_conflicts)
    removed = np.zeros(n, dtype=bool)
    removed[[r["index"] for r in rows if not r["kept"]]] = True
    if config.outliers:
        rows += _outlier_rows(dataset, np.flatnonzero(~removed), config)
        removed[[r["index"] for r in rows if r["reason"] == "outlier"]] = True
    kept = np.flatnonzero(~removed)
    if len(kept) == 0:
        raise DataError(f"{dataset.source or 'data set'}: cleaning would remove every image")
    report = _report_frame(dataset, rows, removed)
    cleaned = dataset.subset(kept).with_splits(_remap_splits(dict(dataset.splits), kept, n))
    if report_path is not None:
        write_report(report, report_path)
    return cleaned, report
