"""A Ray cluster as users run one, on this machine: a head node and a second node joined with `--address`
(`ray start`, one CPU each), one PostgreSQL storage, one S3 artifact store (moto) both nodes reach, and two
drivers (`python -m search.run --executor ray --address ...`, two shells) on one study.

One study checks, in order: its trials spread over both nodes, each recording its node; a second driver
shares the work; killing the second node mid-study (every process of it, SIGKILL) loses no completed trial,
and the study finishes on the head node, the lost trials' configurations run again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from search.execution.ray_executor import WORKER_ATTR
from search.trial.objective import ARTIFACT_ATTR_PREFIX
from search.execution.storage import open_artifact_store
from search.study.optuna_study import FINISHED
from search_helpers import RAY_ENV, moto_s3, ray_cluster, require_postgres, trial_pids, wait_for, write_tiny_spec

TRIALS = 10
ARTIFACTS = "s3://cells/cluster"


def start_driver(spec_path: Path, head: str, storage: str, env: dict) -> subprocess.Popen:
    """`python -m search.run` joining the cluster: two workers of half a CPU each (`--cpus 1` leaves the
    other half of each node to a second driver)."""
    return subprocess.Popen([sys.executable, "-m", "search.run", "--no-progress", "--study", str(spec_path),
                             "--executor", "ray", "--address", head, "--storage", storage, "--artifacts", ARTIFACTS,
                             "--workers", "2", "--cpus", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **env})


def running_where(study: optuna.Study, node_pids: set[int]) -> dict[int, bool]:
    """Trials in training (their worker recorded) -> whether they run on the node whose processes are given."""
    running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if "worker" in t.user_attrs]
    return {t.number: trial_pids([t]) <= node_pids for t in running}


class StudyHandle:
    """The study the drivers create, loaded on first use."""

    def __init__(self, name: str, storage: str) -> None:
        self.name, self.storage = name, storage

    def get_trials(self, deepcopy: bool = True, states=None) -> list:
        return optuna.load_study(study_name=self.name, storage=self.storage).get_trials(deepcopy=deepcopy,
                                                                                         states=states)


@pytest.fixture
def s3_env(tmp_path):
    boto3 = pytest.importorskip("boto3")
    with moto_s3(tmp_path) as env:
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="cells")
        yield {**env, **RAY_ENV}


@pytest.mark.slow  # about 4 minutes on two shared cores
def test_two_nodes_two_drivers_and_a_lost_node(tmp_path, s3_env, monkeypatch):
    storage = require_postgres()
    name = f"cluster_{os.getpid()}_{int(time.time())}"
    spec_path = write_tiny_spec(tmp_path, name=name, trials=TRIALS, min_epochs=1, max_epochs=1)
    study = StudyHandle(name, storage)
    drivers: list[subprocess.Popen] = []
    try:
        with ray_cluster(tmp_path, nodes=2, cpus=1, env=s3_env) as (head, second):
            drivers.append(start_driver(spec_path, head.address, storage, s3_env))
            # One driver's trials spread over both nodes.
            wait_for(lambda: set(running_where(study, second.pids()).values()) == {True, False}, 300,
                     "trials in training on both nodes")
            there = [n for n, on in running_where(study, second.pids()).items() if on]
            second_node = {t.number: t for t in study.get_trials()}[there[0]].user_attrs["ray_node_id"]
            drivers.append(start_driver(spec_path, head.address, storage, s3_env))  # another shell
            wait_for(lambda: len({t.user_attrs[WORKER_ATTR].split(":")[0] for t in study.get_trials()
                                  if "worker" in t.user_attrs}) == 2, 300, "trials of the second driver")
            # The second node dies once it has completed a trial and trains another.
            on_second = wait_for(lambda: any(t.user_attrs.get("ray_node_id") == second_node
                                             for t in study.get_trials(states=(TrialState.COMPLETE,)))
                                 and [n for n, on in running_where(study, second.pids()).items() if on],
                                 400, "a trial completed and one in training on the second node")
            completed = {t.number for t in study.get_trials(states=(TrialState.COMPLETE,))}
            killed_at = time.time()
            second.kill()
            outputs = [driver.communicate(timeout=900) for driver in drivers]
    finally:
        for driver in drivers:
            driver.kill()
    for driver, (out, err) in zip(drivers, outputs):
        assert driver.returncode == 0, err[-3000:]
    trials = study.get_trials()
    by_number = {t.number: t for t in trials}
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) >= TRIALS
    assert completed <= {t.number for t in trials if t.state == TrialState.COMPLETE}, "a completed trial was lost"
    nodes = {t.user_attrs["ray_node_id"] for t in finished}
    assert len(nodes) == 2, "the finished trials did not spread over both nodes"
    assert len({t.user_attrs[WORKER_ATTR].split(":")[0] for t in finished}) == 2, "one driver did all the work"
    later = [t for t in trials if t.datetime_start and t.datetime_start.timestamp() > killed_at + 1]
    assert later and all(t.user_attrs.get("ray_node_id") != second_node for t in later)
    for number in on_second:  # lost with the node: failed once stale, its configuration run again
        assert by_number[number].state == TrialState.FAIL
        reruns = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == number]
        assert reruns and reruns[0].params == by_number[number].params
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env["AWS_ENDPOINT_URL"])
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, s3_env[key])
    store = open_artifact_store(ARTIFACTS)  # the files of a trial of the second node reached the bucket
    done_there = [t for t in finished if t.user_attrs["ray_node_id"] == second_node and t.state == TrialState.COMPLETE]
    for trial in done_there:
        assert store.open_reader(trial.user_attrs[ARTIFACT_ATTR_PREFIX + "metrics.json"]).read()
    optuna.delete_study(study_name=name, storage=storage)
