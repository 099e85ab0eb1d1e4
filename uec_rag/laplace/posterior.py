"""Diagonal Gaussian posterior over one linear layer, stored as safetensors.

The file contains two tensors and string metadata::

    weight_variance  [H, I]   variance of each weight W[h, i]
    bias_variance    [H]      variance of each bias b[h]

The metadata records which model the posterior belongs to (``model_fingerprint``)
and how it was obtained (prior precision, curvature type, likelihood temperature,
training data, library version), plus the ``variance_scale`` applied at encode time
and the ``reference_trace`` of the resulting embedding covariances. Files may store
the tensors in float16; they are always loaded as float32.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from uec_rag._io import atomic_file
from uec_rag._version import __version__

__all__ = [
    "DEFAULT_PRIOR_PRECISION",
    "FORMAT_NAME",
    "DiagonalPosterior",
    "PosteriorMetadata",
    "PosteriorMismatchError",
    "model_fingerprint",
    "posterior_source_from_state",
    "posterior_source_to_state",
]

FORMAT_NAME = "uec_rag.diagonal_posterior.v1"
"""Value of the ``format`` metadata key; files without it are rejected."""

DEFAULT_PRIOR_PRECISION = 1.0e4
"""Prior precision of the prior-only fallback: every weight gets variance ``1e-4``.

A prior standard deviation of 0.01 is about a third of the typical magnitude of the
pretrained output-dense weights of BERT-style models (RMS 0.03 to 0.05), so the
perturbation stays near the range where linearisation holds. With it, minilm's
embedding traces are about 0.02 to 0.06, where the delta method overestimates the
variance by a few percent. It carries no information about the data, and fitted
posteriors replace it.
"""

_CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "layer_norm_eps",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "position_embedding_type",
    "relative_attention_num_buckets",
)
"""Architecture keys of a transformers config that enter the model fingerprint.

