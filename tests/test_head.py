"""Head-mode member: identity head over a black-box embedder."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch

from uec_rag.encoders.base import ProbabilisticMember
from uec_rag.encoders.head import HeadEncoder
from uec_rag.laplace.fit import fit_posterior
from uec_rag.laplace.posterior import DiagonalPosterior, PosteriorMismatchError

DIM = 12


def hashed_embedder(texts: list[str]) -> np.ndarray:
    """A deterministic, picklable black box: hashed character trigrams, L2-normalised."""
    vectors = np.zeros((len(texts), DIM), dtype=np.float32)
    for row, text in enumerate(texts):
        padded = f"  {text}  "
        for start in range(len(padded) - 2):
            digest = hashlib.md5(padded[start : start + 3].encode("utf-8")).digest()
            vectors[row, digest[0] % DIM] += 1.0 if digest[1] % 2 else -1.0
        vectors[row] /= max(float(np.linalg.norm(vectors[row])), 1e-6)
    return vectors


class FakeLangChainEmbeddings:
    """Duck-typed LangChain Embeddings that marks queries differently from documents."""

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return hashed_embedder(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        return (-hashed_embedder([text])[0]).tolist()


def _random_posterior(head: HeadEncoder, seed: int = 0) -> DiagonalPosterior:
    generator = torch.Generator().manual_seed(seed)
    prior = head.posterior
    return DiagonalPosterior(
        torch.rand(DIM, DIM, generator=generator) * 0.02,
        torch.rand(DIM, generator=generator) * 0.01,
        prior.metadata,
    )


TEXTS = ["the cat sat on the mat", "quantum chromodynamics", "", "Привет, мир", "猫が好き"]


def test_head_mean_is_embedder_output():
    head = HeadEncoder(hashed_embedder, name="hashed")
    encoded = head.encode(TEXTS)
    np.testing.assert_array_equal(encoded.mean, hashed_embedder(TEXTS))
    assert isinstance(head, ProbabilisticMember)
    assert head.dim == DIM


def test_head_variance_formula_exact():
    head = HeadEncoder(hashed_embedder, name="hashed")
    posterior = _random_posterior(head)
    head = head.with_posterior(posterior)
    outputs = hashed_embedder(TEXTS).astype(np.float64)
    weight_variance = posterior.weight_variance.double().numpy()
    bias_variance = posterior.bias_variance.double().numpy()
    expected = np.zeros_like(outputs)
    for n in range(len(TEXTS)):
        for d in range(DIM):
            expected[n, d] = (outputs[n] ** 2 * weight_variance[d]).sum() + bias_variance[d]
    np.testing.assert_allclose(head.encode(TEXTS).variance, expected, rtol=1e-5)


def test_head_variance_matches_monte_carlo():
    head = HeadEncoder(hashed_embedder, name="hashed")
    head = head.with_posterior(_random_posterior(head, seed=1))
    captured = head.capture(TEXTS, "document")
    generator = torch.Generator().manual_seed(2)
    samples = 20000
    weight = torch.eye(DIM) + torch.randn(samples, DIM, DIM, generator=generator) * (
        head.posterior.weight_variance.sqrt()
    )
    bias = torch.randn(samples, DIM, generator=generator) * head.posterior.bias_variance.sqrt()
    outputs = head.embed_from_capture(captured, weight, bias)  # [S, B, D]
    empirical = outputs.var(dim=0).numpy()
    analytic = head.encode(TEXTS).variance
    relative = np.abs(empirical - analytic) / analytic
    assert np.median(relative) < 0.03
    assert abs(empirical.sum() / analytic.sum() - 1) < 0.02


def test_head_routes_langchain_queries():
    head = HeadEncoder(FakeLangChainEmbeddings(), name="fake-langchain")
    queries = head.encode(TEXTS, "query").mean
    documents = head.encode(TEXTS, "document").mean
    np.testing.assert_allclose(queries, -documents, rtol=1e-6)


def test_head_accepts_encode_objects():
    class Model:
        def encode(self, texts: list[str]) -> np.ndarray:
            return hashed_embedder(texts)

    head = HeadEncoder(Model(), name="encode-object")
    np.testing.assert_array_equal(head.encode(TEXTS).mean, hashed_embedder(TEXTS))


def test_head_rejects_unsupported_embedder():
    with pytest.raises(TypeError, match="embedder must be"):
        HeadEncoder(42, name="number")


def test_head_rejects_bad_outputs():
    head = HeadEncoder(lambda texts: np.full((len(texts), 3), np.nan), name="nan", dim=3)
    with pytest.raises(ValueError, match="non-finite value for text 0"):
        head.encode(["a"])
    head = HeadEncoder(lambda texts: np.zeros((len(texts) + 1, 3)), name="rows", dim=3)
    with pytest.raises(ValueError, match="shape"):
        head.encode(["a"])


def test_head_rejects_non_string_text():
    head = HeadEncoder(hashed_embedder, name="hashed")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        head.encode(["a", 3])  # type: ignore[list-item]


def test_head_empty_input():
    head = HeadEncoder(hashed_embedder, name="hashed")
    assert head.encode([]).mean.shape == (0, DIM)


def test_head_pickles():
    head = HeadEncoder(hashed_embedder, name="hashed")
    head = head.with_posterior(_random_posterior(head))
    restored = pickle.loads(pickle.dumps(head))
    np.testing.assert_array_equal(restored.encode(TEXTS).variance, head.encode(TEXTS).variance)
    assert restored.fingerprint() == head.fingerprint()


def test_head_posterior_round_trip_and_mismatch(tmp_path):
    head = HeadEncoder(hashed_embedder, name="hashed")
    path = _random_posterior(head).save(tmp_path / "head.safetensors")
    loaded = HeadEncoder(hashed_embedder, path, name="hashed")
    np.testing.assert_array_equal(
        loaded.encode(TEXTS).variance, head.with_posterior(path).encode(TEXTS).variance
    )
    # The mismatch is reported when the head is built, before any call of the embedder.
    calls = []

    def counting_embedder(texts):
        calls.append(len(texts))
        return hashed_embedder(texts)

    with pytest.raises(PosteriorMismatchError, match="does not belong"):
        HeadEncoder(counting_embedder, path, name="another-model")
    with pytest.raises(ValueError, match=r"covers a \[12, 12\] head, but dim=8 was passed"):
        HeadEncoder(counting_embedder, path, name="hashed", dim=8)
    assert calls == []


def test_head_fit_shrinks_variance(tmp_path):
    words = ["river", "bank", "money", "stone", "music", "train", "paper", "cloud", "green"]
    pairs = [(f"what about {a} and {b}", f"{a} {b} {a} story") for a in words for b in words[:4]]
    head = HeadEncoder(hashed_embedder, name="hashed")
    result = fit_posterior(head, pairs, batch_size=6, held_out_fraction=0.25, show_progress=False)
    posterior = result.posterior
    assert posterior.metadata.layer_name == "identity_head"
    assert posterior.metadata.n_data == result.n_fit == 27
    assert float(posterior.weight_variance.max()) <= 1.0 / result.prior_precision
    assert float(posterior.weight_variance.min()) < 1.0 / result.prior_precision
    path = posterior.save(tmp_path / "fitted.safetensors")
    assert HeadEncoder(hashed_embedder, path, name="hashed").reference_trace == pytest.approx(
        result.reference_trace
    )


def _spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman rank correlation (no ties expected in real-valued traces)."""

    def ranks(values: np.ndarray) -> np.ndarray:
        result = np.empty(len(values))
        result[np.argsort(values, kind="stable")] = np.arange(len(values))
        return result

    return float(np.corrcoef(ranks(first), ranks(second))[0, 1])


