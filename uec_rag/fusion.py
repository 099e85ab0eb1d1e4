"""UEC and its baselines as scoring methods over per-member embeddings computed once.

Every method takes the K members' query and document Gaussians (each member
encodes the texts once, e.g. into a cache) and returns ``[Q, N]`` scores, so an
evaluation compares methods without re-encoding. The methods share the
coefficient, combination and similarity code of the ensemble:

- ``uec``: per-item coefficients from a :class:`CoefficientRule`, a combination
  (``direct_sum`` or ``convolution``) and a similarity. With ``uncertainty`` it is
  the full method. With ``inner_product`` of the combined means it is the
  ablation without the uncertainty-aware similarity.
- ``fixed``: the same combination with coefficients fixed for every item:
  user weights, or uniform ``1/K`` when no weights are given.
- ``single``: one member alone.
- ``concatenation``: the members' vectors concatenated unweighted (direct sum
  with all coefficients 1). Under the inner product it ranks exactly like
  ``fixed`` with uniform weights and ``direct_sum``, which scales every block by
  the same ``1/K``.
- ``rrf``: reciprocal rank fusion of the members' rankings,
  ``score(d) = sum_k w_k / (rrf_k + rank_k(d))`` with 1-based ranks and
  ``rrf_k = 60``, the formula of LangChain's ``EnsembleRetriever`` (its
  ``c`` parameter).

:func:`standard_methods` builds the usual set of baselines and ablations by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from uec_rag.coefficients import CoefficientRule
from uec_rag.combine import COMBINATIONS, Combination, combine, combine_members
from uec_rag.gaussian import GaussianEmbedding
from uec_rag.index import GaussianIndex, inner_product_top_k
from uec_rag.similarity import uncertainty_similarity

__all__ = [
    "METHOD_KINDS",
    "SIMILARITIES",
    "Method",
    "MethodKind",
    "MethodScores",
    "Similarity",
    "combined_embedding",
    "method_scores",
    "method_top_k",
    "reciprocal_rank_fusion",
    "standard_methods",
    "top_k_from_scores",
]

MethodKind = Literal["uec", "fixed", "single", "concatenation", "rrf"]
METHOD_KINDS: tuple[MethodKind, ...] = ("uec", "fixed", "single", "concatenation", "rrf")
Similarity = Literal["uncertainty", "inner_product"]
SIMILARITIES: tuple[Similarity, ...] = ("uncertainty", "inner_product")


@dataclass(frozen=True)
class Method:
    """One scoring method (see the module docstring for each kind).

    Parameters
    ----------
    kind : {"uec", "fixed", "single", "concatenation", "rrf"}
        The method family.
    combine : {"direct_sum", "convolution"}, default "direct_sum"
        Combination for ``uec`` and ``fixed``.
    rule : CoefficientRule, default CoefficientRule()
        Coefficient rule for ``uec``.
    similarity : {"uncertainty", "inner_product"}, default "uncertainty"
        ``uncertainty`` ranks by ``mu_s / sqrt(1 + pi/8 sigma_s^2)``;
        ``inner_product`` by the inner product of the means. For ``rrf`` it is
        the similarity that ranks each member.
    member : int, optional
        Member position for ``single``.
    weights : tuple of float, optional
        Per-member weights for ``fixed`` (normalised to sum 1; default uniform)
        and ``rrf`` (default uniform).
    rrf_k : int, default 60
        Rank offset of reciprocal rank fusion.
    rrf_depth : int, optional
        Only a member's top ``rrf_depth`` documents contribute, as when each
        retriever returns a short list; default: the full ranking.
    """

    kind: MethodKind
    combine: Combination = "direct_sum"
    rule: CoefficientRule = field(default_factory=CoefficientRule)
    similarity: Similarity = "uncertainty"
    member: int | None = None
    weights: tuple[float, ...] | None = None
    rrf_k: int = 60
    rrf_depth: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in METHOD_KINDS:
            raise ValueError(f"kind must be one of {list(METHOD_KINDS)}, got {self.kind!r}")
        if self.combine not in COMBINATIONS:
            raise ValueError(f"combine must be one of {list(COMBINATIONS)}, got {self.combine!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(
                f"similarity must be one of {list(SIMILARITIES)}, got {self.similarity!r}"
            )
        if self.kind == "single" and (self.member is None or self.member < 0):
            raise ValueError(f"kind='single' needs a member position >= 0, got {self.member!r}")
        if self.weights is not None:
            weights = tuple(float(w) for w in self.weights)
            if (
                not weights
                or any(not np.isfinite(w) or w < 0 for w in weights)
                or sum(weights) <= 0
            ):
                raise ValueError(
                    f"weights must be finite, >= 0 and not all 0, got {self.weights!r}"
                )
            object.__setattr__(self, "weights", weights)
        if self.rrf_k < 0:
            raise ValueError(f"rrf_k must be >= 0, got {self.rrf_k}")
        if self.rrf_depth is not None and self.rrf_depth < 1:
            raise ValueError(f"rrf_depth must be >= 1, got {self.rrf_depth}")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict."""
        settings = asdict(self)
        settings["rule"] = self.rule.to_dict()
        settings["weights"] = None if self.weights is None else list(self.weights)
        return settings


