"""A deterministic stand-in for a probabilistic encoder, for tests without models."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from uec_rag.encoders.base import Kind, check_kind, check_texts
from uec_rag.gaussian import GaussianEmbedding


class FakeMember:
    """Encodes each text as a Gaussian seeded by a hash of (name, text).

    The mean is unit-norm; the variance is ``variance_scale`` times a per-text
    factor in [0.5, 1.5], so traces differ between texts and members.
    """

    def __init__(
        self,
        name: str,
        dim: int,
        variance_scale: float = 0.01,
        reference_trace: float | None = None,
    ) -> None:
        self._name = name
        self._dim = dim
        self.variance_scale = variance_scale
        self._reference_trace = reference_trace
        self.calls = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def reference_trace(self) -> float | None:
        return self._reference_trace

    def encode(
        self,
        texts: Sequence[str],
        kind: Kind = "document",
        *,
        batch_size: int | None = None,
        show_progress: bool | None = None,
    ) -> GaussianEmbedding:
        kind = check_kind(kind)
        texts = check_texts(texts)
        self.calls += 1
        means, variances = [], []
        for text in texts:
            digest = hashlib.sha256(f"{self._name}|{text}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            mean = rng.standard_normal(self._dim)
            means.append(mean / np.linalg.norm(mean))
            factor = rng.uniform(0.5, 1.5)
            variances.append(self.variance_scale * factor * rng.uniform(0.5, 1.5, self._dim))
        shape = (len(texts), self._dim)
        return GaussianEmbedding(
            np.asarray(means).reshape(shape), np.asarray(variances).reshape(shape)
        )

    def fingerprint(self) -> str:
        text = f"fake|{self._name}|{self._dim}|{self.variance_scale}|{self._reference_trace}"
        return hashlib.sha256(text.encode()).hexdigest()
