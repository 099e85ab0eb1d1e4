"""The UEC ensemble: K probabilistic encoders combined per item by their uncertainty.

Method ("Uncertainty-driven Embedding Convolution", ICLR 2026):

1. Each member ``k`` encodes a text ``x`` as a diagonal Gaussian
   ``N(mu_k(x), Sigma_k(x))``.
2. Per-item coefficients ``pi_k(x)`` favour the members with the smaller trace
   ``tr Sigma_k(x)`` (:mod:`uec_rag.coefficients`).
3. The members are combined into one Gaussian (:mod:`uec_rag.combine`).
4. Queries and documents are compared by the uncertainty-aware score
   ``mu_s / sqrt(1 + pi/8 sigma_s^2)`` (:mod:`uec_rag.similarity`,
   :mod:`uec_rag.index`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from uec_rag.coefficients import CoefficientRule
from uec_rag.combine import COMBINATIONS, Combination, combine_members
from uec_rag.encoders.base import Kind, ProbabilisticMember, check_kind, check_texts
from uec_rag.gaussian import GaussianEmbedding
from uec_rag.index import PRECISIONS, GaussianIndex, Precision, SearchResult
from uec_rag.similarity import Scores, uncertainty_similarity

__all__ = ["EnsembleEncoding", "MemberSpec", "UECEnsemble"]

logger = logging.getLogger(__name__)

MemberSpec = ProbabilisticMember | str | os.PathLike
"""A member object, or a preset name / local model folder for ``load_encoder``."""

_FINGERPRINT_FORMAT = "uec-ensemble-1"


@dataclass(frozen=True)
class EnsembleEncoding:
    """An ensemble's encoding of N texts.

    Attributes
    ----------
    gaussian : GaussianEmbedding
        The combined Gaussian, ``[N, D]`` (``D = sum_k D_k`` for ``direct_sum``).
    coefficients : np.ndarray
        Per-item coefficients ``pi [N, K]`` (float32, rows sum to 1), showing
        which member carried each text.
    member_names : tuple of str
        Member names, in the column order of ``coefficients``.
    member_embeddings : tuple of GaussianEmbedding
        Each member's own Gaussians, for caching or other combinations.
    """

    gaussian: GaussianEmbedding
    coefficients: np.ndarray
    member_names: tuple[str, ...]
    member_embeddings: tuple[GaussianEmbedding, ...]

    def __len__(self) -> int:
        return len(self.gaussian)


def _check_member_object(position: int, member: object) -> None:
    if not isinstance(member, ProbabilisticMember):
        raise TypeError(
            f"members[{position}] has type {type(member).__name__}, not a ProbabilisticMember: "
            "pass an encoder with name, dim, reference_trace, encode() and fingerprint(), "
            "or a preset name such as 'minilm'"
        )


def _check_unique(names: Sequence[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(
                f"duplicate member name {name!r} in {list(names)}; each member must be distinct"
            )
        seen.add(name)


class UECEnsemble:
    """An uncertainty-weighted ensemble of probabilistic text encoders.

    The method and its source are in the module docstring. Layer-mode and
    head-mode members work alike: anything implementing
    :class:`~uec_rag.encoders.base.ProbabilisticMember`.

    Parameters
    ----------
    members : sequence of ProbabilisticMember, str or os.PathLike
        The encoders. A string or path is a preset name (``"minilm"``,
        ``"mpnet"``, ``"e5-small"``) or a local model folder, loaded on first use
        with ``uec_rag.encoders.load_encoder``.
    combine : {"direct_sum", "convolution"}, default "direct_sum"
        How members are combined; ``convolution`` needs members of equal
        dimension.
    coefficients : CoefficientRule, optional
        The per-item coefficient rule; default ``CoefficientRule()`` (the
        inverse-trace rule with ``T = 1``, no trace normalisation).
    index_precision : {"float32", "float16", "uint8"}, default "float32"
        Storage of the variance terms in indexes built by :meth:`index`.

    Raises
    ------
    ValueError
        On an empty member list, duplicate members, an unknown combination, or
        (once members are loaded) ``convolution`` over unequal dimensions.
    TypeError
        On a member that is neither a ProbabilisticMember nor a string or path.
    """

    def __init__(
        self,
        members: Sequence[MemberSpec],
        combine: Combination = "direct_sum",
        coefficients: CoefficientRule | None = None,
        *,
        index_precision: Precision = "float32",
    ) -> None:
        if isinstance(members, (str, os.PathLike, ProbabilisticMember)):
            raise TypeError("members must be a list of members; wrap a single one: [member]")
        specs = list(members)
        if not specs:
            raise ValueError("members is empty: give at least one encoder or preset name")
        for position, spec in enumerate(specs):
            if not isinstance(spec, (str, os.PathLike)):
                _check_member_object(position, spec)
        _check_unique([self._spec_key(spec) for spec in specs])
        if combine not in COMBINATIONS:
            raise ValueError(f"combine must be one of {list(COMBINATIONS)}, got {combine!r}")
        if index_precision not in PRECISIONS:
            raise ValueError(
                f"index_precision must be one of {list(PRECISIONS)}, got {index_precision!r}"
            )
        if coefficients is not None and not isinstance(coefficients, CoefficientRule):
            raise TypeError(
                f"coefficients must be a CoefficientRule, got {type(coefficients).__name__}"
            )

        self._specs: list[Any] = specs
        self.combine: Combination = combine
        self.rule = coefficients or CoefficientRule()
        self.index_precision: Precision = index_precision
        self._members: list[ProbabilisticMember] | None = None
        if all(not isinstance(spec, (str, os.PathLike)) for spec in specs):
            self._members = self._validated(specs)

    @staticmethod
    def _spec_key(spec: Any) -> str:
        return os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else spec.name

    def _validated(self, members: list[ProbabilisticMember]) -> list[ProbabilisticMember]:
        _check_unique([member.name for member in members])
        dims = [member.dim for member in members]
        if self.combine == "convolution" and len(set(dims)) != 1:
            raise ValueError(
                f"combine='convolution' needs members of equal dimension, got dimensions {dims} "
                f"for {[member.name for member in members]}; use combine='direct_sum'"
            )
        return members

    # -- members ---------------------------------------------------------------

    @property
    def members(self) -> list[ProbabilisticMember]:
        """The member encoders, loading any given by name or path."""
        if self._members is None:
            from uec_rag.encoders import load_encoder  # deferred: loads torch models

            resolved = []
            for position, spec in enumerate(self._specs):
                if isinstance(spec, (str, os.PathLike)):
                    logger.info("loading ensemble member %s", os.fspath(spec))
                    spec = load_encoder(os.fspath(spec))
                _check_member_object(position, spec)
                resolved.append(spec)
            self._members = self._validated(resolved)
        return self._members

    @property
    def member_names(self) -> tuple[str, ...]:
        """Member names, in member order."""
        return tuple(member.name for member in self.members)

    @property
    def reference_traces(self) -> list[float | None]:
        """Each member's reference trace (None where the member has none)."""
        return [member.reference_trace for member in self.members]

    @property
    def dim(self) -> int:
        """Dimension of the combined Gaussian."""
        dims = [member.dim for member in self.members]
        return sum(dims) if self.combine == "direct_sum" else dims[0]

    # -- encoding --------------------------------------------------------------

    def encode_members(
        self,
        texts: Sequence[str],
        kind: Kind,
        *,
        batch_size: int | None = None,
        show_progress: bool | None = None,
    ) -> list[GaussianEmbedding]:
        """Encode ``texts`` with every member; returns K Gaussians ``[N, D_k]``."""
        kind = check_kind(kind)
        texts = check_texts(texts)
        outputs = []
        for member in self.members:
            if not texts:
                outputs.append(GaussianEmbedding.empty(member.dim))
                continue
            output = member.encode(texts, kind, batch_size=batch_size, show_progress=show_progress)
            if not isinstance(output, GaussianEmbedding):
                raise TypeError(
                    f"member {member.name!r} returned {type(output).__name__} from encode(), "
                    "expected a GaussianEmbedding"
                )
            if output.mean.shape != (len(texts), member.dim):
                raise ValueError(
                    f"member {member.name!r} returned shape {list(output.mean.shape)} for "
                    f"{len(texts)} texts, expected [{len(texts)}, {member.dim}]"
                )
            outputs.append(output)
        return outputs

    def combine_members(
        self, per_member: Sequence[GaussianEmbedding], kind: Combination | None = None
    ) -> EnsembleEncoding:
        """Combine per-member Gaussians (e.g. from a cache) without encoding again.

        Parameters
        ----------
        per_member : sequence of GaussianEmbedding
            One ``[N, D_k]`` embedding per member, in member order.
        kind : {"direct_sum", "convolution"}, optional
            The combination; default the ensemble's ``combine``.

        Returns
        -------
        EnsembleEncoding
        """
        members = self.members
        per_member = list(per_member)
        if len(per_member) != len(members):
            raise ValueError(f"got {len(per_member)} member embeddings for {len(members)} members")
        for member, embedding in zip(members, per_member, strict=True):
            if isinstance(embedding, GaussianEmbedding) and embedding.dim != member.dim:
                raise ValueError(
                    f"embedding for member {member.name!r} has dimension {embedding.dim}, "
                    f"expected {member.dim}"
                )
        gaussian, coefficients = combine_members(
            per_member, kind or self.combine, self.rule, self.reference_traces
        )
        return EnsembleEncoding(gaussian, coefficients, self.member_names, tuple(per_member))

    def encode(
        self,
        texts: Sequence[str],
        kind: Kind = "document",
        *,
        batch_size: int | None = None,
        show_progress: bool | None = None,
    ) -> EnsembleEncoding:
        """Encode ``texts`` with every member and combine them."""
        per_member = self.encode_members(
            texts, kind, batch_size=batch_size, show_progress=show_progress
        )
        return self.combine_members(per_member)

    def encode_queries(self, texts: Sequence[str], **settings: Any) -> EnsembleEncoding:
        """Encode queries (members add their query prefix, if any); see :meth:`encode`."""
        return self.encode(texts, "query", **settings)

    def encode_documents(self, texts: Sequence[str], **settings: Any) -> EnsembleEncoding:
        """Encode documents; see :meth:`encode`."""
        return self.encode(texts, "document", **settings)

    # -- scoring ---------------------------------------------------------------

    @staticmethod
    def _gaussian(value: EnsembleEncoding | GaussianEmbedding, name: str) -> GaussianEmbedding:
        if isinstance(value, EnsembleEncoding):
            return value.gaussian
        if isinstance(value, GaussianEmbedding):
            return value
        raise TypeError(
            f"{name} must be an EnsembleEncoding or GaussianEmbedding, got {type(value).__name__}; "
            "encode texts first with encode_queries / encode_documents"
        )

    def score(
        self,
        queries: EnsembleEncoding | GaussianEmbedding,
        documents: EnsembleEncoding | GaussianEmbedding,
    ) -> Scores:
        """Score every query against every document (dense ``[Q, N]`` arrays)."""
        return uncertainty_similarity(
            self._gaussian(queries, "queries"), self._gaussian(documents, "documents")
        )

    def index(
        self,
        texts_or_encoding: Sequence[str] | EnsembleEncoding | GaussianEmbedding,
        ids: Sequence[Hashable] | None = None,
        *,
        precision: Precision | None = None,
        **settings: Any,
    ) -> GaussianIndex:
        """Build a :class:`GaussianIndex` over documents given as texts or an encoding.

        Parameters
        ----------
        texts_or_encoding : sequence of str, EnsembleEncoding or GaussianEmbedding
            Texts are encoded with :meth:`encode_documents` (``settings`` are
            passed on).
        ids : sequence of hashable, optional
            One id per document; default ``0..N-1``.
        precision : {"float32", "float16", "uint8"}, optional
            Default the ensemble's ``index_precision``.
        """
        if isinstance(texts_or_encoding, (EnsembleEncoding, GaussianEmbedding)):
            documents = self._gaussian(texts_or_encoding, "texts_or_encoding")
        else:
            documents = self.encode_documents(texts_or_encoding, **settings).gaussian
        return GaussianIndex(documents, ids, precision=precision or self.index_precision)

    def search(
        self, query_texts: Sequence[str], index: GaussianIndex, top_k: int = 10, **settings: Any
    ) -> SearchResult:
        """Encode queries and return the ``top_k`` documents of ``index`` per query."""
        if not isinstance(index, GaussianIndex):
            raise TypeError(f"index must be a GaussianIndex, got {type(index).__name__}")
        if index.dim != self.dim:
            raise ValueError(
                f"index has dimension {index.dim} but this ensemble produces {self.dim}; "
                "build the index with the same ensemble"
            )
        queries = self.encode_queries(query_texts, **settings)
        return index.search(queries.gaussian, top_k)

    # -- identity and pickling -------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """Return the combination and coefficient settings as a JSON-serialisable dict."""
        return {"combine": self.combine, "coefficients": self.rule.to_dict()}

    def fingerprint(self) -> str:
        """Return a stable sha256 hex id of the members' fingerprints and the settings.

        Members' fingerprints cover their weights, posteriors and settings; the
        index precision is excluded because it does not change encodings.
        """
        payload = {
            "format": _FINGERPRINT_FORMAT,
            "members": [member.fingerprint() for member in self.members],
            **self.settings(),
        }
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def __getstate__(self) -> dict[str, Any]:
        # Members given by name are stored by name and reloaded lazily; member
        # objects pickle themselves (as a recipe, never as torch modules).
        return {
            "specs": self._specs,
            "combine": self.combine,
            "rule": self.rule.to_dict(),
            "index_precision": self.index_precision,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["specs"],
            state["combine"],
            CoefficientRule.from_dict(state["rule"]),
            index_precision=state["index_precision"],
        )

    def __repr__(self) -> str:
        names = [self._spec_key(spec) for spec in self._specs]
        return f"UECEnsemble(members={names}, combine={self.combine!r}, coefficients={self.rule!r})"
