"""Per-item ensemble coefficients computed from each member's covariance trace.

For an item ``x`` and members ``k = 1..K`` with diagonal covariances
``Sigma_k(x)``, every rule maps the traces ``t_k = tr Sigma_k(x)`` to
coefficients ``pi_k(x) > 0`` with ``sum_k pi_k(x) = 1``:

``inverse_trace`` (default, the rule of "Uncertainty-driven Embedding
Convolution", ICLR 2026), tempered by a temperature ``T``::

    pi_k = (1 / t_k)^(1/T) / sum_j (1 / t_j)^(1/T)

``T = 1`` is the paper's rule ``pi_k = (1 / t_k) / sum_j (1 / t_j)``. Larger ``T``
moves the coefficients towards uniform, smaller ``T`` towards the member with the
smallest trace.

``softmax`` (the form in the paper's later version)::

    pi_k = softmax_k(-t_k / T)

``uniform``::

    pi_k = 1 / K

With ``normalize_traces=True`` each trace is first divided by the member's
reference trace (its typical trace, e.g. the median on its fit data, stored in
the posterior file), ``t_k <- t_k / ref_k``. Members whose variance scales
differ then compete on how unusual an item is for them rather than on their raw
scale.

Every rule is computed in log space (a log-sum-exp), so traces spanning many
orders of magnitude give no overflow. Under ``inverse_trace`` a zero trace means
certainty: the members with zero trace share the whole weight equally, without
NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from uec_rag.gaussian import GaussianEmbedding

__all__ = [
    "RULES",
    "CoefficientRule",
    "RuleName",
    "check_member_embeddings",
    "compute_coefficients",
    "member_traces",
]

RuleName = Literal["inverse_trace", "softmax", "uniform"]
RULES: tuple[RuleName, ...] = ("inverse_trace", "softmax", "uniform")


@dataclass(frozen=True)
class CoefficientRule:
    """Settings of the per-item coefficient rule (formulas in the module docstring).

    Parameters
    ----------
    rule : {"inverse_trace", "softmax", "uniform"}, default "inverse_trace"
        The mapping from traces to coefficients.
    temperature : float, default 1.0
        ``T`` in the formulas, finite and ``> 0``. For ``inverse_trace``,
        ``T = 1`` is the paper's rule. For ``softmax`` the traces are in the
        member's variance units (or multiples of the reference trace when
        ``normalize_traces`` is on), so ``T`` must be chosen on that scale.
        Ignored by ``uniform``.
    normalize_traces : bool, default False
        Divide each member's trace by its reference trace before applying the
        rule. Requires every member to have a reference trace.
    """

    rule: RuleName = "inverse_trace"
    temperature: float = 1.0
    normalize_traces: bool = False

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {list(RULES)}, got {self.rule!r}")
        temperature = float(self.temperature)
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature!r}")
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "normalize_traces", bool(self.normalize_traces))

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict (for fingerprints and caches)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> CoefficientRule:
        """Build a rule from the output of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        unknown = set(settings) - {"rule", "temperature", "normalize_traces"}
        if unknown:
            raise ValueError(f"unknown CoefficientRule settings {sorted(unknown)}")
        return cls(**settings)


def check_member_embeddings(members: Sequence[GaussianEmbedding], caller: str) -> int:
    """Check that ``members`` are K >= 1 embeddings of the same N items and return N.

    Raises
    ------
    ValueError
        If ``members`` is empty (the message names ``caller``) or the item counts differ.
    TypeError
        If a member is not a :class:`GaussianEmbedding`.
    """
    if not members:
        raise ValueError(f"{caller} needs at least one member embedding")
    for index, member in enumerate(members):
        if not isinstance(member, GaussianEmbedding):
            raise TypeError(
                f"members[{index}] must be a GaussianEmbedding, got {type(member).__name__}"
            )
    sizes = [len(member) for member in members]
    if len(set(sizes)) != 1:
        raise ValueError(f"member embeddings must hold the same number of items, got {sizes}")
    return sizes[0]


