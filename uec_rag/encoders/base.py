"""The interface every ensemble member implements, and shared input checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

from uec_rag.gaussian import GaussianEmbedding

__all__ = ["KINDS", "Kind", "ProbabilisticMember", "check_kind", "check_texts"]

Kind = Literal["query", "document"]
KINDS: tuple[Kind, ...] = ("query", "document")


@runtime_checkable
class ProbabilisticMember(Protocol):
    """A text encoder that returns a diagonal Gaussian per text.

    Layer-mode encoders (a Laplace posterior over a transformer's last linear
    layer) and head-mode encoders (an identity head over a black-box embedder)
    both implement it, so the ensemble treats them alike. Implementations must
    pickle: they are shipped to worker processes.
    """

    @property
    def name(self) -> str:
        """Short human-readable name, e.g. the preset name."""
        ...

    @property
    def dim(self) -> int:
        """Embedding dimension ``D``."""
        ...

    @property
    def reference_trace(self) -> float | None:
        """Typical trace of this member's covariance (the median on its fit data), if known."""
        ...

    def encode(
        self,
        texts: Sequence[str],
        kind: Kind = "document",
        *,
        batch_size: int | None = None,
        show_progress: bool | None = None,
    ) -> GaussianEmbedding:
        """Encode ``texts`` as Gaussians of shape ``[len(texts), dim]``."""
        ...

    def fingerprint(self) -> str:
        """Stable id of the model weights, posterior and settings (hex string)."""
        ...


def check_texts(texts: Sequence[str]) -> list[str]:
    """Return ``texts`` as a list, raising ``TypeError`` on a non-string item.

    A bare string is rejected too, because iterating it would encode each
    character as a separate text.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            "texts must be a sequence of strings, got a single "
            f"{type(texts).__name__}; wrap it in a list: [text]"
        )
    items = list(texts)
    for index, text in enumerate(items):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] must be str, got {type(text).__name__}: {text!r:.80}")
    return items


def check_kind(kind: str) -> Kind:
    """Return ``kind`` if it is ``"query"`` or ``"document"``, else raise ``ValueError``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be 'query' or 'document', got {kind!r}")
    return kind  # type: ignore[return-value]
