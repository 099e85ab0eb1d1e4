"""Tests of the LangChain integration: UECEmbeddings and UECReranker.

The first part runs on deterministic fake members. The part marked ``slow``
runs the three bundled models, on real XQuAD data where it is available.
"""

from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from langchain_core.documents import Document
from langchain_core.vectorstores import InMemoryVectorStore
from uec_fakes import FakeMember, fake_members
from uec_realdata import FIRST_STAGE_K, SHARED_REAL_CACHE, ndcg_at_10, xquad_subset

from uec_rag.cache import MemoryGaussianCache, SQLiteGaussianCache
from uec_rag.ensemble import UECEnsemble
from uec_rag.integrations._common import (
    COEFFICIENTS_KEY,
    DEFAULT_MEMBERS,
    RELEVANCE_SCORE_KEY,
    SCORE_MEAN_KEY,
    SCORE_STD_KEY,
)
from uec_rag.integrations.langchain import UECEmbeddings, UECReranker

TEXTS = [
    "The cat sat on the mat.",
    "Quantum chromodynamics describes the strong interaction.",
    "Der Hund schläft im Garten.",
    "Un chat dort sur le tapis.",
    "Stock markets fell sharply on Monday.",
]


@pytest.fixture
def members() -> list[FakeMember]:
    return fake_members()


@pytest.fixture
def embeddings(members: list[FakeMember]) -> UECEmbeddings:
    return UECEmbeddings(members=members, cache=MemoryGaussianCache())


def _reference_ensemble(members: list[FakeMember]) -> UECEnsemble:
    # Fresh copies, so encoder call counts of the members under test stay untouched.
    copies = [FakeMember(member.name, member.dim, member.noise) for member in members]
    return UECEnsemble(members=copies)


# --------------------------------------------------------------------------- UECEmbeddings


def test_embed_documents_equals_ensemble_mean(embeddings, members):
    vectors = embeddings.embed_documents(TEXTS)

    expected = _reference_ensemble(members).encode_documents(TEXTS).gaussian.mean
    assert isinstance(vectors, list)
    assert all(type(value) is float for value in vectors[0])
    np.testing.assert_array_equal(np.asarray(vectors, dtype=np.float32), expected)


def test_embed_query_uses_query_kind(embeddings, members):
    vector = embeddings.embed_query(TEXTS[0])

    reference = _reference_ensemble(members)
    expected_query = reference.encode_queries([TEXTS[0]]).gaussian.mean[0]
    np.testing.assert_array_equal(np.asarray(vector, dtype=np.float32), expected_query)
    assert embeddings.cached_ensemble.cache.count() == 1


def test_default_members_are_bundled_presets():
    model = UECEmbeddings(cache=None)
    assert model.members == list(DEFAULT_MEMBERS)
    assert model.combine == "direct_sum"


def test_embed_writes_every_gaussian_to_cache(embeddings):
    embeddings.embed_documents(TEXTS)
    core = embeddings.cached_ensemble

    entries = core.cache.get_many(core.fingerprint, "document", TEXTS)
    assert all(entry is not None for entry in entries)
    assert entries[0].coefficients.shape == (3,)
    assert entries[0].variance.shape == entries[0].mean.shape
    assert np.isclose(entries[0].coefficients.sum(), 1.0, atol=1e-6)


def test_cache_hit_skips_encoder(embeddings, members):
    first = embeddings.embed_documents(TEXTS)
    calls = [member.calls for member in members]

    second = embeddings.embed_documents(list(reversed(TEXTS)))

    assert [member.calls for member in members] == calls
    assert second == list(reversed(first))


def test_partial_hits_encode_only_misses(embeddings, members):
    embeddings.embed_documents(TEXTS[:2])
    before = members[0].encoded

    embeddings.embed_documents(TEXTS)

    assert members[0].encoded - before == len(TEXTS) - 2


def test_duplicates_encoded_once(embeddings, members):
    vectors = embeddings.embed_documents([TEXTS[0], TEXTS[1], TEXTS[0], TEXTS[0]])
    assert members[0].encoded == 2
    assert vectors[0] == vectors[2] == vectors[3]


def test_cache_none_encodes_every_call(members):
    model = UECEmbeddings(members=members, cache=None)
    model.embed_documents(TEXTS)
    model.embed_documents(TEXTS)
    assert members[0].calls == 2


def test_empty_documents_returns_empty(embeddings, members):
    assert embeddings.embed_documents([]) == []
    assert members[0].calls == 0


def test_bad_inputs_raise(embeddings):
    with pytest.raises(TypeError, match=r"texts\[1\] must be str"):
        embeddings.embed_documents(["ok", 5])
    with pytest.raises(TypeError, match="use embed_query"):
        embeddings.embed_documents("one string")
    with pytest.raises(TypeError, match="text must be str"):
        embeddings.embed_query(None)


