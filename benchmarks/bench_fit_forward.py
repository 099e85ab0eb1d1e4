"""Benchmark: the forward-pass floor under a posterior fit.

Draws the fit pairs exactly as ``uec-rag fit --max-pairs N`` does by default and times
the plain ``encode`` of their distinct queries and distinct passages, each text
once and sorted by length. No fit can read these pairs in less time, so the
number shows how much of a fit's time the model's own forward passes take.

Usage::

    UEC_RAG_DATA=/path/to/data python benchmarks/bench_fit_forward.py \\
        [--model mpnet] [--max-pairs 1000]

The pairs come from the training splits of XQuAD en, ru, zh, ar and SciFact,
the mix of the shipped posteriors.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from uec_rag._allocator import keep_freed_memory
from uec_rag.datasets import gather_pairs
from uec_rag.encoders import load_encoder

DATASETS = ("xquad-en", "xquad-ru", "xquad-zh", "xquad-ar", "scifact")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mpnet", help="preset or model folder")
    parser.add_argument("--max-pairs", type=int, default=1000)
    args = parser.parse_args()
    data = os.environ.get("UEC_RAG_DATA")
    if not data:
        parser.error("set UEC_RAG_DATA to the folder holding xquad-en, ..., scifact")

    keep_freed_memory()  # as the command line does
    pairs, description = gather_pairs(
        [Path(data) / name for name in DATASETS], max_pairs=args.max_pairs, seed=0
    )
    member = load_encoder(args.model)
    member.encode(["warm up"], "query")
    queries = sorted({query for query, _ in pairs})
    passages = sorted({passage for _, passage in pairs})

    started = time.perf_counter()
    member.encode(queries, "query")
    middle = time.perf_counter()
    member.encode(passages, "document")
    ended = time.perf_counter()
    print(f"{args.model}: {description}")
    print(f"{len(queries)} distinct queries: {middle - started:.1f} s")
    print(f"{len(passages)} distinct passages: {ended - middle:.1f} s")
    print(f"forward floor: {ended - started:.1f} s")


if __name__ == "__main__":
    main()
