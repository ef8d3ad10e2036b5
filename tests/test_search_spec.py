"""Study specs, CLI overrides, the search space and device planning: fast, no training."""

import os
import subprocess
import sys

import optuna
import pytest

from common.errors import ConfigError
from search.execution.devices import WorkerDevices, pin_environment
from search.execution.devices_plan import parse_gpus, plan_workers, usable_cores
from search.run import parse_args, spec_from_args
from search.study.space import config_from_params, suggest_params, warm_start_trials
from search.study.spec import WARM_START_KEYS, load_spec, spec_from_dict


@pytest.mark.parametrize("name", ["default", "an2dl_gpu", "fast", "accurate"])
def test_shipped_specs_load(name):
    spec = load_spec(name)
    assert spec.name == name
    assert spec.warm_start
    assert [params for params, _ in warm_start_trials(spec)] == [
        {k: v for k, v in e.items() if k not in WARM_START_KEYS} for e in spec.warm_start
        for _ in range(e.get("copies", 1))]


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
        ({"warm_start": [{"backbone": "compact_cnn", "copies": 0}]}, r"'warm_start\[0\].copies': 0"),
        ({"warm_start": [{}, {"prune": "no"}]}, r"'warm_start\[1\].prune': 'no' \(should be true or false\)"),
        ({"space": {"backbones": ["vgg99"]}}, "unknown backbone 'vgg99' in 'space.backbones'"),
        ({"space": {"augment_policies": ["light", "sparkle"]}}, "unknown augmentation policy 'sparkle'"),
        ({"algorithm": {"objective": "val_loss"}}, "'algorithm.objective': 'val_loss'.*robust"),
        ({"algorithm": {"objective": "multi", "pruner": "median"}}, "'multi' cannot prune.*'algorithm.pruner'"),
        ({"robustness": {"heldout_families": ["weather"]}}, "unknown family 'weather' in 'robustness.heldout"),
        ({"robustness": {"train_families": ["noise", "artefact"]}}, "'artefact' is in both"),
        ({"robustness": {"heldout_families": []}}, "'robustness.heldout_families' is empty"),
        ({"robustness": {"train_families": ["noise"], "heldout_families": ["colour"]}},
         "policy 'light' .* held-out family 'colour'"),
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
                       "--gpus", "2", "--data", "cells.npz", "--out", str(tmp_path), "--workers", "3", "--cpus", "1",
                       "--mixed-precision", "bfloat16"])
    spec = spec_from_args(args)
    assert (spec.budget.trials, spec.budget.timeout_s, spec.storage.url) == (7, 60, "sqlite:///x.db")
    assert (spec.executor.kind, spec.executor.gpus, spec.executor.workers, spec.executor.cpus) == ("ray", "2", 3, 1)
    assert spec.executor.mixed_precision == "bfloat16"
    with pytest.raises(ConfigError, match="executor.cpus"):
        spec_from_args(parse_args(["--cpus", "0"]))
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


def test_gradual_unfreeze_is_a_searched_option_for_pretrained_backbones():
    fixed = spec_from_dict({"space": {"gradual_unfreeze": [True]}})
    _, params, config = _sample(fixed, lambda name: True)
    assert params["gradual_unfreeze"] is True and config.gradual_unfreeze is True
    _, params, config = _sample(fixed, lambda name: False)  # from scratch: one stage, nothing to unfreeze
    assert "gradual_unfreeze" not in params and config.gradual_unfreeze is False
    assert not _sample(load_spec("an2dl_gpu"), lambda name: True)[2].gradual_unfreeze  # default: off
    with pytest.raises(ConfigError, match="space.gradual_unfreeze"):
        spec_from_dict({"space": {"gradual_unfreeze": ["yes"]}})


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
    plan = plan_workers(["0", "1"], None, cores=list(range(8)))
    assert [d.gpu for d in plan] == ["0", "1"] and all(d.cpu_threads == 4 for d in plan)
    assert [d.cpu_cores for d in plan] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    plan = plan_workers([], None, cores=[0, 1])
    assert [d.gpu for d in plan] == [None, None] and all(d.cpu_threads == 1 for d in plan)
    assert [d.cpu_cores for d in plan] == [(0,), (1,)]
    lone = plan_workers([], 1, cores=[0, 1])
    assert len(lone) == 1 and lone[0].cpu_threads == 2 and lone[0].cpu_cores == (0, 1)
    crowded = plan_workers([], 3, cores=[0, 1])
    assert all(d.cpu_threads == 1 and d.cpu_cores is None for d in crowded)  # more workers than cores: no pin
    assert all(d.gpu_memory is None for d in [*plan, *lone, *crowded])  # no GPU, or one each: no cap
    shared = plan_workers(["0", "1"], 5, cores=list(range(10)))
    assert [(d.gpu, d.gpu_memory) for d in shared] == [("0", 0.3), ("1", 0.45), ("0", 0.3), ("1", 0.45), ("0", 0.3)]


def test_cpus_limits_the_cores_and_bad_values_are_named():
    available = usable_cores()
    assert usable_cores(1) == available[:1]
    with pytest.raises(ConfigError, match="invalid cpus value 0"):
        usable_cores(0)
    with pytest.raises(ConfigError, match=f"only {len(available)} core"):
        usable_cores(len(available) + 1)


