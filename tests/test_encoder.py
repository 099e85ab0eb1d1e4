"""ProbabilisticEncoder on the real bundled models: mean, hooks, bad input, threads, pickling."""

from __future__ import annotations

import json
import logging
import multiprocessing
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from model_folders import sentence_transformers_modules

from uec_rag.encoders import load_encoder, shipped_posterior_path
from uec_rag.encoders.pooling import PoolingConfig, pool, pooling_weights, read_pooling_config
from uec_rag.encoders.transformer import ProbabilisticEncoder
from uec_rag.gaussian import GaussianEmbedding
from uec_rag.laplace.posterior import (
    DEFAULT_PRIOR_PRECISION,
    DiagonalPosterior,
    PosteriorMismatchError,
)

PRESETS = ["minilm", "mpnet", "e5-small"]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "Когда была основана Московская государственная консерватория?",
    "长城是中国古代的军事防御工程。",
    "ما هي عاصمة المملكة العربية السعودية؟",
    "",
    "   \t\n ",
    "word " * 700,
]

HOSTILE = [
    "\x00\x01\x02\x03\x07\x08\x1b[31mred\x1b[0m\x7f",
    "\u200b\u200c\u200d\u2060\ufeff",
    "\u202eevil right-to-left override\u202c \u200fمرحبا\u200e hello",
    "🙂😂🤖👨‍👩‍👧‍👦🏳️‍🌈" * 20,
    "Mixed: English, Русский, 中文, العربية, हिन्दी, 日本語, 한국어, ελληνικά",
    "\u0301\u0302\u0303" * 50,
    "a" * 100_000,
    "\n" * 5000,
    "🙂" * 30_000,
    "\uffff\ufffe\U0010ffff",
    "",
    " ",
]


_LOADED: dict[str, ProbabilisticEncoder] = {}


def _load(preset: str, **settings: object) -> ProbabilisticEncoder:
    try:
        return load_encoder(preset, **settings)
    except (ImportError, ValueError, FileNotFoundError) as error:
        pytest.skip(f"preset {preset} cannot be loaded here: {error}")


def _shared(preset: str) -> ProbabilisticEncoder:
    """Load each preset once per test session (prior-only posterior)."""
    if preset not in _LOADED:
        _LOADED[preset] = _load(preset, posterior=None)
    return _LOADED[preset]


@pytest.fixture(scope="module")
def minilm() -> ProbabilisticEncoder:
    return _shared("minilm")


# --------------------------------------------------------------------- mean


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_mean_matches_sentence_transformers(preset: str) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    encoder = _shared(preset)
    reference_model = sentence_transformers.SentenceTransformer(encoder.model_path, device="cpu")
    kinds = (
        ("query", "document")
        if encoder.prefix("query") != encoder.prefix("document")
        else ("query",)
    )
    for kind in kinds:
        prefixed = [encoder.prefix(kind) + text for text in SENTENCES]
        reference = reference_model.encode(prefixed, batch_size=4, convert_to_numpy=True)
        result = encoder.encode(SENTENCES, kind, batch_size=3)
        assert result.mean.shape == reference.shape
        assert float(np.abs(result.mean - reference).max()) <= 1e-5


def test_e5_prefixes_by_kind() -> None:
    encoder = _shared("e5-small")
    assert encoder.prefix("query") == "query: "
    assert encoder.prefix("document") == "passage: "
    query = encoder.encode(["capital of France"], "query")
    document = encoder.encode(["capital of France"], "document")
    assert not np.allclose(query.mean, document.mean)


def test_minilm_settings_from_config(minilm: ProbabilisticEncoder) -> None:
    assert minilm.pooling == PoolingConfig("mean", True, 256, False)
    assert minilm.max_seq_length == 256
    assert minilm.dim == 384
    assert minilm.name == "minilm"
    assert minilm.layer_name == "encoder.layer.5.output.dense"
    assert minilm.layer is minilm.model.encoder.layer[5].output.dense


def test_mean_is_unit_norm(minilm: ProbabilisticEncoder) -> None:
    result = minilm.encode(SENTENCES)
    np.testing.assert_allclose(np.linalg.norm(result.mean, axis=1), 1.0, atol=1e-5)


def test_input_order_preserved(minilm: ProbabilisticEncoder) -> None:
    texts = SENTENCES[:5]
    together = minilm.encode(texts, batch_size=2)
    for index, text in enumerate(texts):
        alone = minilm.encode([text])
        np.testing.assert_allclose(together.mean[index], alone.mean[0], atol=1e-6)
        np.testing.assert_allclose(together.variance[index], alone.variance[0], rtol=1e-4)


# ----------------------------------------------------------------- variance


