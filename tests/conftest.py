"""Shared fixtures: the real data folder and the real bundled models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA_ENV = "UEC_RAG_DATA"
"""Environment variable naming the folder that holds the BEIR data sets (xquad-en, scifact, ...)."""


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data folder; tests that need it skip with the reason when it is absent."""
    value = os.environ.get(DATA_ENV)
    if not value:
        pytest.skip(f"real data not available: set {DATA_ENV} to the folder holding xquad-en etc.")
    path = Path(value)
    if not (path / "xquad-en").is_dir():
        pytest.skip(f"real data not available: {DATA_ENV}={value} has no xquad-en folder")
    return path
