"""Benchmark of the UEC core: coefficients, combination and uncertainty-aware search.

Not a test. Three parts, each printing Markdown rows for docs/benchmarks.md:

``combine``
    Coefficients (inverse trace) plus ``direct_sum`` / ``convolution`` for
    ``--items`` items and K = 3 members (dims 384/768/384, or 3 x 384), as time
    per call and as a ratio to plain concatenation of the same means.
``search``
    Top-10 search by the uncertainty-aware score over ``--documents`` synthetic
    documents (D = ``--dim``) for 1 and 64 queries, as a ratio to a plain
    float32 inner-product top-10 over the same means in the same process, for
    each storage precision, with the peak extra memory of one search call
    (tracemalloc) and the index size.
``real``
    Top-10 agreement of float16 / uint8 storage with float32 on real queries:
    the bundled members encode the data sets under ``$UEC_RAG_DATA``
    (through the evaluation's embedding store, so embeddings that ``uec-rag
    eval`` already computed are read back), are combined by UEC
    (``direct_sum``, default rule) and searched.

Usage::

    python benchmarks/bench_scoring.py combine --items 100000
    python benchmarks/bench_scoring.py search --documents 1000000 --dim 384
    python benchmarks/bench_scoring.py real --datasets xquad-en xquad-ru scifact
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from uec_rag.coefficients import compute_coefficients, member_traces
from uec_rag.combine import combine
from uec_rag.gaussian import GaussianEmbedding
from uec_rag.index import PRECISIONS, GaussianIndex, inner_product_top_k


def write(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def median_time(function: Callable[[], object], repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_extra_bytes(function: Callable[[], object]) -> int:
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    function()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def synthetic_gaussians(
    rng: np.random.Generator, n: int, dim: int, trace: float, block: int = 65536
) -> GaussianEmbedding:
    """Unit-norm random means; variances with mean trace ``trace`` and per-item spread."""
    mean = np.empty((n, dim), dtype=np.float32)
    variance = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        rows = rng.standard_normal((stop - start, dim), dtype=np.float32)
        mean[start:stop] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        scale = rng.uniform(0.5, 1.5, size=(stop - start, 1)).astype(np.float32)
        variance[start:stop] = (
            (trace / dim)
            * scale
            * rng.uniform(0.5, 1.5, size=(stop - start, dim)).astype(np.float32)
        )
    return GaussianEmbedding(mean, variance)


def near_queries(
    rng: np.random.Generator, documents: GaussianEmbedding, n: int, trace: float
) -> GaussianEmbedding:
    """Queries close to random documents (cosine about 0.7), as in retrieval."""
    dim = documents.dim
    picks = rng.choice(len(documents), size=n, replace=False)
    noise = rng.standard_normal((n, dim), dtype=np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    mean = 0.7 * documents.mean[picks] + 0.71 * noise
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    variance = np.full((n, dim), trace / dim, dtype=np.float32)
    return GaussianEmbedding(mean, variance)


def run_combine(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    write(f"### Coefficients + combination, {args.items:,} items, K = 3")
    write()
    write("| combination | dims | time (s) | ratio to concatenating the means |")
    write("|---|---|---|---|")
    for kind, dims in (("direct_sum", (384, 768, 384)), ("convolution", (384, 384, 384))):
        members = [synthetic_gaussians(rng, args.items, dim, 0.03) for dim in dims]

        def uec(members: list[GaussianEmbedding] = members, kind: str = kind) -> None:
            coefficients = compute_coefficients(member_traces(members))
            combine(members, coefficients, kind)  # type: ignore[arg-type]

        def concatenate(members: list[GaussianEmbedding] = members) -> None:
            np.concatenate([member.mean for member in members], axis=1)

        uec_time = median_time(uec, args.repeats)
        base_time = median_time(concatenate, args.repeats)
        write(f"| {kind} | {dims} | {uec_time:.3f} | {uec_time / base_time:.2f} |")
        del members
        gc.collect()
    write()


def run_search(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(1)
    write(
        f"### Top-{args.top_k} search, {args.documents:,} documents, D = {args.dim}, "
        f"mean trace {args.trace}"
    )
    write()
    start = time.perf_counter()
    documents = synthetic_gaussians(rng, args.documents, args.dim, args.trace)
    write(f"(generated documents in {time.perf_counter() - start:.1f} s)")
    write()
    write(
        "| queries | method | time (s) | ratio to plain top-k | "
        "ratio to chunked plain top-k | peak extra memory (MB) | index (MB) |"
    )
    write("|---|---|---|---|---|---|---|")

    for n_queries in (1, 64):
        queries = near_queries(rng, documents, n_queries, args.trace)

        def plain(queries: GaussianEmbedding = queries) -> None:
            scores = queries.mean @ documents.mean.T
            np.argpartition(-scores, args.top_k - 1, axis=1)[:, : args.top_k]

        def plain_chunked(queries: GaussianEmbedding = queries) -> None:
            inner_product_top_k(queries.mean, documents.mean, args.top_k)

        plain_time = median_time(plain, args.repeats)
        chunked_time = median_time(plain_chunked, args.repeats)
        mean_mb = documents.mean.nbytes / 2**20
        for name, seconds, function in (
            ("plain float32 matmul + argpartition", plain_time, plain),
            ("plain float32, chunked running top-k", chunked_time, plain_chunked),
        ):
            write(
                f"| {n_queries} | {name} | {seconds:.3f} | {seconds / plain_time:.2f} | "
                f"{seconds / chunked_time:.2f} | {peak_extra_bytes(function) / 2**20:.0f} | "
                f"{mean_mb:.0f} |"
            )

        for precision in args.precisions:
            index = GaussianIndex(documents, precision=precision)
            modes = [True, False] if args.dense else [True]
            for prune in modes:

                def search(
                    index: GaussianIndex = index,
                    queries: GaussianEmbedding = queries,
                    prune: bool = prune,
                ) -> None:
                    index.search(queries, args.top_k, prune=prune)

                seconds = median_time(search, args.repeats if prune else 1)
                label = f"UEC score, {precision}" + ("" if prune else ", dense (no pruning)")
                write(
                    f"| {n_queries} | {label} | {seconds:.3f} | {seconds / plain_time:.2f} | "
                    f"{seconds / chunked_time:.2f} | {peak_extra_bytes(search) / 2**20:.0f} | "
                    f"{index.nbytes / 2**20:.0f} |"
                )
            del index
            gc.collect()
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write()
    write(f"Process peak RSS: {maxrss_mb:.0f} MB.")
    write()


def run_real(args: argparse.Namespace) -> None:
    from uec_rag.combine import combine_members
    from uec_rag.datasets import load_beir
    from uec_rag.encoders import load_encoder
    from uec_rag.evaluation.embedding_store import EmbeddingStore

    data = os.environ.get("UEC_RAG_DATA")
    if not data:
        raise SystemExit("set UEC_RAG_DATA to the folder holding the BEIR data sets")
    store = EmbeddingStore()
    members = [load_encoder(name) for name in args.members]

    write(f"### Reduced-precision top-{args.top_k} agreement with float32, real queries")
    write()
    write(f"Members: {', '.join(args.members)}; combination direct_sum, default rule.")
    write()
    write("| data set | queries | documents | float16 | uint8 |")
    write("|---|---|---|---|---|")
    for name in args.datasets:
        dataset = load_beir(Path(data) / name, split=args.split)
        doc_ids = list(dataset.corpus)
        query_ids = list(dataset.queries)
        doc_texts = [dataset.corpus[i] for i in doc_ids]
        query_texts = [dataset.queries[i] for i in query_ids]
        doc_members = [
            store.encode(member, doc_texts, "document", description=f"{name} documents")
            for member in members
        ]
        query_members = [
            store.encode(member, query_texts, "query", description=f"{name} {args.split}")
            for member in members
        ]
        documents, _ = combine_members(doc_members)
        queries, _ = combine_members(query_members)
        reference = GaussianIndex(documents).search(queries, args.top_k).indices
        agreement = {}
        for precision in ("float16", "uint8"):
            found = GaussianIndex(documents, precision=precision).search(queries, args.top_k)
            agreement[precision] = (found.indices == reference).all(axis=1).mean()
        write(
            f"| {name} | {len(query_ids)} | {len(doc_ids)} | "
            f"{agreement['float16']:.2%} | {agreement['uint8']:.2%} |"
        )
    write()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    combine_parser = sub.add_parser("combine", help="coefficients + combination")
    combine_parser.add_argument("--items", type=int, default=100_000)
    combine_parser.add_argument("--repeats", type=int, default=3)
    search_parser = sub.add_parser("search", help="synthetic top-k search")
    search_parser.add_argument("--documents", type=int, default=1_000_000)
    search_parser.add_argument("--dim", type=int, default=384)
    search_parser.add_argument(
        "--trace", type=float, default=0.03, help="mean covariance trace per item"
    )
    search_parser.add_argument("--top-k", type=int, default=10)
    search_parser.add_argument("--repeats", type=int, default=3)
    search_parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    search_parser.add_argument(
        "--dense", action="store_true", help="also time the dense path without pruning"
    )
    real_parser = sub.add_parser("real", help="reduced-precision agreement on real data")
    real_parser.add_argument("--datasets", nargs="+", default=["xquad-en", "xquad-ru"])
    real_parser.add_argument("--members", nargs="+", default=["minilm", "mpnet", "e5-small"])
    real_parser.add_argument("--split", default="test")
    real_parser.add_argument("--top-k", type=int, default=10)
    args = parser.parse_args()

    write(
        f"<!-- {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"numpy {np.__version__}, python {platform.python_version()} -->"
    )
    {"combine": run_combine, "search": run_search, "real": run_real}[args.part](args)


if __name__ == "__main__":
    main()
