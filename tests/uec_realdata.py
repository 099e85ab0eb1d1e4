"""Helpers for integration tests on real XQuAD data: a fixed subset and nDCG@10.

Shared by tests/test_langchain.py and tests/test_llamaindex.py. The Gaussian
cache below is shared by both in one pytest process, so the second file reuses
the encodings of the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ir_measures
from ir_measures import nDCG

from uec_rag.cache import MemoryGaussianCache
from uec_rag.datasets import load_beir

SHARED_REAL_CACHE = MemoryGaussianCache()
"""Gaussian cache for real-model tests that do not count encoder calls."""

FIRST_STAGE_K = 20
"""Candidates retrieved by the first stage and handed to the reranker."""


@dataclass(frozen=True)
class RetrievalSubset:
    """A deterministic slice of a BEIR data set."""

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def xquad_subset(
    data_dir: Path, language: str, n_documents: int = 120, n_queries: int = 60
) -> RetrievalSubset:
    """Return the first ``n_documents`` paragraphs (by id) and ``n_queries`` of their questions.

    Questions are taken with an even stride over the test-split questions
    whose relevant paragraphs all lie in the subset, so they cover every
    article in it.
    """
    dataset = load_beir(data_dir / f"xquad-{language}", split="test")
    document_ids = sorted(dataset.corpus)[:n_documents]
    kept = set(document_ids)
    candidates = sorted(
        query_id for query_id, judged in dataset.qrels.items() if set(judged) <= kept
    )
    stride = max(1, len(candidates) // n_queries)
    query_ids = candidates[::stride][:n_queries]
    return RetrievalSubset(
        corpus={doc_id: dataset.corpus[doc_id] for doc_id in document_ids},
        queries={query_id: dataset.queries[query_id] for query_id in query_ids},
        qrels={query_id: dataset.qrels[query_id] for query_id in query_ids},
    )


def ndcg_at_10(rankings: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> float:
    """Mean nDCG@10 over the queries of ``qrels``, computed by ir-measures (pytrec_eval)."""
    judged = [
        ir_measures.Qrel(query_id, doc_id, relevance)
        for query_id, documents in qrels.items()
        for doc_id, relevance in documents.items()
    ]
    run = [
        ir_measures.ScoredDoc(query_id, doc_id, float(len(ranking) - rank))
        for query_id, ranking in rankings.items()
        for rank, doc_id in enumerate(ranking)
    ]
    return float(ir_measures.calc_aggregate([nDCG @ 10], judged, run)[nDCG @ 10])
