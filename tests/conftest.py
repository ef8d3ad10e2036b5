"""Shared fixtures: the embedded real data set, loaded once per session."""

from pathlib import Path

import pytest

RAW_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "pbc_raw_sample"


@pytest.fixture(scope="session")
def embedded():
    from data_pipeline.loaders import load

    return load()


@pytest.fixture(scope="session")
def raw_sample_dir() -> Path:
    if not RAW_SAMPLE.is_dir():
        pytest.skip(f"raw JPEG sample not found at {RAW_SAMPLE}")
    return RAW_SAMPLE
