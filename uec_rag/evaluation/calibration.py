"""Failure detection and calibration of the top-1 hit.

Two questions are asked of every retrieval method, per query:

* **Failure detection.** Does a per-query uncertainty ``u`` rank the queries
  whose top-1 hit is wrong above those whose top-1 hit is right? Measured by
  the AUROC of ``u`` for the label "top-1 is wrong" (the Mann-Whitney U
  statistic divided by ``n_wrong * n_right``, ties counted one half). 0.5 is
  chance, 1.0 is perfect.
* **Calibration.** Given a probability ``p`` that the top-1 hit is right, the
  expected calibration error is ``ECE = sum_b (n_b / n) |acc_b - conf_b|`` over
  equal-width bins of ``p`` (Guo et al. 2017, "On Calibration of Modern Neural
  Networks"), and the reliability diagram plots ``acc_b`` against ``conf_b``.

The probability is a logistic map ``p = sigmoid(a * s + b)`` of the method's
top-1 score ``s`` (see ``LogisticCalibrator``). It is fitted by maximum
likelihood on the train split, never on test, and applied to the test split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LogisticCalibrator", "auroc", "expected_calibration_error", "reliability_bins"]


def auroc(uncertainty: np.ndarray, wrong: np.ndarray) -> float:
    """Return the AUROC with which ``uncertainty`` detects ``wrong`` items.

    Parameters
    ----------
    uncertainty : np.ndarray
        ``[n]`` scores, higher meaning "more likely wrong".
    wrong : np.ndarray
        ``[n]`` booleans, the positive class.

    Returns
    -------
    float
        The probability that a random wrong item has a higher uncertainty than
        a random right item, ties counted one half; NaN when one class is empty
        (the AUROC is undefined then, and reports show it as "n/a").

    Raises
    ------
    ValueError
        If the shapes differ or ``uncertainty`` contains a non-finite value.
    """
    u = np.asarray(uncertainty, dtype=np.float64).ravel()
    labels = np.asarray(wrong, dtype=bool).ravel()
    if u.size != labels.size:
        raise ValueError(f"uncertainty and wrong differ in length: {u.size} != {labels.size}")
    if not np.isfinite(u).all():
        raise ValueError("uncertainty contains a non-finite value")
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")

    order = np.argsort(u, kind="stable")
    sorted_u = u[order]
    starts = np.flatnonzero(np.r_[True, sorted_u[1:] != sorted_u[:-1]])
    ends = np.r_[starts[1:], u.size]
    ranks = np.empty(u.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    rank_sum = ranks[labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def reliability_bins(
    probability: np.ndarray, correct: np.ndarray, n_bins: int = 10
) -> dict[str, np.ndarray]:
    """Group predictions into equal-width probability bins.

    Returns
    -------
    dict[str, np.ndarray]
        ``"edges"`` ``[n_bins + 1]``, and per bin ``"count"``, ``"confidence"``
        (mean probability) and ``"accuracy"`` (fraction correct); the last two
        are NaN for empty bins. Bins are closed on the left, and the last bin
        also contains ``p = 1``.
    """
    p = np.asarray(probability, dtype=np.float64).ravel()
    y = np.asarray(correct, dtype=np.float64).ravel()
    if p.size != y.size:
        raise ValueError(f"probability and correct differ in length: {p.size} != {y.size}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if p.size and (not np.isfinite(p).all() or p.min() < 0 or p.max() > 1):
        raise ValueError("probability must be finite and in [0, 1]")

    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.floor(p * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=p, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=y, minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": confidence, "accuracy": accuracy}


def expected_calibration_error(
    probability: np.ndarray, correct: np.ndarray, n_bins: int = 10
) -> float:
    """Return the ECE over ``n_bins`` equal-width bins (0 is perfectly calibrated)."""
    bins = reliability_bins(probability, correct, n_bins)
    filled = bins["count"] > 0
    if not filled.any():
        raise ValueError("expected_calibration_error needs at least one prediction")
    weights = bins["count"][filled] / bins["count"].sum()
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float((weights * gaps).sum())


@dataclass(frozen=True)
class LogisticCalibrator:
    """A 1-D logistic map ``p = sigmoid(slope * s + intercept)``.

    Fitted by Newton's method on the log-likelihood with a small L2 penalty
    (``1e-4`` on the slope, none on the intercept), which keeps the fit finite
    when the train labels are perfectly separable by ``s``. The score is
    standardised with the train mean and standard deviation before fitting.
    """

    slope: float
    intercept: float
    center: float
    scale: float

    @classmethod
    def fit(
        cls, score: np.ndarray, correct: np.ndarray, *, iterations: int = 50
    ) -> LogisticCalibrator:
        """Fit the map on train scores and binary labels.

        Raises
        ------
        ValueError
            If there are fewer than 2 items, the lengths differ, or a score is
            not finite.
        """
        s = np.asarray(score, dtype=np.float64).ravel()
        y = np.asarray(correct, dtype=np.float64).ravel()
        if s.size != y.size:
            raise ValueError(f"score and correct differ in length: {s.size} != {y.size}")
        if s.size < 2:
            raise ValueError(f"fitting a calibrator needs at least 2 items, got {s.size}")
        if not np.isfinite(s).all():
            raise ValueError("score contains a non-finite value")

        center = float(s.mean())
        scale = float(s.std()) or 1.0
        x = np.stack([(s - center) / scale, np.ones_like(s)], axis=1)
        penalty = np.diag([1e-4, 0.0])
        weights = np.zeros(2)
        for _ in range(iterations):
            p = 1.0 / (1.0 + np.exp(-(x @ weights)))
            gradient = x.T @ (y - p) - penalty @ weights
            hessian = (x * (p * (1 - p))[:, None]).T @ x + penalty + 1e-9 * np.eye(2)
            step = np.linalg.solve(hessian, gradient)
            weights = weights + step
            if np.abs(step).max() < 1e-10:
                break
        return cls(float(weights[0]), float(weights[1]), center, scale)

    def predict(self, score: np.ndarray) -> np.ndarray:
        """Return the probability that the top-1 hit is right, for each score."""
        z = self.slope * (np.asarray(score, dtype=np.float64) - self.center) / self.scale
        return 1.0 / (1.0 + np.exp(-np.clip(z + self.intercept, -500, 500)))
