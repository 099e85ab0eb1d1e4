"""Exact top-k search by the uncertainty-aware score over a fixed document set.

:class:`GaussianIndex` stores, per document, the mean ``mu_c`` (float32) and the
variance factor ``V = [var_c, mu_c^2 + var_c]`` of shape ``[2D]`` (see
:mod:`uec_rag.similarity`), so one query-document variance is one inner product
with the query factor ``[mu_q^2, var_q]``. ``V`` can be stored in float32, or in
float16 or 8 bits with a scale per row and half (the two halves differ in
magnitude), cutting its memory from 8 D to 4 D or 2 D bytes per document.

Search runs over chunks of documents with a running top-k per query, so memory
is bounded by ``query_batch_size x chunk_size`` and never ``Q x N x D``. It is
exact, with pruning from a bound: for ``mu_s >= 0`` the score
``mu_s / sqrt(1 + pi/8 sigma_s^2)`` is at most ``mu_s``, and for ``mu_s < 0`` it
is below 0. A document whose bound ``max(mu_s, 0)`` does not exceed the current
k-th best score cannot enter the top-k, so its variance is never computed.
After the first chunk, only the few documents whose ``mu_s`` beats that
threshold are scored in full. The means product ``mu_q mu_c^T`` is computed for
every document, so the cost is close to that of a plain inner-product search.
When the variances are so large that most documents pass the bound, a chunk
falls back to the dense product ``[mu_q^2, var_q] V^T``.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from uec_rag.gaussian import GaussianEmbedding
from uec_rag.similarity import Scores, document_terms, probit_score, query_terms

__all__ = ["PRECISIONS", "GaussianIndex", "Precision", "SearchResult", "inner_product_top_k"]

logger = logging.getLogger(__name__)

Precision = Literal["float32", "float16", "uint8"]
PRECISIONS: tuple[Precision, ...] = ("float32", "float16", "uint8")

_DENSE_FRACTION = 0.05
"""A chunk whose share of bound-passing pairs exceeds this is scored densely."""

_PAIR_BATCH = 4096
"""Query-document pairs scored per step of the sparse path (bounds the gathered rows)."""


@dataclass(frozen=True)
class SearchResult:
    """Top-k documents per query, best first; arrays have shape ``[Q, k]``.

    Attributes
    ----------
    indices : np.ndarray
        Row numbers of the documents in the index (int64).
    ids : list of list
        The documents' ids, ``ids[q][j]`` for ``indices[q, j]``.
    score, mu_s, sigma_s : np.ndarray
        The uncertainty-aware score, the mean and the standard deviation of the
        inner product (float32).
    """

    indices: np.ndarray
    ids: list[list[Hashable]]
    score: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray


class _RunningTopK:
    """Best ``k`` (score, index, mu_s, sigma_s^2) per query, merged chunk by chunk."""

    def __init__(self, n_queries: int, k: int) -> None:
        self.k = k
        self.score = np.full((n_queries, k), -np.inf, dtype=np.float32)
        self.index = np.full((n_queries, k), -1, dtype=np.int64)
        self.mu_s = np.zeros((n_queries, k), dtype=np.float32)
        self.sigma2_s = np.zeros((n_queries, k), dtype=np.float32)

    def threshold(self) -> np.ndarray:
        """k-th best score per query so far (``-inf`` until k documents were seen)."""
        return self.score.min(axis=1)

    def _merge(
        self,
        query: int | slice,
        score: np.ndarray,
        index: np.ndarray,
        mu: np.ndarray,
        sigma2: np.ndarray,
    ) -> None:
        all_score = np.concatenate([self.score[query], score], axis=-1)
        all_index = np.concatenate([self.index[query], index], axis=-1)
        all_mu = np.concatenate([self.mu_s[query], mu], axis=-1)
        all_sigma2 = np.concatenate([self.sigma2_s[query], sigma2], axis=-1)
        width = all_score.shape[-1]
        keep = np.argpartition(all_score, width - self.k, axis=-1)[..., width - self.k :]
        self.score[query] = np.take_along_axis(all_score, keep, axis=-1)
        self.index[query] = np.take_along_axis(all_index, keep, axis=-1)
        self.mu_s[query] = np.take_along_axis(all_mu, keep, axis=-1)
        self.sigma2_s[query] = np.take_along_axis(all_sigma2, keep, axis=-1)

    def add_dense(self, start: int, score: np.ndarray, mu: np.ndarray, sigma2: np.ndarray) -> None:
        """Merge a chunk scored in full: arrays ``[Q, n]`` for documents ``start..start+n``."""
        width = score.shape[1]
        kk = min(self.k, width)
        top = np.argpartition(score, width - kk, axis=1)[:, width - kk :]
        self._merge(
            slice(None),
            np.take_along_axis(score, top, axis=1),
            top + start,
            np.take_along_axis(mu, top, axis=1),
            np.take_along_axis(sigma2, top, axis=1),
        )

    def add_pairs(
        self,
        query: np.ndarray,
        index: np.ndarray,
        score: np.ndarray,
        mu: np.ndarray,
        sigma2: np.ndarray,
    ) -> None:
        """Merge scattered pairs; ``query`` is sorted (as ``np.nonzero`` returns it)."""
        boundaries = np.flatnonzero(np.diff(query)) + 1
        starts = np.concatenate([[0], boundaries])
        stops = np.concatenate([boundaries, [len(query)]])
        for begin, end in zip(starts, stops, strict=True):
            row = int(query[begin])
            self._merge(row, score[begin:end], index[begin:end], mu[begin:end], sigma2[begin:end])

    def sorted(self) -> tuple[np.ndarray, ...]:
        order = np.argsort(-self.score, axis=1, kind="stable")
        return tuple(
            np.take_along_axis(array, order, axis=1)
            for array in (self.score, self.index, self.mu_s, self.sigma2_s)
        )


def _check_top_k(top_k: int, n_documents: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if n_documents == 0:
        raise ValueError("cannot search an empty index")
    return min(int(top_k), n_documents)


def inner_product_top_k(
    queries: np.ndarray,
    documents: np.ndarray,
    top_k: int,
    *,
    chunk_size: int = 65536,
    query_batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k documents by the plain inner product, chunked like :meth:`GaussianIndex.search`.

    Parameters
    ----------
    queries, documents : np.ndarray
        float32 means of shapes ``[Q, D]`` and ``[N, D]``.
    top_k : int
        Number of documents per query (capped at N).

    Returns
    -------
    tuple of np.ndarray
        ``(indices [Q, k] int64, scores [Q, k] float32)``, best first.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    documents = np.ascontiguousarray(documents, dtype=np.float32)
    k = _check_top_k(top_k, len(documents))
    indices = np.empty((len(queries), k), dtype=np.int64)
    scores = np.empty((len(queries), k), dtype=np.float32)
    for q_start in range(0, len(queries), query_batch_size):
        batch = queries[q_start : q_start + query_batch_size]
        best = _RunningTopK(len(batch), k)
        for start in range(0, len(documents), chunk_size):
            mu = batch @ documents[start : start + chunk_size].T
            threshold = best.threshold()
            passing = mu > threshold[:, None]
            n_passing = int(np.count_nonzero(passing))
            if n_passing > _DENSE_FRACTION * passing.size:
                best.add_dense(start, mu, mu, np.zeros_like(mu))
            elif n_passing:
                rows, cols = np.nonzero(passing)
                values = mu[rows, cols]
                best.add_pairs(rows, cols + start, values, values, np.zeros_like(values))
        score, index, _, _ = best.sorted()
        indices[q_start : q_start + len(batch)] = index
        scores[q_start : q_start + len(batch)] = score
    return indices, scores


class GaussianIndex:
    """Precomputed document terms for exact top-k search by the uncertainty-aware score.

    The score is ``mu_s / sqrt(1 + pi/8 sigma_s^2)`` as defined in
    :mod:`uec_rag.similarity`; the search algorithm and its pruning bound are in
    the module docstring.

    Parameters
    ----------
    documents : GaussianEmbedding
        The documents, ``[N, D]`` (for an ensemble: the combined Gaussian).
    ids : sequence of hashable, optional
        One id per document; default ``0..N-1``.
    precision : {"float32", "float16", "uint8"}, default "float32"
        Storage of the variance factor ``V``. ``float16`` and ``uint8`` store
        ``V / scale`` with one scale per row and half (the half's maximum), which
        costs 4 D or 2 D bytes per document instead of 8 D. ``uint8`` is
        8-bit unsigned (``V >= 0``), rounded to the nearest of 255 steps.
        The means always stay float32.
    chunk_size : int, default 65536
        Documents per step of :meth:`search`; memory per step is about
        ``query_batch_size x chunk_size x 9`` bytes.

    Raises
    ------
    ValueError
        On a wrong number of ids, duplicate ids, or an unknown precision.
    """

    def __init__(
        self,
        documents: GaussianEmbedding,
        ids: Sequence[Hashable] | None = None,
        *,
        precision: Precision = "float32",
        chunk_size: int = 65536,
    ) -> None:
        if not isinstance(documents, GaussianEmbedding):
            raise TypeError(
                f"documents must be a GaussianEmbedding, got {type(documents).__name__}"
            )
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        n_documents = len(documents)
        if ids is None:
            ids = list(range(n_documents))
        else:
            ids = list(ids)
            if len(ids) != n_documents:
                raise ValueError(f"got {len(ids)} ids for {n_documents} documents")
            if len(set(ids)) != len(ids):
                raise ValueError("ids must be unique")

        self.ids: list[Hashable] = ids
        self.precision: Precision = precision
        self.chunk_size = int(chunk_size)
        self.mean = documents.mean
        self._dim = documents.dim
        self.terms, self.term_scales = self._pack_terms(documents, precision)
        logger.debug(
            "built GaussianIndex: %d documents, D=%d, %s", n_documents, self._dim, precision
        )

    @staticmethod
    def _pack_terms(
        documents: GaussianEmbedding, precision: Precision, block: int = 65536
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Compute ``V`` block by block, so the float32 ``V`` never exists in full
        when a smaller storage is chosen."""
        n_documents, dim = len(documents), documents.dim
        dtype = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}[precision]
        codes = np.empty((n_documents, 2 * dim), dtype=dtype)
        scales = None if precision == "float32" else np.empty((n_documents, 2), np.float32)
        for start in range(0, n_documents, block):
            rows = slice(start, min(start + block, n_documents))
            terms = document_terms(documents[rows])
            if scales is None:
                codes[rows] = terms
                continue
            halves = terms.reshape(-1, 2, dim)
            maxima = halves.max(axis=2)
            safe = np.where(maxima > 0, maxima, 1.0).astype(np.float32)
            unit = halves / safe[:, :, None]
            if precision == "float16":
                codes[rows] = unit.reshape(-1, 2 * dim)
                scales[rows] = safe
            else:
                codes[rows] = np.rint(unit * 255).reshape(-1, 2 * dim)
                scales[rows] = safe / 255
        return codes, scales

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    @property
    def dim(self) -> int:
        """Embedding dimension ``D``."""
        return self._dim

    @property
    def nbytes(self) -> int:
        """Bytes held by the means and the variance factor (ids excluded)."""
        scales = 0 if self.term_scales is None else self.term_scales.nbytes
        return int(self.mean.nbytes + self.terms.nbytes + scales)

    def document_terms(self, rows: np.ndarray | slice) -> np.ndarray:
        """Return the variance factor ``V`` of the given documents as float32, ``[n, 2D]``."""
        codes = self.terms[rows]
        if self.term_scales is None:
            return codes
        n_rows = codes.shape[0]
        halves = codes.reshape(n_rows, 2, self._dim).astype(np.float32)
        halves *= self.term_scales[rows][:, :, None]
        return halves.reshape(n_rows, 2 * self._dim)

    def _check_queries(self, queries: GaussianEmbedding) -> None:
        if not isinstance(queries, GaussianEmbedding):
            raise TypeError(f"queries must be a GaussianEmbedding, got {type(queries).__name__}")
        if queries.dim != self._dim:
            raise ValueError(
                f"queries have dimension {queries.dim} but the index has {self._dim}; "
                "encode both with the same members and combination"
            )

    def _pair_sigma2(self, q_terms: np.ndarray, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        sigma2 = np.empty(len(query), dtype=np.float32)
        for begin in range(0, len(query), _PAIR_BATCH):
            end = begin + _PAIR_BATCH
            doc = self.document_terms(rows[begin:end])
            sigma2[begin:end] = np.einsum("pd,pd->p", q_terms[query[begin:end]], doc)
        return np.maximum(sigma2, 0)

    def _dense_sigma2(self, q_terms: np.ndarray, start: int, stop: int) -> np.ndarray:
        step = 8192
        parts = [
            q_terms @ self.document_terms(slice(begin, min(begin + step, stop))).T
            for begin in range(start, stop, step)
        ]
        return np.maximum(np.concatenate(parts, axis=1), 0)

    def search(
        self,
        queries: GaussianEmbedding,
        top_k: int = 10,
        *,
        query_batch_size: int = 64,
        prune: bool = True,
    ) -> SearchResult:
        """Find the ``top_k`` documents with the highest uncertainty-aware score per query.

        Parameters
        ----------
        queries : GaussianEmbedding
            ``[Q, D]`` query Gaussians.
        top_k : int, default 10
            Documents per query; capped at the index size.
        query_batch_size : int, default 64
            Queries scored together per step.
        prune : bool, default True
            Skip the variance of documents that cannot enter the top-k (exact,
            see the module docstring). ``False`` scores every pair densely.

        Returns
        -------
        SearchResult
            Arrays ``[Q, k]``, best first.
        """
        self._check_queries(queries)
        k = _check_top_k(top_k, len(self))
        n_queries = len(queries)
        results = [np.empty((n_queries, k), dtype=dtype) for dtype in (np.float32, np.int64)]
        score_all, index_all = results
        mu_all = np.empty((n_queries, k), dtype=np.float32)
        sigma2_all = np.empty((n_queries, k), dtype=np.float32)

        for q_start in range(0, n_queries, query_batch_size):
            batch = queries[q_start : q_start + query_batch_size]
            q_terms = query_terms(batch)
            best = _RunningTopK(len(batch), k)
            for start in range(0, len(self), self.chunk_size):
                stop = min(start + self.chunk_size, len(self))
                self._search_chunk(best, batch.mean, q_terms, start, stop, prune)
            score, index, mu, sigma2 = best.sorted()
            rows = slice(q_start, q_start + len(batch))
            score_all[rows], index_all[rows], mu_all[rows], sigma2_all[rows] = (
                score,
                index,
                mu,
                sigma2,
            )

        ids = [[self.ids[i] for i in row] for row in index_all.tolist()]
        return SearchResult(index_all, ids, score_all, mu_all, np.sqrt(sigma2_all))

    def _search_chunk(
        self,
        best: _RunningTopK,
        q_mean: np.ndarray,
        q_terms: np.ndarray,
        start: int,
        stop: int,
        prune: bool,
    ) -> None:
        mu = q_mean @ self.mean[start:stop].T
        if not prune:
            sigma2 = self._dense_sigma2(q_terms, start, stop)
            best.add_dense(start, probit_score(mu, sigma2), mu, sigma2)
            return

        threshold = best.threshold()
        seeded: tuple[np.ndarray, np.ndarray] | None = None
        if np.isneginf(threshold).any():
            # Seed the threshold with the exact scores of this chunk's k best means.
            width = stop - start
            kk = min(best.k, width)
            top = np.argpartition(mu, width - kk, axis=1)[:, width - kk :]
            seeded = (np.repeat(np.arange(len(mu)), kk), top.reshape(-1))
            self._add_pairs(best, mu, q_terms, *seeded, start)
            threshold = best.threshold()

        # Upper bound of the score: mu_s when mu_s >= 0, else 0.
        bound = mu if (threshold >= 0).all() else np.maximum(mu, 0)
        passing = bound > threshold[:, None]
        if seeded is not None:
            passing[seeded] = False
        n_passing = int(np.count_nonzero(passing))
        if n_passing == 0:
            return
        if n_passing <= _DENSE_FRACTION * passing.size:
            self._add_pairs(best, mu, q_terms, *np.nonzero(passing), start)
            return

        sigma2 = self._dense_sigma2(q_terms, start, stop)
        score = probit_score(mu, sigma2)
        if seeded is not None:
            score[seeded] = -np.inf  # already merged
        best.add_dense(start, score, mu, sigma2)

    def _add_pairs(
        self,
        best: _RunningTopK,
        mu: np.ndarray,
        q_terms: np.ndarray,
        query: np.ndarray,
        cols: np.ndarray,
        start: int,
    ) -> None:
        """Score the pairs (query, start + cols) exactly and merge them into ``best``."""
        order = np.argsort(query, kind="stable")
        query, cols = query[order], cols[order]
        mu_pairs = mu[query, cols]
        sigma2 = self._pair_sigma2(q_terms, query, cols + start)
        best.add_pairs(query, cols + start, probit_score(mu_pairs, sigma2), mu_pairs, sigma2)

    def score(self, queries: GaussianEmbedding, doc_indices: np.ndarray | Sequence[int]) -> Scores:
        """Score queries against chosen documents, e.g. to rerank candidates.

        Parameters
        ----------
        queries : GaussianEmbedding
            ``[Q, D]``.
        doc_indices : array of int
            Row numbers, shape ``[m]`` (the same documents for every query) or
            ``[Q, m]`` (one list per query).

        Returns
        -------
        Scores
            Arrays of shape ``[Q, m]``.
        """
        self._check_queries(queries)
        indices = np.asarray(doc_indices)
        if indices.size and not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"doc_indices must be integers, got dtype {indices.dtype}")
        indices = indices.astype(np.int64)
        n_queries = len(queries)
        if indices.ndim == 1:
            indices = np.broadcast_to(indices, (n_queries, len(indices)))
        if indices.ndim != 2 or indices.shape[0] != n_queries:
            raise ValueError(
                f"doc_indices must have shape [m] or [Q, m] with Q = {n_queries}, "
                f"got {list(indices.shape)}"
            )
        out_of_range = (indices < 0) | (indices >= len(self))
        if out_of_range.any():
            bad = tuple(int(i) for i in np.argwhere(out_of_range)[0])
            raise IndexError(
                f"doc_indices{list(bad)} = {indices[bad]} is outside the index "
                f"of {len(self)} documents"
            )

        query = np.repeat(np.arange(n_queries), indices.shape[1])
        rows = indices.reshape(-1)
        mu = np.empty(len(rows), dtype=np.float32)
        for begin in range(0, len(rows), _PAIR_BATCH):
            end = begin + _PAIR_BATCH
            mu[begin:end] = np.einsum(
                "pd,pd->p", queries.mean[query[begin:end]], self.mean[rows[begin:end]]
            )
        sigma2 = self._pair_sigma2(query_terms(queries), query, rows)
        shape = indices.shape
        return Scores(
            probit_score(mu, sigma2).reshape(shape),
            mu.reshape(shape),
            np.sqrt(sigma2).reshape(shape),
        )