def test_variance_positive_and_finite(minilm: ProbabilisticEncoder) -> None:
    result = minilm.encode(SENTENCES)
    assert isinstance(result, GaussianEmbedding)
    assert result.variance.dtype == np.float32
    assert np.isfinite(result.variance).all()
    assert (result.variance >= 0).all()
    # MiniLM has dead dimensions (LayerNorm gamma ~ 1e-33): constant, so variance ~ 0.
    gamma = minilm.model.encoder.layer[-1].output.LayerNorm.weight.detach().numpy()
    live = np.abs(gamma) > 1e-6
    assert int(live.sum()) >= 380
    assert (result.variance[:, live] > 0).all()


def test_variance_scales_with_posterior(minilm: ProbabilisticEncoder) -> None:
    doubled = minilm.posterior.with_metadata(variance_scale=2.0)
    base = minilm.encode(SENTENCES[:3]).variance
    scaled = minilm.with_posterior(doubled).encode(SENTENCES[:3]).variance
    np.testing.assert_allclose(scaled, 2.0 * base, rtol=1e-5)


def test_prior_only_fallback_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    encoder = _load("minilm", posterior=None)
    assert encoder.posterior.is_prior_only
    assert encoder.posterior.metadata.prior_precision == DEFAULT_PRIOR_PRECISION
    with caplog.at_level(logging.WARNING, logger="uec_rag.encoders.transformer"):
        encoder.encode(["one"])
        encoder.encode(["two"])
    messages = [
        record.getMessage() for record in caplog.records if "prior-only" in record.getMessage()
    ]
    assert len(messages) == 1


def test_auto_posterior_uses_shipped_file_or_prior() -> None:
    encoder = _load("minilm", posterior="auto")
    shipped = shipped_posterior_path("minilm")
    assert encoder.posterior.is_prior_only == (shipped is None)


# ------------------------------------------------------------ hooks API


def test_single_forward_pass_per_batch(minilm: ProbabilisticEncoder) -> None:
    calls = {"model": 0, "output": 0}

    def count(name: str):
        def hook(*_: object) -> None:
            calls[name] += 1

        return hook

    handles = [
        minilm.model.register_forward_hook(count("model")),
        minilm.model.encoder.layer[-1].output.register_forward_hook(count("output")),
    ]
    try:
        minilm.encode(SENTENCES[:5], batch_size=2)
    finally:
        for handle in handles:
            handle.remove()
    assert calls["model"] == 3
    assert calls["output"] == 3


def test_capture_shapes(minilm: ProbabilisticEncoder) -> None:
    captured = minilm.capture(SENTENCES[:3], "query")
    batch, tokens = captured.attention_mask.shape
    assert batch == 3
    assert captured.activations.shape == (3, tokens, 1536)
    assert captured.residual.shape == (3, tokens, 384)
    assert captured.pre_norm.shape == (3, tokens, 384)
    assert not captured.activations.is_inference()


def test_embed_from_capture_default_matches_encode(minilm: ProbabilisticEncoder) -> None:
    captured = minilm.capture(SENTENCES[:4])
    embedded = minilm.embed_from_capture(captured)
    expected = minilm.encode(SENTENCES[:4]).mean
    np.testing.assert_allclose(embedded.numpy(), expected, atol=1e-6)


def test_embed_from_capture_batched_samples(minilm: ProbabilisticEncoder) -> None:
    captured = minilm.capture(SENTENCES[:2])
    weight = minilm.layer.weight.detach()
    samples = torch.stack([weight, weight * 1.01, weight * 0.99])
    embedded = minilm.embed_from_capture(captured, samples)
    assert embedded.shape == (3, 2, 384)
    single = minilm.embed_from_capture(captured, weight * 1.01)
    torch.testing.assert_close(embedded[1], single, atol=1e-6, rtol=0)


def test_embed_from_capture_differentiable(minilm: ProbabilisticEncoder) -> None:
    captured = minilm.capture(SENTENCES[:2])
    weight = minilm.layer.weight.detach().clone().requires_grad_(True)
    embedded = minilm.embed_from_capture(captured, weight)
    embedded[0, 0].backward()
    assert weight.grad is not None
    assert float(weight.grad.abs().sum()) > 0


def test_variance_from_capture_matches_encode(minilm: ProbabilisticEncoder) -> None:
    captured = minilm.capture(SENTENCES[:3])
    np.testing.assert_allclose(
        minilm.variance_from_capture(captured).numpy(),
        minilm.encode(SENTENCES[:3]).variance,
        rtol=1e-4,
    )


def test_hooks_idle_outside_calls(minilm: ProbabilisticEncoder) -> None:
    minilm.encode(["warm up"])
    assert getattr(minilm._local, "recorder", None) is None
    inputs = minilm.tokenizer(["plain forward"], return_tensors="pt")
    with torch.inference_mode():
        minilm.model(**inputs)
    assert getattr(minilm._local, "recorder", None) is None


