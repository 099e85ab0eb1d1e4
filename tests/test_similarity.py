"""Uncertainty-aware similarity: exact values, the naive reference and Monte Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest

from uec_rag.gaussian import GaussianEmbedding
from uec_rag.similarity import (
    PROBIT_FACTOR,
    naive_similarity,
    probit_score,
    similarity_moments,
    uncertainty_similarity,
    wasserstein2_distance,
)


def random_gaussians(
    rng: np.random.Generator, n: int, dim: int, std: float = 0.1
) -> GaussianEmbedding:
    mean = rng.standard_normal((n, dim))
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    variance = (std * rng.uniform(0.2, 1.5, size=(n, dim))) ** 2
    return GaussianEmbedding(mean, variance)


def kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall tau-b of two score vectors (O(n^2), for small n)."""
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    upper = np.triu_indices(len(x), k=1)
    dx, dy = dx[upper], dy[upper]
    concordance = float((dx * dy).sum())
    return concordance / math.sqrt(float((dx != 0).sum()) * float((dy != 0).sum()))


def test_similarity_exact_values() -> None:
    queries = GaussianEmbedding(np.array([[1.0, 2.0]]), np.array([[0.5, 0.25]]))
    documents = GaussianEmbedding(np.array([[3.0, -1.0]]), np.array([[0.1, 0.2]]))
    # mu_s = 3 - 2 = 1
    # sigma^2 = (1*0.1 + 4*0.2) + (9*0.5 + 1*0.25) + (0.5*0.1 + 0.25*0.2) = 0.9 + 4.75 + 0.1
    expected_sigma2 = 5.75
    scores = uncertainty_similarity(queries, documents)

    assert scores.mu_s[0, 0] == pytest.approx(1.0)
    assert scores.sigma_s[0, 0] ** 2 == pytest.approx(expected_sigma2, rel=1e-6)
    assert scores.score[0, 0] == pytest.approx(1 / math.sqrt(1 + math.pi / 8 * expected_sigma2))


def test_vectorised_matches_naive_reference() -> None:
    rng = np.random.default_rng(0)
    queries = random_gaussians(rng, 9, 48, std=0.3)
    documents = random_gaussians(rng, 40, 48, std=0.3)
    fast = uncertainty_similarity(queries, documents)
    slow = naive_similarity(queries, documents)

    np.testing.assert_allclose(fast.mu_s, slow.mu_s, atol=1e-6, rtol=0)
    np.testing.assert_allclose(fast.sigma_s, slow.sigma_s, atol=1e-6, rtol=0)
    np.testing.assert_allclose(fast.score, slow.score, atol=1e-6, rtol=0)


def test_zero_variance_gives_inner_product() -> None:
    rng = np.random.default_rng(1)
    queries = random_gaussians(rng, 3, 16, std=0.0)
    documents = random_gaussians(rng, 5, 16, std=0.0)
    scores = uncertainty_similarity(queries, documents)

    np.testing.assert_allclose(scores.score, queries.mean @ documents.mean.T, atol=1e-7)
    assert (scores.sigma_s == 0).all()


def test_dimension_mismatch_raises() -> None:
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="dimension 8 but documents have 9"):
        uncertainty_similarity(random_gaussians(rng, 2, 8), random_gaussians(rng, 2, 9))


def test_probit_score_shrinks_towards_zero() -> None:
    mu = np.array([0.5, -0.5, 0.0])
    sigma2 = np.array([8 / math.pi, 8 / math.pi, 3.0])
    np.testing.assert_allclose(probit_score(mu, sigma2), mu / math.sqrt(2))
    assert pytest.approx(math.pi / 8) == PROBIT_FACTOR


def sample_inner_products(
    rng: np.random.Generator,
    query: GaussianEmbedding,
    documents: GaussianEmbedding,
    n_samples: int,
) -> np.ndarray:
    """Sample ``q^T c`` for one query and each document: shape ``[N, n_samples]``."""
    shape = (n_samples, query.dim)
    q = query.mean[0] + np.sqrt(query.variance[0]) * rng.standard_normal(shape, np.float32)
    products = np.empty((len(documents), n_samples))
    for j in range(len(documents)):
        noise = rng.standard_normal(shape, np.float32)
        c = documents.mean[j] + np.sqrt(documents.variance[j]) * noise
        products[j] = np.einsum("sd,sd->s", q, c)
    return products