Keys such as ``transformers_version`` or ``_name_or_path`` change with the
environment, not the model, so they are left out.
"""


class PosteriorMismatchError(ValueError):
    """A posterior was loaded onto a model other than the one it was fitted for."""


def _canonical_config(config: Mapping[str, Any] | Any) -> str:
    if not isinstance(config, Mapping):
        config = config.to_dict()
    selected = {key: config[key] for key in _CONFIG_KEYS if key in config}
    return json.dumps(selected, sort_keys=True, separators=(",", ":"), default=str)


def model_fingerprint(layer: nn.Linear, config: Mapping[str, Any] | Any) -> str:
    """Compute the sha256 fingerprint of a model, as seen by its last-layer posterior.

    Parameters
    ----------
    layer : torch.nn.Linear
        The layer the posterior covers. Its weight and bias are hashed as
        little-endian float32 bytes.
    config : Mapping or transformers.PretrainedConfig
        The model config. Only the architecture keys listed in ``_CONFIG_KEYS``
        enter the hash, serialised as canonical JSON (sorted keys, no spaces).

    Returns
    -------
    str
        64 hex digits.
    """
    digest = hashlib.sha256()
    for tensor in (layer.weight, layer.bias):
        if tensor is None:
            digest.update(b"none")
            continue
        data = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(data.numpy().astype("<f4", copy=False).tobytes())
    digest.update(_canonical_config(config).encode("utf-8"))
    return digest.hexdigest()


@dataclass(frozen=True)
class PosteriorMetadata:
    """Provenance of a :class:`DiagonalPosterior`; stored as string metadata in the file.

    Parameters
    ----------
    model_fingerprint : str
        :func:`model_fingerprint` of the model and layer the posterior belongs to.
    layer_name : str
        Dotted module name of the layer, e.g. ``"encoder.layer.5.output.dense"``.
    prior_precision : float
        Precision of the isotropic Gaussian prior on the weights.
    curvature : str
        How the likelihood curvature was approximated, e.g. ``"diag_ggn"``,
        ``"empirical_fisher"``, or ``"prior_only"`` for no data.
    temperature : float, default=1.0
        Likelihood temperature used in the fit.
    data : str, default="none"
        Description of the fit data (name and size).
    n_data : int, default=0
        Number of training items used in the fit.
    variance_scale : float, default=1.0
        Factor applied to both variance tensors at encode time.
    reference_trace : float or None, default=None
        Median trace of the embedding covariance on the fit data, after scaling.
    library_version : str
        Version of ``uec_rag`` that wrote the file.
    """

    model_fingerprint: str
    layer_name: str
    prior_precision: float
    curvature: str
    temperature: float = 1.0
    data: str = "none"
    n_data: int = 0
    variance_scale: float = 1.0
    reference_trace: float | None = None
    library_version: str = __version__

    def to_strings(self) -> dict[str, str]:
        """Serialise to the ``str -> str`` mapping that safetensors stores."""
        result = {"format": FORMAT_NAME}
        for item in fields(self):
            value = getattr(self, item.name)
            if value is None:
                result[item.name] = ""
            elif isinstance(value, float):
                # repr() round-trips a float exactly.
                result[item.name] = repr(value)
            else:
                result[item.name] = str(value)
        return result

    @classmethod
    def from_strings(cls, values: Mapping[str, str], source: str) -> PosteriorMetadata:
        """Parse the mapping written by :meth:`to_strings`; ``source`` names the file in errors."""
        if values.get("format") != FORMAT_NAME:
            raise ValueError(
                f"{source} is not a uec_rag posterior file: metadata 'format' is "
                f"{values.get('format')!r}, expected {FORMAT_NAME!r}"
            )
        parsed: dict[str, Any] = {}
        for item in fields(cls):
            if item.name not in values:
                if item.name in ("model_fingerprint", "layer_name", "prior_precision", "curvature"):
                    raise ValueError(f"{source} is missing the metadata key {item.name!r}")
                continue
            text = values[item.name]
            try:
                if item.name in ("prior_precision", "temperature", "variance_scale"):
                    parsed[item.name] = float(text)
                elif item.name == "reference_trace":
                    parsed[item.name] = float(text) if text else None
                elif item.name == "n_data":
                    parsed[item.name] = int(text)
                else:
                    parsed[item.name] = text
            except ValueError as error:
                raise ValueError(
                    f"{source} has an invalid metadata value {item.name}={text!r}: {error}"
                ) from None
        metadata = cls(**parsed)
        metadata.validate(source)
        return metadata

    def validate(self, source: str = "posterior") -> None:
        """Raise ``ValueError`` if a numeric field is out of range."""
        if not (math.isfinite(self.prior_precision) and self.prior_precision > 0):
            raise ValueError(f"{source}: prior_precision must be > 0, got {self.prior_precision}")
        if not (math.isfinite(self.variance_scale) and self.variance_scale > 0):
            raise ValueError(f"{source}: variance_scale must be > 0, got {self.variance_scale}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"{source}: temperature must be > 0, got {self.temperature}")
        if self.reference_trace is not None and not (
            math.isfinite(self.reference_trace) and self.reference_trace >= 0
        ):
            raise ValueError(
                f"{source}: reference_trace must be finite and >= 0, got {self.reference_trace}"
            )
        if self.n_data < 0:
            raise ValueError(f"{source}: n_data must be >= 0, got {self.n_data}")


def _check_variance(name: str, tensor: torch.Tensor, shape: tuple[int, ...], source: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(
            f"{source}: {name} must have shape {list(shape)}, got {list(tensor.shape)}"
        )
    not_finite = ~torch.isfinite(tensor)
    if not_finite.any():
        index = tuple(int(i) for i in torch.nonzero(not_finite)[0])
        raise ValueError(f"{source}: {name} contains a non-finite value at index {index}")
    negative = tensor < 0
    if negative.any():
        index = tuple(int(i) for i in torch.nonzero(negative)[0])
        raise ValueError(
            f"{source}: {name} must be >= 0, got {float(tensor[index])} at index {index}"
        )


@dataclass(frozen=True, eq=False)
class DiagonalPosterior:
    """Diagonal Gaussian posterior N(theta_MAP, diag(variance)) over one linear layer.

    This is the diagonal Laplace approximation (MacKay 1992; Daxberger et al. 2021,
    "Laplace Redux") restricted to the weight ``W [H, I]`` and bias ``b [H]`` of a
    single ``nn.Linear``. The posterior precision of each parameter is the prior
    precision plus the diagonal curvature of the log likelihood, and the stored
    variance is its inverse. The mean is the pretrained weight itself, so only the
    variances are stored.

    At encode time both variances are multiplied by ``metadata.variance_scale``
    (:attr:`scaled_weight_variance`, :attr:`scaled_bias_variance`).

    Parameters
    ----------
    weight_variance : torch.Tensor
        Float32 tensor of shape ``[H, I]``, finite and ``>= 0``.
    bias_variance : torch.Tensor
        Float32 tensor of shape ``[H]``, finite and ``>= 0``.
    metadata : PosteriorMetadata
        Provenance, including the fingerprint of the model it belongs to.

    Raises
    ------
    ValueError
        If a shape, value or metadata field is invalid.
    """

    weight_variance: torch.Tensor
    bias_variance: torch.Tensor
    metadata: PosteriorMetadata
    _hash: list[str] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        weight = self.weight_variance.detach().to(device="cpu", dtype=torch.float32).contiguous()
        bias = self.bias_variance.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if weight.ndim != 2:
            raise ValueError(f"weight_variance must have shape [H, I], got {list(weight.shape)}")
        _check_variance("weight_variance", weight, tuple(weight.shape), "posterior")
        _check_variance("bias_variance", bias, (weight.shape[0],), "posterior")
        self.metadata.validate()
        object.__setattr__(self, "weight_variance", weight)
        object.__setattr__(self, "bias_variance", bias)

    @property
    def shape(self) -> tuple[int, int]:
        """Weight shape ``(H, I)`` of the covered layer."""
        return (int(self.weight_variance.shape[0]), int(self.weight_variance.shape[1]))

    @property
    def is_prior_only(self) -> bool:
        """Whether this is the data-free fallback built by :meth:`prior_only`."""
        return self.metadata.curvature == "prior_only"

    @property
    def scaled_weight_variance(self) -> torch.Tensor:
        """Weight variance times ``variance_scale``: the values used at encode time."""
        return self.weight_variance * self.metadata.variance_scale

    @property
    def scaled_bias_variance(self) -> torch.Tensor:
        """Bias variance times ``variance_scale``: the values used at encode time."""
        return self.bias_variance * self.metadata.variance_scale

    @classmethod
    def prior_only(
        cls,
        layer: nn.Linear,
        prior_precision: float = DEFAULT_PRIOR_PRECISION,
        *,
        model_fingerprint: str,
        layer_name: str,
    ) -> DiagonalPosterior:
        """Build the data-free fallback: isotropic variance ``1 / prior_precision``.

        Parameters
        ----------
        layer : torch.nn.Linear
            The covered layer; only its shape is used.
        prior_precision : float, default=DEFAULT_PRIOR_PRECISION
            Precision of the isotropic Gaussian prior (1e4).
        model_fingerprint : str
            Fingerprint of the model, from :func:`model_fingerprint`.
        layer_name : str
            Dotted module name of ``layer``.
        """
        if not (math.isfinite(prior_precision) and prior_precision > 0):
            raise ValueError(f"prior_precision must be finite and > 0, got {prior_precision}")
        variance = 1.0 / float(prior_precision)
        out_features, in_features = layer.weight.shape
        metadata = PosteriorMetadata(
            model_fingerprint=model_fingerprint,
            layer_name=layer_name,
            prior_precision=float(prior_precision),
            curvature="prior_only",
        )
        return cls(
            torch.full((out_features, in_features), variance, dtype=torch.float32),
            torch.full((out_features,), variance, dtype=torch.float32),
            metadata,
        )

    def with_metadata(self, **changes: Any) -> DiagonalPosterior:
        """Return a copy with some metadata fields replaced (e.g. ``reference_trace``)."""
        return DiagonalPosterior(
            self.weight_variance, self.bias_variance, replace(self.metadata, **changes)
        )

    def to_state(self) -> dict[str, Any]:
        """Return the tensors as numpy arrays and the metadata as strings, for pickling."""
        return {
            "weight_variance": self.weight_variance.numpy(),
            "bias_variance": self.bias_variance.numpy(),
            "metadata": self.metadata.to_strings(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> DiagonalPosterior:
        """Rebuild a posterior from the output of :meth:`to_state`, validating it again."""
        return cls(
            torch.from_numpy(np.asarray(state["weight_variance"])),
            torch.from_numpy(np.asarray(state["bias_variance"])),
            PosteriorMetadata.from_strings(state["metadata"], "pickled posterior"),
        )

    def check_compatible(self, fingerprint: str) -> None:
        """Raise :class:`PosteriorMismatchError` unless ``fingerprint`` is this posterior's model.

        Parameters
        ----------
        fingerprint : str
            :func:`model_fingerprint` of the model the posterior is about to be used with.
        """
        if fingerprint != self.metadata.model_fingerprint:
            raise PosteriorMismatchError(
                "posterior does not belong to this model: it was fitted for the model with "
                f"fingerprint {self.metadata.model_fingerprint} (layer "
                f"{self.metadata.layer_name}), but the loaded model has fingerprint "
                f"{fingerprint}. Load the posterior fitted for this model, fit one with "
                "`uec-rag fit`, or pass posterior=None to use the prior-only fallback."
            )

    def content_hash(self) -> str:
        """Sha256 over both variance tensors and the metadata (hex), cached after the first call."""
        if not self._hash:
            digest = hashlib.sha256()
            digest.update(self.weight_variance.numpy().astype("<f4", copy=False).tobytes())
            digest.update(self.bias_variance.numpy().astype("<f4", copy=False).tobytes())
            digest.update(json.dumps(self.metadata.to_strings(), sort_keys=True).encode("utf-8"))
            self._hash.append(digest.hexdigest())
        return self._hash[0]

    def save(self, path: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
        """Write the posterior to a safetensors file atomically.

        Parameters
        ----------
        path : str or Path
            Target file, conventionally ``*.safetensors``.
        dtype : torch.dtype, default=torch.float32
            Storage type, ``torch.float32`` or ``torch.float16`` (half the size;
            variances below about 6e-8 lose precision and below 6e-8 / 2**10 become 0).
        """
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
        if dtype == torch.float16 and float(self.weight_variance.max()) > 65504.0:
            raise ValueError("weight_variance exceeds the float16 range; save with float32")
        path = Path(path)
        tensors = {
            "weight_variance": self.weight_variance.to(dtype).contiguous(),
            "bias_variance": self.bias_variance.to(dtype).contiguous(),
        }
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=self.metadata.to_strings())
        return path

    @classmethod
    def load(cls, path: str | Path) -> DiagonalPosterior:
        """Read and validate a posterior written by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            If the file is not a uec_rag posterior, or a tensor has a wrong shape,
            a non-finite or a negative value.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"posterior file not found: {path}")
        source = str(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                strings = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, ValueError, OSError) as error:
            raise ValueError(f"{source} is not a valid safetensors file: {error}") from None
        metadata = PosteriorMetadata.from_strings(strings, source)
        missing = {"weight_variance", "bias_variance"} - tensors.keys()
        if missing:
            raise ValueError(f"{source} is missing the tensors {sorted(missing)}")
        weight = tensors["weight_variance"].to(torch.float32)
        bias = tensors["bias_variance"].to(torch.float32)
        if weight.ndim != 2:
            raise ValueError(
                f"{source}: weight_variance must have shape [H, I], got {list(weight.shape)}"
            )
        _check_variance("weight_variance", weight, tuple(weight.shape), source)
        _check_variance("bias_variance", bias, (weight.shape[0],), source)
        return cls(weight, bias, metadata)


def posterior_source_to_state(
    source: DiagonalPosterior | str | Path | None,
) -> dict[str, Any] | str | None:
    """Convert an encoder's ``posterior`` argument to a picklable value.

    A :class:`DiagonalPosterior` becomes the mapping of :meth:`DiagonalPosterior.to_state`
    and a ``Path`` becomes a string. Other values are returned unchanged.
    """
    if isinstance(source, DiagonalPosterior):
        return source.to_state()
    if isinstance(source, Path):
        return str(source)
    return source


def posterior_source_from_state(
    state: dict[str, Any] | str | None,
) -> DiagonalPosterior | str | None:
    """Convert the output of :func:`posterior_source_to_state` back into a ``posterior`` argument.

    A mapping becomes a :class:`DiagonalPosterior`. Other values are returned unchanged.
    """
    if isinstance(state, dict):
        return DiagonalPosterior.from_state(state)
    return state
