"""Artifact stores named by URL: `s3://bucket/prefix` through Optuna's Boto3ArtifactStore against a real local
S3 server (moto in server mode), and the schemes that are refused in one line."""

from __future__ import annotations

import io

import optuna
import pytest
from optuna.artifacts import download_artifact, upload_artifact

from search.execution.lifecycle import probe_artifact_store
from common.errors import StorageError
from search.execution.storage import open_artifact_store
from search_helpers import moto_s3


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A moto S3 server with an empty bucket `cells`; boto3 in this process points at it."""
    boto3 = pytest.importorskip("boto3")
    with moto_s3(tmp_path) as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        client = boto3.client("s3")
        client.create_bucket(Bucket="cells")
        yield client


def keys(client, bucket: str = "cells") -> list[str]:
    return sorted(item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def test_s3_prefix_keeps_each_study_under_its_own_prefix(s3, tmp_path):
    study = optuna.create_study()
    trial = study.ask()
    source = tmp_path / "model.txt"
    ids = {}
    for prefix in ("runs/a", "runs/b/"):
        store = open_artifact_store(f"s3://cells/{prefix}")
        probe_artifact_store(store, f"s3://cells/{prefix}")
        source.write_text(f"weights of {prefix}")
        ids[prefix] = upload_artifact(artifact_store=store, file_path=str(source), study_or_trial=trial)
    assert keys(s3) == [f"runs/a/{ids['runs/a']}", f"runs/b/{ids['runs/b/']}"]  # the probes removed themselves
    target = tmp_path / "back.txt"
    download_artifact(artifact_store=open_artifact_store("s3://cells/runs/a"), file_path=str(target),
                      artifact_id=ids["runs/a"])
    assert target.read_text() == "weights of runs/a"
    with pytest.raises(Exception):  # the other prefix does not hold it
        open_artifact_store("s3://cells/runs/b").open_reader(ids["runs/a"])


def test_s3_bucket_without_prefix_writes_at_the_top(s3):
    store = open_artifact_store("s3://cells")
    store.write("one", io.BytesIO(b"1"))
    assert keys(s3) == ["one"]
    assert store.open_reader("one").read() == b"1"


def test_a_missing_bucket_fails_the_probe_in_one_line(s3):
    with pytest.raises(StorageError, match=r"^artifact store s3://nobucket/x is not writable \(.*NoSuchBucket"):
        probe_artifact_store(open_artifact_store("s3://nobucket/x"), "s3://nobucket/x")


@pytest.mark.parametrize("location", ["gs://bucket/prefix", "ftp://host/folder"])
def test_other_schemes_are_refused_in_one_line(location, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match=r"use a folder or s3://bucket/prefix"):
        open_artifact_store(location)
    assert not list(tmp_path.iterdir()), "a folder named after the URL was created"
