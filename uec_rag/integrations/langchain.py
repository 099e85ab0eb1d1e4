"""LangChain integration: UEC embeddings for any vector store, and a UEC reranker.

* :class:`UECEmbeddings` implements ``langchain_core.embeddings.Embeddings``.
  It returns the ensemble's combined means, so any LangChain vector store can
  index them, and it writes every Gaussian to the Gaussian cache.
* :class:`UECReranker` implements
  ``langchain_core.documents.BaseDocumentCompressor``. It reorders retrieved
  documents by the uncertainty-aware score, reading document Gaussians from
  the cache and encoding only the misses.

The math (coefficients, combination, similarity) is in :mod:`uec_rag.ensemble`
and :mod:`uec_rag.similarity`; the caching and ranking shared with LlamaIndex
is in :mod:`uec_rag.integrations._common`.

Requires ``langchain-core`` (``pip install uec-rag[langchain]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.embeddings import Embeddings
from langchain_core.runnables.config import run_in_executor
from pydantic import ConfigDict, Field, field_validator

from uec_rag.integrations._common import CachedEnsemble, EnsembleSettings

__all__ = ["UECEmbeddings", "UECReranker"]

_ENCODE_KEYS = frozenset({"batch_size", "show_progress"})


def _check_encode_kwargs(name: str, value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    unknown = set(value) - _ENCODE_KEYS
    if unknown:
        raise ValueError(
            f"{name} has unknown keys {sorted(unknown)}; the ensemble's encoding accepts "
            f"{sorted(_ENCODE_KEYS)} (model settings go in model_kwargs)"
        )
    return value


class UECEmbeddings(EnsembleSettings, Embeddings):
    """LangChain embeddings from a UEC ensemble (Uncertainty-driven Embedding Convolution,
    ICLR 2026).

    Each text is encoded by every member as a diagonal Gaussian; the members
    are weighted per text by their uncertainty and combined. ``embed_documents``
    and ``embed_query`` return the combined mean as a list of Python floats.
    The full Gaussian (mean, variance, coefficients) of every text goes to the
    Gaussian cache, where :class:`UECReranker` finds it.

    Parameters
    ----------
    members, combine, coefficient_rule, temperature, normalize_traces, model_kwargs, cache
        Ensemble and cache settings; see
        :class:`~uec_rag.integrations._common.EnsembleSettings`. With no
        arguments the three bundled presets are used and Gaussians go to the
        persistent SQLite cache in the cache folder.
    batch_size : int, default 32
        Texts per forward pass.
    show_progress : bool, default False
        Show a progress bar while encoding documents.
    encode_kwargs : dict, default ``{}``
        Encoding settings for documents (``batch_size``, ``show_progress``);
        they override the two fields above.
    query_encode_kwargs : dict or None, default None
        Encoding settings for queries; ``None`` uses ``encode_kwargs``.

    Notes
    -----
    Models load on first use and are shared by every instance in the process
    that names the same members and ``model_kwargs``. Calls into the models
    are serialised in the process, so concurrent calls from threads are safe
    and return the same vectors as serial calls. The async methods run the
    encoding in the default executor, so they do not block the event loop.

    Examples
    --------
    >>> from langchain_core.vectorstores import InMemoryVectorStore
    >>> embeddings = UECEmbeddings(members=["minilm", "e5-small"])  # doctest: +SKIP
    >>> store = InMemoryVectorStore.from_texts(["..."], embeddings)  # doctest: +SKIP
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    batch_size: int = Field(default=32, ge=1)
    show_progress: bool = False
    encode_kwargs: dict[str, Any] = Field(default_factory=dict)
    query_encode_kwargs: dict[str, Any] | None = None

    @field_validator("encode_kwargs")
    @classmethod
    def _validate_encode_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_encode_kwargs("encode_kwargs", value) or {}

    @field_validator("query_encode_kwargs")
    @classmethod
    def _validate_query_encode_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _check_encode_kwargs("query_encode_kwargs", value)

    def _document_kwargs(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "show_progress": self.show_progress,
            **self.encode_kwargs,
        }

    def _query_kwargs(self) -> dict[str, Any]:
        if self.query_encode_kwargs is None:
            return {**self._document_kwargs(), "show_progress": False}
        return {"batch_size": self.batch_size, "show_progress": False, **self.query_encode_kwargs}

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed documents; returns one list of floats per text (the combined mean)."""
        if isinstance(texts, str):
            raise TypeError("embed_documents expects a list of strings; use embed_query for one")
        texts = list(texts)
        if not texts:
            return []
        encoding = self.cached_ensemble.encode(texts, "document", self._document_kwargs())
        return encoding.gaussian.mean.tolist()

    def embed_query(self, text: str) -> list[float]:
        """Embed a query; returns the combined mean as a list of floats."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}: {text!r:.80}")
        encoding = self.cached_ensemble.encode([text], "query", self._query_kwargs())
        return encoding.gaussian.mean[0].tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """Async :meth:`embed_documents`, run in the default executor."""
        return await run_in_executor(None, self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        """Async :meth:`embed_query`, run in the default executor."""
        return await run_in_executor(None, self.embed_query, text)

    def __getstate__(self) -> dict[str, Any]:
        # The loaded models stay behind; the copy reloads them on first use.
        return self._state_without_core(super().__getstate__())


class UECReranker(BaseDocumentCompressor):
    """LangChain document compressor that reranks by the uncertainty-aware score.

    For a query ``q`` and a document ``c`` with combined Gaussians, the score
    is ``mu_s / sqrt(1 + pi/8 sigma_s^2)`` with ``mu_s = mu_q^T mu_c`` and
    ``sigma_s^2`` the variance of ``q^T c`` (Uncertainty-driven Embedding
    Convolution, ICLR 2026; formulas in :mod:`uec_rag.similarity`).

    Parameters
    ----------
    embeddings : UECEmbeddings, default ``UECEmbeddings()``
        The ensemble and Gaussian cache. Pass the instance that embedded the
        vector store, so the documents' Gaussians are cache hits.
    top_n : int or None, default 3
        Number of documents to return; ``None`` returns all, reordered.

    Notes
    -----
    The returned documents are copies; the caller's documents are not
    modified. Each copy's metadata gains ``relevance_score`` (the score, a
    Python float), ``uec_score_mean`` (``mu_s``), ``uec_score_std``
    (``sigma_s``) and ``uec_coefficients`` (``{member name: coefficient}`` of
    the document). Repeated documents are encoded once and all occurrences are
    returned, with equal scores, in input order.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    embeddings: UECEmbeddings = Field(default_factory=UECEmbeddings)
    top_n: int | None = Field(default=3, ge=1)

    @property
    def cached_ensemble(self) -> CachedEnsemble:
        """The ensemble and cache of :attr:`embeddings`."""
        return self.embeddings.cached_ensemble

    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Return copies of ``documents`` sorted by score, at most ``top_n`` of them.

        Raises
        ------
        TypeError
            If ``query`` is not a string, or a document's ``page_content`` is
            not a string (the message names its position).
        """
        documents = list(documents)
        if not isinstance(query, str):
            raise TypeError(f"query must be str, got {type(query).__name__}: {query!r:.80}")
        for position, document in enumerate(documents):
            content = getattr(document, "page_content", None)
            if not isinstance(content, str):
                raise TypeError(
                    f"documents[{position}].page_content must be str, "
                    f"got {type(content).__name__}: {content!r:.80}"
                )
        if not documents:
            return []

        ranked = self.cached_ensemble.rerank(
            query,
            [document.page_content for document in documents],
            top_n=self.top_n,
            query_kwargs=self.embeddings._query_kwargs(),
            document_kwargs=self.embeddings._document_kwargs(),
        )
        results = []
        for item in ranked:
            document = documents[item.index]
            metadata = {**document.metadata, **item.metadata()}
            results.append(document.model_copy(update={"metadata": metadata}))
        return results

    async def acompress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Async :meth:`compress_documents`, run in the default executor."""
        return await run_in_executor(None, self.compress_documents, documents, query, callbacks)
