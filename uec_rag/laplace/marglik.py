"""Laplace log marginal likelihood and the prior precision that maximises it.

For a diagonal Laplace approximation with ``P`` parameters at ``theta*``, an
isotropic Gaussian prior ``N(m, 1/lambda I)`` and a diagonal curvature ``h`` of
the negative log-likelihood (MacKay 1992, "A practical Bayesian framework for
backpropagation networks"; Daxberger et al. 2021, "Laplace Redux", whose
laplace-torch computes the same quantity)::

    log Z(lambda) = log p(D | theta*)
                    - 1/2 [log det(H + lambda I) - log det(lambda I)]
                    - 1/2 lambda ||theta* - m||^2
                  = log p(D | theta*) - 1/2 sum_p log(1 + h_p / lambda)
                    - 1/2 lambda ||theta* - m||^2.

Prior mean. We use ``m = 0``, as laplace-torch does: the pretrained weights are
read as the estimate under weight decay, which is a zero-mean Gaussian prior.
Centring the prior at the pretrained weights instead (``m = theta*``) removes
the last term, and ``log Z`` then increases monotonically in ``lambda``, so it
has no finite maximiser.

Maximiser. With ``u = log lambda`` and the effective number of parameters
``gamma(lambda) = sum_p h_p / (h_p + lambda)``,

    d log Z / d u = 1/2 [gamma(lambda) - lambda ||theta* - m||^2].

``gamma`` decreases and ``lambda ||theta* - m||^2`` increases in ``lambda``, so the
derivative has exactly one root, the global maximiser (MacKay's fixed point
``lambda = gamma / ||theta* - m||^2``). It is found by bisection in ``u``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PriorPrecisionFit", "log_marginal_likelihood", "optimize_prior_precision"]


@dataclass(frozen=True)
class PriorPrecisionFit:
    """Outcome of :func:`optimize_prior_precision`.

    Attributes
    ----------
    prior_precision : float
        The maximiser ``lambda``.
    log_marginal_likelihood : float
        ``log Z(lambda)`` at the maximiser.
    effective_parameters : float
        ``gamma(lambda) = sum_p h_p / (h_p + lambda)``, how many parameters the data determine.
    """

    prior_precision: float
    log_marginal_likelihood: float
    effective_parameters: float


def _check_inputs(curvature: torch.Tensor, parameters: torch.Tensor) -> None:
    if curvature.shape != parameters.shape:
        raise ValueError(
            f"curvature and parameters must have equal shapes, got {list(curvature.shape)} "
            f"and {list(parameters.shape)}"
        )
    if not bool(torch.isfinite(curvature).all()) or bool((curvature < 0).any()):
        raise ValueError("curvature must be finite and >= 0 everywhere")


def log_marginal_likelihood(
    log_likelihood: float | torch.Tensor,
    curvature: torch.Tensor,
    parameters: torch.Tensor,
    prior_precision: float | torch.Tensor,
    prior_mean: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Compute the Laplace log marginal likelihood ``log Z(lambda)`` (formula in the module doc).

    Parameters
    ----------
    log_likelihood : float or torch.Tensor
        ``log p(D | theta*)`` summed over the data.
    curvature : torch.Tensor
        Diagonal curvature ``h`` of the negative log-likelihood, any shape, ``>= 0``.
    parameters : torch.Tensor
        ``theta*``, same shape as ``curvature``.
    prior_precision : float or torch.Tensor
        Scalar ``lambda > 0``; differentiable when given as a tensor.
    prior_mean : float or torch.Tensor, default=0.0
        Prior mean ``m``.

    Returns
    -------
    torch.Tensor
        Float64 scalar.
    """
    _check_inputs(curvature, parameters)
    h = curvature.detach().double().flatten()
    delta = parameters.detach().double() - torch.as_tensor(prior_mean, dtype=torch.float64)
    scatter = (delta.flatten() ** 2).sum()
    precision = torch.as_tensor(prior_precision, dtype=torch.float64)
    log_det_ratio = torch.log1p(h / precision).sum()
    return torch.as_tensor(log_likelihood, dtype=torch.float64) - 0.5 * (
        log_det_ratio + precision * scatter
    )


def optimize_prior_precision(
    log_likelihood: float,
    curvature: torch.Tensor,
    parameters: torch.Tensor,
    prior_mean: float | torch.Tensor = 0.0,
    *,
    tolerance: float = 1e-10,
) -> PriorPrecisionFit:
    """Find the scalar prior precision that maximises the Laplace log marginal likelihood.

    Parameters
    ----------
    log_likelihood : float
        ``log p(D | theta*)``; it shifts ``log Z`` but not the maximiser.
    curvature : torch.Tensor
        Diagonal curvature of the negative log-likelihood, ``>= 0``.
    parameters : torch.Tensor
        ``theta*``, same shape as ``curvature``.
    prior_mean : float or torch.Tensor, default=0.0
        Prior mean ``m``; see the module docstring for why zero.
    tolerance : float, default=1e-10
        Bisection stops when the bracket on ``log lambda`` is narrower than this.

    Returns
    -------
    PriorPrecisionFit

    Raises
    ------
    ValueError
        If the curvature is zero everywhere (no data) or ``theta* == m``: then
        ``log Z`` has no finite maximiser.
    """
    _check_inputs(curvature, parameters)
    h = curvature.detach().double().flatten()
    delta = parameters.detach().double() - torch.as_tensor(prior_mean, dtype=torch.float64)
    scatter = float((delta.flatten() ** 2).sum())
    positive = int((h > 0).sum())
    if positive == 0:
        raise ValueError("curvature is zero everywhere, so the data determine no prior precision")
    if scatter == 0.0:
        raise ValueError(
            "parameters equal the prior mean, so log Z increases without bound in the "
            "prior precision; use a prior mean other than the parameters"
        )

    def slope(log_precision: float) -> float:
        precision = math.exp(log_precision)
        gamma = float((h / (h + precision)).sum())
        return gamma - precision * scatter

    # slope > 0 below the root and < 0 above: gamma -> positive as lambda -> 0 and
    # gamma <= P while lambda * scatter grows without bound.
    low = math.log(positive / scatter) - 60.0
    high = math.log(h.numel() / scatter) + 1.0
    while slope(low) <= 0:
        low -= 20.0
    while slope(high) >= 0:
        high += 20.0
    while high - low > tolerance:
        middle = 0.5 * (low + high)
        if slope(middle) > 0:
            low = middle
        else:
            high = middle

    precision = math.exp(0.5 * (low + high))
    value = log_marginal_likelihood(log_likelihood, curvature, parameters, precision, prior_mean)
    gamma = float((h / (h + precision)).sum())
    return PriorPrecisionFit(precision, float(value), gamma)