def test_bad_settings_raise(members):
    with pytest.raises(ValueError, match="unknown keys"):
        UECEmbeddings(members=members, encode_kwargs={"normalize_embeddings": True})
    with pytest.raises(ValueError, match="extra"):
        UECEmbeddings(members=members, model_name="x")
    with pytest.raises(ValueError, match="batch_size"):
        UECEmbeddings(members=members, batch_size=0)
    with pytest.raises(TypeError, match=r"members\[1\]"):
        UECEmbeddings(members=["minilm", 3.5], cache=None).embed_query("x")


def test_encode_kwargs_reach_members(members):
    seen: list[tuple[int | None, bool | None]] = []
    original = FakeMember.encode

    def spy(self, texts, kind="document", *, batch_size=None, show_progress=None):
        seen.append((kind, batch_size, show_progress))
        return original(self, texts, kind, batch_size=batch_size, show_progress=show_progress)

    model = UECEmbeddings(
        members=[members[0]],
        cache=None,
        batch_size=7,
        encode_kwargs={"show_progress": True},
        query_encode_kwargs={"batch_size": 2},
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FakeMember, "encode", spy)
        model.embed_documents(["a"])
        model.embed_query("b")
    assert seen == [("document", 7, True), ("query", 2, False)]


async def test_async_methods_match_sync(embeddings):
    documents = await embeddings.aembed_documents(TEXTS)
    query = await embeddings.aembed_query(TEXTS[1])
    assert documents == embeddings.embed_documents(TEXTS)
    assert query == embeddings.embed_query(TEXTS[1])


async def test_async_does_not_block_event_loop(members):
    class SlowMember(FakeMember):
        def encode(self, texts, kind="document", **settings):
            import time

            time.sleep(0.3)
            return super().encode(texts, kind, **settings)

    model = UECEmbeddings(members=[SlowMember("slow")], cache=None)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        for _ in range(10):
            await asyncio.sleep(0.01)
            ticks += 1

    await asyncio.gather(model.aembed_documents(["a"]), ticker())
    # The ticker finished while the encoder slept in a worker thread.
    assert ticks == 10


def test_pickle_roundtrip_keeps_models(embeddings):
    before = embeddings.embed_documents(TEXTS)
    embeddings.embed_query("q")

    restored = pickle.loads(pickle.dumps(embeddings))

    assert restored._core is None
    assert restored.embed_documents(TEXTS) == before
    assert restored.cached_ensemble.ensemble.member_names == ("a", "b", "c")
    assert restored.cached_ensemble.fingerprint == embeddings.cached_ensemble.fingerprint


def test_pickle_sqlite_cache_reopens_same_file(tmp_path: Path, members):
    model = UECEmbeddings(members=members, cache=tmp_path / "gaussians.sqlite")
    model.embed_documents(TEXTS)

    restored = pickle.loads(pickle.dumps(model))

    cache = restored.cached_ensemble.cache
    assert isinstance(cache, SQLiteGaussianCache)
    assert cache.path == tmp_path / "gaussians.sqlite"
    assert cache.count() == len(TEXTS)


def test_threads_equal_serial_fake(members):
    model = UECEmbeddings(members=members, cache=MemoryGaussianCache())
    batches = [[f"{text} #{worker}" for text in TEXTS] for worker in range(8)]
    serial = [
        UECEmbeddings(members=fake_members(), cache=None).embed_documents(batch)
        for batch in batches
    ]

    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(model.embed_documents, batches))

    assert parallel == serial