def test_a_worker_is_pinned_to_its_cores():
    device = plan_workers([], None, cores=usable_cores(1))[0]
    env = {**os.environ, **pin_environment(device)}
    code = ("import os; from search.execution.devices import pin_cpu_cores; pin_cpu_cores(); "
            "print(sorted(os.sched_getaffinity(0)))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(list(device.cpu_cores))


# Steps that allocate a compute thread's activations (28x28, a 128-image batch), alive together, then freed
STEPS = ("import resource, threading, numpy as np\n{setup}\n"
         "def steps():\n"
         "    for _ in range(20):\n"
         "        alive = [np.ones(n, np.uint8) for n in (12849152, 6426624, 3215360, 28000256, 12849152, 6426624, "
         "1208320, 22130688)]\n"
         "        del alive\n"
         "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
         "thread = threading.Thread(target=steps); thread.start(); thread.join()\n"
         "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")


def page_faults(env: dict, setup: str = "") -> int:
    """Minor page faults of the steps in a fresh process."""
    return int(subprocess.run([sys.executable, "-c", STEPS.format(setup=setup)], env=env, capture_output=True,
                              text=True, check=True).stdout)


@pytest.fixture
def plain_malloc(monkeypatch) -> dict:
    """The environment without MALLOC_* variables (conftest.py's, or the user's own)."""
    for name in [name for name in os.environ if name.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    return dict(os.environ)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_a_worker_keeps_freed_tensor_memory_instead_of_faulting_it_in_again(plain_malloc):
    worker = {**plain_malloc, **pin_environment(WorkerDevices(cpu_threads=1))}
    faults = {"plain": page_faults(plain_malloc), "worker": page_faults(worker)}
    assert worker["MALLOC_ARENA_MAX"] == "1" and faults["worker"] < faults["plain"] / 3, faults
    assert "MALLOC_ARENA_MAX" not in pin_environment(WorkerDevices())  # glibc's default number of arenas
    own = subprocess.run([sys.executable, "-c", "from common.malloc import malloc_environment; "
                          "print(malloc_environment(1))"], env={**plain_malloc, "MALLOC_ARENA_MAX": "4"},
                         capture_output=True, text=True, check=True)
    assert own.stdout.strip() == "{}"  # the user's own settings stand


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_a_command_keeps_freed_tensor_memory_in_its_own_process(plain_malloc):
    """Every command runs through run_cli, which applies the workers' settings to its own process."""
    command = "from common.cli_errors import run_cli\nrun_cli(lambda argv: 0, [])"
    faults = {"plain": page_faults(plain_malloc), "command": page_faults(plain_malloc, command),
              "own": page_faults({**plain_malloc, "MALLOC_TOP_PAD_": "0"}, command)}
    assert faults["command"] < faults["plain"] / 3 and faults["own"] > faults["plain"] / 2, faults


def test_a_jax_worker_compiles_into_the_studys_cache_and_keeps_a_cache_the_user_named(tmp_path):
    """A worker's environment, applied before JAX starts, as the local executor and the refit start workers."""
    code = ("import os, sys; from pathlib import Path; from search.execution.devices import WorkerDevices, "
            "pin_environment; env = pin_environment(WorkerDevices(), Path(sys.argv[1])); "
            "print(env.get('JAX_COMPILATION_CACHE_DIR')); os.environ.update(env); import keras, jax; "
            "keras.ops.sum(jax.jit(lambda x: jax.numpy.sin(x) @ x.T)(jax.numpy.ones((64, 64))))")
    cache, mine, other = tmp_path / "runs" / "jax_cache", tmp_path / "mine", tmp_path / "tf" / "jax_cache"
    assert worker_environment(code, "jax", cache) == str(cache) and any(cache.iterdir())  # even a graph under 1 s
    assert worker_environment(code, "jax", tmp_path / "unused", JAX_COMPILATION_CACHE_DIR=str(mine)) == str(mine)
    assert any(mine.iterdir()) and not (tmp_path / "unused").exists()
    assert worker_environment(code, "tensorflow", other) == "None" and not other.exists()


def test_jax_workers_sharing_a_gpu_are_capped_at_their_share_unless_the_user_set_one():
    code = ("import os, sys; from search.execution.devices import WorkerDevices, pin_environment; "
            "env = {**os.environ, **pin_environment(WorkerDevices(gpu='0', gpu_memory=float(sys.argv[1])))}; "
            "print(env.get('XLA_PYTHON_CLIENT_MEM_FRACTION'))")  # the worker's whole environment
    assert worker_environment(code, "jax", 0.3) == "0.300"
    assert worker_environment(code, "jax", 0.3, XLA_CLIENT_MEM_FRACTION="0.5") == "None"  # JAX refuses both names
    assert worker_environment(code, "jax", 0.3, XLA_PYTHON_CLIENT_MEM_FRACTION="0.5") == "0.5"
    assert worker_environment(code, "tensorflow", 0.3) == "None"  # TensorFlow grows its memory instead


def worker_environment(code: str, backend: str, argument, **env) -> str:
    """The last line `code` prints, run with `argument` under `backend` with `env` (and no fraction or cache of
    this machine's own unless given)."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION", "JAX_COMPILATION_CACHE_DIR",
                          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    done = subprocess.run([sys.executable, "-c", code, str(argument)], capture_output=True, text=True,
                          env={**clean, "KERAS_BACKEND": backend, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]
