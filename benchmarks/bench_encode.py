"""Time probabilistic encoding against sentence-transformers' plain ``encode``.

For each preset, the same real passages are encoded by
``ProbabilisticEncoder.encode`` (mean and delta-method variance) and by
``SentenceTransformer.encode`` of the same model folder, in the same process, with
the same batch size. The passages are split into blocks, and both encode each
block, alternating which goes first so that machine load affects both alike. The
script reports the median of the per-block time ratios (probabilistic /
deterministic) and the ratio of the totals.

Passages: an equal share of XQuAD paragraphs in English, Russian, Chinese and
Arabic, and SciFact abstracts (title and text), read from ``$UEC_RAG_DATA``.

Usage::

    UEC_RAG_DATA=/path/to/data python benchmarks/bench_encode.py --presets minilm mpnet e5-small
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from uec_rag.encoders import load_encoder

XQUAD = ("xquad-en", "xquad-ru", "xquad-zh", "xquad-ar")


def read_passages(data_dir: Path, count: int) -> list[str]:
    """Return ``count`` passages: 15 % from each XQuAD language, the rest from SciFact."""
    per_language = int(count * 0.15)
    passages: list[str] = []
    for name in XQUAD:
        with open(data_dir / name / "corpus.jsonl", encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle]
        passages += [row["text"] for row in rows[:per_language]]
    with open(data_dir / "scifact" / "corpus.jsonl", encoding="utf-8") as handle:
        for line in handle:
            if len(passages) >= count:
                break
            row = json.loads(line)
            passages.append(f"{row.get('title', '')} {row['text']}".strip())
    if len(passages) < count:
        raise ValueError(
            f"{data_dir} contains only {len(passages)} passages, but {count} were requested; "
            "pass a smaller --passages"
        )
    return passages


def bench_preset(
    preset: str, passages: list[str], batch_size: int, block_size: int, repeats: int
) -> dict[str, float]:
    """Return the median block ratio, the total ratio and both total times for one preset."""
    from sentence_transformers import SentenceTransformer

    encoder = load_encoder(preset, posterior="auto", batch_size=batch_size)
    reference = SentenceTransformer(encoder.model_path, device="cpu")
    reference.max_seq_length = encoder.max_seq_length
    prefixed = [encoder.prefix("document") + text for text in passages]

    def run_probabilistic(start: int) -> float:
        began = time.perf_counter()
        encoder.encode(passages[start : start + block_size], "document", show_progress=False)
        return time.perf_counter() - began

    def run_reference(start: int) -> float:
        began = time.perf_counter()
        reference.encode(
            prefixed[start : start + block_size],
            batch_size=batch_size,
            show_progress_bar=False,
            convert_to_numpy=True,
        )
        return time.perf_counter() - began

    # Warm-up on one batch each, so that lazy initialisation is not timed.
    run_probabilistic(0)
    run_reference(0)

    ratios: list[float] = []
    totals = {"probabilistic": 0.0, "deterministic": 0.0}
    block = 0
    for _ in range(repeats):
        for start in range(0, len(passages), block_size):
            if block % 2 == 0:
                probabilistic = run_probabilistic(start)
                deterministic = run_reference(start)
            else:
                deterministic = run_reference(start)
                probabilistic = run_probabilistic(start)
            block += 1
            ratios.append(probabilistic / deterministic)
            totals["probabilistic"] += probabilistic
            totals["deterministic"] += deterministic
            sys.stderr.write(
                f"{preset} block {block}: {probabilistic:.2f}s vs {deterministic:.2f}s "
                f"ratio {ratios[-1]:.3f}\n"
            )
    return {
        "median_ratio": statistics.median(ratios),
        "total_ratio": totals["probabilistic"] / totals["deterministic"],
        "probabilistic_s": totals["probabilistic"],
        "deterministic_s": totals["deterministic"],
        "blocks": float(len(ratios)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["minilm", "mpnet", "e5-small"])
    parser.add_argument("--passages", type=int, default=1000, help="number of passages")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    parser.add_argument("--block-size", type=int, default=64, help="passages per timed block")
    parser.add_argument("--repeats", type=int, default=1, help="passes over the passages")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()

    logging.basicConfig(level=logging.ERROR)
    data = os.environ.get("UEC_RAG_DATA")
    if not data:
        parser.error("set UEC_RAG_DATA to the folder holding xquad-en, ..., scifact")
    if args.threads:
        torch.set_num_threads(args.threads)
    passages = read_passages(Path(data), args.passages)

    sys.stdout.write(f"torch threads: {torch.get_num_threads()}, passages: {len(passages)}\n")
    sys.stdout.write(
        "| preset | median block ratio | total ratio | probabilistic (s) | deterministic (s) |\n"
    )
    sys.stdout.write("|---|---|---|---|---|\n")
    for preset in args.presets:
        result = bench_preset(preset, passages, args.batch_size, args.block_size, args.repeats)
        sys.stdout.write(
            f"| {preset} | {result['median_ratio']:.3f} | {result['total_ratio']:.3f} | "
            f"{result['probabilistic_s']:.1f} | {result['deterministic_s']:.1f} |\n"
        )
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
