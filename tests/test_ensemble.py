"""UECEnsemble with fake members (no models) and, when available, real members."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from fake_members import FakeMember

from uec_rag.coefficients import CoefficientRule
from uec_rag.combine import direct_sum
from uec_rag.ensemble import EnsembleEncoding, UECEnsemble
from uec_rag.index import GaussianIndex
from uec_rag.similarity import uncertainty_similarity

TEXTS = ["the cat sat", "a dog barked", "stock markets fell", "rain is expected", "hello"]


def ensemble(**settings) -> UECEnsemble:
    members = [FakeMember("small", 6, 0.01, 0.06), FakeMember("large", 10, 0.04, 0.4)]
    return UECEnsemble(members, **settings)


def test_encode_returns_coefficients_and_combination() -> None:
    model = ensemble()
    encoding = model.encode_documents(TEXTS)

    assert isinstance(encoding, EnsembleEncoding)
    assert encoding.member_names == ("small", "large")
    assert encoding.coefficients.shape == (5, 2)
    np.testing.assert_allclose(encoding.coefficients.sum(axis=1), 1, rtol=1e-6)
    assert encoding.gaussian.dim == 16
    expected = direct_sum(list(encoding.member_embeddings), encoding.coefficients)
    np.testing.assert_array_equal(encoding.gaussian.mean, expected.mean)
    # The member with the smaller variance carries most of the weight.
    assert (encoding.coefficients[:, 0] > 0.5).all()


def test_combine_members_reuses_cached_embeddings() -> None:
    model = ensemble()
    per_member = model.encode_members(TEXTS, "query")
    calls = [member.calls for member in model.members]
    combined = model.combine_members(per_member)
    assert [member.calls for member in model.members] == calls
    np.testing.assert_array_equal(combined.gaussian.mean, model.encode_queries(TEXTS).gaussian.mean)

    with pytest.raises(ValueError, match="got 1 member embeddings for 2 members"):
        model.combine_members(per_member[:1])
    with pytest.raises(ValueError, match="dimension 10, expected 6"):
        model.combine_members(per_member[::-1])


def test_score_and_search_agree() -> None:
    model = ensemble()
    documents = model.encode_documents(TEXTS)
    queries = model.encode_queries(TEXTS[:2])
    scores = model.score(queries, documents)
    expected = uncertainty_similarity(queries.gaussian, documents.gaussian)
    np.testing.assert_allclose(scores.score, expected.score)

    index = model.index(TEXTS, ids=["a", "b", "c", "d", "e"])
    assert isinstance(index, GaussianIndex)
    result = model.search(TEXTS[:2], index, top_k=3)
    np.testing.assert_array_equal(result.indices, np.argsort(-scores.score, axis=1)[:, :3])
    assert result.ids[0][0] == "a"


def test_convolution_needs_equal_dims() -> None:
    with pytest.raises(ValueError, match=r"dimensions \[6, 10\].*direct_sum"):
        ensemble(combine="convolution")
    equal = UECEnsemble([FakeMember("a", 6), FakeMember("b", 6)], combine="convolution")
    assert equal.encode_documents(TEXTS).gaussian.dim == 6


def test_normalised_rule_uses_member_reference_traces() -> None:
    model = ensemble(coefficients=CoefficientRule(normalize_traces=True))
    coefficients = model.encode_documents(TEXTS).coefficients
    # Normalised by the reference traces, neither member dominates everywhere.
    assert coefficients.min() > 0.2

    missing = UECEnsemble(
        [FakeMember("a", 4, reference_trace=1.0), FakeMember("b", 4)],
        coefficients=CoefficientRule(normalize_traces=True),
    )
    with pytest.raises(ValueError, match="member 1 has no reference trace"):
        missing.encode_documents(TEXTS)


def test_invalid_members_raise() -> None:
    with pytest.raises(ValueError, match="members is empty"):
        UECEnsemble([])
    with pytest.raises(ValueError, match="duplicate member name 'a'"):
        UECEnsemble([FakeMember("a", 4), FakeMember("a", 8)])
    with pytest.raises(TypeError, match=r"members\[1\] has type int, not a ProbabilisticMember"):
        UECEnsemble([FakeMember("a", 4), 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="wrap a single one"):
        UECEnsemble("minilm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="combine must be one of"):
        UECEnsemble([FakeMember("a", 4)], combine="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duplicate member name 'minilm'"):
        UECEnsemble(["minilm", "minilm"])


def test_bad_texts_and_inputs_raise() -> None:
    model = ensemble()
    with pytest.raises(TypeError, match="wrap it in a list"):
        model.encode_queries("a single string")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"texts\[1\] must be str"):
        model.encode_documents(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="encode texts first"):
        model.score(["text"], model.encode_documents(TEXTS))  # type: ignore[arg-type]
    other = UECEnsemble([FakeMember("x", 3)])
    with pytest.raises(ValueError, match="index has dimension 3"):
        model.search(["q"], other.index(TEXTS))


def test_empty_texts_give_empty_encoding() -> None:
    encoding = ensemble().encode_documents([])
    assert encoding.gaussian.mean.shape == (0, 16)
    assert encoding.coefficients.shape == (0, 2)


def test_fingerprint_stable_and_sensitive() -> None:
    assert ensemble().fingerprint() == ensemble().fingerprint()
    assert len(ensemble().fingerprint()) == 64
    tempered = ensemble(coefficients=CoefficientRule(temperature=2))
    assert tempered.fingerprint() != ensemble().fingerprint()
    swapped = UECEnsemble([FakeMember("large", 10, 0.04, 0.4), FakeMember("small", 6, 0.01, 0.06)])
    assert swapped.fingerprint() != ensemble().fingerprint()
    assert ensemble(index_precision="uint8").fingerprint() == ensemble().fingerprint()


def test_ensemble_pickles() -> None:
    model = ensemble(coefficients=CoefficientRule("softmax", 0.5))
    restored = pickle.loads(pickle.dumps(model))
    assert restored.fingerprint() == model.fingerprint()
    np.testing.assert_array_equal(
        restored.encode_documents(TEXTS).gaussian.mean, model.encode_documents(TEXTS).gaussian.mean
    )


def test_members_by_name_resolve_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    import uec_rag.encoders as encoders

    loaded: list[str] = []

    def fake_load(name: str, **settings) -> FakeMember:
        loaded.append(name)
        return FakeMember(name, 4)

    monkeypatch.setattr(encoders, "load_encoder", fake_load, raising=False)
    model = UECEnsemble(["one", "two"])
    assert loaded == []
    state = pickle.dumps(model)
    assert model.member_names == ("one", "two")
    assert loaded == ["one", "two"]
    assert pickle.loads(state).encode_documents(TEXTS).gaussian.dim == 8


@pytest.mark.slow
def test_real_members_search_xquad(data_dir) -> None:
    from uec_rag.datasets import load_beir

    dataset = load_beir(data_dir / "xquad-en", split="test")
    doc_ids = list(dataset.corpus)[:12]
    documents = [dataset.corpus[i] for i in doc_ids]
    queries = [
        dataset.queries[q] for q, judged in dataset.qrels.items() if set(judged) & set(doc_ids)
    ][:6]
    model = UECEnsemble(["minilm", "mpnet", "e5-small"])
    assert model.member_names == ("minilm", "mpnet", "e5-small")
    assert model.dim == 384 + 768 + 384

    encoded = model.encode_documents(documents)
    np.testing.assert_allclose(encoded.coefficients.sum(axis=1), 1, rtol=1e-5)
    assert (encoded.coefficients > 0).all()
    index = model.index(encoded, ids=doc_ids)
    result = model.search(queries, index, top_k=3)
    dense = model.score(model.encode_queries(queries), encoded)
    np.testing.assert_array_equal(result.indices, np.argsort(-dense.score, axis=1)[:, :3])
    # The uncertainty score differs from the mean inner product, but only slightly.
    assert (np.abs(dense.score) < np.abs(dense.mu_s)).all()

    restored = pickle.loads(pickle.dumps(model))
    assert restored.fingerprint() == model.fingerprint()