@pytest.mark.slow
@pytest.mark.xfail(
    reason="measured Spearman -0.10: layer-mode traces follow the norm of the pooled vector "
    "before normalisation, which normalised black-box outputs do not carry (see "
    "docs/posteriors.md, head mode and test_layer_trace_follows_pooled_norm)",
    strict=False,
)
def test_head_traces_rank_like_layer_mode(data_dir):
    import random

    from uec_rag.datasets import load_beir, load_pairs
    from uec_rag.encoders import load_encoder, shipped_posterior_path

    if shipped_posterior_path("minilm") is None:
        pytest.skip("no shipped minilm posterior to compare with")
    layer_mode = load_encoder("minilm")
    head = HeadEncoder(lambda texts: layer_mode.encode(texts).mean, name="minilm-black-box")

    pairs = []
    for name in ("xquad-en", "xquad-ru", "xquad-zh", "xquad-ar", "scifact"):
        pairs += load_pairs(data_dir / name)
    pairs = random.Random(0).sample(pairs, 120)
    head = head.with_posterior(fit_posterior(head, pairs, show_progress=False).posterior)

    texts = []
    for name in ("xquad-en", "xquad-ru", "xquad-zh", "xquad-ar", "scifact"):
        dataset = load_beir(data_dir / name, split="test")
        texts += [dataset.queries[query_id] for query_id in sorted(dataset.queries)[:40]]
    layer_traces = layer_mode.encode(texts, "query").variance.sum(axis=1)
    head_traces = head.encode(texts, "query").variance.sum(axis=1)

    correlation = _spearman(layer_traces, head_traces)
    print(f"Spearman(head-mode trace, layer-mode trace) over {len(texts)} queries: {correlation}")
    assert correlation > 0.5


@pytest.mark.slow
def test_layer_trace_follows_pooled_norm(data_dir):
    """The layer-mode trace of a normalising model grows as its pooled vector shrinks."""
    from uec_rag.datasets import load_beir
    from uec_rag.encoders import load_encoder, shipped_posterior_path
    from uec_rag.encoders.pooling import pool

    if shipped_posterior_path("minilm") is None:
        pytest.skip("no shipped minilm posterior")
    layer_mode = load_encoder("minilm")
    texts = []
    for name in ("xquad-en", "xquad-ru", "xquad-zh", "xquad-ar"):
        dataset = load_beir(data_dir / name, split="test")
        texts += [dataset.queries[query_id] for query_id in sorted(dataset.queries)[:100]]
    traces = layer_mode.encode(texts, "query").variance.sum(axis=1)
    norms = []
    for start in range(0, len(texts), 50):
        captured = layer_mode.capture(texts[start : start + 50], "query")
        pooled, _ = pool("mean", captured.last_hidden_state, captured.attention_mask)
        norms.append(pooled.norm(dim=1).detach().numpy())
    inverse_square_norm = 1.0 / np.concatenate(norms) ** 2

    correlation = _spearman(traces, inverse_square_norm)
    print(f"Spearman(layer-mode trace, 1 / ||pooled||^2) over {len(texts)} queries: {correlation}")
    assert correlation > 0.7
