"""The documentation builds with ``mkdocs build --strict``: no broken links or references."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DOCS_PACKAGES = {
    "mkdocs": "mkdocs",
    "material": "mkdocs-material",
    "mkdocstrings": "mkdocstrings",
    "mkdocstrings_handlers.python": "mkdocstrings-python",
}
"""Module to import -> package that provides it."""


def _missing_packages() -> list[str]:
    missing = []
    for module, package in DOCS_PACKAGES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(package)
    return missing


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    missing = _missing_packages()
    if missing:
        pytest.skip(f"documentation tools not installed: {', '.join(missing)} (pip install them)")

    site = tmp_path / "site"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr

    assert (site / "index.html").is_file()
    ensemble_page = (site / "api" / "ensemble" / "index.html").read_text(encoding="utf-8")
    assert "UECEnsemble" in ensemble_page
    assert "encode_queries" in ensemble_page