def member_traces(members: Sequence[GaussianEmbedding]) -> np.ndarray:
    """Stack the covariance traces of K members' embeddings of the same N items.

    Returns
    -------
    np.ndarray
        float64 array of shape ``[N, K]``.
    """
    check_member_embeddings(members, "member_traces")
    return np.stack([member.variance.sum(axis=1, dtype=np.float64) for member in members], axis=1)


def _check_traces(traces: np.ndarray) -> np.ndarray:
    traces = np.asarray(traces, dtype=np.float64)
    if traces.ndim != 2 or traces.shape[1] == 0:
        raise ValueError(f"traces must have shape [N, K] with K >= 1, got {traces.shape}")
    bad = ~np.isfinite(traces) | (traces < 0)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"traces must be finite and >= 0, got {traces[index]} at index {index}")
    return traces


def _normalize(traces: np.ndarray, reference_traces: Sequence[float | None] | None) -> np.ndarray:
    n_members = traces.shape[1]
    if reference_traces is None:
        raise ValueError(
            "normalize_traces=True needs reference_traces (one per member); pass them, "
            "or use CoefficientRule(normalize_traces=False)"
        )
    references = list(reference_traces)
    if len(references) != n_members:
        raise ValueError(
            f"got {len(references)} reference traces for {n_members} members; pass one per member"
        )
    for index, reference in enumerate(references):
        if reference is None:
            raise ValueError(
                f"member {index} has no reference trace, so its traces cannot be normalised; "
                "fit or load a posterior that stores one, or use normalize_traces=False"
            )
        if not math.isfinite(reference) or reference <= 0:
            raise ValueError(
                f"reference trace of member {index} must be finite and > 0, got {reference!r}"
            )
    return traces / np.asarray(references, dtype=np.float64)


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=1, keepdims=True)


def compute_coefficients(
    traces: np.ndarray,
    rule: CoefficientRule | None = None,
    reference_traces: Sequence[float | None] | None = None,
) -> np.ndarray:
    """Compute the per-item coefficients ``pi [N, K]`` from covariance traces.

    Parameters
    ----------
    traces : np.ndarray
        Traces ``tr Sigma_k(x_n)`` of shape ``[N, K]``, finite and ``>= 0``.
    rule : CoefficientRule, optional
        The rule and its settings; default ``CoefficientRule()`` (inverse trace,
        ``T = 1``, no normalisation).
    reference_traces : sequence of float or None, optional
        One reference trace per member; required when ``rule.normalize_traces``.

    Returns
    -------
    np.ndarray
        float32 array of shape ``[N, K]``; every row sums to 1. Entries are
        positive, except that members beaten by a zero trace get exactly 0, and
        a weight below about 1e-38 of the largest one underflows to 0.

    Raises
    ------
    ValueError
        On a bad shape, a negative or non-finite trace, or a missing reference
        trace when normalisation is requested.
    """
    rule = rule or CoefficientRule()
    traces = _check_traces(traces)
    if rule.normalize_traces:
        traces = _normalize(traces, reference_traces)

    if rule.rule == "uniform":
        return np.full(traces.shape, 1.0 / traces.shape[1], dtype=np.float32)

    if rule.rule == "softmax":
        return _softmax_rows(-traces / rule.temperature).astype(np.float32)

    # inverse_trace: log pi_k = -log(t_k) / T - logsumexp_j(-log(t_j) / T).
    zero = traces == 0
    with np.errstate(divide="ignore"):
        logits = -np.log(traces) / rule.temperature
    coefficients = np.empty_like(traces)
    rows_with_zero = zero.any(axis=1)
    if rows_with_zero.any():
        # A zero trace is an infinite logit: the zero-trace members split the weight.
        zero_rows = zero[rows_with_zero]
        coefficients[rows_with_zero] = zero_rows / zero_rows.sum(axis=1, keepdims=True)
    regular = ~rows_with_zero
    if regular.any():
        coefficients[regular] = _softmax_rows(logits[regular])
    return coefficients.astype(np.float32)
