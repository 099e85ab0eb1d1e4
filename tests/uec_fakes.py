"""Deterministic fake ensemble members for adapter tests that need no real model."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from uec_rag.encoders.base import Kind, check_kind, check_texts
from uec_rag.gaussian import GaussianEmbedding


class FakeMember:
    """A ProbabilisticMember whose Gaussians are a fixed function of (name, kind, text).

    The mean is a unit vector seeded by the text; the variance grows with the
    text's length scaled by ``noise``, so members disagree about uncertainty.
    ``calls`` counts ``encode`` calls and ``encoded`` the texts they received.
    """

    def __init__(self, name: str, dim: int = 8, noise: float = 0.01) -> None:
        self._name = name
        self._dim = dim
        self.noise = noise
        self.calls = 0
        self.encoded = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def reference_trace(self) -> float | None:
        return None

    def _row(self, kind: str, text: str) -> tuple[np.ndarray, np.ndarray]:
        # Queries and documents share the seed, so a text scores highest against itself.
        seed = int.from_bytes(hashlib.sha256(f"{self._name}\0{text}".encode()).digest()[:8], "big")
        rng = np.random.default_rng(seed)
        mean = rng.normal(size=self._dim)
        mean /= np.linalg.norm(mean)
        variance = np.full(self._dim, self.noise * (1 + len(text) % 7) / self._dim)
        if kind == "query":
            variance = variance * 0.5
        return mean, variance

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
        self.encoded += len(texts)
        if not texts:
            return GaussianEmbedding.empty(self._dim)
        rows = [self._row(kind, text) for text in texts]
        return GaussianEmbedding(
            np.stack([row[0] for row in rows]), np.stack([row[1] for row in rows])
        )

    def fingerprint(self) -> str:
        return hashlib.sha256(f"fake:{self._name}:{self._dim}:{self.noise}".encode()).hexdigest()

    def __getstate__(self) -> dict:
        return {"name": self._name, "dim": self._dim, "noise": self.noise}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["name"], state["dim"], state["noise"])


def fake_members() -> list[FakeMember]:
    """Three fake members of different dimensions and noise levels."""
    return [FakeMember("a", 8, 0.01), FakeMember("b", 12, 0.05), FakeMember("c", 8, 0.2)]
