"""LlamaIndex integration: a UEC node postprocessor (reranker) and a UEC embedding model.

* :class:`UECEmbedding` implements LlamaIndex's ``BaseEmbedding``. It returns
  the ensemble's combined means and writes every Gaussian to the Gaussian
  cache.
* :class:`UECNodePostprocessor` implements ``BaseNodePostprocessor``. It
  reorders retrieved nodes by the uncertainty-aware score, reading the nodes'
  Gaussians from the cache by content and encoding only the misses.

Both share the caching and ranking code with the LangChain integration
(:mod:`uec_rag.integrations._common`). Requires ``llama-index-core``
(``pip install uec-rag[llamaindex]``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field
from llama_index.core.callbacks import CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from uec_rag.integrations._common import (
    METADATA_KEYS,
    CachedEnsemble,
    EnsembleSettings,
    RankedText,
)

__all__ = ["RETRIEVAL_SCORE_KEY", "UECEmbedding", "UECNodePostprocessor"]

dispatcher = get_dispatcher(__name__)

RETRIEVAL_SCORE_KEY = "retrieval_score"
"""Metadata key of the first-stage score, kept when ``keep_retrieval_score`` is on."""


class UECEmbedding(EnsembleSettings, BaseEmbedding):
    """LlamaIndex embedding model from a UEC ensemble (Uncertainty-driven Embedding
    Convolution, ICLR 2026).

    Each text is encoded by every member as a diagonal Gaussian; the members
    are weighted per text by their uncertainty and combined. The embedding is
    the combined mean. The full Gaussian (mean, variance, coefficients) goes
    to the Gaussian cache, so :class:`UECNodePostprocessor` over an index built
    with this model finds every node there.

    Parameters
    ----------
    members, combine, coefficient_rule, temperature, normalize_traces, model_kwargs, cache
        Ensemble and cache settings; see
        :class:`~uec_rag.integrations._common.EnsembleSettings`.
    model_name : str, default "uec-ensemble"
        Name reported to LlamaIndex's instrumentation.
    embed_batch_size : int, default 10
        Texts per call into the ensemble (LlamaIndex splits the input into
        batches of this size; each batch is one ensemble call).

    Notes
    -----
    The loaded models live in a private attribute. Pickling stores the
    settings only, and the copy reloads its models on first use (once per
    process and settings).
    """

    model_name: str = "uec-ensemble"

    @classmethod
    def class_name(cls) -> str:
        return "UECEmbedding"

    def _encode_kwargs(self) -> dict[str, Any]:
        return {"batch_size": self.embed_batch_size, "show_progress": False}

    def _get_query_embedding(self, query: str) -> Embedding:
        if not isinstance(query, str):
            raise TypeError(f"query must be str, got {type(query).__name__}: {query!r:.80}")
        encoding = self.cached_ensemble.encode([query], "query", self._encode_kwargs())
        return encoding.gaussian.mean[0].tolist()

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._get_text_embeddings([text])[0]

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        # One ensemble call per batch; LlamaIndex has already cut the input
        # into batches of embed_batch_size.
        if not texts:
            return []
        encoding = self.cached_ensemble.encode(texts, "document", self._encode_kwargs())
        return encoding.gaussian.mean.tolist()

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)

    def __getstate__(self) -> dict[str, Any]:
        # The loaded models stay behind; the copy reloads them on first use.
        return self._state_without_core(super().__getstate__())


def _merged(keys: list[str], extra: tuple[str, ...]) -> list[str]:
    return list(dict.fromkeys([*keys, *extra]))


class UECNodePostprocessor(BaseNodePostprocessor):
    """LlamaIndex node postprocessor that reranks by the uncertainty-aware score.

    For a query ``q`` and a node ``c`` with combined Gaussians, the score is
    ``mu_s / sqrt(1 + pi/8 sigma_s^2)``, where ``mu_s = mu_q^T mu_c`` and
    ``sigma_s^2`` is the variance of ``q^T c`` (Uncertainty-driven Embedding
    Convolution, ICLR 2026; formulas in :mod:`uec_rag.similarity`).

    Parameters
    ----------
    top_n : int, default 3
        Number of nodes to return.
    embed_model : UECEmbedding, default ``UECEmbedding()``
        The ensemble and Gaussian cache. Pass the embedding model the index
        was built with, so the nodes' Gaussians are cache hits.
    keep_retrieval_score : bool, default False
        Store the first-stage score in the node metadata under
        ``retrieval_score``.

    Notes
    -----
    The node text scored is ``node.get_content(metadata_mode=MetadataMode.EMBED)``,
    the text the embedding model saw. The query is ``query_bundle.query_str``.
    The bundle's embedding is not used, because the async path leaves it unset.

    The returned nodes are copies with ``score`` set to the uncertainty-aware
    score (a Python float) and metadata keys ``uec_score_mean`` (``mu_s``),
    ``uec_score_std`` (``sigma_s``) and ``uec_coefficients``
    (``{member name: coefficient}``). These keys are added to the node's
    ``excluded_llm_metadata_keys`` and ``excluded_embed_metadata_keys``, so
    they stay out of LLM prompts and out of the embedded text. It emits
    ``ReRankStartEvent`` and ``ReRankEndEvent``.
    """

    top_n: int = Field(default=3, ge=1, description="Number of nodes to return.")
    embed_model: UECEmbedding = Field(
        default_factory=UECEmbedding, description="The UEC ensemble and its Gaussian cache."
    )
    keep_retrieval_score: bool = Field(
        default=False, description="Keep the first-stage score in metadata['retrieval_score']."
    )

    @classmethod
    def class_name(cls) -> str:
        return "UECNodePostprocessor"

    @property
    def cached_ensemble(self) -> CachedEnsemble:
        """The ensemble and cache of :attr:`embed_model`."""
        return self.embed_model.cached_ensemble

    def _postprocess_nodes(
        self,
        nodes: list[NodeWithScore],
        query_bundle: QueryBundle | None = None,
    ) -> list[NodeWithScore]:
        if query_bundle is None:
            raise ValueError(
                "UECNodePostprocessor needs the query: pass query_bundle=QueryBundle(query) "
                "or query_str to postprocess_nodes"
            )
        if not nodes:
            return []
        texts = [item.node.get_content(metadata_mode=MetadataMode.EMBED) for item in nodes]

        dispatcher.event(
            ReRankStartEvent(
                query=query_bundle,
                nodes=nodes,
                top_n=self.top_n,
                model_name=self.embed_model.model_name,
            )
        )
        with self.callback_manager.event(
            CBEventType.RERANKING,
            payload={
                EventPayload.NODES: nodes,
                EventPayload.MODEL_NAME: self.embed_model.model_name,
                EventPayload.QUERY_STR: query_bundle.query_str,
                EventPayload.TOP_K: self.top_n,
            },
        ) as event:
            ranked = self.cached_ensemble.rerank(
                query_bundle.query_str,
                texts,
                top_n=self.top_n,
                query_kwargs=self.embed_model._encode_kwargs(),
                document_kwargs=self.embed_model._encode_kwargs(),
            )
            reranked = [self._scored_copy(nodes[item.index], item) for item in ranked]
            event.on_end(payload={EventPayload.NODES: reranked})
        dispatcher.event(ReRankEndEvent(nodes=reranked))
        return reranked

    def _scored_copy(self, item: NodeWithScore, ranked: RankedText) -> NodeWithScore:
        extra = {key: value for key, value in ranked.metadata().items() if key in METADATA_KEYS}
        hidden = METADATA_KEYS
        if self.keep_retrieval_score:
            extra[RETRIEVAL_SCORE_KEY] = item.score
            hidden = (*METADATA_KEYS, RETRIEVAL_SCORE_KEY)

        node = item.node.model_copy()
        node.metadata = {**item.node.metadata, **extra}
        node.excluded_llm_metadata_keys = _merged(item.node.excluded_llm_metadata_keys, hidden)
        node.excluded_embed_metadata_keys = _merged(item.node.excluded_embed_metadata_keys, hidden)
        return NodeWithScore(node=node, score=ranked.score)
