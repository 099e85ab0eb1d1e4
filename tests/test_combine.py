"""Convolution and direct sum of member Gaussians."""

from __future__ import annotations

import numpy as np
import pytest

from uec_rag.coefficients import CoefficientRule
from uec_rag.combine import combine, combine_members, convolution, direct_sum
from uec_rag.gaussian import GaussianEmbedding


def test_convolution_exact_values() -> None:
    first = GaussianEmbedding(np.array([[1.0, 0.0]]), np.array([[1.0, 2.0]]))
    second = GaussianEmbedding(np.array([[0.0, 2.0]]), np.array([[4.0, 0.0]]))
    combined = convolution([first, second], np.array([[0.25, 0.75]]))

    np.testing.assert_allclose(combined.mean, [[0.25, 1.5]])
    # 0.0625 * [1, 2] + 0.5625 * [4, 0]
    np.testing.assert_allclose(combined.variance, [[2.3125, 0.125]])


def test_direct_sum_exact_values() -> None:
    first = GaussianEmbedding(np.array([[2.0]]), np.array([[1.0]]))
    second = GaussianEmbedding(np.array([[1.0, 3.0]]), np.array([[0.5, 2.0]]))
    combined = direct_sum([first, second], np.array([[0.25, 0.75]]))

    np.testing.assert_allclose(combined.mean, [[1.0, np.sqrt(0.75), 3 * np.sqrt(0.75)]])
    np.testing.assert_allclose(combined.variance, [[0.25, 0.375, 1.5]])


def test_direct_sum_inner_product_is_weighted_member_sum() -> None:
    rng = np.random.default_rng(0)
    members_q = [GaussianEmbedding(rng.normal(size=(1, d)), np.zeros((1, d))) for d in (3, 5)]
    members_c = [GaussianEmbedding(rng.normal(size=(1, d)), np.zeros((1, d))) for d in (3, 5)]
    pi_q, pi_c = np.array([[0.2, 0.8]]), np.array([[0.6, 0.4]])
    inner = direct_sum(members_q, pi_q).mean @ direct_sum(members_c, pi_c).mean.T
    expected = sum(
        np.sqrt(pi_q[0, k] * pi_c[0, k]) * members_q[k].mean @ members_c[k].mean.T for k in range(2)
    )
    np.testing.assert_allclose(inner, expected, rtol=1e-5)


def test_convolution_unequal_dims_raises() -> None:
    first = GaussianEmbedding(np.zeros((1, 384)), np.zeros((1, 384)))
    second = GaussianEmbedding(np.zeros((1, 768)), np.zeros((1, 768)))
    with pytest.raises(ValueError, match=r"dimensions \[384, 768\].*direct_sum"):
        convolution([first, second], np.array([[0.5, 0.5]]))


def test_bad_coefficients_raise() -> None:
    member = GaussianEmbedding(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"shape \[N, K\] = \[2, 2\]"):
        direct_sum([member, member], np.ones((2, 3)))
    with pytest.raises(ValueError, match="finite and >= 0"):
        direct_sum([member, member], np.array([[0.5, np.nan], [0.5, 0.5]]))


def test_members_must_match_in_size_and_type() -> None:
    member = GaussianEmbedding(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="same number of items"):
        direct_sum([member, member[0]], np.ones((2, 2)))
    with pytest.raises(TypeError, match=r"members\[1\] must be a GaussianEmbedding"):
        direct_sum([member, np.zeros((2, 3))], np.ones((2, 2)))  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least one member"):
        direct_sum([], np.ones((2, 0)))


def test_combine_dispatch_and_unknown_name() -> None:
    member = GaussianEmbedding(np.ones((1, 2)), np.ones((1, 2)))
    coefficients = np.array([[0.5, 0.5]])
    assert combine([member, member], coefficients, "direct_sum").dim == 4
    assert combine([member, member], coefficients, "convolution").dim == 2
    with pytest.raises(ValueError, match="combination must be one of"):
        combine([member, member], coefficients, "sum")  # type: ignore[arg-type]


def test_combine_members_uses_traces() -> None:
    certain = GaussianEmbedding(np.ones((1, 2)), np.full((1, 2), 0.1))
    uncertain = GaussianEmbedding(np.ones((1, 2)), np.full((1, 2), 0.3))
    combined, coefficients = combine_members([certain, uncertain], "convolution")
    np.testing.assert_allclose(coefficients, [[0.75, 0.25]], rtol=1e-6)
    np.testing.assert_allclose(combined.mean, [[1.0, 1.0]], rtol=1e-6)
    # 0.5625 * 0.1 + 0.0625 * 0.3
    np.testing.assert_allclose(combined.variance, [[0.075, 0.075]], rtol=1e-5)

    _, uniform = combine_members([certain, uncertain], rule=CoefficientRule("uniform"))
    np.testing.assert_allclose(uniform, [[0.5, 0.5]])
