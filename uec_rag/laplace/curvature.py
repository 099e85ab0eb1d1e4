"""Diagonal curvature of the in-batch contrastive (InfoNCE) negative log-likelihood.

The likelihood of a batch of ``B`` (query, positive passage) pairs is the
in-batch InfoNCE likelihood (van den Oord et al. 2018, "Representation Learning
with Contrastive Predictive Coding"): query ``i`` picks its own passage among
the ``U`` distinct passages of the batch,

    logits[i, j] = q_i . c_j / temperature,
    p(target_i | batch) = softmax_j(logits[i, :])[target_i].

Both the query embeddings ``q`` and the passage embeddings ``c`` depend on the
parameters ``theta`` (weight and bias of the last linear layer). One *example*
is one query row of the logit matrix: the vector ``logits[i, :]`` of length
``U`` as a function of ``theta`` through ``q_i`` and through every ``c_j`` of
the batch. Its Jacobian is ``J_i = d logits[i, :] / d theta`` (shape ``[U, P]``).

Two diagonal curvature approximations of the negative log-likelihood are
provided (Martens 2020, "New insights and perspectives on the natural gradient
method"; Kunstner et al. 2019, "Limitations of the empirical Fisher
approximation"):

* Diagonal generalised Gauss-Newton (``"ggn"``, the default)::

      diag GGN = sum_i diag(J_i^T Lambda_i J_i),  Lambda_i = diag(p_i) - p_i p_i^T,

  where ``Lambda_i`` is the Hessian of the softmax cross-entropy with respect to
  the logits. It is computed exactly through the factorisation
  ``Lambda_i = A_i A_i^T`` with columns ``a_ik = sqrt(p_ik) (e_k - p_i)``, so
  ``diag GGN = sum_i sum_k (J_i^T a_ik)^2``: a sum of squared vector-Jacobian
  products. It is positive semi-definite even away from a mode, which matters
  here because the pretrained weights are not a mode of this likelihood.

* Diagonal empirical Fisher (``"ef"``)::

      diag EF = sum_i (d nll_i / d theta)^2,  nll_i = -log p(target_i | batch),

  the squared per-example gradients.

Masked logits (a column that is another positive of the same query) are
excluded from the softmax, so they get ``p = 0`` and contribute nothing.

The per-text Jacobians are never materialised. The caller supplies a function
that maps a text index and ``m`` cotangent vectors ``[m, D]`` to the ``m``
parameter gradients ``[m, P]`` of that single text's embedding. Every
vector-Jacobian product the formulas need is a linear combination of these.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "CURVATURES",
    "DEFAULT_CURVATURE",
    "DEFAULT_TEMPERATURE",
    "BatchCurvature",
    "Curvature",
    "TextGradients",
    "infonce_curvature",
    "infonce_nll",
]

Curvature = Literal["ggn", "ef"]
CURVATURES: tuple[Curvature, ...] = ("ggn", "ef")
DEFAULT_CURVATURE: Curvature = "ggn"

DEFAULT_TEMPERATURE = 0.05
"""InfoNCE temperature: the inverse of the default ``scale=20.0`` of the in-batch
contrastive ``MultipleNegativesRankingLoss`` in sentence-transformers 6.3."""

TextGradients = Callable[[int, torch.Tensor], torch.Tensor]
"""``(text index, cotangents [m, D]) -> gradients [m, P]`` of ``cotangent . embedding``.

The returned tensor must be new: the curvature adds to it in place."""

CURVATURE_NAMES: dict[str, str] = {"ggn": "diag_ggn", "ef": "empirical_fisher"}
"""Value of the posterior metadata field ``curvature`` for each option."""


@dataclass(frozen=True)
class BatchCurvature:
    """Curvature contribution of one batch.

    Attributes
    ----------
    diagonal : torch.Tensor
        Float32 tensor ``[P]``: the diagonal curvature summed over the batch's queries.
    nll : float
        Negative log-likelihood of the batch, summed over its queries.
    """

    diagonal: torch.Tensor
    nll: float


def check_curvature(curvature: str) -> Curvature:
    """Return ``curvature`` if it is ``"ggn"`` or ``"ef"``, else raise ``ValueError``."""
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {list(CURVATURES)}, got {curvature!r}")
    return curvature  # type: ignore[return-value]


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float if it is finite and > 0, else raise ``ValueError``."""
    value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return value


