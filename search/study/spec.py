"""Study specs: one TOML file names the data, split, search space, budget, executor and storage.

Every key is checked against the dataclass fields below, so a typo fails with the key's name instead of
being silently ignored.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError
from search.study.goals import OBJECTIVES
from search.study.trial_config import MIXED_PRECISIONS

if TYPE_CHECKING:
    from search.study.location import StudyLocation

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The shipped specs are package data of the `studies` package, so they are found from any working directory
# and in a non-editable install or wheel, not through the source tree.
STUDIES_DIR = resources.files("studies")


@dataclass
class DataSpec:
    """The data: `path` an .npz, a class-per-folder tree or a .csv of files and labels (data_pipeline.loaders);
    `image_size` and `center_crop` (pixels) apply to image files, which are resized to 64 px by default."""

    path: str | None = None  # None / "": the embedded 28x28 PBC set
    image_size: int | None = None  # image files: resize to this side (None: 64)
    center_crop: int | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    max_train_images: int | None = None


@dataclass
class SpaceSpec:
    """Ranges and choices of the define-by-run search space (see search.study.space)."""

    backbones: list[str] = field(default_factory=lambda: ["small_resnet", "compact_cnn"])
    weights: str | None = None  # applied to pretrained families: "imagenet", None or a file
    augment_policies: list[str] = field(default_factory=lambda: ["light", "randaugment", "augmix", "cutmix_mixup"])
    augment_strength: list[float] = field(default_factory=lambda: [0.0, 1.0])
    optimizers: list[str] = field(default_factory=lambda: ["adamw", "adam", "lion", "sgd"])
    learning_rate: list[float] = field(default_factory=lambda: [3e-4, 1e-2])
    weight_decay: list[float] = field(default_factory=lambda: [1e-6, 1e-2])
    batch_size: list[int] = field(default_factory=lambda: [64, 128, 256])
    dropout: list[float] = field(default_factory=lambda: [0.0, 0.5])
    label_smoothing: list[float] = field(default_factory=lambda: [0.0, 0.2])
    epochs: list[int] = field(default_factory=lambda: [6, 20])
    head_epochs: int = 2
    unfreeze_fraction: list[float] = field(default_factory=lambda: [0.0, 1.0])
    finetune_lr_factor: list[float] = field(default_factory=lambda: [0.05, 0.5])
    gradual_unfreeze: list[bool] = field(default_factory=lambda: [False])  # [false, true]: searched
    class_weighting: list[bool] = field(default_factory=lambda: [False, True])


@dataclass
class BudgetSpec:
    trials: int = 100
    timeout_s: float | None = None  # the whole run's seconds: trials still running stop at an epoch boundary
    trial_time_budget_s: float | None = None  # cap on one trial's training
    early_stopping_patience: int = 5
    tta_views: int = 8


@dataclass
class AlgorithmSpec:
    sampler: str = "tpe"  # tpe | random
    multivariate: bool = True
    n_startup_trials: int = 8
    seed: int | None = 0
    pruner: str = "hyperband"  # hyperband | median | none
    min_resource: int = 2
    reduction_factor: int = 3
    objective: str = "robust"  # robust | val_accuracy_tta | multi (see search.study.goals)


@dataclass
class RobustnessSpec:
    """The leave-families-out protocol (data_pipeline.corrupt.FAMILIES): training augmentation may draw
    only from `train_families`; every trial is also scored on a seeded corrupted copy of the validation
    split made with the `heldout_families`, at every severity."""

    train_families: list[str] = field(default_factory=lambda: ["noise", "blur", "colour"])
    heldout_families: list[str] = field(default_factory=lambda: ["acquisition", "artefact"])
    seed: int = 0
    refit: bool = False  # the build retrains its members on every family, held-out ones included (ensemble.refit)


@dataclass
class CleaningSpec:
    """Cleaning before the split (data_pipeline.cleaning): duplicates, label conflicts, non-cell outliers."""

    enabled: bool = True
    near_distance: int = 4  # pHash bits; -1: exact duplicates only
    drop_label_conflicts: bool = True
    outliers: bool = True
    outlier_z: float = 4.5


@dataclass
class ExecutorSpec:
    kind: str = "local"  # local | ray
    workers: int | None = None  # None: one per GPU, else one per core (see search.execution.devices_plan)
    gpus: str | None = None  # None: detect; "0,1" or "2" to fake or choose devices
    cpus: int | None = None  # cores (local) or cluster CPUs (ray) this driver takes (None: all)
    gpus_per_trial: float = 1.0
    address: str | None = None  # ray: join an existing cluster
    mixed_precision: str = "auto"  # auto | on | bfloat16 | off: search.execution.devices.training_policy


@dataclass
class StorageSpec:
    url: str | None = None  # None: sqlite:///<out>/<study>/study.db ; or any SQLAlchemy URL, or journal:PATH
    artifacts: str | None = None  # None: <out>/<study>/artifacts ; or s3://bucket/prefix
    heartbeat_interval: int = 10
    grace_period: int = 30
    max_retry: int = 1


@dataclass
class StudySpec:
    name: str = "default"
    out: str = "runs"
    data: DataSpec = field(default_factory=DataSpec)
    space: SpaceSpec = field(default_factory=SpaceSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    algorithm: AlgorithmSpec = field(default_factory=AlgorithmSpec)
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    robustness: RobustnessSpec = field(default_factory=RobustnessSpec)
    cleaning: CleaningSpec = field(default_factory=CleaningSpec)
    warm_start: list[dict[str, Any]] = field(default_factory=list)

    @property
    def location(self) -> "StudyLocation":
        from search.study.location import StudyLocation

        return StudyLocation(self.name, self.out, self.storage.url or "", self.storage.artifacts or "")

    @property
    def study_dir(self) -> Path:
        return self.location.folder

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(StudySpec)}
SECTION_TYPES = {"data": DataSpec, "space": SpaceSpec, "budget": BudgetSpec, "algorithm": AlgorithmSpec,
                 "executor": ExecutorSpec, "storage": StorageSpec, "robustness": RobustnessSpec,
                 "cleaning": CleaningSpec}



def _build_section(name: str, cls: type, values: Any, origin: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{origin}: [{name}] must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{origin}: unknown key '{name}.{key}' (known: {', '.join(known)})")
        default = getattr(cls(), key)
        if default is not None and value is not None and not _same_kind(default, value):
            raise ConfigError(f"{origin}: '{name}.{key}' should be like {default!r}, got {value!r}")
    return cls(**{k: (None if v == "" else v) for k, v in values.items()})


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


def spec_from_dict(values: dict[str, Any], origin: str = "spec") -> StudySpec:
    spec = StudySpec()
    for key, value in values.items():
        if key in SECTION_TYPES:
            setattr(spec, key, _build_section(key, SECTION_TYPES[key], value, origin))
        elif key == "warm_start":
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"{origin}: 'warm_start' must be an array of tables ([[warm_start]])")
            _validate_warm_start(value, origin)
            spec.warm_start = value
        elif key in ("name", "out"):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{origin}: '{key}' must be a non-empty string")
            setattr(spec, key, value)
        else:
            raise ConfigError(f"{origin}: unknown key '{key}' (known: {', '.join(SECTIONS)})")
    validate_spec(spec, origin)
    return spec


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


WARM_START_KEYS = {"copies": "a positive integer like 2", "prune": "true or false"}  # settings, not parameters


def _validate_warm_start(entries: list[dict], origin: str) -> None:
    for index, entry in enumerate(entries):
        copies, prune = entry.get("copies", 1), entry.get("prune", True)
        for key, ok in {"copies": _positive_int(copies), "prune": isinstance(prune, bool)}.items():
            if not ok:
                raise ConfigError(f"{origin}: invalid value for 'warm_start[{index}].{key}': {entry[key]!r} "
                                  f"(should be {WARM_START_KEYS[key]})")


def validate_spec(spec: StudySpec, origin: str = "spec") -> None:
    checks = {
        "executor.kind": spec.executor.kind in ("local", "ray"),
        "executor.workers": spec.executor.workers is None or _positive_int(spec.executor.workers),
        "executor.cpus": spec.executor.cpus is None or _positive_int(spec.executor.cpus),
        "executor.mixed_precision": spec.executor.mixed_precision in MIXED_PRECISIONS,
        "data.image_size": spec.data.image_size is None or _positive_int(spec.data.image_size),
        "data.center_crop": spec.data.center_crop is None or _positive_int(spec.data.center_crop),
        "algorithm.sampler": spec.algorithm.sampler in ("tpe", "random"),
        "algorithm.pruner": spec.algorithm.pruner in ("hyperband", "median", "none"),
        "budget.trials": spec.budget.trials >= 1,
        "budget.timeout_s": spec.budget.timeout_s is None or spec.budget.timeout_s > 0,
        "budget.tta_views": spec.budget.tta_views in (1, 2, 4, 8),
        "space.backbones": bool(spec.space.backbones),
        "space.optimizers": bool(spec.space.optimizers),
        "space.augment_policies": bool(spec.space.augment_policies),
        "space.gradual_unfreeze": bool(spec.space.gradual_unfreeze)
        and all(isinstance(v, bool) for v in spec.space.gradual_unfreeze),
    }
    for key in ("learning_rate", "weight_decay", "augment_strength", "dropout", "label_smoothing", "epochs",
                "unfreeze_fraction", "finetune_lr_factor"):
        low_high = getattr(spec.space, key)
        checks[f"space.{key}"] = len(low_high) == 2 and low_high[0] <= low_high[1]
    checks["algorithm.objective"] = spec.algorithm.objective in OBJECTIVES
    from backbones import list_backbones

    unknown = [b for b in spec.space.backbones if b not in list_backbones()]
    if unknown:
        raise ConfigError(f"{origin}: unknown backbone {unknown[0]!r} in 'space.backbones' "
                          f"(available: {', '.join(list_backbones())})")
    for key, ok in checks.items():
        if not ok:
            section, name = key.split(".")
            choices = {"algorithm.objective": OBJECTIVES, "executor.mixed_precision": MIXED_PRECISIONS}.get(key)
            hint = f" (choose one of {', '.join(choices)})" if choices else ""
            raise ConfigError(f"{origin}: invalid value for '{key}': {getattr(getattr(spec, section), name)!r}"
                              + hint)
    if spec.algorithm.objective == "multi" and spec.algorithm.pruner != "none":
        raise ConfigError(f"{origin}: 'algorithm.objective' = 'multi' cannot prune (Optuna does not prune "
                          f"multi-objective studies): set 'algorithm.pruner' = 'none', not "
                          f"{spec.algorithm.pruner!r}")
    _validate_robustness(spec, origin)


def _validate_robustness(spec: StudySpec, origin: str) -> None:
    """Families exist and do not overlap, and no searched policy reaches a held-out family."""
    from data_pipeline.policies import POLICIES, policy_families
    from data_pipeline.corrupt import FAMILIES

    robustness = spec.robustness
    for key in ("train_families", "heldout_families"):
        unknown = [f for f in getattr(robustness, key) if f not in FAMILIES]
        if unknown:
            raise ConfigError(f"{origin}: unknown family {unknown[0]!r} in 'robustness.{key}' "
                              f"(families: {', '.join(FAMILIES)})")
    if not robustness.heldout_families:
        raise ConfigError(f"{origin}: 'robustness.heldout_families' is empty: hold out at least one family "
                          f"(default: acquisition, artefact) to score trials on shift nobody trained for")
    both = sorted(set(robustness.train_families) & set(robustness.heldout_families))
    if both:
        raise ConfigError(f"{origin}: family {both[0]!r} is in both 'robustness.train_families' and "
                          f"'robustness.heldout_families'")
    for policy in spec.space.augment_policies:
        if policy not in POLICIES:
            raise ConfigError(f"{origin}: unknown augmentation policy {policy!r} in 'space.augment_policies' "
                              f"(available: {', '.join(POLICIES)})")
        leaked = sorted(policy_families(policy, robustness.train_families) & set(robustness.heldout_families))
        if leaked:
            raise ConfigError(f"{origin}: policy {policy!r} in 'space.augment_policies' applies the held-out "
                              f"family {leaked[0]!r} ('robustness.heldout_families')")


def resolve_spec_path(study: str | None) -> Path | resources.abc.Traversable:
    """A `.toml` path as given, or the name of a shipped spec (`quick` -> studies/quick.toml in the package)."""
    name = study or "default"
    path = Path(name) if name.endswith(".toml") else STUDIES_DIR / f"{name}.toml"
    if not path.is_file():
        available = ", ".join(sorted(p.name[:-5] for p in STUDIES_DIR.iterdir() if p.name.endswith(".toml")))
        raise ConfigError(f"study spec not found: {path} (shipped specs: {available})")
    return path


def load_spec(study: str | None = None) -> StudySpec:
    path = resolve_spec_path(study)
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    return spec_from_dict(values, origin=str(path))
