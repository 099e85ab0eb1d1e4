"""Loaders for retrieval and similarity data sets.

The retrieval format is the BEIR layout: a folder with ``corpus.jsonl``
(``{"_id", "title", "text"}`` per line), ``queries.jsonl`` (``{"_id", "text"}``)
and ``qrels/<split>.tsv`` (``query-id, corpus-id, score`` with a header line).
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uec_rag._io import atomic_file

__all__ = [
    "BeirDataset",
    "DataFormatError",
    "StsDataset",
    "convert_squad_to_beir",
    "load_beir",
    "load_sts",
]


class DataFormatError(ValueError):
    """A data file is malformed; the message names the file, line and field.

    ``line`` is 1-based; 0 means the problem concerns the whole file, and the
    message then names no line.
    """

    def __init__(self, path: Path | str, line: int, message: str) -> None:
        where = f"{path}, line {line}" if line > 0 else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path = Path(path)
        self.line = line

    @classmethod
    def from_json(cls, path: Path | str, line: int, error: json.JSONDecodeError) -> DataFormatError:
        """Describe a JSON syntax error with its column and reason."""
        reason = error.msg.removesuffix(" at")
        return cls(path, line, f"invalid JSON at column {error.colno}: {reason}")


@dataclass
class BeirDataset:
    """A retrieval data set in memory.

    Attributes
    ----------
    name : str
        Folder name, e.g. ``"xquad-ru"``.
    corpus : dict[str, str]
        Document id to document text (title and text joined by a blank line
        when the title is non-empty).
    queries : dict[str, str]
        Query id to query text, restricted to queries that have judgements in
        the loaded split.
    qrels : dict[str, dict[str, int]]
        Query id to ``{document id: relevance}``.
    split : str
        The qrels split that was loaded.
    """

    name: str
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    split: str
    titles: dict[str, str] = field(default_factory=dict)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                raise DataFormatError.from_json(path, line_number, error) from None
            if not isinstance(record, dict):
                raise DataFormatError(
                    path, line_number, f"expected a JSON object, got {type(record).__name__}"
                )
            yield line_number, record


def _string_field(path: Path, line: int, record: dict[str, Any], name: str) -> str:
    if name not in record:
        raise DataFormatError(path, line, f"missing field {name!r}")
    value = record[name]
    if isinstance(value, int) and not isinstance(value, bool) and name == "_id":
        value = str(value)
    if not isinstance(value, str):
        raise DataFormatError(
            path, line, f"field {name!r} must be a string, got {type(value).__name__}"
        )
    return value


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    """Read a BEIR qrels TSV file (header ``query-id corpus-id score``)."""
    return _read_qrels(path)[0]


def _read_qrels(path: Path) -> tuple[dict[str, dict[str, int]], dict[tuple[str, str], int]]:
    """Read a qrels file and also return the line number of each judgement."""
    qrels: dict[str, dict[str, int]] = {}
    lines: dict[tuple[str, str], int] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        for line_number, row in enumerate(reader, start=1):
            if not row or (line_number == 1 and row[0] == "query-id"):
                continue
            if len(row) != 3:
                raise DataFormatError(
                    path, line_number, f"expected 3 tab-separated fields, got {len(row)}"
                )
            query_id, doc_id, score = row
            try:
                relevance = int(score)
            except ValueError:
                raise DataFormatError(
                    path, line_number, f"field 'score' must be an integer, got {score!r}"
                ) from None
            qrels.setdefault(query_id, {})[doc_id] = relevance
            lines.setdefault((query_id, doc_id), line_number)
    return qrels, lines


def load_beir(path: str | Path, split: str = "test") -> BeirDataset:
    """Load a BEIR-layout folder.

    Parameters
    ----------
    path : str or Path
        Folder holding ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/``.
    split : str, default ``"test"``
        Name of the qrels file to read, ``qrels/<split>.tsv``.

    Raises
    ------
    FileNotFoundError
        If a required file is missing; the message lists the splits present.
    DataFormatError
        If a line is malformed or a judgement names an unknown query or document.
    """
    root = Path(path)
    corpus_path = root / "corpus.jsonl"
    queries_path = root / "queries.jsonl"
    qrels_path = root / "qrels" / f"{split}.tsv"
    for required in (corpus_path, queries_path):
        if not required.is_file():
            raise FileNotFoundError(f"{required} not found; {root} is not a BEIR folder")
    if not qrels_path.is_file():
        present = sorted(p.stem for p in (root / "qrels").glob("*.tsv"))
        raise FileNotFoundError(
            f"{qrels_path} not found; splits present in {root / 'qrels'}: {present or 'none'}"
        )

    corpus: dict[str, str] = {}
    titles: dict[str, str] = {}
    for line, record in _iter_jsonl(corpus_path):
        doc_id = _string_field(corpus_path, line, record, "_id")
        text = _string_field(corpus_path, line, record, "text")
        title = record.get("title") or ""
        if not isinstance(title, str):
            raise DataFormatError(corpus_path, line, "field 'title' must be a string")
        titles[doc_id] = title
        corpus[doc_id] = f"{title}\n\n{text}" if title.strip() else text

    all_queries: dict[str, str] = {}
    for line, record in _iter_jsonl(queries_path):
        all_queries[_string_field(queries_path, line, record, "_id")] = _string_field(
            queries_path, line, record, "text"
        )

    qrels, judgement_lines = _read_qrels(qrels_path)
    for (query_id, doc_id), line in judgement_lines.items():
        if query_id not in all_queries:
            raise DataFormatError(
                qrels_path, line, f"field 'query-id': {query_id!r} is not in {queries_path}"
            )
        if doc_id not in corpus:
            raise DataFormatError(
                qrels_path, line, f"field 'corpus-id': {doc_id!r} is not in {corpus_path}"
            )
    queries = {query_id: all_queries[query_id] for query_id in qrels}
    return BeirDataset(root.name, corpus, queries, qrels, split, titles)


@dataclass
class StsDataset:
    """Sentence pairs with gold similarity scores, as in the STS benchmark.

    Attributes
    ----------
    name : str
        File stem, e.g. ``"stsb-ru-test"``.
    sentences1, sentences2 : list[str]
        The two sides of each pair, aligned by index.
    scores : np.ndarray
        Gold similarity per pair, float64 of shape ``[P]`` (STSb uses 0 to 5).
    """

    name: str
    sentences1: list[str]
    sentences2: list[str]
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.sentences1)


def load_sts(path: str | Path) -> StsDataset:
    """Load an STS CSV file with rows ``sentence1,sentence2,score`` and no header.

    Fields that contain commas must be quoted, as the ``csv`` module writes them.

    Parameters
    ----------
    path : str or Path
        The CSV file, UTF-8.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    DataFormatError
        If a row does not have 3 fields, a sentence is empty, the score is not a
        finite number, or the file has no rows. The message names the file, the
        line and the field.
    """
    csv_path = Path(path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"STS file {csv_path} not found")

    sentences1: list[str] = []
    sentences2: list[str] = []
    scores: list[float] = []
    with csv_path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        for row in reader:
            # reader.line_num is the line where the row ends, which differs from
            # the row count when a quoted field spans several lines.
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != 3:
                raise DataFormatError(
                    csv_path,
                    line,
                    f"expected 3 comma-separated fields (sentence1, sentence2, score), "
                    f"got {len(row)}; quote fields that contain commas",
                )
            first, second, score_text = row
            for name, value in (("sentence1", first), ("sentence2", second)):
                if not value.strip():
                    raise DataFormatError(csv_path, line, f"field {name!r} is empty")
            try:
                score = float(score_text)
            except ValueError:
                raise DataFormatError(
                    csv_path, line, f"field 'score' must be a number, got {score_text!r}"
                ) from None
            if not math.isfinite(score):
                raise DataFormatError(
                    csv_path, line, f"field 'score' must be finite, got {score_text!r}"
                )
            sentences1.append(first)
            sentences2.append(second)
            scores.append(score)

    if not scores:
        raise DataFormatError(csv_path, 1, "the file contains no sentence pairs")
    return StsDataset(csv_path.stem, sentences1, sentences2, np.asarray(scores, dtype=np.float64))


def _squad_field(path: Path, where: str, record: Any, name: str, kind: type) -> Any:
    if not isinstance(record, dict) or name not in record:
        raise DataFormatError(path, 0, f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, kind):
        raise DataFormatError(
            path, 0, f"{where}: field {name!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def convert_squad_to_beir(
    squad_path: str | Path,
    output_dir: str | Path,
    *,
    train_fraction: float = 0.0,
    seed: int = 0,
) -> Path:
    """Convert a SQuAD-style JSON file (SQuAD, XQuAD, MLQA) to a BEIR folder.

    Every paragraph becomes a document (``_id`` ``a<article>p<paragraph>``, the
    article title as ``title``) and every question a query judged relevant
    (score 1) to its paragraph. Questions are split into ``qrels/train.tsv``
    and ``qrels/test.tsv`` by whole article, so no paragraph has questions in
    both splits. The SQuAD layout is ``{"data": [{"title", "paragraphs":
    [{"context", "qas": [{"id", "question"}]}]}]}``.

    Parameters
    ----------
    squad_path : str or Path
        The JSON file.
    output_dir : str or Path
        The BEIR folder to write; it is created, and existing files in it are
        replaced.
    train_fraction : float, default 0.0
        Fraction of the articles (rounded down, chosen at random with ``seed``)
        whose questions go to the train split. With 0 no train split is written.
    seed : int, default 0
        Seed of the article shuffle.

    Returns
    -------
    Path
        ``output_dir``.

    Raises
    ------
    DataFormatError
        If the file is not valid JSON, a field is missing or has the wrong
        type, or a question id repeats. Line numbers refer to the JSON text
        when the parser reports one, else 0 with the path of the field in the
        document (e.g. ``data[3].paragraphs[1].qas[0]``).
    ValueError
        If ``train_fraction`` is not in ``[0, 1)``.
    """
    source = Path(squad_path)
    target = Path(output_dir)
    if not 0.0 <= train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in [0, 1), got {train_fraction}")

    try:
        document = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataFormatError.from_json(source, error.lineno, error) from None
    articles = _squad_field(source, "top level", document, "data", list)

    corpus_rows: list[dict[str, str]] = []
    query_rows: list[dict[str, str]] = []
    article_of_query: dict[str, int] = {}
    qrels_rows: list[tuple[str, str]] = []
    for article_index, article in enumerate(articles):
        where = f"data[{article_index}]"
        title = article.get("title", "") if isinstance(article, dict) else ""
        if not isinstance(title, str):
            raise DataFormatError(source, 0, f"{where}: field 'title' must be str")
        paragraphs = _squad_field(source, where, article, "paragraphs", list)
        for paragraph_index, paragraph in enumerate(paragraphs):
            paragraph_where = f"{where}.paragraphs[{paragraph_index}]"
            context = _squad_field(source, paragraph_where, paragraph, "context", str)
            doc_id = f"a{article_index}p{paragraph_index}"
            corpus_rows.append({"_id": doc_id, "title": title, "text": context})
            questions = _squad_field(source, paragraph_where, paragraph, "qas", list)
            for question_index, qa in enumerate(questions):
                qa_where = f"{paragraph_where}.qas[{question_index}]"
                query_id = _squad_field(source, qa_where, qa, "id", str)
                question = _squad_field(source, qa_where, qa, "question", str)
                if query_id in article_of_query:
                    raise DataFormatError(
                        source, 0, f"{qa_where}: question id {query_id!r} appears twice"
                    )
                article_of_query[query_id] = article_index
                query_rows.append({"_id": query_id, "text": question})
                qrels_rows.append((query_id, doc_id))

    train_articles: set[int] = set()
    if train_fraction > 0:
        order = np.random.default_rng(seed).permutation(len(articles))
        train_articles = {int(i) for i in order[: int(len(articles) * train_fraction)]}

    (target / "qrels").mkdir(parents=True, exist_ok=True)
    with atomic_file(target / "corpus.jsonl") as tmp:
        tmp.write_text(
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in corpus_rows),
            encoding="utf-8",
        )
    with atomic_file(target / "queries.jsonl") as tmp:
        tmp.write_text(
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in query_rows),
            encoding="utf-8",
        )
    splits = {"test": [r for r in qrels_rows if article_of_query[r[0]] not in train_articles]}
    if train_articles:
        splits["train"] = [r for r in qrels_rows if article_of_query[r[0]] in train_articles]
    for split, rows in splits.items():
        with atomic_file(target / "qrels" / f"{split}.tsv") as tmp:
            lines = ["query-id\tcorpus-id\tscore\n"]
            lines += [f"{query_id}\t{doc_id}\t1\n" for query_id, doc_id in rows]
            tmp.write_text("".join(lines), encoding="utf-8")
    return target


__all__ += ["gather_pairs", "load_pairs"]


def load_pairs(path: str | Path, split: str = "train") -> list[tuple[str, str]]:
    """Load (query, positive passage) pairs from a BEIR folder or a pairs JSONL file.

    Parameters
    ----------
    path : str or Path
        Either a BEIR folder (see :func:`load_beir`), from which every judgement
        with relevance > 0 in ``qrels/<split>.tsv`` gives one pair (a query with
        several positives gives several pairs), or a JSONL file with one
        ``{"query": ..., "positive": ...}`` object per line (other keys are
        ignored, blank lines skipped).
    split : str, default ``"train"``
        Qrels split of a BEIR folder; ignored for a JSONL file.

    Returns
    -------
    list[tuple[str, str]]
        Pairs in file order (BEIR: qrels order).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist or a BEIR file is missing.
    DataFormatError
        If a line is malformed or a query or passage is empty or whitespace only;
        the message names the file and the line number.
    """
    root = Path(path)
    if root.is_dir():
        dataset = load_beir(root, split=split)
        pairs = [
            (dataset.queries[query_id], dataset.corpus[doc_id])
            for query_id, judged in dataset.qrels.items()
            for doc_id, relevance in judged.items()
            if relevance > 0
        ]
        if not pairs:
            raise DataFormatError(
                root / "qrels" / f"{split}.tsv", 0, "no judgement with relevance > 0"
            )
        return pairs
    if not root.is_file():
        raise FileNotFoundError(
            f"{root} not found; pass a BEIR folder or a JSONL file of "
            '{"query": ..., "positive": ...} lines'
        )

    pairs = []
    for line, record in _iter_jsonl(root):
        query = _string_field(root, line, record, "query")
        positive = _string_field(root, line, record, "positive")
        for name, value in (("query", query), ("positive", positive)):
            if not value.strip():
                raise DataFormatError(root, line, f"field {name!r} is empty")
        pairs.append((query, positive))
    if not pairs:
        raise DataFormatError(root, 0, "the file contains no pairs")
    return pairs


def gather_pairs(
    paths: list[Path],
    split: str = "train",
    *,
    max_pairs: int | None = None,
    seed: int = 0,
) -> tuple[list[tuple[str, str]], str]:
    """Load the pairs of several sources, draw at most ``max_pairs`` and describe them.

    Parameters
    ----------
    paths : list of Path
        BEIR folders or pairs JSONL files, each read with :func:`load_pairs`.
    split : str, default ``"train"``
        Qrels split of the BEIR folders.
    max_pairs : int or None, default None
        Keep at most this many pairs, drawn at random with ``seed``; None keeps all.
    seed : int, default 0
        Seed of the draw.

    Returns
    -------
    pairs : list[tuple[str, str]]
        The pairs, in file order when none were drawn.
    description : str
        Each source with its pair count, followed by the draw when there was one,
        e.g. ``"xquad-en/qrels/train.tsv (230 pairs); 100 drawn with seed 0"``.

    Raises
    ------
    FileNotFoundError, DataFormatError
        As :func:`load_pairs`.
    """
    pairs: list[tuple[str, str]] = []
    parts = []
    for path in paths:
        loaded = load_pairs(path, split=split)
        pairs.extend(loaded)
        source = f"{path.name}/qrels/{split}.tsv" if path.is_dir() else path.name
        parts.append(f"{source} ({len(loaded)} pairs)")
    description = ", ".join(parts)
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = random.Random(seed).sample(pairs, max_pairs)
        description += f"; {max_pairs} drawn with seed {seed}"
    return pairs, description
