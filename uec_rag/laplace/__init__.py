"""Laplace posteriors over the last linear layer of an encoder."""

from __future__ import annotations

from uec_rag.laplace.posterior import (
    DEFAULT_PRIOR_PRECISION,
    DiagonalPosterior,
    PosteriorMetadata,
    PosteriorMismatchError,
    model_fingerprint,
)

__all__ = [
    "DEFAULT_PRIOR_PRECISION",
    "DiagonalPosterior",
    "PosteriorMetadata",
    "PosteriorMismatchError",
    "model_fingerprint",
]
