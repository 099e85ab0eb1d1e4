"""Retrieval metrics against ir-measures (trec_eval definitions) and Spearman against scipy."""

from __future__ import annotations

import ir_measures
import numpy as np
import pytest
from ir_measures import MRR, R, nDCG
from scipy.stats import spearmanr

from uec_rag.evaluation.metrics import (
    Judgements,
    mean_metrics,
    rank_top_k,
    retrieval_metrics,
    spearman,
)


def _random_case(seed: int, n_queries: int = 40, n_docs: int = 300):
    rng = np.random.default_rng(seed)
    query_ids = [f"q{i}" for i in range(n_queries)]
    doc_ids = [f"d{j}" for j in range(n_docs)]
    qrels: dict[str, dict[str, int]] = {}
    for query_id in query_ids:
        judged = rng.choice(n_docs, size=int(rng.integers(1, 8)), replace=False)
        # Grades 0..3, so some judged documents are non-relevant, and some
        # queries have graded relevance.
        qrels[query_id] = {doc_ids[j]: int(rng.integers(0, 4)) for j in judged}
    scores = rng.normal(size=(n_queries, n_docs))
    return query_ids, doc_ids, qrels, scores


def _ir_measures_values(query_ids, doc_ids, qrels, scores, measures):
    run = {
        query_id: {doc_id: float(scores[i, j]) for j, doc_id in enumerate(doc_ids)}
        for i, query_id in enumerate(query_ids)
    }
    values: dict[str, dict[str, float]] = {}
    for metric in ir_measures.iter_calc(measures, qrels, run):
        values.setdefault(str(metric.measure), {})[metric.query_id] = metric.value
    return values


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_ir_measures(seed):
    query_ids, doc_ids, qrels, scores = _random_case(seed)
    judgements = Judgements.build(qrels, query_ids, doc_ids)
    ours = retrieval_metrics(scores, judgements)

    reference = _ir_measures_values(
        query_ids, doc_ids, qrels, scores, [nDCG @ 10, R @ 10, R @ 100, MRR @ 10]
    )
    # Queries whose judgements are all 0 score 0 in both.
    assert set(reference["R@10"]) == set(query_ids)
    pairs = {"ndcg@10": "nDCG@10", "recall@10": "R@10", "recall@100": "R@100", "mrr@10": "RR@10"}
    for ours_name, reference_name in pairs.items():
        expected = np.array([reference[reference_name][q] for q in query_ids])
        np.testing.assert_allclose(ours[ours_name], expected, atol=1e-6, err_msg=ours_name)


def test_metrics_small_exact_case():
    qrels = {"q0": {"d1": 1}, "q1": {"d0": 2, "d2": 1}}
    scores = np.array([[0.9, 0.8, 0.1], [0.1, 0.5, 0.3]])
    judgements = Judgements.build(qrels, ["q0", "q1"], ["d0", "d1", "d2"])
    result = retrieval_metrics(scores, judgements)

    # q0: relevant document at rank 2.
    assert result["mrr@10"][0] == pytest.approx(0.5)
    assert result["ndcg@10"][0] == pytest.approx(1 / np.log2(3))
    # q1: ranking d1, d2, d0; DCG = 1/log2(3) + 2/log2(4); IDCG = 2 + 1/log2(3).
    expected = (1 / np.log2(3) + 2 / 2) / (2 + 1 / np.log2(3))
    assert result["ndcg@10"][1] == pytest.approx(expected)
    assert result["recall@10"].tolist() == [1.0, 1.0]
    assert result["top1_correct"].tolist() == [False, False]
    assert mean_metrics(result)["mrr@10"] == pytest.approx(0.5)


def test_rank_top_k_breaks_ties_by_index():
    scores = np.array([[1.0, 3.0, 3.0, 2.0]])
    assert rank_top_k(scores, 3).tolist() == [[1, 2, 3]]
    assert rank_top_k(scores, 10).tolist() == [[1, 2, 3, 0]]


def test_metrics_reject_bad_scores():
    judgements = Judgements.build({"q": {"a": 1}}, ["q"], ["a", "b"])
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(np.zeros((2, 2)), judgements)
    with pytest.raises(ValueError, match="non-finite"):
        retrieval_metrics(np.array([[np.nan, 0.0]]), judgements)


def test_judgements_reject_unknown_document():
    with pytest.raises(KeyError, match="'zzz'"):
        Judgements.build({"q": {"zzz": 1}}, ["q"], ["a"])


@pytest.mark.parametrize("seed", [0, 1])
def test_spearman_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 6, size=200).astype(float)  # many ties
    predicted = gold + rng.normal(scale=2.0, size=200)
    predicted[:20] = 0.5  # ties in the prediction too
    assert spearman(predicted, gold) == pytest.approx(
        spearmanr(predicted, gold).statistic, abs=1e-12
    )


def test_spearman_rejects_constant_input():
    with pytest.raises(ValueError, match="constant"):
        spearman(np.ones(5), np.arange(5))
    with pytest.raises(ValueError, match="length"):
        spearman(np.ones(5), np.arange(4))
