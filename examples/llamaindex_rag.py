"""Retrieval with LlamaIndex: a UEC-embedded index and a UEC reranker in a query engine.

A ``VectorStoreIndex`` over English passages is built with ``UECEmbedding``
(the three bundled models). The query engine retrieves 20 nodes by the
combined mean and ``UECNodePostprocessor`` keeps the best 5 by the
uncertainty-aware score. No LLM is used (``Settings.llm = None`` and
``response_mode="no_text"``); the script prints the source nodes.

Data: XQuAD from ``$UEC_RAG_DATA`` (folders ``xquad-en``, ``xquad-ru``, ...)
when present, otherwise the sample corpus next to this script. The questions
of both are translations of each other, so one passage answers a question in
every language.

Run::

    python examples/llamaindex_rag.py
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from llama_index.core import Settings, VectorStoreIndex
from llama_index.core.schema import TextNode
from parallel_corpus import format_weights, load_parallel_data

from uec_rag.integrations.llamaindex import UECEmbedding, UECNodePostprocessor


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
    parser.add_argument(
        "--cache",
        default="sqlite",
        help="Gaussian cache: sqlite (the default file), memory or a path",
    )
    args = parser.parse_args()

    name, datasets = load_parallel_data(args.data, args.max_documents)
    english = datasets["en"]
    print(f"{name}: {len(english.corpus)} English passages, languages {sorted(datasets)}")

    Settings.llm = None
    embed_model = UECEmbedding(cache=args.cache)
    nodes = [TextNode(text=text, id_=doc_id) for doc_id, text in english.corpus.items()]
    index = VectorStoreIndex(nodes, embed_model=embed_model)

    # The postprocessor shares the embedding model's ensemble and Gaussian
    # cache, so the retrieved nodes are cache hits.
    engine = index.as_query_engine(
        similarity_top_k=20,
        node_postprocessors=[UECNodePostprocessor(top_n=5, embed_model=embed_model)],
        response_mode="no_text",
    )
    core = embed_model.cached_ensemble

    for query_id in sorted(english.queries)[: args.questions]:
        relevant = set(english.qrels[query_id])
        for language, dataset in datasets.items():
            query = dataset.queries.get(query_id)
            if query is None:
                continue
            response = engine.query(query)
            print(f"\n[{language}] {query}")
            query_weights = core.encode([query], "query").coefficient_dict(0)
            print("  query coefficients: " + format_weights(query_weights))
            for rank, source in enumerate(response.source_nodes, start=1):
                metadata = source.node.metadata
                mark = "*" if source.node.node_id in relevant else " "
                print(
                    f" {mark}{rank}. {source.node.node_id:>8}  score {source.score:+.4f}"
                    f"  sigma_s {metadata['uec_score_std']:.4f}"
                    f"  coefficients {format_weights(metadata['uec_coefficients'])}"
                )
                print(f"      {source.node.get_content()[:100]!r}")
    print("\n* marks the passage that answers the question")


if __name__ == "__main__":
    main()
