"""The ``uec-rag`` command line.

Each subcommand lives in its own module of this package and provides
``add_parser(subparsers)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from uec_rag._allocator import keep_freed_memory

__all__ = ["main"]

SUBCOMMANDS: tuple[str, ...] = ("encode", "fit", "eval")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with one sub-parser per subcommand module."""
    parser = argparse.ArgumentParser(
        prog="uec-rag",
        description="Uncertainty-aware ensembles of text-embedding models.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"uec_rag.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"uec_rag.cli.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if os.environ.get("UEC_RAG_KEEP_FREED_MEMORY", "1") != "0":
        keep_freed_memory()
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
