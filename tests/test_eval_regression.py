"""A reduced real evaluation: every method's row is produced and nDCG@10 stays near the record.

It runs all bundled members on the first 100 test (and train) questions of each
XQuAD language and the first 100 pairs of each STSb file. Every nDCG@10 and
Spearman value is compared with ``eval_regression_expected.json``, which the
same reduced run wrote. Embeddings are cached in the cache folder, so a second
run only scores.

To rewrite the expected values after a deliberate change (new posteriors, new
members), run ``UEC_RAG_WRITE_EXPECTED=1 pytest tests/test_eval_regression.py``
and commit the JSON file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from uec_rag.encoders import load_encoder
from uec_rag.evaluation.methods import build_methods
from uec_rag.evaluation.runner import (
    DEFAULT_MEMBERS,
    EvalSettings,
    RetrievalTask,
    StsTask,
    run_evaluation,
)

EXPECTED = Path(__file__).with_name("eval_regression_expected.json")
TOLERANCE = 0.02
"""Largest allowed change of any nDCG@10 or Spearman value (2 points)."""

LANGUAGES = ("en", "ru", "zh", "ar")


def _tasks(data_dir: Path) -> list[RetrievalTask | StsTask]:
    tasks: list[RetrievalTask | StsTask] = [
        RetrievalTask(f"xquad-{language}", data_dir / f"xquad-{language}") for language in LANGUAGES
    ]
    for language in ("en", "ru", "zh"):
        stem = data_dir / "stsb" / f"stsb-{language}"
        tasks.append(StsTask(f"stsb-{language}", Path(f"{stem}-test.csv"), Path(f"{stem}-dev.csv")))
    return tasks


def _values(results: dict) -> dict[str, dict[str, float]]:
    values: dict[str, dict[str, float]] = {}
    for dataset in results["datasets"]:
        metric = "ndcg@10" if dataset["kind"] == "retrieval" else "spearman"
        values[dataset["name"]] = {
            label: round(row[metric], 4) for label, row in dataset["methods"].items()
        }
    return values


@pytest.mark.slow
def test_reduced_real_evaluation(data_dir):
    members = [load_encoder(name) for name in DEFAULT_MEMBERS]
    results = run_evaluation(
        _tasks(data_dir),
        members,
        labels=list(DEFAULT_MEMBERS),
        settings=EvalSettings(max_queries=100),
    )
    observed = _values(results)

    expected_rows = [
        entry.label for entry in build_methods(DEFAULT_MEMBERS, [m.dim for m in members])
    ]
    for dataset in results["datasets"]:
        assert (
            dataset["n_test_queries" if dataset["kind"] == "retrieval" else "n_test_pairs"] == 100
        )
        for label in expected_rows:
            assert label in dataset["methods"], (dataset["name"], label)

    if os.environ.get("UEC_RAG_WRITE_EXPECTED"):
        EXPECTED.write_text(
            json.dumps(observed, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        pytest.skip(f"wrote {EXPECTED.name}; commit it")

    if not EXPECTED.is_file():
        pytest.skip(
            f"every row was produced, but {EXPECTED.name} is missing, so the values were not "
            "compared; write it with UEC_RAG_WRITE_EXPECTED=1"
        )
    expected = json.loads(EXPECTED.read_text(encoding="utf-8"))
    assert set(observed) == set(expected)
    for name, rows in expected.items():
        assert set(observed[name]) == set(rows), name
        for label, value in rows.items():
            assert observed[name][label] == pytest.approx(value, abs=TOLERANCE), (name, label)
