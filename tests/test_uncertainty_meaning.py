"""Fitted posteriors must give uncertainty that means something on real data.

MiniLM (all-MiniLM-L6-v2) was trained on English text. A posterior fitted on
English XQuAD training pairs should give Russian, Chinese and Arabic questions a
larger covariance trace than English ones, and over held-out pairs a larger
query trace should go with a lower cosine to the positive passage.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from uec_rag.datasets import load_beir, load_pairs
from uec_rag.laplace.fit import fit_posterior

QUESTIONS_PER_LANGUAGE = 100
FIT_PAIRS = 96


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(values: np.ndarray) -> np.ndarray:
        order = np.argsort(values, kind="stable")
        result = np.empty(len(values))
        result[order] = np.arange(len(values), dtype=float)
        for value in np.unique(values):
            tied = values == value
            result[tied] = result[tied].mean()
        return result

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def _test_questions(data_dir, language: str) -> list[str]:
    dataset = load_beir(data_dir / f"xquad-{language}", split="test")
    return [dataset.queries[query_id] for query_id in sorted(dataset.queries)][
        :QUESTIONS_PER_LANGUAGE
    ]


@pytest.fixture(scope="module")
def english_minilm(data_dir):
    from uec_rag.encoders import load_encoder

    encoder = load_encoder("minilm", posterior=None)
    pairs = random.Random(0).sample(load_pairs(data_dir / "xquad-en"), FIT_PAIRS)
    result = fit_posterior(encoder, pairs, show_progress=False)
    return encoder.with_posterior(result.posterior)


@pytest.mark.slow
def test_spearman_helper():
    assert _spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 30.0, 20.0])) == pytest.approx(0.5)


@pytest.mark.slow
def test_english_fit_other_languages_have_larger_trace(english_minilm, data_dir):
    traces = {
        language: english_minilm.encode(_test_questions(data_dir, language), "query")
        .variance.sum(axis=1)
        .mean()
        for language in ("en", "ru", "zh", "ar")
    }
    ratios = {language: traces[language] / traces["en"] for language in ("ru", "zh", "ar")}
    print(f"mean query trace relative to English: {ratios}")
    for language, ratio in ratios.items():
        assert ratio > 1.0, f"{language}: trace ratio {ratio:.3f} to English"


def _trace_cosine_correlation(encoder, pairs) -> float:
    queries = encoder.encode([query for query, _ in pairs], "query")
    passages = encoder.encode([passage for _, passage in pairs], "document")
    cosine = (queries.mean * passages.mean).sum(axis=1)
    return _spearman(queries.variance.sum(axis=1), cosine)


@pytest.mark.slow
def test_held_out_trace_anticorrelates_with_cosine(english_minilm, data_dir):
    by_language = {
        language: random.Random(1).sample(
            load_pairs(data_dir / f"xquad-{language}", split="test"), 50
        )
        for language in ("en", "ru", "zh", "ar")
    }
    english = _trace_cosine_correlation(english_minilm, by_language["en"])
    pooled = _trace_cosine_correlation(
        english_minilm, [pair for pairs in by_language.values() for pair in pairs]
    )
    print(f"Spearman(query trace, cosine to positive): English {english}, four languages {pooled}")
    # NOTE: within English alone the correlation is near zero (see docs/posteriors.md);
    # the check is over held-out pairs of all four languages.
    assert pooled < 0.0
