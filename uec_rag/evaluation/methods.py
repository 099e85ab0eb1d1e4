"""The methods an evaluation compares, their tuning grids and pair scoring.

Every method is a :class:`uec_rag.fusion.Method` applied to per-member
Gaussians computed once. This module decides which methods a report has,
builds the train-split grids of the two tuned methods with equal budgets, and
scores aligned sentence pairs (STS) in O(P) rather than as a ``[P, P]`` matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations_with_replacement

import numpy as np

from uec_rag.coefficients import CoefficientRule
from uec_rag.fusion import Method, combined_embedding, reciprocal_rank_fusion
from uec_rag.gaussian import GaussianEmbedding
from uec_rag.similarity import document_terms, probit_score, query_terms

__all__ = [
    "MethodEntry",
    "build_methods",
    "convolution_group",
    "pair_scores",
    "simplex_grid",
    "top_hit_sigma",
    "uec_grid",
]

UEC_DEFAULT = "UEC, direct sum"
UEC_TUNED = "UEC tuned on train, direct sum"
WEIGHTED = "weighted, direct sum (tuned on train)"
RRF = "RRF (k=60)"
ORACLE = "oracle: best single member (picked on test)"
RERANK = "RRF top-{depth}, reranked by tuned UEC"


@dataclass
class MethodEntry:
    """One row of the report.

    Attributes
    ----------
    label : str
        Row label.
    method : Method or None
        The scoring method; None for rows derived from other rows (oracle,
        reranking), and for tuned rows until tuning sets it.
    members : tuple of int
        Positions of the members the method uses (a subset for convolution).
    tuned : {"weights", "uec"} or None
        Which train-split grid chooses the method.
    family : str
        ``"single"``, ``"baseline"`` or ``"uec"``, for grouping in reports.
    settings : dict
        Settings shown in the report (filled by tuning for tuned rows).
    """

    label: str
    method: Method | None
    members: tuple[int, ...]
    tuned: str | None = None
    family: str = "baseline"
    settings: dict = field(default_factory=dict)


def convolution_group(dims: Sequence[int]) -> tuple[int, ...]:
    """Return the positions of the members sharing the most common dimension (first on ties).

    Convolution adds vectors coordinate by coordinate, so it can combine only
    members of equal dimension. With the bundled presets these are minilm and
    e5-small (384 dims), without mpnet (768).
    """
    counts: dict[int, int] = {}
    for dim in dims:
        counts[dim] = counts.get(dim, 0) + 1
    best = max(counts, key=lambda dim: (counts[dim], -list(dims).index(dim)))
    return tuple(position for position, dim in enumerate(dims) if dim == best)


def build_methods(
    labels: Sequence[str], dims: Sequence[int], *, rrf_k: int = 60
) -> list[MethodEntry]:
    """Build the report's rows for members with these labels and dimensions."""
    everyone = tuple(range(len(labels)))
    group = convolution_group(dims)
    group_name = "+".join(labels[position] for position in group)
    # A single member's method sees only its own embeddings, hence member=0.
    entries = [
        MethodEntry(
            label,
            Method("single", similarity="inner_product", member=0),
            (position,),
            family="single",
        )
        for position, label in enumerate(labels)
    ]
    entries.append(MethodEntry(ORACLE, None, everyone, family="single"))
    entries.append(
        MethodEntry(
            "uniform, direct sum",
            Method("fixed", "direct_sum", similarity="inner_product"),
            everyone,
        )
    )
    if len(group) >= 2:
        entries.append(
            MethodEntry(
                f"uniform, convolution ({group_name})",
                Method("fixed", "convolution", similarity="inner_product"),
                group,
            )
        )
    entries.append(MethodEntry(WEIGHTED, None, everyone, tuned="weights"))
    entries.append(
        MethodEntry(
            RRF.replace("60", str(rrf_k)),
            Method("rrf", similarity="inner_product", rrf_k=rrf_k),
            everyone,
        )
    )
    entries.append(MethodEntry(UEC_DEFAULT, Method("uec", "direct_sum"), everyone, family="uec"))
    if len(group) >= 2:
        entries.append(
            MethodEntry(
                f"UEC, convolution ({group_name})",
                Method("uec", "convolution"),
                group,
                family="uec",
            )
        )
    entries.append(
        MethodEntry(
            "UEC w/o uncertainty similarity",
            Method("uec", "direct_sum", similarity="inner_product"),
            everyone,
            family="uec",
        )
    )
    entries.append(
        MethodEntry(
            "UEC w/o uncertainty coefficients",
            Method("fixed", "direct_sum", similarity="uncertainty"),
            everyone,
            family="uec",
        )
    )
    entries.append(MethodEntry(UEC_TUNED, None, everyone, tuned="uec", family="uec"))
    return entries


