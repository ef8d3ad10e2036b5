"""Serve a study in optuna-dashboard (its trials, plots, and the artifacts each trial uploaded)."""

from __future__ import annotations

from search.study.location import StudyLocation


def serve_dashboard(location: StudyLocation, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Check that the study exists (one clear error otherwise), then serve it until Ctrl-C."""
    import optuna
    import optuna_dashboard

    from common.errors import StorageError
    from search.execution.storage import open_artifact_store, open_storage

    storage = open_storage(location.storage, heartbeat_interval=None, must_exist=True)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if location.name not in names:
        raise StorageError(f"no study {location.name!r} in {location.storage} (found: {names})")
    print(f"optuna-dashboard on http://{host}:{port} for study {location.name!r} (Ctrl-C stops it)", flush=True)
    optuna_dashboard.run_server(storage, host=host, port=port, artifact_store=open_artifact_store(location.artifacts))