# ---------------------------------------------------------------- bad input


def test_empty_list_shape(minilm: ProbabilisticEncoder) -> None:
    result = minilm.encode([])
    assert result.mean.shape == (0, 384)
    assert result.variance.shape == (0, 384)


@pytest.mark.parametrize(("bad", "type_name"), [(None, "NoneType"), (3, "int"), (b"x", "bytes")])
def test_non_string_item_type_error(
    minilm: ProbabilisticEncoder, bad: object, type_name: str
) -> None:
    with pytest.raises(TypeError, match=rf"texts\[1\] must be str, got {type_name}"):
        minilm.encode(["fine", bad])


def test_bare_string_rejected(minilm: ProbabilisticEncoder) -> None:
    with pytest.raises(TypeError, match="wrap it in a list"):
        minilm.encode("not a list")


def test_invalid_kind_rejected(minilm: ProbabilisticEncoder) -> None:
    with pytest.raises(ValueError, match="kind must be 'query' or 'document'"):
        minilm.encode(["x"], kind="passage")


def test_lone_surrogate_rejected(minilm: ProbabilisticEncoder) -> None:
    with pytest.raises(ValueError, match=r"texts\[1\] is not valid Unicode"):
        minilm.encode(["fine", "bad \ud800 text"])


def test_empty_and_whitespace_defined(minilm: ProbabilisticEncoder) -> None:
    result = minilm.encode(["", " ", "\t\n", "x"])
    assert np.isfinite(result.mean).all()
    # Whitespace tokenizes to nothing, so all three are the [CLS] [SEP] embedding.
    np.testing.assert_allclose(result.mean[1], result.mean[0], atol=1e-6)
    np.testing.assert_allclose(result.mean[2], result.mean[0], atol=1e-6)
    assert not np.allclose(result.mean[3], result.mean[0])
    ids = minilm.tokenizer([""])["input_ids"][0]
    assert ids == [minilm.tokenizer.cls_token_id, minilm.tokenizer.sep_token_id]


def test_truncation_warns_once_with_count(
    minilm: ProbabilisticEncoder, caplog: pytest.LogCaptureFixture
) -> None:
    texts = ["short", "long " * 400, "also long " * 300, "fine"]
    with caplog.at_level(logging.WARNING, logger="uec_rag.encoders.transformer"):
        result = minilm.encode(texts, batch_size=1)
    messages = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert messages == [
        "minilm: 2 of 4 texts are longer than max_seq_length=256 tokens and were truncated"
    ]
    assert np.isfinite(result.mean).all()


def test_exact_length_not_counted_truncated(
    minilm: ProbabilisticEncoder, caplog: pytest.LogCaptureFixture
) -> None:
    text = " ".join(["word"] * 254)
    assert len(minilm.tokenizer([text])["input_ids"][0]) == 256
    with caplog.at_level(logging.WARNING, logger="uec_rag.encoders.transformer"):
        minilm.encode([text])
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_hostile_corpus_finite(preset: str) -> None:
    encoder = _shared(preset)
    for kind in ("query", "document"):
        result = encoder.encode(HOSTILE, kind, batch_size=4)
        assert result.mean.shape == (len(HOSTILE), encoder.dim)
        assert np.isfinite(result.mean).all()
        assert np.isfinite(result.variance).all()
        assert (result.variance >= 0).all()


# ------------------------------------------------------------ concurrency


@pytest.mark.slow
def test_threads_match_serial(minilm: ProbabilisticEncoder) -> None:
    texts = SENTENCES[:7]
    batches = [texts[i:] + texts[:i] for i in range(7)] + [texts[::-1]]
    serial = [minilm.encode(batch, batch_size=3) for batch in batches]
    barrier = threading.Barrier(8)

    def run(batch: list[str]) -> GaussianEmbedding:
        barrier.wait()
        return minilm.encode(batch, batch_size=3)

    with ThreadPoolExecutor(max_workers=8) as pool_:
        parallel = list(pool_.map(run, batches))
    for expected, actual in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(actual.mean, expected.mean)
        np.testing.assert_array_equal(actual.variance, expected.variance)


# --------------------------------------------------------------- pickling