def simplex_grid(n_members: int, budget: int) -> list[tuple[float, ...]]:
    """Enumerate the weight vectors with entries ``i / m`` summing to 1, for the largest ``m``.

    The lattice has ``C(m + K - 1, K - 1)`` points; ``m`` is the largest value
    whose lattice has at most ``budget`` points (at least 1).
    """
    if n_members < 1 or budget < 1:
        raise ValueError(f"need n_members >= 1 and budget >= 1, got {n_members}, {budget}")
    resolution = 1
    while math.comb(resolution + 1 + n_members - 1, n_members - 1) <= budget:
        resolution += 1
        if n_members == 1:
            break
    points = []
    for combo in combinations_with_replacement(range(n_members), resolution):
        counts = np.bincount(np.asarray(combo, dtype=np.int64), minlength=n_members)
        points.append(tuple(float(c) / resolution for c in counts))
    return points


def uec_grid(size: int, *, normalizable: bool, raw_trace_scale: float) -> list[CoefficientRule]:
    """Build ``size`` UEC coefficient rules: rule x trace normalisation x temperature.

    The rules ``inverse_trace`` and ``softmax`` are each tried with and without
    trace normalisation (only without when a member has no reference trace),
    and the temperatures of each pair are log-spaced over [0.05, 2], with the
    one nearest 1 set to 1. The
    softmax on raw traces divides traces in the members' variance units by
    ``T``, so its temperatures are multiplied by ``raw_trace_scale`` (the
    median train trace). Normalised traces are already near 1.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    pairs = [("inverse_trace", False), ("softmax", False)]
    if normalizable:
        pairs += [("inverse_trace", True), ("softmax", True)]
    per_pair = [
        size // len(pairs) + (1 if index < size % len(pairs) else 0) for index in range(len(pairs))
    ]
    rules = []
    for (rule, normalize), count in zip(pairs, per_pair, strict=True):
        if count == 0:
            continue
        temperatures = np.geomspace(0.05, 2.0, count) if count > 1 else np.array([1.0])
        # The temperature nearest 1 becomes exactly 1, so UEC's default rule is a grid point.
        temperatures[np.argmin(np.abs(np.log(temperatures)))] = 1.0
        if rule == "softmax" and not normalize:
            temperatures = temperatures * raw_trace_scale
        rules.extend(
            CoefficientRule(rule, float(temperature), normalize) for temperature in temperatures
        )
    return rules


def top_hit_sigma(
    method: Method,
    query_members: Sequence[GaussianEmbedding],
    doc_members: Sequence[GaussianEmbedding],
    top_hit: np.ndarray,
    reference_traces: Sequence[float | None] | None,
) -> np.ndarray | None:
    """Return ``sigma_s`` of each query and its top hit under the method's Gaussians.

    ``sigma_s^2 = mu_q^T Sigma_c mu_q + mu_c^T Sigma_q mu_c + tr(Sigma_q Sigma_c)``
    of the combined query and document Gaussians; None for RRF, which has none.
    """
    if method.kind == "rrf":
        return None
    queries, _ = combined_embedding(method, query_members, reference_traces)
    documents, _ = combined_embedding(method, doc_members, reference_traces)
    hits = documents[np.asarray(top_hit)]
    sigma2 = (query_terms(queries) * document_terms(hits)).sum(axis=1, dtype=np.float64)
    return np.sqrt(np.maximum(sigma2, 0.0))


def pair_scores(
    method: Method,
    left_members: Sequence[GaussianEmbedding],
    right_members: Sequence[GaussianEmbedding],
    reference_traces: Sequence[float | None] | None = None,
) -> np.ndarray:
    """Score aligned pairs ``(left[i], right[i])`` with a method, shape ``[P]``.

    The same combination and similarity as :func:`uec_rag.fusion.method_scores`,
    but only for the P aligned pairs. RRF fuses the members' rankings of the
    pairs (each member ranks all P pairs by its own similarity).
    """
    if method.kind == "rrf":
        per_member = [
            (left.mean * right.mean).sum(axis=1)[None, :]
            for left, right in zip(left_members, right_members, strict=True)
        ]
        return reciprocal_rank_fusion(per_member, k=method.rrf_k)[0]

    left, _ = combined_embedding(method, left_members, reference_traces)
    right, _ = combined_embedding(method, right_members, reference_traces)
    mu_s = (left.mean * right.mean).sum(axis=1, dtype=np.float64)
    if method.similarity == "inner_product":
        return mu_s
    sigma2 = (query_terms(left) * document_terms(right)).sum(axis=1, dtype=np.float64)
    return probit_score(mu_s, np.maximum(sigma2, 0.0))
