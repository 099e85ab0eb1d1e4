"""GaussianIndex: exact chunked top-k, reduced precision and reranking."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from uec_rag.gaussian import GaussianEmbedding
from uec_rag.index import GaussianIndex, inner_product_top_k
from uec_rag.similarity import naive_similarity, uncertainty_similarity


def random_gaussians(rng: np.random.Generator, n: int, dim: int, std: float) -> GaussianEmbedding:
    mean = rng.standard_normal((n, dim))
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    scale = rng.uniform(0.2, 3.0, size=(n, 1))
    variance = (std * scale * rng.uniform(0.5, 1.5, size=(n, dim))) ** 2
    return GaussianEmbedding(mean, variance)


def dense_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("std", [0.01, 0.2, 1.0])
@pytest.mark.parametrize("prune", [True, False])
def test_search_equals_dense_ranking(std: float, prune: bool) -> None:
    rng = np.random.default_rng(0)
    documents = random_gaussians(rng, 3000, 24, std)
    queries = random_gaussians(rng, 37, 24, std)
    dense = uncertainty_similarity(queries, documents)
    index = GaussianIndex(documents, chunk_size=257)
    result = index.search(queries, top_k=10, query_batch_size=16, prune=prune)

    np.testing.assert_array_equal(result.indices, dense_top_k(dense.score, 10))
    expected = np.take_along_axis(dense.score, result.indices, axis=1)
    np.testing.assert_allclose(result.score, expected, atol=1e-6)
    np.testing.assert_allclose(
        result.mu_s, np.take_along_axis(dense.mu_s, result.indices, axis=1), atol=1e-6
    )
    np.testing.assert_allclose(
        result.sigma_s, np.take_along_axis(dense.sigma_s, result.indices, axis=1), atol=1e-6
    )
    assert (np.diff(result.score, axis=1) <= 0).all()


def test_search_handles_negative_scores() -> None:
    # Every document points away from the query, so every score is negative and
    # the pruning bound must not discard them.
    rng = np.random.default_rng(1)
    documents = random_gaussians(rng, 500, 8, 0.3)
    query = GaussianEmbedding(-documents.mean.mean(axis=0, keepdims=True), np.full((1, 8), 0.05))
    flipped = GaussianEmbedding(
        np.where(documents.mean @ query.mean.T > 0, -1.0, 1.0) * documents.mean,
        documents.variance,
    )
    dense = uncertainty_similarity(query, flipped)
    assert (dense.score < 0).all()
    result = GaussianIndex(flipped, chunk_size=64).search(query, top_k=5)
    np.testing.assert_array_equal(result.indices, dense_top_k(dense.score, 5))


def test_search_ids_and_small_index() -> None:
    rng = np.random.default_rng(2)
    documents = random_gaussians(rng, 4, 6, 0.1)
    index = GaussianIndex(documents, ids=["a", "b", "c", "d"])
    result = index.search(documents[1], top_k=10)
    assert result.indices.shape == (1, 4)
    assert result.ids[0] == [index.ids[i] for i in result.indices[0]]
    assert set(result.ids[0]) == {"a", "b", "c", "d"}


@pytest.mark.parametrize("precision", ["float16", "uint8"])
def test_reduced_precision_close_to_float32(precision: str) -> None:
    rng = np.random.default_rng(3)
    documents = random_gaussians(rng, 2000, 32, 0.05)
    queries = random_gaussians(rng, 50, 32, 0.05)
    exact = GaussianIndex(documents)
    reduced = GaussianIndex(documents, precision=precision)  # type: ignore[arg-type]

    terms_exact = exact.document_terms(slice(None))
    terms_reduced = reduced.document_terms(slice(None))
    tolerance = 1e-3 if precision == "float16" else 1 / 255
    row_max = terms_exact.reshape(2000, 2, 32).max(axis=2, keepdims=True)
    error = np.abs(terms_reduced - terms_exact).reshape(2000, 2, 32) / row_max
    assert error.max() <= tolerance

    agreement = (exact.search(queries, 10).indices == reduced.search(queries, 10).indices).all(
        axis=1
    )
    assert agreement.mean() >= 0.96
    assert reduced.nbytes < exact.nbytes


def test_score_matches_naive_reference() -> None:
    rng = np.random.default_rng(4)
    documents = random_gaussians(rng, 50, 16, 0.3)
    queries = random_gaussians(rng, 3, 16, 0.3)
    reference = naive_similarity(queries, documents)
    index = GaussianIndex(documents)

    chosen = np.array([[4, 9, 0], [49, 1, 2], [7, 7, 8]])
    scores = index.score(queries, chosen)
    np.testing.assert_allclose(
        scores.score, np.take_along_axis(reference.score, chosen, axis=1), atol=1e-6
    )
    np.testing.assert_allclose(
        scores.sigma_s, np.take_along_axis(reference.sigma_s, chosen, axis=1), atol=1e-6
    )
    shared = index.score(queries, [3, 5])
    np.testing.assert_allclose(shared.mu_s, reference.mu_s[:, [3, 5]], atol=1e-6)


def test_score_bad_indices_raise() -> None:
    rng = np.random.default_rng(5)
    index = GaussianIndex(random_gaussians(rng, 5, 4, 0.1))
    queries = random_gaussians(rng, 2, 4, 0.1)
    with pytest.raises(IndexError, match=r"doc_indices\[0, 1\] = 5 is outside the index of 5"):
        index.score(queries, [[0, 5], [1, 2]])
    with pytest.raises(ValueError, match=r"shape \[m\] or \[Q, m\] with Q = 2"):
        index.score(queries, [[0, 1]] * 3)
    with pytest.raises(TypeError, match="must be integers"):
        index.score(queries, [0.5])


def test_index_bad_input_raises() -> None:
    rng = np.random.default_rng(6)
    documents = random_gaussians(rng, 3, 4, 0.1)
    with pytest.raises(ValueError, match="got 2 ids for 3 documents"):
        GaussianIndex(documents, ids=["a", "b"])
    with pytest.raises(ValueError, match="ids must be unique"):
        GaussianIndex(documents, ids=["a", "b", "a"])
    with pytest.raises(ValueError, match="precision must be one of"):
        GaussianIndex(documents, precision="int4")  # type: ignore[arg-type]
    index = GaussianIndex(documents)
    with pytest.raises(ValueError, match="dimension 5 but the index has 4"):
        index.search(random_gaussians(rng, 1, 5, 0.1))
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        index.search(documents, top_k=0)


def test_index_pickles() -> None:
    rng = np.random.default_rng(7)
    documents = random_gaussians(rng, 30, 4, 0.1)
    index = GaussianIndex(documents, precision="uint8")
    restored = pickle.loads(pickle.dumps(index))
    np.testing.assert_array_equal(
        restored.search(documents[:3], 5).indices, index.search(documents[:3], 5).indices
    )


def test_inner_product_top_k_matches_argsort() -> None:
    rng = np.random.default_rng(8)
    documents = rng.standard_normal((5000, 16)).astype(np.float32)
    queries = rng.standard_normal((70, 16)).astype(np.float32)
    indices, scores = inner_product_top_k(queries, documents, 7, chunk_size=333)
    dense = queries @ documents.T
    np.testing.assert_array_equal(indices, dense_top_k(dense, 7))
    np.testing.assert_allclose(scores, np.take_along_axis(dense, indices, axis=1), rtol=1e-6)
