"""Loaders for retrieval and similarity data sets.

The retrieval format is the BEIR layout: a folder with ``corpus.jsonl``
(``{"_id", "title", "text"}`` per line), ``queries.jsonl`` (``{"_id", "text"}``)
and ``qrels/<split>.tsv`` (``query-id, corpus-id, score`` with a header line).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BeirDataset", "DataFormatError", "load_beir"]


class DataFormatError(ValueError):
    """A data file is malformed; the message names the file, line and field."""

    def __init__(self, path: Path | str, line: int, message: str) -> None:
        super().__init__(f"{path}, line {line}: {message}")
        self.path = Path(path)
        self.line = line


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
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(path, line_number, f"invalid JSON: {error.msg}") from None
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
    qrels: dict[str, dict[str, int]] = {}
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
    return qrels


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

    qrels = load_qrels(qrels_path)
    for query_id, judged in qrels.items():
        if query_id not in all_queries:
            raise DataFormatError(qrels_path, 0, f"query id {query_id!r} is not in {queries_path}")
        unknown = [doc_id for doc_id in judged if doc_id not in corpus]
        if unknown:
            raise DataFormatError(
                qrels_path, 0, f"document id {unknown[0]!r} is not in {corpus_path}"
            )
    queries = {query_id: all_queries[query_id] for query_id in qrels}
    return BeirDataset(root.name, corpus, queries, qrels, split, titles)
