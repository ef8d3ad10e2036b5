"""The Optuna objective: sample a configuration, train it, prune through per-epoch reports, and publish the
trial's metrics (user attributes) and files (artifact store) so the storage alone describes the study."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import traceback
from pathlib import Path

import optuna
from optuna.artifacts import upload_artifact

from search.config import TrialConfig
from search.reseed import is_reseed
from search.space import config_from_params, suggest_params
from search.spec import StudySpec
from search.trainer import ARTIFACT_FILES, TrialResult, train_trial

ARTIFACT_ATTR_PREFIX = "artifact:"


def is_pretrained(backbone: str) -> bool:
    from backbones import get_backbone

    return get_backbone(backbone).pretrained


def device_label() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"gpu:{visible}" if visible else "cpu"


def trial_config(trial: optuna.Trial, spec: StudySpec) -> TrialConfig:
    params = suggest_params(trial, spec, is_pretrained)
    seed = (spec.algorithm.seed or 0) + trial.number
    return config_from_params(params, spec, is_pretrained, seed)


def publish_result(trial: optuna.Trial | optuna.trial.FrozenTrial, result: TrialResult, artifact_store,
                   storage: optuna.storages.BaseStorage | None = None) -> None:
    """Metrics become user attributes and files go to the artifact store (ids kept as user attributes).

    A live `Trial` carries its storage; a `FrozenTrial` (Ray Tune's driver side) needs `storage` given.
    """
    set_attr = trial.set_user_attr if storage is None else functools.partial(storage.set_trial_user_attr,
                                                                             trial._trial_id)
    for key, value in result.metrics.items():
        set_attr(key, value)
    for name in ARTIFACT_FILES:
        artifact_id = upload_artifact(artifact_store=artifact_store, file_path=str(result.directory / name),
                                      study_or_trial=trial, storage=storage)
        set_attr(ARTIFACT_ATTR_PREFIX + name, artifact_id)


class Objective:
    """Callable for `study.optimize`. Trains in a scratch folder that is removed once uploaded."""

    def __init__(self, spec: StudySpec, artifact_store) -> None:
        self.spec = spec
        self.artifact_store = artifact_store

    def __call__(self, trial: optuna.Trial) -> float:
        config = trial_config(trial, self.spec)
        trial.set_user_attr("seed", config.seed)
        trial.set_user_attr("device", device_label())
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        work_dir = self.spec.study_dir / "work" / f"trial_{trial.number:05d}"

        def report(epoch: int, val_accuracy: float) -> None:
            trial.report(val_accuracy, epoch)
            if not is_reseed(trial) and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch} at val_accuracy {val_accuracy:.4f}")

        try:
            result = train_trial(config, work_dir, report=report)
            publish_result(trial, result, self.artifact_store)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}"[:500])
            trial.set_user_attr("fail_traceback", traceback.format_exc()[-2000:])
            raise
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        return float(result.metrics[self.spec.algorithm.objective])


def work_root(spec: StudySpec) -> Path:
    return spec.study_dir / "work"
