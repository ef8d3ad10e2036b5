"""Study specs, CLI overrides, the search space and device planning: fast, no training."""

import optuna
import pytest

from search.config import ConfigError
from search.executors.devices_plan import parse_gpus, plan_workers
from search.run import apply_overrides, parse_args
from search.space import config_from_params, suggest_params, warm_start_params
from search.spec import load_spec, spec_from_dict


@pytest.mark.parametrize("name", ["default", "an2dl_gpu"])
def test_shipped_specs_load(name):
    spec = load_spec(name)
    assert spec.name == name
    assert spec.warm_start and warm_start_params(spec) == spec.warm_start


def test_an2dl_spec_is_the_competition_setting():
    spec = load_spec("an2dl_gpu")
    assert spec.space.weights == "imagenet"
    assert {"efficientnet_v2_s", "convnext_large", "mobilenet_v3_small", "resnet50"} <= set(spec.space.backbones)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"budget": {"trails": 3}}, "unknown key 'budget.trails'"),
        ({"budgets": {}}, "unknown key 'budgets'"),
        ({"budget": {"trials": "many"}}, "'budget.trials' should be like 100"),
        ({"executor": {"kind": "slurm"}}, "'executor.kind'"),
        ({"space": {"learning_rate": [1e-2, 1e-4]}}, "'space.learning_rate'"),
        ({"warm_start": {"backbone": "x"}}, "'warm_start' must be an array"),
        ({"space": {"backbones": ["vgg99"]}}, "unknown backbone 'vgg99' in 'space.backbones'"),
    ],
)
def test_bad_spec_names_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        spec_from_dict(values)


def test_missing_and_invalid_spec_files(tmp_path):
    with pytest.raises(ConfigError, match="study spec not found: .*nope.toml .*default"):
        load_spec(str(tmp_path / "nope.toml"))
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_spec(str(broken))


def test_cli_flags_override_the_spec(tmp_path):
    args = parse_args(["--trials", "7", "--timeout", "60", "--storage", "sqlite:///x.db", "--executor", "ray",
                       "--gpus", "2", "--data", "cells.npz", "--out", str(tmp_path), "--workers", "3"])
    spec = apply_overrides(load_spec("default"), args)
    assert (spec.budget.trials, spec.budget.timeout_s, spec.storage.url) == (7, 60, "sqlite:///x.db")
    assert (spec.executor.kind, spec.executor.gpus, spec.executor.workers) == ("ray", "2", 3)
    assert spec.data.path == "cells.npz" and spec.study_dir == tmp_path / "default"


def _sample(spec, pretrained):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=3))
    trial = study.ask()
    params = suggest_params(trial, spec, pretrained)
    return trial, params, config_from_params(params, spec, pretrained, seed=1)


def test_space_is_conditional_on_the_backbone():
    spec = load_spec("an2dl_gpu")
    _, params, config = _sample(spec, lambda name: True)
    assert "unfreeze_fraction" in params and config.weights == "imagenet"
    spec = load_spec("default")
    _, params, config = _sample(spec, lambda name: False)
    assert "unfreeze_fraction" not in params and config.weights is None
    assert config.split_file.endswith("split.json") and config.tta_views == spec.budget.tta_views


def test_weight_decay_only_for_optimizers_that_use_it():
    spec = spec_from_dict({"space": {"optimizers": ["adam"]}})
    _, params, config = _sample(spec, lambda name: False)
    assert "weight_decay" not in params and config.weight_decay == 0.0


def test_gpu_lists_and_worker_plans():
    assert parse_gpus("none") == []
    assert parse_gpus("2") == ["0", "1"]
    assert parse_gpus("1,3") == ["1", "3"]
    with pytest.raises(ConfigError, match="invalid --gpus"):
        parse_gpus("gpu0")
    plan = plan_workers(["0", "1"], None, cpu_count=8)
    assert [d.gpu for d in plan] == ["0", "1"] and all(d.cpu_threads == 4 for d in plan)
    plan = plan_workers([], None, cpu_count=2)
    assert [d.gpu for d in plan] == [None, None] and all(d.cpu_threads == 1 for d in plan)
    assert len(plan_workers([], 1, cpu_count=2)) == 1 and plan_workers([], 1, cpu_count=2)[0].cpu_threads == 2