def _logits(
    queries: torch.Tensor, passages: torch.Tensor, mask: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    logits = queries @ passages.T / temperature
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits


def infonce_nll(
    queries: torch.Tensor,
    passages: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compute the summed InfoNCE negative log-likelihood of a batch.

    Parameters
    ----------
    queries : torch.Tensor
        Query embeddings ``[B, D]``.
    passages : torch.Tensor
        Candidate passage embeddings ``[U, D]``.
    targets : torch.Tensor
        Long tensor ``[B]``: the column of each query's positive passage.
    temperature : float
        Logits are ``queries @ passages.T / temperature``.
    mask : torch.Tensor or None, default=None
        Bool ``[B, U]``; ``False`` removes a column from that query's softmax.

    Returns
    -------
    torch.Tensor
        Scalar, differentiable in ``queries`` and ``passages``.
    """
    logits = _logits(queries, passages, mask, temperature)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def infonce_curvature(
    queries: torch.Tensor,
    passages: torch.Tensor,
    targets: torch.Tensor,
    query_gradients: TextGradients,
    passage_gradients: TextGradients | None,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    curvature: Curvature = DEFAULT_CURVATURE,
    mask: torch.Tensor | None = None,
    max_chunk_bytes: int = 256 * 2**20,
) -> BatchCurvature:
    """Compute the diagonal GGN or empirical Fisher of one batch's InfoNCE NLL.

    Parameters
    ----------
    queries : torch.Tensor
        Query embeddings ``[B, D]`` at the current parameters (no gradient needed).
    passages : torch.Tensor
        Distinct candidate passage embeddings ``[U, D]``.
    targets : torch.Tensor
        Long tensor ``[B]``: the column of each query's positive passage.
    query_gradients : TextGradients
        ``(i, cotangents [m, D]) -> [m, P]``: parameter gradients of
        ``cotangent . q_i`` for query ``i``.
    passage_gradients : TextGradients or None
        The same for passage ``j``; ``None`` when the passages do not depend on
        the parameters (fixed class vectors).
    temperature : float, default=DEFAULT_TEMPERATURE
        InfoNCE temperature (0.05).
    curvature : {"ggn", "ef"}, default="ggn"
        Diagonal generalised Gauss-Newton or diagonal empirical Fisher; see the
        module docstring for both formulas.
    mask : torch.Tensor or None, default=None
        Bool ``[B, U]``; ``False`` removes a column from that query's softmax.
        A query's own target column must stay ``True``.
    max_chunk_bytes : int, default=256 MiB
        Bound on the buffer of passage gradients held at once (GGN only).

    Returns
    -------
    BatchCurvature
        The diagonal ``[P]`` summed over the batch's queries and the summed NLL.
    """
    curvature = check_curvature(curvature)
    temperature = check_temperature(temperature)
    queries = queries.detach()
    passages = passages.detach()
    batch = queries.shape[0]
    if mask is not None and not bool(mask[torch.arange(batch), targets].all()):
        raise ValueError("mask must keep each query's own target column")

    logits = _logits(queries, passages, mask, temperature)
    log_probs = torch.log_softmax(logits, dim=1)
    probs = log_probs.exp()
    nll = float(-log_probs[torch.arange(batch), targets].sum())

    if curvature == "ef":
        diagonal = _empirical_fisher(
            queries, passages, targets, probs, query_gradients, passage_gradients, temperature
        )
    else:
        diagonal = _gauss_newton(
            queries,
            passages,
            probs,
            query_gradients,
            passage_gradients,
            temperature,
            max_chunk_bytes,
        )
    return BatchCurvature(diagonal, nll)


def _empirical_fisher(
    queries: torch.Tensor,
    passages: torch.Tensor,
    targets: torch.Tensor,
    probs: torch.Tensor,
    query_gradients: TextGradients,
    passage_gradients: TextGradients | None,
    temperature: float,
) -> torch.Tensor:
    # d nll_i / d logits[i, :] = p_i - onehot(target_i). Through logits = q c^T / t:
    #   d nll_i / d q_i = (p_i - e_i) @ c / t,   d nll_i / d c_j = (p_ij - e_ij) q_i / t.
    batch = queries.shape[0]
    residual = probs.clone()
    residual[torch.arange(batch), targets] -= 1.0
    per_query: torch.Tensor | None = None
    if passage_gradients is not None:
        for j in range(passages.shape[0]):
            cotangents = residual[:, j : j + 1] * queries / temperature
            contribution = passage_gradients(j, cotangents)
            per_query = contribution if per_query is None else per_query + contribution
    query_cotangents = residual @ passages / temperature
    rows = [query_gradients(i, query_cotangents[i : i + 1]) for i in range(batch)]
    query_part = torch.cat(rows, dim=0)
    per_query = query_part if per_query is None else per_query + query_part
    return (per_query**2).sum(dim=0)


def _gauss_newton(
    queries: torch.Tensor,
    passages: torch.Tensor,
    probs: torch.Tensor,
    query_gradients: TextGradients,
    passage_gradients: TextGradients | None,
    temperature: float,
    max_chunk_bytes: int,
) -> torch.Tensor:
    # Row i, factor column k: the scalar g_ik = sqrt(p_ik) (logits[i, k] - p_i . logits[i, :])
    # with p held fixed, whose gradient is J_i^T a_ik. Through logits = q c^T / t:
    #   d g_ik / d q_i = sqrt(p_ik) (c_k - p_i @ c) / t
    #   d g_ik / d c_j = sqrt(p_ik) (delta_jk - p_ij) q_i / t
    # The passage part is sum_j coefficient[k, j] Z_ij with Z_ij the gradient of q_i . c_j / t
    # with respect to the parameters through c_j alone.
    batch, num_passages = queries.shape[0], passages.shape[0]
    sqrt_probs = probs.sqrt()
    mean_passages = probs @ passages
    diagonal: torch.Tensor | None = None

    chunk = batch
    if passage_gradients is not None:
        probe = passage_gradients(0, queries[:1] / temperature)
        bytes_per_row = num_passages * probe.shape[1] * probe.element_size()
        chunk = max(1, min(batch, max_chunk_bytes // max(1, bytes_per_row)))

    for start in range(0, batch, chunk):
        rows = range(start, min(batch, start + chunk))
        passage_terms: torch.Tensor | None = None
        if passage_gradients is not None:
            cotangents = queries[start : rows.stop] / temperature
            columns = [passage_gradients(j, cotangents) for j in range(num_passages)]
            passage_terms = torch.stack(columns, dim=1)  # [rows, U, P]
            del columns

        for offset, i in enumerate(rows):
            query_cotangents = sqrt_probs[i, :, None] * (passages - mean_passages[i]) / temperature
            gradients = query_gradients(i, query_cotangents)  # [U, P]
            if passage_terms is not None:
                coefficients = -sqrt_probs[i, :, None] * probs[i][None, :]
                coefficients = coefficients + torch.diag(sqrt_probs[i])
                gradients.addmm_(coefficients.to(gradients.dtype), passage_terms[offset])
            # Column sums of squares without a [U, P] temporary.
            squares = torch.einsum("up,up->p", gradients, gradients)
            diagonal = squares if diagonal is None else diagonal.add_(squares)
        del passage_terms

    assert diagonal is not None
    return diagonal
