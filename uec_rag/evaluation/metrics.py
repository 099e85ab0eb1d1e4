"""Retrieval and similarity metrics, vectorised over queries.

Definitions follow trec_eval (as used by ``ir-measures`` and ``pytrec_eval``):

* ``nDCG@k`` = DCG@k / IDCG@k with linear gain ``rel`` and discount
  ``1 / log2(rank + 1)``; the ideal ranking sorts all judged relevances of the
  query, retrieved or not.
* ``Recall@k`` = (relevant documents in the top k) / (relevant documents), where
  relevant means ``rel > 0``.
* ``MRR@10`` = 1 / rank of the first relevant document in the top 10, else 0.

A query whose judgements are all 0 scores 0 on every metric, as in trec_eval.
Ties in the scores are broken by the lower column index, which differs
from trec_eval's tie order, so cross-checks use tie-free scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "RETRIEVAL_METRICS",
    "Judgements",
    "mean_metrics",
    "rank_top_k",
    "retrieval_metrics",
    "spearman",
]

RETRIEVAL_METRICS: tuple[str, ...] = ("ndcg@10", "recall@10", "recall@100", "mrr@10")
"""Names of the retrieval metrics, in report order."""

_DEPTH = 100


@dataclass(frozen=True)
class Judgements:
    """Relevance judgements aligned with the rows and columns of a score matrix.

    Attributes
    ----------
    query_ids : list[str]
        Row order, ``Q`` queries.
    doc_ids : list[str]
        Column order, ``N`` documents.
    relevance : np.ndarray
        Dense ``[Q, N]`` int32 matrix of relevance grades (0 when unjudged).
    ideal_dcg : np.ndarray
        ``[Q]`` IDCG@10 of each query.
    relevant_count : np.ndarray
        ``[Q]`` number of documents with ``rel > 0``.
    """

    query_ids: list[str]
    doc_ids: list[str]
    relevance: np.ndarray
    ideal_dcg: np.ndarray
    relevant_count: np.ndarray

    @classmethod
    def build(
        cls,
        qrels: Mapping[str, Mapping[str, int]],
        query_ids: Sequence[str],
        doc_ids: Sequence[str],
    ) -> Judgements:
        """Align ``qrels`` (query id -> {document id: grade}) with the given orders.

        Raises
        ------
        KeyError
            If a query id has no judgements or a judged document is not in
            ``doc_ids``; the message names the id.
        """
        column = {doc_id: index for index, doc_id in enumerate(doc_ids)}
        relevance = np.zeros((len(query_ids), len(doc_ids)), dtype=np.int32)
        ideal_dcg = np.zeros(len(query_ids), dtype=np.float64)
        for row, query_id in enumerate(query_ids):
            if query_id not in qrels:
                raise KeyError(f"query {query_id!r} has no relevance judgements")
            grades = []
            for doc_id, grade in qrels[query_id].items():
                if doc_id not in column:
                    raise KeyError(
                        f"judged document {doc_id!r} of query {query_id!r} not in corpus"
                    )
                relevance[row, column[doc_id]] = grade
                grades.append(grade)
            ideal = np.sort(np.maximum(np.asarray(grades, dtype=np.float64), 0.0))[::-1][:10]
            ideal_dcg[row] = float((ideal / np.log2(np.arange(2, ideal.size + 2))).sum())
        relevant_count = (relevance > 0).sum(axis=1)
        return cls(list(query_ids), list(doc_ids), relevance, ideal_dcg, relevant_count)


def rank_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Return the column indices of the ``k`` highest scores per row, best first.

    Uses ``argpartition`` (O(N) per row) and sorts only the ``k`` selected
    columns; ties are broken by the lower column index.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape [Q, N], got {scores.shape}")
    if not np.isfinite(scores).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(scores))[0])
        raise ValueError(f"scores contain a non-finite value at index {bad}")
    k = min(k, scores.shape[1])
    if k < scores.shape[1]:
        candidates = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        candidates = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    candidate_scores = np.take_along_axis(scores, candidates, axis=1)
    # lexsort: last key is primary, so sort by -score, then by column index.
    order = np.lexsort((candidates, -candidate_scores), axis=1)
    return np.take_along_axis(candidates, order, axis=1)


def retrieval_metrics(scores: np.ndarray, judgements: Judgements) -> dict[str, np.ndarray]:
    """Compute per-query nDCG@10, Recall@10, Recall@100 and MRR@10.

    Parameters
    ----------
    scores : np.ndarray
        ``[Q, N]`` scores, higher is better, rows and columns in the order of
        ``judgements``.
    judgements : Judgements
        The aligned relevance judgements.

    Returns
    -------
    dict[str, np.ndarray]
        Metric name (see ``RETRIEVAL_METRICS``) to a ``[Q]`` float64 array, plus
        ``"top1_correct"`` (``[Q]`` bool, the first hit has ``rel > 0``).
    """
    expected = judgements.relevance.shape
    if np.shape(scores) != expected:
        raise ValueError(
            f"scores must have shape {expected} (queries, documents), got {np.shape(scores)}"
        )

    top = rank_top_k(scores, _DEPTH)
    grades = np.take_along_axis(judgements.relevance, top, axis=1).astype(np.float64)
    hits = grades > 0

    discounts = 1.0 / np.log2(np.arange(2, 12))[: min(10, top.shape[1])]
    dcg = (np.maximum(grades[:, :10], 0.0) * discounts).sum(axis=1)
    ideal = np.where(judgements.ideal_dcg > 0, judgements.ideal_dcg, 1.0)
    count = np.maximum(judgements.relevant_count, 1)

    first_hit = np.where(hits[:, :10].any(axis=1), hits[:, :10].argmax(axis=1) + 1, 0)
    reciprocal_rank = np.where(first_hit > 0, 1.0 / np.maximum(first_hit, 1), 0.0)

    return {
        "ndcg@10": dcg / ideal,
        "recall@10": hits[:, :10].sum(axis=1) / count,
        "recall@100": hits[:, :100].sum(axis=1) / count,
        "mrr@10": reciprocal_rank,
        "top1_correct": hits[:, 0],
    }


def mean_metrics(per_query: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Average the per-query retrieval metrics (``RETRIEVAL_METRICS`` only)."""
    return {name: float(np.mean(per_query[name])) for name in RETRIEVAL_METRICS}


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]
    average = (starts + ends + 1) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def spearman(predicted: np.ndarray, gold: np.ndarray) -> float:
    """Spearman rank correlation: the Pearson correlation of average ranks.

    Raises
    ------
    ValueError
        If the arrays differ in length, have fewer than 2 items, contain a
        non-finite value, or one of them is constant (the correlation is
        undefined).
    """
    x = np.asarray(predicted, dtype=np.float64).ravel()
    y = np.asarray(gold, dtype=np.float64).ravel()
    if x.size != y.size:
        raise ValueError(f"predicted and gold differ in length: {x.size} != {y.size}")
    if x.size < 2:
        raise ValueError(f"Spearman correlation needs at least 2 items, got {x.size}")
    for name, array in (("predicted", x), ("gold", y)):
        if not np.isfinite(array).all():
            raise ValueError(
                f"{name} contains a non-finite value at index {int(np.argmin(np.isfinite(array)))}"
            )
    rank_x = _average_ranks(x) - (x.size + 1) / 2.0
    rank_y = _average_ranks(y) - (y.size + 1) / 2.0
    denominator = np.sqrt((rank_x**2).sum() * (rank_y**2).sum())
    if denominator == 0:
        raise ValueError("Spearman correlation is undefined when predicted or gold is constant")
    return float((rank_x * rank_y).sum() / denominator)