def _encode_in_worker(args: tuple[bytes, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    encoder = pickle.loads(args[0])
    result = encoder.encode(args[1])
    return result.mean, result.variance


def test_pickle_stores_recipe_not_model(minilm: ProbabilisticEncoder) -> None:
    payload = pickle.dumps(minilm)
    assert len(payload) < 10_000
    restored = pickle.loads(payload)
    assert restored._loaded is False
    assert restored.fingerprint() == minilm.fingerprint()


def test_pickle_with_posterior_object(minilm: ProbabilisticEncoder) -> None:
    posterior = minilm.posterior.with_metadata(variance_scale=3.0, reference_trace=0.5)
    encoder = minilm.with_posterior(posterior)
    restored = pickle.loads(pickle.dumps(encoder))
    assert restored.reference_trace == 0.5
    np.testing.assert_array_equal(
        restored.encode(SENTENCES[:2]).variance, encoder.encode(SENTENCES[:2]).variance
    )


@pytest.mark.slow
def test_spawn_pool_matches_parent(minilm: ProbabilisticEncoder, tmp_path: Path) -> None:
    path = minilm.posterior.with_metadata(variance_scale=1.5).save(tmp_path / "p.safetensors")
    encoder = minilm.with_posterior(path)
    expected = encoder.encode(SENTENCES)
    payload = pickle.dumps(encoder)
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as workers:
        results = workers.map(_encode_in_worker, [(payload, SENTENCES)] * 2)
    for mean, variance in results:
        np.testing.assert_allclose(mean, expected.mean, atol=1e-6)
        np.testing.assert_allclose(variance, expected.variance, rtol=1e-5)


# ------------------------------------------------------------ properties


def test_fingerprint_depends_on_posterior_and_settings(minilm: ProbabilisticEncoder) -> None:
    base = minilm.fingerprint()
    assert base == minilm.fingerprint()
    scaled = minilm.with_posterior(minilm.posterior.with_metadata(variance_scale=2.0))
    assert scaled.fingerprint() != base
    prefixed = ProbabilisticEncoder(minilm.model_path, name="minilm", query_prefix="q: ")
    assert (
        prefixed.fingerprint()
        != ProbabilisticEncoder(minilm.model_path, name="minilm").fingerprint()
    )


def test_reference_trace_from_metadata(minilm: ProbabilisticEncoder) -> None:
    assert minilm.with_posterior(None).reference_trace is None
    posterior = minilm.posterior.with_metadata(reference_trace=0.042)
    assert minilm.with_posterior(posterior).reference_trace == 0.042


def test_mismatched_posterior_rejected(minilm: ProbabilisticEncoder, tmp_path: Path) -> None:
    foreign = DiagonalPosterior.prior_only(
        minilm.layer, model_fingerprint="0" * 64, layer_name=minilm.layer_name
    )
    path = foreign.save(tmp_path / "foreign.safetensors")
    with pytest.raises(PosteriorMismatchError) as info:
        load_encoder("minilm", posterior=path)
    assert "0" * 64 in str(info.value)
    assert minilm.model_fingerprint() in str(info.value)


def test_posterior_of_other_preset_rejected(minilm: ProbabilisticEncoder, tmp_path: Path) -> None:
    other = _shared("e5-small")
    path = other.posterior.save(tmp_path / "e5.safetensors")
    with pytest.raises(PosteriorMismatchError, match="does not belong to this model"):
        minilm.with_posterior(path)


# ------------------------------------------------------------------ pooling


@pytest.mark.parametrize(
    "mode", ["mean", "cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]
)
def test_pool_matches_sentence_transformers(mode: str) -> None:
    modules = pytest.importorskip("sentence_transformers.sentence_transformer.modules")
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 7, 5, generator=generator)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    reference = modules.Pooling(5, pooling_mode=mode)(
        {"token_embeddings": tokens, "attention_mask": mask}
    )["sentence_embedding"]
    ours, _ = pool(mode, tokens, mask)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)


def test_pooling_weights_cls_and_last() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    torch.testing.assert_close(
        pooling_weights("cls", mask), torch.tensor([[1.0, 0, 0, 0], [1, 0, 0, 0]])
    )
    torch.testing.assert_close(
        pooling_weights("lasttoken", mask), torch.tensor([[0.0, 0, 1, 0], [0, 1, 0, 0]])
    )
    torch.testing.assert_close(
        pooling_weights("mean", mask), torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0], [0.5, 0.5, 0, 0]])
    )


def test_read_pooling_config_rejects_dense(tmp_path: Path) -> None:
    modules = sentence_transformers_modules("Dense")
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"sentence_transformers\.models\.Dense"):
        read_pooling_config(tmp_path)


def test_read_pooling_config_legacy_cls(tmp_path: Path) -> None:
    modules = sentence_transformers_modules()
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    assert read_pooling_config(tmp_path) == PoolingConfig("cls", False, 128, False)


def test_read_pooling_config_plain_folder(tmp_path: Path) -> None:
    assert read_pooling_config(tmp_path) == PoolingConfig("mean", False, None, False)


def test_progress_bar_shown_on_request(
    minilm: ProbabilisticEncoder, capsys: pytest.CaptureFixture[str]
) -> None:
    minilm.encode(SENTENCES[:4], batch_size=2, show_progress=True)
    assert "encode minilm" in capsys.readouterr().err
    minilm.encode(SENTENCES[:4], batch_size=2)
    assert "encode minilm" not in capsys.readouterr().err
