"""Combine K members' Gaussian embeddings of the same items into one Gaussian.

Both combinations take per-item coefficients ``pi [N, K]`` (rows sum to 1, see
:mod:`uec_rag.coefficients`) and assume the members' errors are independent.
With member means ``mu_k`` and diagonal variances ``var_k``:

``convolution`` (the rule of "Uncertainty-driven Embedding Convolution",
ICLR 2026), a weighted sum of independent Gaussians::

    mean = sum_k pi_k mu_k            variance = sum_k pi_k^2 var_k

It needs members of equal dimension.

``direct_sum``, the block vector of the scaled members::

    mean = [sqrt(pi_1) mu_1, ..., sqrt(pi_K) mu_K]
    variance = [pi_1 var_1, ..., pi_K var_K]

Independently trained embedding spaces are not aligned coordinate by
coordinate: coordinate 7 of one model has no relation to coordinate 7 of
another, so adding their vectors mixes unrelated features. The direct sum keeps
each model in its own block, so the inner product of two combined means is
``sum_k sqrt(pi_k(q) pi_k(c)) mu_k(q)^T mu_k(c)``, a weighted sum of each
model's own similarity, and members of any dimensions can be combined.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from uec_rag.coefficients import (
    CoefficientRule,
    check_member_embeddings,
    compute_coefficients,
    member_traces,
)
from uec_rag.gaussian import GaussianEmbedding

__all__ = [
    "COMBINATIONS",
    "Combination",
    "combine",
    "combine_members",
    "convolution",
    "direct_sum",
]

Combination = Literal["convolution", "direct_sum"]
COMBINATIONS: tuple[Combination, ...] = ("convolution", "direct_sum")


def _check(
    members: Sequence[GaussianEmbedding], coefficients: np.ndarray, caller: str
) -> np.ndarray:
    n_items = check_member_embeddings(members, caller)
    coefficients = np.asarray(coefficients, dtype=np.float32)
    expected = (n_items, len(members))
    if coefficients.shape != expected:
        raise ValueError(
            f"coefficients must have shape [N, K] = {list(expected)}, "
            f"got {list(coefficients.shape)}"
        )
    if not np.isfinite(coefficients).all() or (coefficients < 0).any():
        raise ValueError("coefficients must be finite and >= 0")
    return coefficients


def convolution(
    members: Sequence[GaussianEmbedding], coefficients: np.ndarray
) -> GaussianEmbedding:
    """Combine members by the weighted sum ``sum_k pi_k X_k`` of independent Gaussians.

    Parameters
    ----------
    members : sequence of GaussianEmbedding
        K embeddings of the same N items, all of dimension D.
    coefficients : np.ndarray
        ``pi`` of shape ``[N, K]``.

    Returns
    -------
    GaussianEmbedding
        Shape ``[N, D]``: mean ``sum_k pi_k mu_k``, variance ``sum_k pi_k^2 var_k``.

    Raises
    ------
    ValueError
        If the members' dimensions differ (use :func:`direct_sum`), or on bad
        coefficients.
    """
    coefficients = _check(members, coefficients, "convolution")
    dims = [member.dim for member in members]
    if len(set(dims)) != 1:
        raise ValueError(
            f"convolution needs members of equal dimension, got dimensions {dims}; "
            "use combine='direct_sum' for members of different dimensions"
        )

    mean = np.zeros_like(members[0].mean)
    variance = np.zeros_like(members[0].variance)
    for k, member in enumerate(members):
        weight = coefficients[:, k : k + 1]
        mean += weight * member.mean
        variance += np.square(weight) * member.variance
    return GaussianEmbedding(mean, variance)


def direct_sum(members: Sequence[GaussianEmbedding], coefficients: np.ndarray) -> GaussianEmbedding:
    """Combine members into the block vector ``[sqrt(pi_k) X_k]_k``.

    Parameters
    ----------
    members : sequence of GaussianEmbedding
        K embeddings of the same N items, of dimensions ``D_1 .. D_K``.
    coefficients : np.ndarray
        ``pi`` of shape ``[N, K]``.

    Returns
    -------
    GaussianEmbedding
        Shape ``[N, D_1 + ... + D_K]``: block means ``sqrt(pi_k) mu_k`` and
        block variances ``pi_k var_k``.
    """
    coefficients = _check(members, coefficients, "direct_sum")
    scales = np.sqrt(coefficients)
    shape = (len(members[0]), sum(member.dim for member in members))
    mean = np.empty(shape, dtype=np.float32)
    variance = np.empty(shape, dtype=np.float32)
    offset = 0
    for k, member in enumerate(members):
        block = slice(offset, offset + member.dim)
        np.multiply(member.mean, scales[:, k : k + 1], out=mean[:, block])
        np.multiply(member.variance, coefficients[:, k : k + 1], out=variance[:, block])
        offset += member.dim
    return GaussianEmbedding(mean, variance)


def combine(
    members: Sequence[GaussianEmbedding], coefficients: np.ndarray, kind: Combination
) -> GaussianEmbedding:
    """Dispatch to :func:`convolution` or :func:`direct_sum` by name."""
    if kind == "convolution":
        return convolution(members, coefficients)
    if kind == "direct_sum":
        return direct_sum(members, coefficients)
    raise ValueError(f"combination must be one of {list(COMBINATIONS)}, got {kind!r}")


def combine_members(
    members: Sequence[GaussianEmbedding],
    kind: Combination = "direct_sum",
    rule: CoefficientRule | None = None,
    reference_traces: Sequence[float | None] | None = None,
) -> tuple[GaussianEmbedding, np.ndarray]:
    """Compute per-item coefficients from the members' traces and combine the members.

    Parameters
    ----------
    members : sequence of GaussianEmbedding
        K members' embeddings of the same N items (e.g. loaded from a cache).
    kind : {"direct_sum", "convolution"}, default "direct_sum"
        The combination.
    rule : CoefficientRule, optional
        Coefficient rule; default ``CoefficientRule()``.
    reference_traces : sequence of float or None, optional
        One per member; required when ``rule.normalize_traces``.

    Returns
    -------
    tuple
        ``(combined GaussianEmbedding, coefficients [N, K] float32)``.
    """
    if kind not in COMBINATIONS:
        raise ValueError(f"combination must be one of {list(COMBINATIONS)}, got {kind!r}")
    coefficients = compute_coefficients(member_traces(members), rule, reference_traces)
    return combine(members, coefficients, kind), coefficients
