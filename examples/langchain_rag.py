"""Retrieval with LangChain: UEC embeddings in a vector store, then UEC reranking.

The store indexes English passages with ``UECEmbeddings`` (the three bundled
models); each query, asked in several languages, retrieves candidates by the
combined mean and reorders them with ``UECReranker`` by the uncertainty-aware
score. The reranker reads the passages' Gaussians from the cache the store
filled, so it encodes only the query.

Data: XQuAD from ``$UEC_RAG_DATA`` (folders ``xquad-en``, ``xquad-ru``, ...)
when present, otherwise the sample corpus next to this script. The questions
of both are translations of each other, so one passage answers a question in
every language.

Run::

    python examples/langchain_rag.py
    python examples/langchain_rag.py --data /path/to/data --max-documents 100
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from langchain_core.documents import Document
from langchain_core.vectorstores import InMemoryVectorStore
from parallel_corpus import format_weights, load_parallel_data

from uec_rag.integrations.langchain import UECEmbeddings, UECReranker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ["UEC_RAG_DATA"]) if os.environ.get("UEC_RAG_DATA") else None,
        help="folder holding xquad-en, xquad-ru, ... "
        "(default: $UEC_RAG_DATA, else the sample corpus)",
    )
    parser.add_argument("--max-documents", type=int, default=60, help="passages to index")
    parser.add_argument(
        "--questions", type=int, default=2, help="questions, each asked in every language"
    )
    parser.add_argument("--candidates", type=int, default=20, help="passages the store retrieves")
    parser.add_argument("--top-n", type=int, default=3, help="passages kept after reranking")
    parser.add_argument(
        "--cache",
        default="sqlite",
        help="Gaussian cache: sqlite (the default file), memory or a path",
    )
    args = parser.parse_args()

    name, datasets = load_parallel_data(args.data, args.max_documents)
    english = datasets["en"]
    print(f"{name}: {len(english.corpus)} English passages, languages {sorted(datasets)}")

    # Index the English passages; every passage's Gaussian goes to the cache.
    embeddings = UECEmbeddings(cache=args.cache)
    store = InMemoryVectorStore(embedding=embeddings)
    store.add_documents(
        [Document(page_content=text, id=doc_id) for doc_id, text in english.corpus.items()]
    )

    # The store retrieves candidates by the combined mean; the reranker reorders
    # them by the uncertainty-aware score. In a chain, the two are one
    # ContextualCompressionRetriever (langchain-classic).
    retriever = store.as_retriever(search_kwargs={"k": args.candidates})
    reranker = UECReranker(embeddings=embeddings, top_n=args.top_n)
    core = embeddings.cached_ensemble

    for query_id in sorted(english.queries)[: args.questions]:
        relevant = set(english.qrels[query_id])
        for language, dataset in datasets.items():
            query = dataset.queries.get(query_id)
            if query is None:
                continue
            query_weights = core.encode([query], "query").coefficient_dict(0)
            print(f"\n[{language}] {query}")
            print("  query coefficients: " + format_weights(query_weights))
            for rank, document in enumerate(
                reranker.compress_documents(retriever.invoke(query), query), start=1
            ):
                metadata = document.metadata
                mark = "*" if document.id in relevant else " "
                print(
                    f" {mark}{rank}. {document.id:>8}  score {metadata['relevance_score']:+.4f}"
                    f"  sigma_s {metadata['uec_score_std']:.4f}"
                    f"  coefficients {format_weights(metadata['uec_coefficients'])}"
                )
                print(f"      {document.page_content[:100]!r}")
    print("\n* marks the passage that answers the question")


if __name__ == "__main__":
    main()
