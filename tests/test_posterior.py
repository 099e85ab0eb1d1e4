"""DiagonalPosterior: file format, validation, fingerprints and the model-mismatch check."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from uec_rag.laplace.posterior import (
    DEFAULT_PRIOR_PRECISION,
    FORMAT_NAME,
    DiagonalPosterior,
    PosteriorMetadata,
    PosteriorMismatchError,
    model_fingerprint,
    posterior_source_from_state,
    posterior_source_to_state,
)

CONFIG = {"model_type": "bert", "hidden_size": 4, "intermediate_size": 6, "layer_norm_eps": 1e-12}


def _layer(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(6, 4)


def _posterior(layer: nn.Linear, **changes: object) -> DiagonalPosterior:
    generator = torch.Generator().manual_seed(1)
    metadata = PosteriorMetadata(
        model_fingerprint=model_fingerprint(layer, CONFIG),
        layer_name="encoder.layer.5.output.dense",
        prior_precision=3.5,
        curvature="diag_ggn",
        temperature=0.5,
        data="xquad-en train, 230 pairs",
        n_data=230,
        variance_scale=2.0,
        reference_trace=0.0125,
    )
    posterior = DiagonalPosterior(
        torch.rand(4, 6, generator=generator) * 1e-3,
        torch.rand(4, generator=generator) * 1e-3,
        metadata,
    )
    return posterior.with_metadata(**changes) if changes else posterior


def test_roundtrip_float32_exact(tmp_path: Path) -> None:
    posterior = _posterior(_layer())
    path = posterior.save(tmp_path / "p.safetensors")
    loaded = DiagonalPosterior.load(path)
    assert torch.equal(loaded.weight_variance, posterior.weight_variance)
    assert torch.equal(loaded.bias_variance, posterior.bias_variance)
    assert loaded.metadata == posterior.metadata
    assert loaded.content_hash() == posterior.content_hash()


def test_roundtrip_float16_loads_float32(tmp_path: Path) -> None:
    posterior = _posterior(_layer())
    path = posterior.save(tmp_path / "p16.safetensors", dtype=torch.float16)
    loaded = DiagonalPosterior.load(path)
    assert loaded.weight_variance.dtype == torch.float32
    assert loaded.bias_variance.dtype == torch.float32
    torch.testing.assert_close(loaded.weight_variance, posterior.weight_variance, rtol=1e-3, atol=0)
    assert path.stat().st_size < posterior.save(tmp_path / "p32.safetensors").stat().st_size


def test_metadata_stored_as_strings(tmp_path: Path) -> None:
    path = _posterior(_layer()).save(tmp_path / "p.safetensors")
    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_size])
    strings = header["__metadata__"]
    assert strings["format"] == FORMAT_NAME
    assert strings["layer_name"] == "encoder.layer.5.output.dense"
    assert float(strings["prior_precision"]) == 3.5
    assert strings["curvature"] == "diag_ggn"
    assert float(strings["temperature"]) == 0.5
    assert int(strings["n_data"]) == 230
    assert float(strings["reference_trace"]) == 0.0125
    assert strings["library_version"]


def test_scaled_variances_apply_variance_scale() -> None:
    posterior = _posterior(_layer())
    torch.testing.assert_close(posterior.scaled_weight_variance, 2.0 * posterior.weight_variance)
    torch.testing.assert_close(posterior.scaled_bias_variance, 2.0 * posterior.bias_variance)


def test_missing_reference_trace_roundtrips(tmp_path: Path) -> None:
    posterior = _posterior(_layer(), reference_trace=None)
    loaded = DiagonalPosterior.load(posterior.save(tmp_path / "p.safetensors"))
    assert loaded.metadata.reference_trace is None


def _write_raw(path: Path, weight: torch.Tensor, bias: torch.Tensor, metadata: dict) -> Path:
    save_file({"weight_variance": weight, "bias_variance": bias}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    ("weight", "bias", "message"),
    [
        (torch.ones(4, 6), torch.ones(5), r"bias_variance must have shape \[4\]"),
        (torch.ones(24), torch.ones(4), r"weight_variance must have shape \[H, I\]"),
        (torch.full((4, 6), float("nan")), torch.ones(4), "non-finite value at index"),
        (torch.ones(4, 6), torch.tensor([1.0, float("inf"), 1.0, 1.0]), "non-finite"),
        (-torch.ones(4, 6), torch.ones(4), r"must be >= 0, got -1.0 at index \(0, 0\)"),
    ],
)
def test_load_rejects_invalid_tensors(
    tmp_path: Path, weight: torch.Tensor, bias: torch.Tensor, message: str
) -> None:
    metadata = _posterior(_layer()).metadata.to_strings()
    path = _write_raw(tmp_path / "bad.safetensors", weight, bias, metadata)
    with pytest.raises(ValueError, match=message):
        DiagonalPosterior.load(path)


def test_load_rejects_foreign_safetensors(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "foreign.safetensors", torch.ones(4, 6), torch.ones(4), {})
    with pytest.raises(ValueError, match="not a uec_rag posterior file"):
        DiagonalPosterior.load(path)


def test_load_rejects_missing_metadata_key(tmp_path: Path) -> None:
    metadata = _posterior(_layer()).metadata.to_strings()
    del metadata["model_fingerprint"]
    path = _write_raw(tmp_path / "nokey.safetensors", torch.ones(4, 6), torch.ones(4), metadata)
    with pytest.raises(ValueError, match="missing the metadata key 'model_fingerprint'"):
        DiagonalPosterior.load(path)


def test_load_rejects_invalid_metadata_value(tmp_path: Path) -> None:
    metadata = _posterior(_layer()).metadata.to_strings()
    metadata["prior_precision"] = "-1"
    path = _write_raw(tmp_path / "neg.safetensors", torch.ones(4, 6), torch.ones(4), metadata)
    with pytest.raises(ValueError, match="prior_precision must be > 0"):
        DiagonalPosterior.load(path)


def test_load_rejects_non_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        DiagonalPosterior.load(path)


def test_load_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match="posterior file not found"):
        DiagonalPosterior.load("/nonexistent/posterior.safetensors")


def test_constructor_rejects_negative_variance() -> None:
    metadata = _posterior(_layer()).metadata
    with pytest.raises(ValueError, match="weight_variance must be >= 0"):
        DiagonalPosterior(-torch.ones(4, 6), torch.ones(4), metadata)


def test_fingerprint_changes_with_one_weight() -> None:
    layer = _layer()
    before = model_fingerprint(layer, CONFIG)
    with torch.no_grad():
        layer.weight[2, 3] += 1e-6
    assert model_fingerprint(layer, CONFIG) != before


def test_fingerprint_changes_with_architecture() -> None:
    layer = _layer()
    other = dict(CONFIG, layer_norm_eps=1e-5)
    assert model_fingerprint(layer, CONFIG) != model_fingerprint(layer, other)


def test_fingerprint_ignores_environment_keys() -> None:
    layer = _layer()
    noisy = dict(CONFIG, transformers_version="9.9.9", _name_or_path="/somewhere/else")
    assert model_fingerprint(layer, CONFIG) == model_fingerprint(layer, noisy)


def test_fingerprint_is_sha256_hex() -> None:
    value = model_fingerprint(_layer(), CONFIG)
    assert len(value) == 64
    assert int(value, 16) >= 0


def test_check_compatible_names_both_fingerprints() -> None:
    posterior = _posterior(_layer(0))
    other = model_fingerprint(_layer(1), CONFIG)
    with pytest.raises(PosteriorMismatchError) as info:
        posterior.check_compatible(other)
    message = str(info.value)
    assert posterior.metadata.model_fingerprint in message
    assert other in message
    assert "posterior=None" in message


def test_check_compatible_accepts_own_model() -> None:
    layer = _layer(0)
    _posterior(layer).check_compatible(model_fingerprint(layer, CONFIG))


def test_prior_only_is_isotropic() -> None:
    layer = _layer()
    posterior = DiagonalPosterior.prior_only(
        layer, 250.0, model_fingerprint="abc", layer_name="dense"
    )
    assert posterior.is_prior_only
    assert torch.equal(posterior.weight_variance, torch.full((4, 6), 1 / 250.0))
    assert torch.equal(posterior.bias_variance, torch.full((4,), 1 / 250.0))
    assert posterior.metadata.prior_precision == 250.0
    assert posterior.metadata.curvature == "prior_only"


def test_prior_only_default_precision() -> None:
    posterior = DiagonalPosterior.prior_only(_layer(), model_fingerprint="abc", layer_name="d")
    assert posterior.metadata.prior_precision == DEFAULT_PRIOR_PRECISION
    assert float(posterior.weight_variance[0, 0]) == pytest.approx(1 / DEFAULT_PRIOR_PRECISION)


@pytest.mark.parametrize("precision", [0.0, -1.0, float("inf"), float("nan")])
def test_prior_only_rejects_bad_precision(precision: float) -> None:
    with pytest.raises(ValueError, match="prior_precision must be finite and > 0"):
        DiagonalPosterior.prior_only(_layer(), precision, model_fingerprint="a", layer_name="d")


def test_content_hash_depends_on_variances() -> None:
    layer = _layer()
    first = _posterior(layer)
    second = DiagonalPosterior(first.weight_variance * 2, first.bias_variance, first.metadata)
    assert first.content_hash() != second.content_hash()


def test_save_is_atomic_no_leftovers(tmp_path: Path) -> None:
    _posterior(_layer()).save(tmp_path / "p.safetensors")
    assert sorted(item.name for item in tmp_path.iterdir()) == ["p.safetensors"]


def test_state_round_trip_exact() -> None:
    posterior = _posterior(_layer())
    state = pickle.loads(pickle.dumps(posterior.to_state()))
    restored = DiagonalPosterior.from_state(state)
    assert torch.equal(restored.weight_variance, posterior.weight_variance)
    assert torch.equal(restored.bias_variance, posterior.bias_variance)
    assert restored.metadata == posterior.metadata
    assert restored.content_hash() == posterior.content_hash()


def test_from_state_rejects_negative_variance() -> None:
    state = _posterior(_layer()).to_state()
    state["bias_variance"] = -state["bias_variance"]
    with pytest.raises(ValueError, match="bias_variance must be >= 0"):
        DiagonalPosterior.from_state(state)


def test_posterior_source_state_conversion(tmp_path: Path) -> None:
    posterior = _posterior(_layer())
    restored = posterior_source_from_state(posterior_source_to_state(posterior))
    assert isinstance(restored, DiagonalPosterior)
    assert restored.content_hash() == posterior.content_hash()
    assert posterior_source_to_state(tmp_path / "p.safetensors") == str(tmp_path / "p.safetensors")
    assert posterior_source_from_state(str(tmp_path)) == str(tmp_path)
    assert posterior_source_to_state(None) is None
    assert posterior_source_from_state(None) is None
