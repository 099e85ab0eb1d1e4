"""Benchmark: reranking 100 retrieved documents with a warm vs a cold Gaussian cache.

Cold: the documents' Gaussians are not cached, so ``UECReranker`` encodes the
query and all 100 documents with the three bundled models. Warm: the documents
were embedded before (as a vector store built with ``UECEmbeddings`` does), so
the reranker encodes only the query and reads 100 Gaussians from the SQLite
cache. Both use the persistent SQLite store in a temporary folder, in the same
process, with models loaded beforehand.

Usage::

    UEC_RAG_DATA=/path/to/data python benchmarks/bench_rerank.py [--repeats 3]

Documents are the first 100 XQuAD-en passages; queries are XQuAD-en questions.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from langchain_core.documents import Document

from uec_rag.cache import SQLiteGaussianCache
from uec_rag.datasets import load_beir
from uec_rag.integrations.langchain import UECEmbeddings, UECReranker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ["UEC_RAG_DATA"]) if os.environ.get("UEC_RAG_DATA") else None,
        help="folder holding xquad-en (default: $UEC_RAG_DATA)",
    )
    parser.add_argument("--documents", type=int, default=100, help="documents per rerank call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per condition")
    args = parser.parse_args()
    if args.data is None or not (args.data / "xquad-en").is_dir():
        parser.error("set UEC_RAG_DATA or --data to a folder that holds xquad-en")

    dataset = load_beir(args.data / "xquad-en", "test")
    passages = [dataset.corpus[doc_id] for doc_id in sorted(dataset.corpus)[: args.documents]]
    documents = [Document(page_content=text) for text in passages]
    queries = [dataset.queries[query_id] for query_id in sorted(dataset.queries)]

    with tempfile.TemporaryDirectory() as folder:
        # Load the models once, outside the timings.
        UECEmbeddings(cache=None).embed_query("warm up")

        cold_times = []
        for repeat in range(args.repeats):
            cache = SQLiteGaussianCache(Path(folder) / f"cold-{repeat}.sqlite")
            reranker = UECReranker(embeddings=UECEmbeddings(cache=cache), top_n=10)
            start = time.perf_counter()
            reranker.compress_documents(documents, queries[repeat])
            cold_times.append(time.perf_counter() - start)

        cache = SQLiteGaussianCache(Path(folder) / "warm.sqlite")
        embeddings = UECEmbeddings(cache=cache)
        embeddings.embed_documents(passages)
        reranker = UECReranker(embeddings=embeddings, top_n=10)
        warm_times = []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            reranker.compress_documents(documents, queries[args.repeats + repeat])
            warm_times.append(time.perf_counter() - start)

    cold = statistics.median(cold_times)
    warm = statistics.median(warm_times)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"documents per rerank: {len(documents)}, repeats: {args.repeats}")
    print(f"cold cache: median {cold:.3f} s  (runs {[round(t, 3) for t in cold_times]})")
    print(f"warm cache: median {warm:.3f} s  (runs {[round(t, 3) for t in warm_times]})")
    print(f"cold / warm: {cold / warm:.1f}x")


if __name__ == "__main__":
    main()
