"""Executors run a prepared study's trials in parallel: `local` worker processes or Ray worker actors."""

from __future__ import annotations


def require_extras(spec) -> None:
    """Fail in one line, before any work starts, when the spec needs an optional extra that is missing:
    `ray` for `--executor ray`, `postgres` for a postgresql:// storage, `s3` for an s3:// artifact store.
    Only the Ray executor's modules import Ray, and only when that executor runs."""
    from common.errors import require_extra
    from search.execution.storage import require_storage_extras

    if spec.executor.kind == "ray":
        require_extra("ray", "ray", "--executor ray")
    require_storage_extras(spec.storage.url, spec.storage.artifacts)