@dataclass(frozen=True)
class MethodScores:
    """Scores of one method, ``[Q, N]``, and the coefficients it used (``[n, K]`` or None)."""

    scores: np.ndarray
    query_coefficients: np.ndarray | None = None
    document_coefficients: np.ndarray | None = None


def standard_methods(
    member_names: Sequence[str],
    *,
    rule: CoefficientRule | None = None,
    weights: Sequence[float] | None = None,
    equal_dims: bool = False,
) -> dict[str, Method]:
    """Build UEC, its ablations and the baselines, keyed by a readable name.

    Parameters
    ----------
    member_names : sequence of str
        Member names, in member order (used for the ``single:<name>`` keys).
    rule : CoefficientRule, optional
        Rule of the UEC methods; default ``CoefficientRule()``.
    weights : sequence of float, optional
        Adds ``fixed-weights`` with these per-member weights.
    equal_dims : bool, default False
        Adds the ``convolution`` variants (they need members of equal dimension).

    Returns
    -------
    dict of str to Method
        ``uec``, ``uec-mean-ip`` (no uncertainty similarity), ``uec-uniform``
        (uniform coefficients, uncertainty similarity), ``uniform-direct_sum``,
        ``concatenation``, ``rrf``, ``single:<name>`` per member, and optionally
        ``fixed-weights`` and the ``-convolution`` variants.
    """
    rule = rule or CoefficientRule()
    combinations: list[Combination] = ["direct_sum"]
    if equal_dims:
        combinations.append("convolution")

    methods: dict[str, Method] = {}
    for combination in combinations:
        suffix = "" if combination == "direct_sum" else "-convolution"
        methods[f"uec{suffix}"] = Method("uec", combination, rule, "uncertainty")
        methods[f"uec-mean-ip{suffix}"] = Method("uec", combination, rule, "inner_product")
        methods[f"uec-uniform{suffix}"] = Method("fixed", combination, rule, "uncertainty")
        methods[f"uniform-{combination}"] = Method("fixed", combination, rule, "inner_product")
    methods["concatenation"] = Method("concatenation", similarity="inner_product")
    methods["rrf"] = Method("rrf", similarity="inner_product")
    if weights is not None:
        methods["fixed-weights"] = Method(
            "fixed", "direct_sum", rule, "inner_product", weights=tuple(weights)
        )
    for position, name in enumerate(member_names):
        methods[f"single:{name}"] = Method("single", similarity="inner_product", member=position)
    return methods


def _check_members(
    query_members: Sequence[GaussianEmbedding], doc_members: Sequence[GaussianEmbedding]
) -> None:
    if not query_members or len(query_members) != len(doc_members):
        raise ValueError(
            "query_members and doc_members must list the same members (K >= 1), "
            f"got {len(query_members)} and {len(doc_members)}"
        )
    for k, (query, doc) in enumerate(zip(query_members, doc_members, strict=True)):
        if query.dim != doc.dim:
            raise ValueError(
                f"member {k}: query dimension {query.dim} differs from document dimension {doc.dim}"
            )


def _fixed_coefficients(
    n_items: int, n_members: int, weights: tuple[float, ...] | None
) -> np.ndarray:
    if weights is None:
        row = np.full(n_members, 1.0 / n_members)
    else:
        if len(weights) != n_members:
            raise ValueError(f"got {len(weights)} weights for {n_members} members")
        row = np.asarray(weights) / sum(weights)
    return np.broadcast_to(row.astype(np.float32), (n_items, n_members))


def combined_embedding(
    method: Method,
    members: Sequence[GaussianEmbedding],
    reference_traces: Sequence[float | None] | None,
) -> tuple[GaussianEmbedding, np.ndarray | None]:
    """Reduce the members to the single Gaussian the method scores, plus its coefficients.

    Single members and concatenation return no coefficients (``None``).
    """
    if method.kind == "single":
        if method.member >= len(members):  # type: ignore[operator]
            raise ValueError(f"member {method.member} does not exist: there are {len(members)}")
        return members[method.member], None  # type: ignore[index]
    if method.kind == "concatenation":
        ones = np.ones((len(members[0]), len(members)), dtype=np.float32)
        return combine(members, ones, "direct_sum"), None
    if method.kind == "fixed":
        coefficients = _fixed_coefficients(len(members[0]), len(members), method.weights)
        return combine(members, coefficients, method.combine), coefficients
    return combine_members(members, method.combine, method.rule, reference_traces)


