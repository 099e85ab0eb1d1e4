"""Baselines and ablations computed from per-member embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from uec_rag.coefficients import CoefficientRule, compute_coefficients, member_traces
from uec_rag.combine import direct_sum
from uec_rag.fusion import (
    Method,
    method_scores,
    method_top_k,
    reciprocal_rank_fusion,
    standard_methods,
    top_k_from_scores,
)
from uec_rag.gaussian import GaussianEmbedding
from uec_rag.similarity import uncertainty_similarity


def members(rng: np.random.Generator, n: int, dims: tuple[int, ...]) -> list[GaussianEmbedding]:
    out = []
    for k, dim in enumerate(dims):
        mean = rng.standard_normal((n, dim))
        mean /= np.linalg.norm(mean, axis=1, keepdims=True)
        variance = (0.05 * (k + 1)) ** 2 * rng.uniform(0.2, 2.0, size=(n, 1)) * np.ones((n, dim))
        out.append(GaussianEmbedding(mean, variance))
    return out


@pytest.fixture
def embeddings() -> tuple[list[GaussianEmbedding], list[GaussianEmbedding]]:
    rng = np.random.default_rng(0)
    return members(rng, 5, (8, 8, 8)), members(rng, 40, (8, 8, 8))


def test_rrf_exact_values() -> None:
    first = np.array([[0.9, 0.5, 0.1]])  # ranks 1, 2, 3
    second = np.array([[0.1, 0.2, 0.3]])  # ranks 3, 2, 1
    fused = reciprocal_rank_fusion([first, second], k=60)
    expected = 0.5 * np.array([1 / 61 + 1 / 63, 2 / 62, 1 / 63 + 1 / 61])
    np.testing.assert_allclose(fused[0], expected, rtol=1e-6)

    shallow = reciprocal_rank_fusion([first, second], k=60, depth=1)
    np.testing.assert_allclose(shallow[0], 0.5 * np.array([1 / 61, 0, 1 / 61]), rtol=1e-6)


def test_single_member_is_plain_inner_product(embeddings) -> None:
    queries, documents = embeddings
    scores = method_scores(
        Method("single", member=1, similarity="inner_product"), queries, documents
    )
    np.testing.assert_allclose(scores.scores, queries[1].mean @ documents[1].mean.T, rtol=1e-6)
    assert scores.query_coefficients is None


def test_uec_equals_manual_pipeline(embeddings) -> None:
    queries, documents = embeddings
    rule = CoefficientRule(temperature=2.0)
    result = method_scores(Method("uec", "direct_sum", rule), queries, documents)

    pi_q = compute_coefficients(member_traces(queries), rule)
    pi_c = compute_coefficients(member_traces(documents), rule)
    expected = uncertainty_similarity(direct_sum(queries, pi_q), direct_sum(documents, pi_c))
    np.testing.assert_allclose(result.scores, expected.score, rtol=1e-6)
    np.testing.assert_allclose(result.query_coefficients, pi_q)
    np.testing.assert_allclose(result.document_coefficients, pi_c)


def test_concatenation_ranks_like_uniform_direct_sum(embeddings) -> None:
    queries, documents = embeddings
    concatenated = method_scores(
        Method("concatenation", similarity="inner_product"), queries, documents
    )
    uniform = method_scores(Method("fixed", similarity="inner_product"), queries, documents)
    np.testing.assert_allclose(concatenated.scores / 3, uniform.scores, atol=1e-6)


def test_fixed_weights_normalised(embeddings) -> None:
    queries, documents = embeddings
    weighted = method_scores(
        Method("fixed", similarity="inner_product", weights=(2.0, 0.0, 0.0)), queries, documents
    )
    np.testing.assert_allclose(weighted.scores, queries[0].mean @ documents[0].mean.T, atol=1e-6)
    with pytest.raises(ValueError, match="got 2 weights for 3 members"):
        method_scores(Method("fixed", weights=(1.0, 1.0)), queries, documents)


def test_uniform_convolution_is_mean_embedding(embeddings) -> None:
    queries, documents = embeddings
    result = method_scores(
        Method("fixed", "convolution", similarity="inner_product"), queries, documents
    )
    mean_q = sum(member.mean for member in queries) / 3
    mean_c = sum(member.mean for member in documents) / 3
    np.testing.assert_allclose(result.scores, mean_q @ mean_c.T, atol=1e-6)


def test_ablations_differ_from_uec(embeddings) -> None:
    queries, documents = embeddings
    methods = standard_methods(["a", "b", "c"], equal_dims=True, weights=[1, 2, 3])
    scores = {name: method_scores(m, queries, documents).scores for name, m in methods.items()}

    assert {"uec", "uec-mean-ip", "uec-uniform", "rrf", "concatenation", "single:b"} <= set(scores)
    assert {"uec-convolution", "uniform-convolution", "fixed-weights"} <= set(scores)
    assert not np.allclose(scores["uec"], scores["uec-mean-ip"])
    assert not np.allclose(scores["uec"], scores["uec-uniform"])
    for name, value in scores.items():
        assert value.shape == (5, 40), name


def test_method_top_k_matches_dense(embeddings) -> None:
    queries, documents = embeddings
    for name, method in standard_methods(["a", "b", "c"], equal_dims=True).items():
        dense = method_scores(method, queries, documents).scores
        indices, _ = method_top_k(method, queries, documents, 5)
        expected, _ = top_k_from_scores(dense, 5)
        np.testing.assert_array_equal(indices, expected, err_msg=name)


def test_normalised_rule_needs_reference_traces(embeddings) -> None:
    queries, documents = embeddings
    method = Method("uec", rule=CoefficientRule(normalize_traces=True))
    with pytest.raises(ValueError, match="needs reference_traces"):
        method_scores(method, queries, documents)
    scores = method_scores(method, queries, documents, reference_traces=[1.0, 2.0, 3.0])
    assert np.isfinite(scores.scores).all()


def test_bad_methods_raise(embeddings) -> None:
    queries, documents = embeddings
    with pytest.raises(ValueError, match="kind must be one of"):
        Method("bm25")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a member position"):
        Method("single")
    with pytest.raises(ValueError, match="member 5 does not exist"):
        method_scores(Method("single", member=5), queries, documents)
    with pytest.raises(ValueError, match="same members"):
        method_scores(Method("uec"), queries, documents[:2])
    with pytest.raises(ValueError, match="weights must be finite"):
        Method("fixed", weights=(0.0, 0.0))


def test_method_to_dict_is_plain() -> None:
    settings = Method("fixed", weights=(1, 2)).to_dict()
    assert settings["weights"] == [1.0, 2.0]
    assert settings["rule"] == CoefficientRule().to_dict()