def test_import_without_frameworks():
    code = textwrap.dedent(
        """
        import sys
        for name in ("langchain_core", "llama_index", "llama_index.core", "pydantic"):
            sys.modules[name] = None
        import uec_rag
        import uec_rag.cache
        import uec_rag.integrations
        import uec_rag.ensemble
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --------------------------------------------------------------------------- UECReranker


def _documents() -> list[Document]:
    return [
        Document(page_content=text, metadata={"source": index}, id=str(index))
        for index, text in enumerate(TEXTS)
    ]


def test_reranker_order_equals_ensemble_score(embeddings, members):
    reranker = UECReranker(embeddings=embeddings, top_n=None)
    query = "a cat on a mat"

    results = reranker.compress_documents(_documents(), query)

    reference = _reference_ensemble(members)
    scores = reference.score(reference.encode_queries([query]), reference.encode_documents(TEXTS))
    expected_order = np.argsort(-scores.score[0], kind="stable")
    assert [doc.metadata["source"] for doc in results] == expected_order.tolist()
    for doc in results:
        index = doc.metadata["source"]
        assert doc.metadata[RELEVANCE_SCORE_KEY] == pytest.approx(scores.score[0, index], abs=1e-6)
        assert doc.metadata[SCORE_MEAN_KEY] == pytest.approx(scores.mu_s[0, index], abs=1e-6)
        assert doc.metadata[SCORE_STD_KEY] == pytest.approx(scores.sigma_s[0, index], abs=1e-6)


def test_reranker_metadata_types_and_copies(embeddings):
    documents = _documents()
    reranker = UECReranker(embeddings=embeddings, top_n=2)

    results = reranker.compress_documents(documents, TEXTS[2])

    assert len(results) == 2
    assert results[0].page_content == TEXTS[2]
    for doc in results:
        assert type(doc.metadata[RELEVANCE_SCORE_KEY]) is float
        assert type(doc.metadata[SCORE_STD_KEY]) is float
        assert doc.metadata[SCORE_STD_KEY] > 0
        coefficients = doc.metadata[COEFFICIENTS_KEY]
        assert list(coefficients) == ["a", "b", "c"]
        assert all(type(value) is float for value in coefficients.values())
        assert sum(coefficients.values()) == pytest.approx(1.0, abs=1e-6)
        assert doc.id == str(doc.metadata["source"])
    assert all(RELEVANCE_SCORE_KEY not in doc.metadata for doc in documents)
    assert all(doc.metadata == {"source": index} for index, doc in enumerate(documents))
    assert results[0] is not documents[2]


def test_reranker_reads_cache_and_encodes_only_query(embeddings, members):
    embeddings.embed_documents(TEXTS)
    encoded = [member.encoded for member in members]

    UECReranker(embeddings=embeddings).compress_documents(_documents(), "query text")

    assert [member.encoded - before for member, before in zip(members, encoded, strict=True)] == [
        1,
        1,
        1,
    ]


def test_reranker_empty_and_errors(embeddings):
    reranker = UECReranker(embeddings=embeddings)
    assert reranker.compress_documents([], "query") == []

    bad = [*_documents()[:2], Document(page_content="x")]
    object.__setattr__(bad[2], "page_content", 12)
    with pytest.raises(TypeError, match=r"documents\[2\]\.page_content must be str, got int"):
        reranker.compress_documents(bad, "query")
    with pytest.raises(TypeError, match="query must be str"):
        reranker.compress_documents(_documents(), None)
    with pytest.raises(ValueError, match="top_n"):
        UECReranker(embeddings=embeddings, top_n=0)


def test_reranker_duplicates_keep_all_with_equal_scores(embeddings, members):
    documents = [
        Document(page_content=TEXTS[0], metadata={"copy": 1}),
        Document(page_content=TEXTS[1]),
        Document(page_content=TEXTS[0], metadata={"copy": 2}),
    ]
    results = UECReranker(embeddings=embeddings, top_n=None).compress_documents(documents, TEXTS[0])

    assert [doc.metadata.get("copy") for doc in results] == [1, 2, None]
    assert results[0].metadata[RELEVANCE_SCORE_KEY] == results[1].metadata[RELEVANCE_SCORE_KEY]
    assert members[0].encoded == 1 + 2  # the query plus two distinct documents


async def test_reranker_async_matches_sync(embeddings):
    reranker = UECReranker(embeddings=embeddings, top_n=3)
    sync = reranker.compress_documents(_documents(), "dog in a garden")
    asynchronous = await reranker.acompress_documents(_documents(), "dog in a garden")
    assert [doc.page_content for doc in asynchronous] == [doc.page_content for doc in sync]


def test_reranker_pickles(embeddings):
    reranker = UECReranker(embeddings=embeddings, top_n=2)
    expected = reranker.compress_documents(_documents(), "markets")
    restored = pickle.loads(pickle.dumps(reranker))
    assert restored.compress_documents(_documents(), "markets") == expected


def test_contextual_compression_retriever_fake(embeddings):
    retrievers = pytest.importorskip("langchain_classic.retrievers")
    store = InMemoryVectorStore(embedding=embeddings)
    store.add_documents(_documents())
    retriever = retrievers.ContextualCompressionRetriever(
        base_compressor=UECReranker(embeddings=embeddings, top_n=2),
        base_retriever=store.as_retriever(search_kwargs={"k": 4}),
    )

    results = retriever.invoke(TEXTS[3])

    assert len(results) == 2
    assert results[0].page_content == TEXTS[3]
    assert RELEVANCE_SCORE_KEY in results[0].metadata


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def real_embeddings() -> UECEmbeddings:
    return UECEmbeddings(cache=SHARED_REAL_CACHE, batch_size=16)


PASSAGES = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Москва — столица России и крупнейший город страны.",
    "長城是中國古代的軍事防禦工程。",
    "The Great Wall of China is a series of fortifications built across northern China.",
    "Python is a programming language that emphasises readability.",
    "La Tour Eiffel est le monument le plus visité de Paris.",
    "Plants use chlorophyll to absorb sunlight.",
]


def _count_member_calls(monkeypatch: pytest.MonkeyPatch, model) -> list[int]:
    counts = [0] * len(model.cached_ensemble.ensemble.members)
    for position, member in enumerate(model.cached_ensemble.ensemble.members):
        original = member.encode

        def counted(texts, kind="document", *, _position=position, _original=original, **kw):
            counts[_position] += len(texts)
            return _original(texts, kind, **kw)

        monkeypatch.setattr(member, "encode", counted)
    return counts


@pytest.mark.slow
def test_real_cache_hit_means_no_encoder_call(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    model = UECEmbeddings(cache=tmp_path / "gaussians.sqlite", batch_size=16)
    counts = _count_member_calls(monkeypatch, model)

    first = model.embed_documents(PASSAGES)
    assert counts == [len(PASSAGES)] * 3

    second = model.embed_documents(PASSAGES)
    reranked = UECReranker(embeddings=model, top_n=3).compress_documents(
        [Document(page_content=text) for text in PASSAGES], "Where is the Eiffel Tower?"
    )

    assert second == first
    assert counts == [len(PASSAGES) + 1] * 3  # only the query was encoded
    assert "Eiffel" in reranked[0].page_content


@pytest.mark.slow
def test_real_reranker_order_equals_core_score(real_embeddings):
    query = "Which city is the capital of Russia?"
    documents = [Document(page_content=text, metadata={"i": i}) for i, text in enumerate(PASSAGES)]

    results = UECReranker(embeddings=real_embeddings, top_n=None).compress_documents(
        documents, query
    )

    ensemble = real_embeddings.cached_ensemble.ensemble
    scores = ensemble.score(ensemble.encode_queries([query]), ensemble.encode_documents(PASSAGES))
    expected = np.argsort(-scores.score[0], kind="stable").tolist()
    assert [doc.metadata["i"] for doc in results] == expected
    assert results[0].metadata["i"] == 2
    for doc in results:
        expected_score = scores.score[0, doc.metadata["i"]]
        assert doc.metadata[RELEVANCE_SCORE_KEY] == pytest.approx(expected_score, abs=1e-5)
        assert set(doc.metadata[COEFFICIENTS_KEY]) == set(DEFAULT_MEMBERS)


@pytest.mark.slow
def test_real_threads_equal_serial(real_embeddings):
    batches = [[f"{text} ({worker})" for text in PASSAGES[:2]] for worker in range(8)]
    serial_model = UECEmbeddings(cache=None, batch_size=16)
    serial = [serial_model.embed_documents(batch) for batch in batches]

    fresh = UECEmbeddings(cache=MemoryGaussianCache(), batch_size=16)
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(fresh.embed_documents, batches))

    for got, expected in zip(parallel, serial, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_real_contextual_compression_retriever(real_embeddings):
    retrievers = pytest.importorskip("langchain_classic.retrievers")
    store = InMemoryVectorStore(embedding=real_embeddings)
    store.add_texts(PASSAGES)
    retriever = retrievers.ContextualCompressionRetriever(
        base_compressor=UECReranker(embeddings=real_embeddings, top_n=2),
        base_retriever=store.as_retriever(search_kwargs={"k": 6}),
    )

    results = retriever.invoke("Что является столицей России?")

    assert len(results) == 2
    assert results[0].page_content == PASSAGES[2]
    assert results[0].metadata[RELEVANCE_SCORE_KEY] >= results[1].metadata[RELEVANCE_SCORE_KEY]


@pytest.mark.slow
@pytest.mark.parametrize("language", ["en", "ru"])
def test_real_reranker_improves_ndcg_on_xquad(data_dir: Path, real_embeddings, language: str):
    subset = xquad_subset(data_dir, language)
    first_stage = UECEmbeddings(members=["minilm"], cache=SHARED_REAL_CACHE, batch_size=16)
    store = InMemoryVectorStore(embedding=first_stage)
    store.add_documents(
        [Document(page_content=text, id=doc_id) for doc_id, text in subset.corpus.items()]
    )
    reranker = UECReranker(embeddings=real_embeddings, top_n=None)

    store_order: dict[str, list[str]] = {}
    reranked_order: dict[str, list[str]] = {}
    for query_id, query in subset.queries.items():
        candidates = store.similarity_search(query, k=FIRST_STAGE_K)
        store_order[query_id] = [doc.id for doc in candidates]
        reranked_order[query_id] = [
            doc.id for doc in reranker.compress_documents(candidates, query)
        ]

    before = ndcg_at_10(store_order, subset.qrels)
    after = ndcg_at_10(reranked_order, subset.qrels)
    print(f"xquad-{language}: store nDCG@10 {before:.4f}, UEC reranked {after:.4f}")
    assert after > before