def _similarity(
    method: Method, queries: GaussianEmbedding, documents: GaussianEmbedding
) -> np.ndarray:
    if queries.dim != documents.dim:
        raise ValueError(
            f"query dimension {queries.dim} differs from document dimension {documents.dim}"
        )
    if method.similarity == "inner_product":
        return queries.mean @ documents.mean.T
    return uncertainty_similarity(queries, documents).score


def reciprocal_rank_fusion(
    member_scores: Sequence[np.ndarray],
    *,
    k: int = 60,
    depth: int | None = None,
    weights: Sequence[float] | None = None,
) -> np.ndarray:
    """Fuse per-member ``[Q, N]`` scores by ``sum_m w_m / (k + rank_m)``, 1-based ranks.

    Documents below ``depth`` in a member's ranking get nothing from it. Ties
    within a member's scores are ranked by document position.
    """
    if not member_scores:
        raise ValueError("reciprocal_rank_fusion needs at least one member's scores")
    shapes = {scores.shape for scores in member_scores}
    if len(shapes) != 1:
        raise ValueError(f"member scores must have equal shapes, got {sorted(shapes)}")
    if weights is None:
        weights = [1.0 / len(member_scores)] * len(member_scores)
    if len(weights) != len(member_scores):
        raise ValueError(f"got {len(weights)} weights for {len(member_scores)} members")

    fused = np.zeros(member_scores[0].shape, dtype=np.float64)
    for weight, scores in zip(weights, member_scores, strict=True):
        order = np.argsort(-scores, axis=1, kind="stable")
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(1, scores.shape[1] + 1)[None, :], axis=1)
        contribution = weight / (k + ranks)
        if depth is not None:
            contribution[ranks > depth] = 0.0
        fused += contribution
    return fused.astype(np.float32)


def method_scores(
    method: Method,
    query_members: Sequence[GaussianEmbedding],
    doc_members: Sequence[GaussianEmbedding],
    *,
    reference_traces: Sequence[float | None] | None = None,
) -> MethodScores:
    """Score all queries against all documents with one method, dense ``[Q, N]``.

    Parameters
    ----------
    method : Method
        The method (see :func:`standard_methods`).
    query_members, doc_members : sequence of GaussianEmbedding
        The K members' embeddings of the Q queries and of the N documents, in
        the same member order.
    reference_traces : sequence of float or None, optional
        One per member; needed by rules with ``normalize_traces=True``.

    Returns
    -------
    MethodScores
        ``scores [Q, N]`` (higher is better) and the coefficients used.
    """
    _check_members(query_members, doc_members)
    if method.kind == "rrf":
        per_member = [
            _similarity(method, query, doc)
            for query, doc in zip(query_members, doc_members, strict=True)
        ]
        fused = reciprocal_rank_fusion(
            per_member, k=method.rrf_k, depth=method.rrf_depth, weights=method.weights
        )
        return MethodScores(fused)

    queries, query_coefficients = combined_embedding(method, query_members, reference_traces)
    documents, doc_coefficients = combined_embedding(method, doc_members, reference_traces)
    return MethodScores(
        _similarity(method, queries, documents), query_coefficients, doc_coefficients
    )


def top_k_from_scores(scores: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(indices, scores)`` of the ``top_k`` best documents per row, best first."""
    n_documents = scores.shape[1]
    k = min(top_k, n_documents)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(part_scores, order, axis=1)


def method_top_k(
    method: Method,
    query_members: Sequence[GaussianEmbedding],
    doc_members: Sequence[GaussianEmbedding],
    top_k: int,
    *,
    reference_traces: Sequence[float | None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Find each query's ``top_k`` documents with one method, in bounded memory.

    Methods other than ``rrf`` search in chunks (:class:`GaussianIndex` or
    :func:`inner_product_top_k`), so N may be large. ``rrf`` needs full rankings
    and builds the dense ``[Q, N]`` scores.

    Returns
    -------
    tuple of np.ndarray
        ``(indices [Q, k] int64, scores [Q, k] float32)``, best first.
    """
    _check_members(query_members, doc_members)
    if method.kind == "rrf":
        scores = method_scores(
            method, query_members, doc_members, reference_traces=reference_traces
        ).scores
        return top_k_from_scores(scores, top_k)

    queries, _ = combined_embedding(method, query_members, reference_traces)
    documents, _ = combined_embedding(method, doc_members, reference_traces)
    if method.similarity == "inner_product":
        return inner_product_top_k(queries.mean, documents.mean, top_k)
    result = GaussianIndex(documents).search(queries, top_k)
    return result.indices, result.score
