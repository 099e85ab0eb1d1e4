"""Data loading shared by the example scripts.

Both examples index English passages and ask each question in several
languages. The data is XQuAD from a BEIR data folder when it is present,
otherwise the sample corpus next to this module. The questions of both are
translations of each other, so one passage answers a question in every language.
"""

from __future__ import annotations

from pathlib import Path

from uec_rag.datasets import BeirDataset, load_beir

SAMPLE_CORPUS = Path(__file__).resolve().parent / "sample_corpus"
LANGUAGES = ("en", "ru", "zh", "ar")


def load_parallel_data(data: Path | None, max_documents: int) -> tuple[str, dict[str, BeirDataset]]:
    """Load the English corpus and the questions of every language found.

    Returns the data set name and ``{language: dataset}``. XQuAD is cut to its
    first ``max_documents`` passages (by id) and the questions they answer.
    """
    if data is not None and (data / "xquad-en").is_dir():
        name = "XQuAD"
        folders = {lang: data / f"xquad-{lang}" for lang in LANGUAGES}
    else:
        name = "sample corpus"
        folders = {lang: SAMPLE_CORPUS / f"sample-{lang}" for lang in LANGUAGES}
    datasets = {lang: load_beir(path, "test") for lang, path in folders.items() if path.is_dir()}

    indexed_ids = set(sorted(datasets["en"].corpus)[:max_documents])
    for dataset in datasets.values():
        dataset.corpus = {
            doc_id: text for doc_id, text in dataset.corpus.items() if doc_id in indexed_ids
        }
        dataset.qrels = {
            query_id: judged
            for query_id, judged in dataset.qrels.items()
            if set(judged) <= indexed_ids
        }
        dataset.queries = {query_id: dataset.queries[query_id] for query_id in dataset.qrels}
    return name, datasets


def format_weights(weights: dict[str, float]) -> str:
    """Format per-member coefficients as ``"minilm 0.12, mpnet 0.30, ..."``."""
    return ", ".join(f"{member} {value:.2f}" for member, value in weights.items())
