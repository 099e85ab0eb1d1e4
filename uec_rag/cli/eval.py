"""``uec-rag eval``: compare UEC with its members and simpler ensembles on real data."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["DATA_ENV", "add_parser", "find_sample_corpus", "resolve_data_paths", "run"]

logger = logging.getLogger(__name__)

DATA_ENV = "UEC_RAG_DATA"
"""Environment variable naming a folder of BEIR data sets (and an ``stsb/`` folder)."""

SAMPLE_CORPUS = Path("examples") / "sample_corpus"

BAD_MEMBER_LABEL = "sre-bad"
"""Row label of the robustness run's extra member, sre-embedding-model."""


def find_sample_corpus() -> Path | None:
    """Find the sample corpus under the current folder or the repository checkout."""
    checkout = Path(__file__).resolve().parents[2]
    for base in (Path.cwd(), checkout):
        candidate = base / SAMPLE_CORPUS
        if candidate.is_dir():
            return candidate
    return None


def resolve_data_paths(data: list[str] | None) -> tuple[list[Path], str]:
    """Choose the data: ``--data``, else ``$UEC_RAG_DATA``, else the sample corpus.

    Returns the paths and a short description of where they came from.

    Raises
    ------
    FileNotFoundError
        If none of the three is available.
    """
    if data:
        return [Path(path) for path in data], "--data"
    env_value = os.environ.get(DATA_ENV)
    if env_value:
        return [Path(env_value)], f"${DATA_ENV}"
    sample = find_sample_corpus()
    if sample is not None:
        return [sample], "the sample corpus"
    raise FileNotFoundError(
        f"no data to evaluate: pass --data PATH (a BEIR folder, an STS <name>-test.csv file, "
        f"or a folder of them), set {DATA_ENV}, or run from a checkout that has "
        f"{SAMPLE_CORPUS}"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` on the top-level sub-parsers."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate UEC against its members and simpler ensembles",
        description=(
            "Encode each data set once per member (cached on disk), score it with every "
            "method (single members, oracle, uniform, weighted, RRF, UEC and its "
            "ablations) and write a table, a JSON file, a Markdown report and plots. "
            f"Data: --data, else ${DATA_ENV}, else the sample corpus in {SAMPLE_CORPUS}."
        ),
    )
    parser.add_argument(
        "--data",
        action="append",
        metavar="PATH",
        help="a BEIR folder, an STS <name>-test.csv file (tuned on <name>-dev.csv), or a "
        "folder of them; repeat for several",
    )

    parser.add_argument(
        "--members",
        default="minilm,mpnet,e5-small",
        help="comma-separated presets or model folders (default: %(default)s)",
    )

    parser.add_argument(
        "--max-queries",
        type=_positive_int,
        metavar="N",
        help="use at most N queries per split and N pairs per STS file (default: all)",
    )

    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results") / "eval",
        metavar="DIR",
        help="folder for results.json, report.md and img/ (default: %(default)s)",
    )

    parser.add_argument(
        "--robustness",
        action="store_true",
        help=(
            "also run every method with sre-embedding-model added as a bad fourth member; "
            "its posterior is first fitted on up to 400 train pairs of the retrieval sets"
        ),
    )

    parser.add_argument(
        "--tuning-budget",
        type=_positive_int,
        default=28,
        metavar="N",
        help="grid points for the weighted ensemble and for tuned UEC (default: %(default)s)",
    )

    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        help="encoder batch size (default: each member's own)",
    )

    parser.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        metavar="N",
        help="encode with up to N members at once, each in its own process, before scoring "
        "(default: %(default)s)",
    )

    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="encode everything again instead of reading stored embeddings",
    )

    parser.set_defaults(run=run)
    return parser


def _command(args: argparse.Namespace) -> str:
    parts = ["uec-rag", "eval"]
    for path in args.data or []:
        parts += ["--data", str(path)]
    parts += ["--members", args.members]
    if args.max_queries:
        parts += ["--max-queries", str(args.max_queries)]
    parts += ["--out", str(args.out)]
    if args.robustness:
        parts.append("--robustness")
    if args.jobs > 1:
        parts += ["--jobs", str(args.jobs)]
    if args.tuning_budget != 28:
        parts += ["--tuning-budget", str(args.tuning_budget)]
    return shlex.join(parts)


def _encode_in_parallel(tasks: list, members: list, settings: Any, jobs: int) -> None:
    """Fill the embedding store with one worker process per member (members pickle)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from uec_rag.evaluation.runner import encode_tasks

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(jobs, len(members)), mp_context=context) as pool:
        futures = [
            pool.submit(encode_tasks, tasks, member, settings=settings) for member in members
        ]
        for future in futures:
            future.result()


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; return 0 on success, 2 on missing data or members."""
    from uec_rag.encoders import load_encoder
    from uec_rag.evaluation.embedding_store import EmbeddingStore
    from uec_rag.evaluation.plots import plot_coefficients, plot_reliability
    from uec_rag.evaluation.report import (
        markdown_report,
        robustness_losses,
        terminal_report,
        write_json,
    )
    from uec_rag.evaluation.runner import (
        EvalSettings,
        bad_member_path,
        find_tasks,
        fit_missing_posterior,
        run_evaluation,
    )

    started = time.perf_counter()
    try:
        paths, source = resolve_data_paths(args.data)
        tasks = find_tasks(paths)
    except FileNotFoundError as error:
        sys.stderr.write(f"uec-rag eval: {error}\n")
        return 2
    sys.stderr.write(
        f"uec-rag eval: {len(tasks)} data sets from {source}: "
        f"{', '.join(task.name for task in tasks)}\n"
    )

    names = [name.strip() for name in args.members.split(",") if name.strip()]
    if not names:
        sys.stderr.write("uec-rag eval: --members is empty; give e.g. minilm,mpnet,e5-small\n")
        return 2
    members = [load_encoder(name) for name in names]
    settings = EvalSettings(
        max_queries=args.max_queries,
        tuning_budget=args.tuning_budget,
        batch_size=args.batch_size,
    )
    store = EmbeddingStore(enabled=not args.no_cache)

    bad = None
    if args.robustness:
        try:
            bad_path = bad_member_path()
        except (ModuleNotFoundError, FileNotFoundError) as error:
            sys.stderr.write(f"uec-rag eval: {error}\n")
            return 2
        bad = fit_missing_posterior(load_encoder(bad_path), tasks)
    if args.jobs > 1 and store.enabled:
        _encode_in_parallel(tasks, [*members, *([bad] if bad else [])], settings, args.jobs)

    runs = {"main": run_evaluation(tasks, members, labels=names, settings=settings, store=store)}
    results: dict[str, Any] = {"command": _command(args), "data_source": source, "runs": runs}
    if bad is not None:
        runs["robustness"] = run_evaluation(
            tasks,
            [*members, bad],
            labels=[*names, BAD_MEMBER_LABEL],
            settings=settings,
            store=store,
        )
        results["robustness_member"] = {"label": BAD_MEMBER_LABEL, "path": bad.name}
        results["robustness_losses"] = robustness_losses(runs["main"], runs["robustness"])
    results["wall_time_s"] = time.perf_counter() - started

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = {
        "coefficients": plot_coefficients(runs["main"], out / "img" / "coefficients.png"),
        "reliability": plot_reliability(runs["main"], out / "img" / "reliability.png"),
    }
    results["plots"] = {name: str(path) if path else None for name, path in images.items()}
    write_json(results, out / "results.json")
    (out / "report.md").write_text(markdown_report(results, image_dir="img"), encoding="utf-8")

    sys.stdout.write(terminal_report(results))
    sys.stdout.write(f"results written to {out}/ (results.json, report.md, img/)\n")
    return 0
