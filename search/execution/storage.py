"""Optuna storages and artifact stores named by URL, with one clear error when they can't be reached.

- `sqlite:///runs/<study>/study.db` (default), or any SQLAlchemy URL (`postgresql://user:pw@host/db`):
  RDBStorage with heartbeats, so a killed worker's RUNNING trial is failed and retried.
- `journal:PATH`: Optuna's JournalStorage on a shared filesystem (no heartbeats in Optuna's journal).
Artifact stores: a folder (default `runs/<study>/artifacts`) or `s3://bucket/prefix` (Optuna's
Boto3ArtifactStore; boto3 reads the endpoint and credentials from its usual variables and files, so any
S3-compatible store works, Google Cloud Storage included through its XML API with HMAC keys).
PostgreSQL (psycopg) and S3 (boto3) are optional extras: without them, one line names the extra to install.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage

from common.errors import StorageError, require_extra
from search.study.experimental import experimental_features


def redact(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


CREATE_ATTEMPTS = 4  # processes opening one new database at once race to create it; the losers try again


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def open_storage(url: str, *, heartbeat_interval: int | None = 10, grace_period: int | None = 30,
                 max_retry: int = 1, must_exist: bool = False) -> optuna.storages.BaseStorage:
    """Open (or create, unless `must_exist`) the storage at `url`."""
    require_storage_extras(url)
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):])
        if must_exist and not path.is_file():
            raise StorageError(f"no study journal at {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    local = sqlite_path(url)
    if local is not None:
        if must_exist and not local.is_file():
            raise StorageError(f"no study database at {local}")
        local.parent.mkdir(parents=True, exist_ok=True)
    with experimental_features():
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry) if heartbeat_interval else None
    engine_kwargs = {"connect_args": {"timeout": 60}} if local else {"pool_pre_ping": True,
                                                                     "connect_args": {"connect_timeout": 10}}
    for attempt in range(1, CREATE_ATTEMPTS + 1):
        try:
            with experimental_features():  # heartbeats
                storage = RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                     grace_period=grace_period if heartbeat_interval else None,
                                     heartbeat_stale_trial_callback=retry)
            break
        except Exception as exc:  # sqlalchemy raises many types: all mean "unusable storage"
            if attempt == CREATE_ATTEMPTS or not _lost_creation_race(exc):
                raise StorageError(f"cannot use storage {redact(url)}: {first_line(exc)}") from None
            time.sleep(0.2 * attempt)
    if local is not None:
        _lock_at_begin(storage.engine)
    return storage


def _lost_creation_race(exc: Exception) -> bool:
    """Another process created the same new database at the same moment (its tables and version row)."""
    from sqlalchemy.exc import IntegrityError

    return isinstance(exc, IntegrityError) or "already exists" in str(exc)


def _lock_at_begin(engine) -> None:
    """SQLite transactions take the write lock when they begin (waiting up to the busy timeout for it).

    pysqlite otherwise begins a transaction only at its first write, after its reads: two workers then
    both read the same WAITING trial, both set it RUNNING and both run it, and the second one's tell
    fails. With the lock first, Optuna's check-and-set of a trial state is atomic, as on PostgreSQL.
    """
    from sqlalchemy import event

    event.listen(engine, "connect", lambda dbapi_connection, record: setattr(dbapi_connection,
                                                                            "isolation_level", None))
    event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
    engine.dispose()  # connections opened so far lack the "connect" setting


def require_storage_extras(url: str | None = None, artifacts: str | None = None) -> None:
    """Raise MissingExtraError (one line naming the extra) when the storage or artifact store needs a package
    that is not installed; callers check before any long work."""
    if url and url.split("://", 1)[0] in ("postgresql", "postgresql+psycopg"):
        require_extra("psycopg", "postgres", "a postgresql:// storage")
    if artifacts and artifacts.startswith("s3://"):
        require_extra("boto3", "s3", "an s3:// artifact store")


class PrefixedArtifactStore:
    """An artifact store whose artifacts live under `prefix/` of another one (Optuna's stores take a bucket
    only): `s3://bucket/prefix` then keeps several studies apart in one bucket."""

    def __init__(self, store, prefix: str) -> None:
        self.store, self.prefix = store, prefix.strip("/") + "/"

    def open_reader(self, artifact_id: str):
        return self.store.open_reader(self.prefix + artifact_id)

    def write(self, artifact_id: str, content_body) -> None:
        self.store.write(self.prefix + artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self.store.remove(self.prefix + artifact_id)


def open_artifact_store(location: str):
    """A FileSystemArtifactStore for a folder, or Optuna's Boto3ArtifactStore for `s3://bucket[/prefix]`."""
    if location.startswith("s3://"):
        require_storage_extras(artifacts=location)
        from optuna.artifacts import Boto3ArtifactStore

        bucket, _, prefix = location[len("s3://"):].partition("/")
        store = Boto3ArtifactStore(bucket)
        return PrefixedArtifactStore(store, prefix) if prefix.strip("/") else store
    if "://" in location:
        raise StorageError(f"artifact store {location}: use a folder or s3://bucket/prefix (for Google Cloud "
                           f"Storage, s3:// with AWS_ENDPOINT_URL=https://storage.googleapis.com and HMAC keys)")
    Path(location).mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(location)
