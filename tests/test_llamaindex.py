"""Tests of the LlamaIndex integration: UECEmbedding and UECNodePostprocessor.

The first part runs on deterministic fake members. The part marked ``slow``
runs the three bundled models, on real XQuAD data where it is available.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from llama_index.core import Settings, VectorStoreIndex
from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.llms import MockLLM
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode
from uec_fakes import FakeMember, fake_members
from uec_realdata import FIRST_STAGE_K, SHARED_REAL_CACHE, ndcg_at_10, xquad_subset

from uec_rag.cache import MemoryGaussianCache
from uec_rag.encoders.base import Kind, check_texts
from uec_rag.ensemble import UECEnsemble
from uec_rag.gaussian import GaussianEmbedding
from uec_rag.integrations._common import (
    COEFFICIENTS_KEY,
    DEFAULT_MEMBERS,
    METADATA_KEYS,
    SCORE_MEAN_KEY,
    SCORE_STD_KEY,
)
from uec_rag.integrations.llamaindex import (
    RETRIEVAL_SCORE_KEY,
    UECEmbedding,
    UECNodePostprocessor,
)

TEXTS = [
    "The cat sat on the mat.",
    "Quantum chromodynamics describes the strong interaction.",
    "Der Hund schläft im Garten.",
    "Un chat dort sur le tapis.",
    "Stock markets fell sharply on Monday.",
    "Volcanoes erupt when magma reaches the surface.",
]


@pytest.fixture
def members() -> list[FakeMember]:
    return fake_members()


@pytest.fixture
def embed_model(members) -> UECEmbedding:
    return UECEmbedding(members=members, cache=MemoryGaussianCache())


def _nodes(texts: Sequence[str] = TEXTS) -> list[NodeWithScore]:
    # "i" is hidden from the embedded text, so each node's content is its text.
    return [
        NodeWithScore(
            node=TextNode(
                text=text,
                id_=f"n{index}",
                metadata={"i": index},
                excluded_embed_metadata_keys=["i"],
            ),
            score=0.5,
        )
        for index, text in enumerate(texts)
    ]


def _expected_scores(members: list[FakeMember], query: str, texts: Sequence[str]) -> np.ndarray:
    copies = [FakeMember(member.name, member.dim, member.noise) for member in members]
    ensemble = UECEnsemble(members=copies)
    return ensemble.score(ensemble.encode_queries([query]), ensemble.encode_documents(texts)).score[
        0
    ]


class RecordingHandler(BaseEventHandler):
    """Collects every instrumentation event."""

    events: list[BaseEvent] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "RecordingHandler"

    def handle(self, event: BaseEvent, **kwargs) -> None:
        self.events.append(event)


@pytest.fixture
def recorded_events():
    handler = RecordingHandler(events=[])
    root = get_dispatcher()
    root.add_event_handler(handler)
    yield handler.events
    root.event_handlers.remove(handler)


@pytest.fixture(autouse=True)
def mock_llm(monkeypatch: pytest.MonkeyPatch) -> None:
    # Response synthesizers read Settings.llm even in "no_text" mode; never reach a real LLM.
    monkeypatch.setattr(Settings, "_llm", MockLLM())


# --------------------------------------------------------------------------- UECEmbedding


def test_embedding_equals_ensemble_mean(embed_model, members):
    vectors = embed_model.get_text_embedding_batch(TEXTS)
    query = embed_model.get_query_embedding(TEXTS[0])

    copies = [FakeMember(member.name, member.dim, member.noise) for member in members]
    ensemble = UECEnsemble(members=copies)
    np.testing.assert_array_equal(
        np.asarray(vectors, dtype=np.float32), ensemble.encode_documents(TEXTS).gaussian.mean
    )
    np.testing.assert_array_equal(
        np.asarray(query, dtype=np.float32), ensemble.encode_queries([TEXTS[0]]).gaussian.mean[0]
    )
    assert all(type(value) is float for value in query)


def test_embedding_batches_follow_embed_batch_size(members):
    model = UECEmbedding(members=members, cache=None, embed_batch_size=2)
    model.get_text_embedding_batch(TEXTS[:5])
    assert [member.calls for member in members] == [3, 3, 3]
    assert members[0].encoded == 5


async def test_embedding_async_matches_sync(embed_model):
    assert await embed_model.aget_query_embedding("q") == embed_model.get_query_embedding("q")
    assert await embed_model.aget_text_embedding(TEXTS[1]) == embed_model.get_text_embedding(
        TEXTS[1]
    )
    assert await embed_model.aget_text_embedding_batch(
        TEXTS
    ) == embed_model.get_text_embedding_batch(TEXTS)


def test_embedding_pickle_restores_model(embed_model):
    before = embed_model.get_text_embedding_batch(TEXTS)
    restored = pickle.loads(pickle.dumps(embed_model))
    assert restored._core is None
    assert restored.get_text_embedding_batch(TEXTS) == before
    assert restored.cached_ensemble.ensemble.member_names == ("a", "b", "c")


def test_embedding_defaults():
    model = UECEmbedding(cache=None)
    assert model.members == list(DEFAULT_MEMBERS)
    assert model.class_name() == "UECEmbedding"


# --------------------------------------------------------------------------- postprocessor


def test_postprocessor_scores_and_order(embed_model, members):
    postprocessor = UECNodePostprocessor(embed_model=embed_model, top_n=4)
    query = "a cat on the mat"

    results = postprocessor.postprocess_nodes(_nodes(), QueryBundle(query))

    expected = _expected_scores(members, query, TEXTS)
    order = np.argsort(-expected, kind="stable")[:4]
    assert [item.node.metadata["i"] for item in results] == order.tolist()
    for item in results:
        assert type(item.score) is float
        assert item.score == pytest.approx(expected[item.node.metadata["i"]], abs=1e-6)


def test_postprocessor_scores_embed_content(embed_model, members):
    node = TextNode(text=TEXTS[0], metadata={"title": "Cats", "private": "x"})
    node.excluded_embed_metadata_keys = ["private"]
    postprocessor = UECNodePostprocessor(embed_model=embed_model, top_n=1)

    (result,) = postprocessor.postprocess_nodes([NodeWithScore(node=node)], QueryBundle("cat"))

    content = node.get_content(metadata_mode=MetadataMode.EMBED)
    assert "title: Cats" in content
    assert "private" not in content
    assert result.score == pytest.approx(_expected_scores(members, "cat", [content])[0], abs=1e-6)


def test_postprocessor_shuffled_input_keeps_pairing(embed_model, members):
    query = TEXTS[4]
    expected = dict(zip(TEXTS, _expected_scores(members, query, TEXTS), strict=True))
    postprocessor = UECNodePostprocessor(embed_model=embed_model, top_n=len(TEXTS))

    for seed in range(5):
        nodes = _nodes()
        random.Random(seed).shuffle(nodes)
        results = postprocessor.postprocess_nodes(nodes, query_str=query)

        for item in results:
            assert item.score == pytest.approx(expected[item.node.text], abs=1e-6)
        scores = [item.score for item in results]
        assert scores == sorted(scores, reverse=True)
        assert results[0].node.text == query


class AxisMember:
    """A member that maps fixed texts to fixed unit vectors, for exact scores."""

    name = "axis"
    dim = 3
    reference_trace = None
    vectors: ClassVar[dict[str, list[float]]] = {
        "q": [1.0, 0.0, 0.0],
        "positive": [0.6, 0.8, 0.0],
        "zero": [0.0, 0.0, 1.0],
        "negative": [-0.8, 0.6, 0.0],
    }

    def encode(
        self, texts: Sequence[str], kind: Kind = "document", *, batch_size=None, show_progress=None
    ) -> GaussianEmbedding:
        texts = check_texts(texts)
        mean = np.array([self.vectors[text] for text in texts], dtype=np.float32)
        return GaussianEmbedding(mean, np.full_like(mean, 0.01))

    def fingerprint(self) -> str:
        return hashlib.sha256(b"axis").hexdigest()


def test_postprocessor_zero_and_negative_scores():
    model = UECEmbedding(members=[AxisMember()], cache=None)
    postprocessor = UECNodePostprocessor(embed_model=model, top_n=3)
    nodes = [
        NodeWithScore(node=TextNode(text=text), score=None)
        for text in ["negative", "zero", "positive"]
    ]

    results = postprocessor.postprocess_nodes(nodes, QueryBundle("q"))

    assert [item.node.text for item in results] == ["positive", "zero", "negative"]
    assert results[1].score == 0.0
    assert results[0].score > 0
    assert results[2].score < 0
    assert results[0].score < 0.6  # |score| < |mu_s| because the variance is positive
    assert results[0].node.metadata[SCORE_MEAN_KEY] == pytest.approx(0.6, abs=1e-6)


def test_postprocessor_metadata_excluded_and_copies(embed_model):
    nodes = _nodes()
    nodes[0].node.excluded_llm_metadata_keys = ["i"]
    postprocessor = UECNodePostprocessor(embed_model=embed_model, top_n=len(TEXTS))

    results = postprocessor.postprocess_nodes(nodes, QueryBundle("cats"))

    for item in results:
        node = item.node
        assert type(node.metadata[SCORE_STD_KEY]) is float
        assert list(node.metadata[COEFFICIENTS_KEY]) == ["a", "b", "c"]
        for key in METADATA_KEYS:
            assert key in node.excluded_llm_metadata_keys
            assert key in node.excluded_embed_metadata_keys
        assert "uec_" not in node.get_content(metadata_mode=MetadataMode.LLM)
        assert "uec_" not in node.get_content(metadata_mode=MetadataMode.EMBED)
    first = next(item for item in results if item.node.node_id == "n0")
    assert first.node.excluded_llm_metadata_keys[0] == "i"
    assert all(item.node.metadata == {"i": index} for index, item in enumerate(nodes))
    assert all(item.score == 0.5 for item in nodes)


def test_postprocessor_keep_retrieval_score(embed_model):
    postprocessor = UECNodePostprocessor(
        embed_model=embed_model, top_n=2, keep_retrieval_score=True
    )
    results = postprocessor.postprocess_nodes(_nodes(), QueryBundle("cats"))
    assert all(item.node.metadata[RETRIEVAL_SCORE_KEY] == 0.5 for item in results)
    assert all(RETRIEVAL_SCORE_KEY in item.node.excluded_llm_metadata_keys for item in results)


def test_postprocessor_none_bundle_and_empty(embed_model, recorded_events):
    postprocessor = UECNodePostprocessor(embed_model=embed_model)
    with pytest.raises(ValueError, match="needs the query"):
        postprocessor.postprocess_nodes(_nodes())
    assert postprocessor.postprocess_nodes([], QueryBundle("q")) == []


def test_postprocessor_emits_rerank_events(embed_model, recorded_events):
    postprocessor = UECNodePostprocessor(embed_model=embed_model, top_n=2)
    results = postprocessor.postprocess_nodes(_nodes(), QueryBundle("dogs"))

    starts = [event for event in recorded_events if isinstance(event, ReRankStartEvent)]
    ends = [event for event in recorded_events if isinstance(event, ReRankEndEvent)]
    assert len(starts) == 1
    assert len(ends) == 1
    assert starts[0].top_n == 2
    assert starts[0].query.query_str == "dogs"
    assert len(starts[0].nodes) == len(TEXTS)
    assert [item.node.node_id for item in ends[0].nodes] == [item.node.node_id for item in results]


async def test_postprocessor_async_matches_sync(embed_model):
    postprocessor = UECNodePostprocessor(embed_model=embed_model, top_n=3)
    sync = postprocessor.postprocess_nodes(_nodes(), QueryBundle("markets"))
    asynchronous = await postprocessor.apostprocess_nodes(_nodes(), query_str="markets")
    assert [item.node.node_id for item in asynchronous] == [item.node.node_id for item in sync]
    assert [item.score for item in asynchronous] == [item.score for item in sync]


def test_postprocessor_to_dict_roundtrip(tmp_path: Path):
    postprocessor = UECNodePostprocessor(
        top_n=4,
        keep_retrieval_score=True,
        embed_model=UECEmbedding(
            members=["minilm", "e5-small"],
            coefficient_rule="softmax",
            temperature=0.5,
            cache=tmp_path / "g.sqlite",
            embed_batch_size=7,
        ),
    )

    data = postprocessor.to_dict()
    restored = UECNodePostprocessor.from_dict(data)
    from_json = UECNodePostprocessor.from_json(postprocessor.to_json())

    assert data["class_name"] == "UECNodePostprocessor"
    assert data["embed_model"]["class_name"] == "UECEmbedding"
    for copy in (restored, from_json):
        assert copy.top_n == 4
        assert copy.keep_retrieval_score is True
        assert copy.embed_model.members == ["minilm", "e5-small"]
        assert copy.embed_model.coefficient_rule == "softmax"
        assert copy.embed_model.temperature == 0.5
        assert copy.embed_model.embed_batch_size == 7
        assert copy.embed_model.cache == str(tmp_path / "g.sqlite")


def test_postprocessor_pickles(embed_model):
    postprocessor = UECNodePostprocessor(embed_model=embed_model, top_n=3)
    expected = postprocessor.postprocess_nodes(_nodes(), QueryBundle("volcano"))
    restored = pickle.loads(pickle.dumps(postprocessor))
    got = restored.postprocess_nodes(_nodes(), QueryBundle("volcano"))
    assert [item.score for item in got] == [item.score for item in expected]
    assert restored.class_name() == "UECNodePostprocessor"


def test_postprocessor_rejects_bad_top_n(embed_model):
    with pytest.raises(ValueError, match="top_n"):
        UECNodePostprocessor(embed_model=embed_model, top_n=0)


def _index(embed_model: UECEmbedding, texts: Sequence[str] = TEXTS) -> VectorStoreIndex:
    nodes = [
        TextNode(text=text, id_=f"n{index}", metadata={"title": f"Title {index}"})
        for index, text in enumerate(texts)
    ]
    return VectorStoreIndex(nodes, embed_model=embed_model)


def test_index_gives_postprocessor_cache_hits(embed_model, members):
    index = _index(embed_model)
    encoded_by_index = members[0].encoded
    engine = index.as_query_engine(
        llm=MockLLM(),
        similarity_top_k=4,
        node_postprocessors=[UECNodePostprocessor(embed_model=embed_model, top_n=2)],
        response_mode="no_text",
    )

    response = engine.query("a cat on the mat")

    assert encoded_by_index == len(TEXTS)
    # Only the query was encoded, once: the retriever's query embedding is
    # cached, and the reranker finds the query and all nodes in the cache.
    assert members[0].encoded == len(TEXTS) + 1
    assert len(response.source_nodes) == 2


def test_prompt_excludes_reranker_metadata(embed_model):
    index = _index(embed_model)
    # MockLLM without max_tokens answers with the prompt it received.
    engine = index.as_query_engine(
        llm=MockLLM(),
        similarity_top_k=4,
        node_postprocessors=[UECNodePostprocessor(embed_model=embed_model, top_n=3)],
        response_mode="compact",
    )

    response = engine.query("Where does the cat sit?")
    prompt = str(response)

    assert "The cat sat on the mat." in prompt
    assert "title: Title 0" in prompt
    for key in METADATA_KEYS:
        assert key not in prompt
    assert all(SCORE_STD_KEY in node.node.metadata for node in response.source_nodes)


# --------------------------------------------------------------------------- real models


PASSAGES = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Москва — столица России и крупнейший город страны.",
    "The Great Wall of China is a series of fortifications built across northern China.",
    "Python is a programming language that emphasises readability.",
    "Plants use chlorophyll to absorb sunlight.",
]


@pytest.mark.slow
def test_real_query_engine_end_to_end(monkeypatch: pytest.MonkeyPatch):
    model = UECEmbedding(cache=MemoryGaussianCache(), embed_batch_size=16)
    counts = [0, 0, 0]
    for position, member in enumerate(model.cached_ensemble.ensemble.members):
        original = member.encode

        def counted(texts, kind="document", *, _position=position, _original=original, **kw):
            counts[_position] += len(texts)
            return _original(texts, kind, **kw)

        monkeypatch.setattr(member, "encode", counted)

    index = _index(model, PASSAGES)
    engine = index.as_query_engine(
        llm=MockLLM(),
        similarity_top_k=5,
        node_postprocessors=[UECNodePostprocessor(embed_model=model, top_n=2)],
        response_mode="no_text",
    )
    response = engine.query("Quelle est la capitale de la Russie ?")

    sources = response.source_nodes
    assert len(sources) == 2
    assert sources[0].node.text == PASSAGES[2]
    assert sources[0].score >= sources[1].score
    assert set(sources[0].node.metadata[COEFFICIENTS_KEY]) == set(DEFAULT_MEMBERS)
    assert sources[0].node.metadata[SCORE_STD_KEY] > 0
    assert counts == [len(PASSAGES) + 1] * 3


@pytest.mark.slow
def test_real_embedding_pickle_roundtrip():
    model = UECEmbedding(cache=SHARED_REAL_CACHE, embed_batch_size=16)
    before = model.get_query_embedding("Wie hoch ist der Eiffelturm?")
    restored = pickle.loads(pickle.dumps(model))
    assert restored.get_query_embedding("Wie hoch ist der Eiffelturm?") == before
    assert len(before) == 384 + 768 + 384


@pytest.mark.slow
@pytest.mark.parametrize("language", ["en", "ru"])
def test_real_postprocessor_improves_ndcg_on_xquad(data_dir: Path, language: str):
    subset = xquad_subset(data_dir, language)
    first_stage = UECEmbedding(members=["minilm"], cache=SHARED_REAL_CACHE, embed_batch_size=16)
    nodes = [TextNode(text=text, id_=doc_id) for doc_id, text in subset.corpus.items()]
    retriever = VectorStoreIndex(nodes, embed_model=first_stage).as_retriever(
        similarity_top_k=FIRST_STAGE_K
    )
    postprocessor = UECNodePostprocessor(
        embed_model=UECEmbedding(cache=SHARED_REAL_CACHE, embed_batch_size=16),
        top_n=FIRST_STAGE_K,
    )

    index_order: dict[str, list[str]] = {}
    reranked_order: dict[str, list[str]] = {}
    for query_id, query in subset.queries.items():
        candidates = retriever.retrieve(query)
        index_order[query_id] = [item.node.node_id for item in candidates]
        reranked = postprocessor.postprocess_nodes(candidates, QueryBundle(query))
        reranked_order[query_id] = [item.node.node_id for item in reranked]

    before = ndcg_at_10(index_order, subset.qrels)
    after = ndcg_at_10(reranked_order, subset.qrels)
    print(f"xquad-{language}: index nDCG@10 {before:.4f}, UEC postprocessed {after:.4f}")
    assert after > before
