"""Adapter-independent logic shared by the LangChain and LlamaIndex integrations.

Both frameworks' embedding models and rerankers reduce to two operations:

* :meth:`CachedEnsemble.encode`: look the texts up in the Gaussian cache,
  encode only the misses with the ensemble (once per distinct text), write
  the new Gaussians back, and return the combined means, variances and
  coefficients in input order.
* :meth:`CachedEnsemble.rerank`: score one query against candidate texts by
  the uncertainty-aware similarity of :mod:`uec_rag.similarity` and return
  them sorted, with the score's mean and standard deviation and each text's
  per-member coefficients.

:class:`EnsembleSettings` contains the pydantic fields that both frameworks'
classes share, and builds the :class:`CachedEnsemble` lazily, so a framework
object is cheap to construct, pickles as its settings, and reloads its models
on first use in another process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_serializer

from uec_rag.cache import GaussianCache, MemoryGaussianCache, SQLiteGaussianCache, open_cache
from uec_rag.coefficients import CoefficientRule
from uec_rag.encoders.base import Kind, ProbabilisticMember, check_kind, check_texts
from uec_rag.gaussian import GaussianEmbedding
from uec_rag.similarity import uncertainty_similarity

__all__ = [
    "COEFFICIENTS_KEY",
    "DEFAULT_MEMBERS",
    "METADATA_KEYS",
    "RELEVANCE_SCORE_KEY",
    "SCORE_MEAN_KEY",
    "SCORE_STD_KEY",
    "CachedEncoding",
    "CachedEnsemble",
    "EnsembleSettings",
    "RankedText",
    "build_ensemble",
]

DEFAULT_MEMBERS: tuple[str, ...] = ("minilm", "mpnet", "e5-small")
"""The three bundled presets, used when no members are given."""

RELEVANCE_SCORE_KEY = "relevance_score"
"""Metadata key of the uncertainty-aware score (the key LangChain's rerankers use)."""

SCORE_MEAN_KEY = "uec_score_mean"
"""Metadata key of ``mu_s``, the mean of the query-document inner product."""

SCORE_STD_KEY = "uec_score_std"
"""Metadata key of ``sigma_s``, the standard deviation of the inner product."""

COEFFICIENTS_KEY = "uec_coefficients"
"""Metadata key of the document's per-member coefficients, ``{member name: float}``."""

METADATA_KEYS: tuple[str, ...] = (SCORE_MEAN_KEY, SCORE_STD_KEY, COEFFICIENTS_KEY)
"""The keys a reranker adds besides the relevance score."""


# --------------------------------------------------------------------------- ensemble loading

_MEMBERS: dict[tuple[str, str], ProbabilisticMember] = {}
_MEMBERS_LOCK = threading.Lock()
_ENCODE_LOCK = threading.Lock()


def _settings_key(settings: Mapping[str, Any]) -> str:
    return repr(sorted(settings.items()))


def _load_member(spec: str | os.PathLike[str], settings: Mapping[str, Any]) -> ProbabilisticMember:
    """Load a preset or local model once per process and settings, then reuse it."""
    from uec_rag.encoders import load_encoder

    key = (os.fspath(spec), _settings_key(settings))
    with _MEMBERS_LOCK:
        member = _MEMBERS.get(key)
        if member is None:
            member = load_encoder(os.fspath(spec), **settings)
            _MEMBERS[key] = member
    return member


def build_ensemble(
    members: Sequence[Any],
    combine: str,
    rule: CoefficientRule,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Build a :class:`uec_rag.ensemble.UECEnsemble` from member specifications.

    Parameters
    ----------
    members : sequence
        Preset names, local model folders, or objects implementing
        :class:`~uec_rag.encoders.base.ProbabilisticMember`.
    combine : {"direct_sum", "convolution"}
        How the members' Gaussians are combined.
    rule : CoefficientRule
        The per-item coefficient rule.
    model_kwargs : mapping, optional
        Keyword arguments for :func:`uec_rag.encoders.load_encoder`, applied to
        every member given by name or path. A loaded model is reused by every
        ensemble in the process that requests the same name and settings.

    Raises
    ------
    TypeError
        If a member is neither a name, a path nor a probabilistic member.
    ValueError
        If ``members`` is empty.
    """
    from uec_rag.ensemble import UECEnsemble

    if not members:
        raise ValueError("members must name at least one model, e.g. ['minilm']")
    loaded: list[ProbabilisticMember] = []
    for position, member in enumerate(members):
        if isinstance(member, (str, os.PathLike)):
            loaded.append(_load_member(member, dict(model_kwargs or {})))
        elif isinstance(member, ProbabilisticMember):
            loaded.append(member)
        else:
            raise TypeError(
                f"members[{position}] must be a preset name, a model folder or a "
                f"ProbabilisticMember, got {type(member).__name__}: {member!r:.80}"
            )
    return UECEnsemble(members=loaded, combine=combine, coefficients=rule)


# --------------------------------------------------------------------------- cached encoding


@dataclass(frozen=True)
class CachedEncoding:
    """Combined Gaussians of a batch of texts, in input order.

    Attributes
    ----------
    gaussian : GaussianEmbedding
        Combined means and variances, shape ``[N, D]``.
    coefficients : np.ndarray
        Per-member coefficients, shape ``[N, K]``, float32.
    member_names : tuple of str
        Names of the K members, in coefficient column order.
    hits : int
        Number of distinct texts found in the cache.
    encoded : int
        Number of distinct texts the ensemble encoded.
    """

    gaussian: GaussianEmbedding
    coefficients: np.ndarray
    member_names: tuple[str, ...]
    hits: int
    encoded: int

    def coefficient_dict(self, row: int) -> dict[str, float]:
        """Return the coefficients of item ``row`` as ``{member name: float}``."""
        return {
            name: float(value)
            for name, value in zip(self.member_names, self.coefficients[row], strict=True)
        }


@dataclass(frozen=True)
class RankedText:
    """One candidate after reranking.

    Attributes
    ----------
    index : int
        Position of the text in the candidate list given to :meth:`CachedEnsemble.rerank`.
    score : float
        Uncertainty-aware score ``mu_s / sqrt(1 + pi/8 sigma_s^2)``.
    score_mean : float
        ``mu_s``, the mean of the query-document inner product.
    score_std : float
        ``sigma_s``, the standard deviation of the inner product.
    coefficients : dict of str to float
        The document's per-member coefficients.
    """

    index: int
    score: float
    score_mean: float
    score_std: float
    coefficients: dict[str, float]

    def metadata(self) -> dict[str, Any]:
        """Return the reranker metadata: relevance score, ``mu_s``, ``sigma_s``, coefficients."""
        return {
            RELEVANCE_SCORE_KEY: self.score,
            SCORE_MEAN_KEY: self.score_mean,
            SCORE_STD_KEY: self.score_std,
            COEFFICIENTS_KEY: dict(self.coefficients),
        }


class CachedEnsemble:
    """A UEC ensemble with a Gaussian cache in front of it.

    Parameters
    ----------
    ensemble : UECEnsemble
        The ensemble that encodes cache misses.
    cache : GaussianCache or None
        Where Gaussians are looked up and written; ``None`` encodes every text.

    Notes
    -----
    Calls into ensembles are serialised by one process-wide lock, because the
    member protocol does not require thread safety and members loaded by name
    are shared between ensembles. Cache lookups and scoring run outside the
    lock, so concurrent callers still overlap there.
    """

    def __init__(self, ensemble: Any, cache: GaussianCache | None) -> None:
        self.ensemble = ensemble
        self.cache = cache
        self.fingerprint: str = ensemble.fingerprint()

    @property
    def member_names(self) -> tuple[str, ...]:
        """Names of the ensemble members, in coefficient column order."""
        return tuple(self.ensemble.member_names)

    def __getstate__(self) -> dict[str, Any]:
        return {"ensemble": self.ensemble, "cache": self.cache}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["ensemble"], state["cache"])  # type: ignore[misc]

    def _encode_with_ensemble(
        self, texts: list[str], kind: Kind, encode_kwargs: Mapping[str, Any]
    ) -> Any:
        encode = self.ensemble.encode_queries if kind == "query" else self.ensemble.encode_documents
        with _ENCODE_LOCK:
            return encode(texts, **encode_kwargs)

    def encode(
        self,
        texts: Sequence[str],
        kind: Kind,
        encode_kwargs: Mapping[str, Any] | None = None,
    ) -> CachedEncoding:
        """Return the combined Gaussians of ``texts``, encoding only cache misses.

        Each distinct text is encoded at most once, however often it repeats.
        Every newly encoded Gaussian is written to the cache in one batch.

        Parameters
        ----------
        texts : sequence of str
            The texts, validated by :func:`~uec_rag.encoders.base.check_texts`.
        kind : {"query", "document"}
            Which encoding to use (and to look up).
        encode_kwargs : mapping, optional
            Passed to the ensemble's ``encode_queries`` or ``encode_documents``
            (``batch_size``, ``show_progress``).
        """
        kind = check_kind(kind)
        texts = check_texts(texts)
        encode_kwargs = dict(encode_kwargs or {})
        distinct = list(dict.fromkeys(texts))
        names = self.member_names

        entries = (
            self.cache.get_many(self.fingerprint, kind, distinct)
            if self.cache is not None
            else [None] * len(distinct)
        )
        misses = [text for text, entry in zip(distinct, entries, strict=True) if entry is None]

        encoded = None
        if misses:
            encoded = self._encode_with_ensemble(misses, kind, encode_kwargs)
            if self.cache is not None:
                self.cache.put_many(
                    self.fingerprint,
                    kind,
                    misses,
                    encoded.gaussian.mean,
                    encoded.gaussian.variance,
                    encoded.coefficients,
                )

        # Assemble the rows of the distinct texts, then expand to input order.
        if not distinct:
            empty = GaussianEmbedding.empty(self.ensemble.dim)
            coefficients = np.zeros((0, len(names)), dtype=np.float32)
            return CachedEncoding(empty, coefficients, names, 0, 0)
        dim = (
            encoded.gaussian.dim
            if encoded is not None
            else next(entry.mean.shape[0] for entry in entries if entry is not None)
        )
        mean = np.empty((len(distinct), dim), dtype=np.float32)
        variance = np.empty_like(mean)
        coefficients = np.empty((len(distinct), len(names)), dtype=np.float32)
        miss_row = 0
        for row, entry in enumerate(entries):
            if entry is None:
                mean[row] = encoded.gaussian.mean[miss_row]
                variance[row] = encoded.gaussian.variance[miss_row]
                coefficients[row] = encoded.coefficients[miss_row]
                miss_row += 1
            else:
                mean[row] = entry.mean
                variance[row] = entry.variance
                coefficients[row] = entry.coefficients
        position = {text: row for row, text in enumerate(distinct)}
        order = np.fromiter((position[text] for text in texts), dtype=np.intp, count=len(texts))
        return CachedEncoding(
            GaussianEmbedding(mean[order], variance[order]),
            coefficients[order],
            names,
            hits=len(distinct) - len(misses),
            encoded=len(misses),
        )

    def rerank(
        self,
        query: str,
        texts: Sequence[str],
        *,
        top_n: int | None = None,
        query_kwargs: Mapping[str, Any] | None = None,
        document_kwargs: Mapping[str, Any] | None = None,
    ) -> list[RankedText]:
        """Rank ``texts`` for ``query`` by the uncertainty-aware score, best first.

        Ties keep input order. Repeated texts are encoded once and each
        occurrence is returned with the same score.

        Parameters
        ----------
        query : str
            The query text.
        texts : sequence of str
            Candidate documents.
        top_n : int, optional
            Keep only the best ``top_n``; ``None`` keeps all.
        query_kwargs, document_kwargs : mapping, optional
            Encoding settings for the query and the documents (see :meth:`encode`).
        """
        if not isinstance(query, str):
            raise TypeError(f"query must be str, got {type(query).__name__}: {query!r:.80}")
        if top_n is not None and top_n < 1:
            raise ValueError(f"top_n must be >= 1 or None, got {top_n}")
        texts = check_texts(texts)
        if not texts:
            return []

        query_encoding = self.encode([query], "query", query_kwargs)
        documents = self.encode(texts, "document", document_kwargs)
        scores = uncertainty_similarity(query_encoding.gaussian, documents.gaussian)
        score = scores.score[0]

        # A stable sort on the negated score keeps input order among ties.
        order = np.argsort(-score, kind="stable")
        if top_n is not None:
            order = order[:top_n]
        return [
            RankedText(
                index=int(index),
                score=float(score[index]),
                score_mean=float(scores.mu_s[0, index]),
                score_std=float(scores.sigma_s[0, index]),
                coefficients=documents.coefficient_dict(int(index)),
            )
            for index in order
        ]


# --------------------------------------------------------------------------- shared settings

_CORE_LOCK = threading.Lock()

CombineName = Literal["direct_sum", "convolution"]
RuleName = Literal["inverse_trace", "softmax", "uniform"]

_DEFAULT_RULE = CoefficientRule()


class EnsembleSettings(BaseModel):
    """Pydantic fields shared by every framework class that wraps a UEC ensemble.

    Attributes
    ----------
    members : list, default ``["minilm", "mpnet", "e5-small"]``
        Preset names, local model folders, or ready
        :class:`~uec_rag.encoders.base.ProbabilisticMember` objects.
    combine : {"direct_sum", "convolution"}, default "direct_sum"
        ``direct_sum`` for members of different dimensions (the bundled
        presets have 384, 768 and 384); ``convolution`` needs equal dimensions.
    coefficient_rule : {"inverse_trace", "softmax", "uniform"}, default "inverse_trace"
        Per-item coefficient rule (see :mod:`uec_rag.coefficients`).
    temperature : float, default 1.0
        Temperature ``T`` of the coefficient rule.
    normalize_traces : bool, default False
        Divide each member's trace by its reference trace before the rule.
    model_kwargs : dict, default ``{}``
        Keyword arguments for :func:`uec_rag.encoders.load_encoder`, applied to
        members given by name or path (for example ``{"posterior": None}``).
    cache : "sqlite", "memory", path, GaussianCache or None, default "sqlite"
        The Gaussian cache (see :func:`uec_rag.cache.open_cache`). ``"sqlite"``
        is the persistent file in the cache folder; ``None`` turns caching off.
        Share one :class:`~uec_rag.cache.GaussianCache` object (or one path)
        between an embedding model and a reranker so the reranker reads what
        the embedding model wrote.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    members: list[Any] = Field(default_factory=lambda: list(DEFAULT_MEMBERS))
    combine: CombineName = "direct_sum"
    coefficient_rule: RuleName = _DEFAULT_RULE.rule
    temperature: float = _DEFAULT_RULE.temperature
    normalize_traces: bool = _DEFAULT_RULE.normalize_traces
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    cache: Any = "sqlite"

    _core: CachedEnsemble | None = PrivateAttr(default=None)

    @field_serializer("cache")
    def _serialize_cache(self, cache: Any) -> str | None:
        # A JSON-friendly form for to_dict()/to_json(): a SQLite cache is its
        # path; a memory cache serialises as "memory" and loses its entries.
        if isinstance(cache, SQLiteGaussianCache):
            return str(cache.path)
        if isinstance(cache, MemoryGaussianCache):
            return "memory"
        if isinstance(cache, Path):
            return str(cache)
        return cache

    @field_serializer("members")
    def _serialize_members(self, members: list[Any]) -> list[Any]:
        return [
            os.fspath(member) if isinstance(member, os.PathLike) else member for member in members
        ]

    def coefficient_settings(self) -> CoefficientRule:
        """Return the :class:`~uec_rag.coefficients.CoefficientRule` of these settings."""
        return CoefficientRule(
            rule=self.coefficient_rule,
            temperature=self.temperature,
            normalize_traces=self.normalize_traces,
        )

    @property
    def cached_ensemble(self) -> CachedEnsemble:
        """The ensemble and its cache, built on first use (models load here)."""
        core = self._core
        if core is None:
            with _CORE_LOCK:
                core = self._core
                if core is None:
                    ensemble = build_ensemble(
                        self.members,
                        self.combine,
                        self.coefficient_settings(),
                        self.model_kwargs,
                    )
                    cache = open_cache(self.cache)
                    if cache is not None and not isinstance(self.cache, GaussianCache):
                        # Keep the opened store, so copies and pickles share it.
                        object.__setattr__(self, "cache", cache)
                    core = CachedEnsemble(ensemble, cache)
                    self._core = core
        return core

    def _state_without_core(self, state: dict[str, Any]) -> dict[str, Any]:
        private = dict(state.get("__pydantic_private__") or {})
        private["_core"] = None
        return {**state, "__pydantic_private__": private}
