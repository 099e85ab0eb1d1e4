"""Gaussian embeddings with a diagonal covariance.

A batch of ``N`` probabilistic embeddings is stored as two float32 arrays of
shape ``[N, D]``: the mean and the per-dimension variance (the diagonal of each
item's covariance). Every member, the ensemble and the caches exchange this
type, so the validation below runs once, at construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["GaussianEmbedding"]


def _first_bad_index(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


@dataclass(frozen=True)
class GaussianEmbedding:
    """A batch of diagonal Gaussian embeddings N(mean[n], diag(variance[n])).

    Parameters
    ----------
    mean : np.ndarray
        Array of shape ``[N, D]``; converted to C-contiguous float32.
    variance : np.ndarray
        Array of shape ``[N, D]``, finite and ``>= 0``; converted to float32.

    Raises
    ------
    ValueError
        If the arrays are not 2-D, differ in shape, contain NaN or Inf, or the
        variance is negative. The message names the array and the first bad
        index.
    """

    mean: np.ndarray
    variance: np.ndarray

    def __post_init__(self) -> None:
        mean = np.ascontiguousarray(self.mean, dtype=np.float32)
        variance = np.ascontiguousarray(self.variance, dtype=np.float32)
        for name, array in (("mean", mean), ("variance", variance)):
            if array.ndim != 2:
                raise ValueError(f"{name} must have shape [N, D], got shape {array.shape}")
        if mean.shape != variance.shape:
            raise ValueError(
                f"mean and variance must have equal shapes, got {mean.shape} and {variance.shape}"
            )
        for name, array in (("mean", mean), ("variance", variance)):
            not_finite = ~np.isfinite(array)
            if not_finite.any():
                index = _first_bad_index(not_finite)
                raise ValueError(
                    f"{name} contains a non-finite value {array[index]} at index {index}"
                )
        negative = variance < 0
        if negative.any():
            index = _first_bad_index(negative)
            raise ValueError(f"variance must be >= 0, got {variance[index]} at index {index}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "variance", variance)

    @property
    def dim(self) -> int:
        """Embedding dimension ``D``."""
        return int(self.mean.shape[1])

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    def __getitem__(self, index: int | slice | np.ndarray | Sequence[int]) -> GaussianEmbedding:
        """Select items (rows); an integer index keeps the batch axis."""
        if isinstance(index, (int, np.integer)):
            index = slice(int(index), int(index) + 1) if index != -1 else slice(-1, None)
        return GaussianEmbedding(self.mean[index], self.variance[index])

    def trace(self) -> np.ndarray:
        """Trace of each item's covariance, ``tr Sigma(x) = sum_d variance[d]``, shape ``[N]``."""
        return self.variance.sum(axis=1, dtype=np.float64).astype(np.float32)

    @classmethod
    def empty(cls, dim: int) -> GaussianEmbedding:
        """An empty batch of shape ``[0, dim]``."""
        zeros = np.zeros((0, dim), dtype=np.float32)
        return cls(zeros, zeros.copy())

    @classmethod
    def concatenate(cls, parts: Sequence[GaussianEmbedding]) -> GaussianEmbedding:
        """Stack batches of equal dimension along the item axis."""
        if not parts:
            raise ValueError("concatenate needs at least one GaussianEmbedding")
        dims = {part.dim for part in parts}
        if len(dims) != 1:
            raise ValueError(
                f"cannot concatenate embeddings of different dimensions {sorted(dims)}"
            )
        return cls(
            np.concatenate([part.mean for part in parts]),
            np.concatenate([part.variance for part in parts]),
        )