@pytest.mark.parametrize("std", [0.05, 0.3])
def test_moments_match_monte_carlo(std: float) -> None:
    rng = np.random.default_rng(3)
    n_samples = 20_000
    query = random_gaussians(rng, 1, 32, std=std)
    documents = random_gaussians(rng, 6, 32, std=std)
    mu_s, sigma2_s = similarity_moments(query, documents)
    samples = sample_inner_products(rng, query, documents, n_samples)

    sample_mean = samples.mean(axis=1)
    sample_var = samples.var(axis=1, ddof=1)
    standard_error = np.sqrt(sigma2_s[0] / n_samples)
    assert (np.abs(sample_mean - mu_s[0]) < 5 * standard_error).all()
    np.testing.assert_allclose(sample_var, sigma2_s[0], rtol=0.06)


def documents_around(
    rng: np.random.Generator, query: GaussianEmbedding, n: int, std: float
) -> GaussianEmbedding:
    """Documents whose mean similarity to the query spans about [-0.3, 0.95],
    each with its own variance scale (so uncertainty can change the order)."""
    dim = query.dim
    alpha = rng.uniform(-0.3, 0.95, size=(n, 1))
    noise = rng.standard_normal((n, dim))
    noise -= (noise @ query.mean[0])[:, None] * query.mean[0]
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    mean = alpha * query.mean[0] + np.sqrt(1 - alpha**2) * noise
    scale = rng.uniform(0.3, 2.0, size=(n, 1))
    variance = (std * scale * rng.uniform(0.5, 1.5, size=(n, dim))) ** 2
    return GaussianEmbedding(mean, variance)


def rank_agreement(
    std: float,
    *,
    n_queries: int = 8,
    n_documents: int = 100,
    dim: int = 64,
    n_samples: int = 10_000,
    seed: int = 4,
) -> tuple[float, float]:
    """Mean Kendall tau of the probit-score order against (a) the Monte Carlo
    E[sigmoid(q^T c)] order and (b) the ascending 2-Wasserstein order."""
    rng = np.random.default_rng(seed)
    tau_expected, tau_wasserstein = [], []
    for _ in range(n_queries):
        query = random_gaussians(rng, 1, dim, std=std)
        documents = documents_around(rng, query, n_documents, std)
        score = uncertainty_similarity(query, documents).score[0]
        samples = sample_inner_products(rng, query, documents, n_samples)
        expected_sigmoid = (1 / (1 + np.exp(-samples))).mean(axis=1)
        distance = wasserstein2_distance(query, documents)[0]
        tau_expected.append(kendall_tau(score, expected_sigmoid))
        tau_wasserstein.append(kendall_tau(score, -distance))
    return float(np.mean(tau_expected)), float(np.mean(tau_wasserstein))


@pytest.mark.parametrize(
    ("std", "min_tau_expected", "min_tau_wasserstein"),
    [(0.02, 0.98, 0.97), (0.1, 0.98, 0.6), (0.3, 0.95, 0.15)],
)
def test_rank_agreement_with_sampling(
    std: float, min_tau_expected: float, min_tau_wasserstein: float
) -> None:
    # A smaller run than the one reported in docs/similarity.md (8 queries x 100 documents).
    tau_expected, tau_wasserstein = rank_agreement(std, n_queries=4, n_documents=60)
    assert tau_expected > min_tau_expected
    assert tau_wasserstein > min_tau_wasserstein


def test_wasserstein_distance_exact() -> None:
    queries = GaussianEmbedding(np.array([[0.0, 0.0]]), np.array([[1.0, 4.0]]))
    documents = GaussianEmbedding(np.array([[3.0, 4.0]]), np.array([[4.0, 4.0]]))
    # ||mu||^2 = 25, ||sqrt(var_q) - sqrt(var_c)||^2 = (1 - 2)^2 + 0 = 1
    assert wasserstein2_distance(queries, documents)[0, 0] == pytest.approx(math.sqrt(26))
