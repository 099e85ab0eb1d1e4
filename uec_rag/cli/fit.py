"""``uec-rag fit``: fit a last-layer Laplace posterior from query-passage pairs."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register the ``fit`` subcommand."""
    from uec_rag.laplace.curvature import CURVATURES, DEFAULT_CURVATURE, DEFAULT_TEMPERATURE
    from uec_rag.laplace.fit import DEFAULT_BATCH_SIZE, DEFAULT_HELD_OUT_FRACTION

    parser = subparsers.add_parser(
        "fit",
        help="fit a Laplace posterior over a model's last linear layer",
        description=(
            "Fit a diagonal Laplace posterior over the last linear layer of a model from "
            "(query, positive passage) pairs with the in-batch InfoNCE likelihood. The prior "
            "precision maximises the Laplace log marginal likelihood, and the variance scale "
            "matches the posterior's covariance trace to the squared distance between "
            "held-out queries and their positive passages."
        ),
    )
    parser.add_argument(
        "--model", required=True, help="preset name (minilm, mpnet, e5-small) or model folder"
    )
    parser.add_argument(
        "--data",
        required=True,
        action="append",
        type=Path,
        help='BEIR folder or JSONL file of {"query", "positive"} lines; repeat for several',
    )
    parser.add_argument(
        "--split", default="train", help="qrels split read from BEIR folders (default: train)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    parser.add_argument(
        "--curvature",
        choices=CURVATURES,
        default=DEFAULT_CURVATURE,
        help="ggn: diagonal generalised Gauss-Newton; ef: diagonal empirical Fisher "
        f"(default: {DEFAULT_CURVATURE})",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        help=f"InfoNCE temperature (default: {DEFAULT_TEMPERATURE})",
    )
    parser.add_argument(
        "--max-pairs",
        type=int,
        default=None,
        help="use at most this many pairs, drawn at random with --seed (default: all)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"pairs per InfoNCE batch; the batch's other passages are the negatives "
        f"(default: {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--held-out",
        type=float,
        default=DEFAULT_HELD_OUT_FRACTION,
        help="share of the pairs held out to choose the variance scale "
        f"(default: {DEFAULT_HELD_OUT_FRACTION})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default: 0)")
    parser.add_argument(
        "--dtype",
        choices=("float16", "float32"),
        default="float32",
        help="storage type of the variances in the file (default: float32)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Fit, save and report; return the exit status (0 on success, 2 on bad input)."""
    import torch

    from uec_rag.datasets import DataFormatError, gather_pairs
    from uec_rag.encoders import load_encoder
    from uec_rag.laplace.fit import fit_posterior

    write = sys.stdout.write
    problems: list[str] = []
    if args.max_pairs is not None and args.max_pairs < 2:
        problems.append(f"--max-pairs must be >= 2, got {args.max_pairs}")
    if args.batch_size < 2:
        problems.append(f"--batch-size must be >= 2 (in-batch negatives), got {args.batch_size}")
    if not 0.0 <= args.held_out < 1.0:
        problems.append(f"--held-out must be in [0, 1), got {args.held_out}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        problems.append(f"--temperature must be finite and > 0, got {args.temperature}")
    if problems:
        sys.stderr.write("".join(f"error: {problem}\n" for problem in problems))
        return 2

    try:
        pairs, description = gather_pairs(
            args.data, args.split, max_pairs=args.max_pairs, seed=args.seed
        )
    except (FileNotFoundError, DataFormatError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 2

    try:
        member = load_encoder(args.model, posterior=None)
    except (ValueError, FileNotFoundError) as error:
        sys.stderr.write(f"error: --model {args.model}: {error}\n")
        return 2
    try:
        result = fit_posterior(
            member,
            pairs,
            temperature=args.temperature,
            curvature=args.curvature,
            batch_size=args.batch_size,
            held_out_fraction=args.held_out,
            seed=args.seed,
            data_description=description,
            show_progress=True,
        )
    except ValueError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    dtype = torch.float16 if args.dtype == "float16" else torch.float32
    path = result.posterior.save(args.out, dtype=dtype)

    write(f"model: {args.model} ({member.layer_name})\n")
    write(f"data: {description}\n")
    write(f"pairs: {result.n_fit} for the curvature, {result.n_held_out} held out\n")
    write(f"curvature: {args.curvature}, temperature: {args.temperature}\n")
    write(f"prior precision: {result.prior_precision:.6g}\n")
    write(f"log marginal likelihood: {result.log_marginal_likelihood:.6g}\n")
    write(f"effective parameters: {result.effective_parameters:.1f}\n")
    write(f"variance scale: {result.variance_scale:.6g}\n")
    if result.held_out_log_likelihood is not None:
        write(
            "held-out InfoNCE log-likelihood per query of the uncertainty-aware similarity: "
            f"{result.held_out_log_likelihood:.4f} "
            f"(scale 1: {result.held_out_log_likelihood_unscaled:.4f}, "
            f"no variance: {result.held_out_log_likelihood_deterministic:.4f})\n"
        )
    write(f"reference trace: {result.reference_trace:.6g}\n")
    write(f"time: {result.seconds:.1f} s\n")
    write(f"wrote {path}\n")
    return 0
