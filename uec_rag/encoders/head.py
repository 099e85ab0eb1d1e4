"""Head-mode member: an identity linear head with a Laplace posterior over a black-box embedder.

Some embedders expose only their output vectors (an API model behind LangChain
``Embeddings``, an ONNX model, a function). :class:`HeadEncoder` puts a linear
head ``y = W h + b`` with ``W = I`` and ``b = 0`` on the output ``h(x)`` and gives
it the same diagonal Laplace treatment as the last layer of a transformer
(MacKay 1992; Daxberger et al. 2021, "Laplace Redux"). The mean is ``h(x)``
itself and, because the head is linear, the variance is exact::

    Var[y_d(x)] = sum_i h_i(x)^2 sigma2_W[d, i] + sigma2_b[d].

The head exposes the hooks API of :class:`~uec_rag.encoders.ProbabilisticEncoder`
(``layer``, ``capture``, ``embed_from_capture``), so
:func:`uec_rag.laplace.fit.fit_posterior` fits it with the same code, and the
posterior file format is the same.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from uec_rag.encoders.base import Kind, check_kind, check_texts
from uec_rag.gaussian import GaussianEmbedding
from uec_rag.laplace.posterior import (
    DEFAULT_PRIOR_PRECISION,
    DiagonalPosterior,
    model_fingerprint,
    posterior_source_from_state,
    posterior_source_to_state,
)

__all__ = ["HEAD_LAYER_NAME", "HeadCapture", "HeadEncoder"]

logger = logging.getLogger(__name__)

HEAD_LAYER_NAME = "identity_head"
"""Layer name recorded in head-mode posterior files."""

_VARIANCE_METHOD = "identity-head-exact-v1"


@dataclass(frozen=True)
class HeadCapture:
    """Black-box outputs of one batch, shaped like a one-token transformer capture.

    Attributes
    ----------
    activations : torch.Tensor
        Head input ``h [B, 1, D]``.
    residual : torch.Tensor
        Zeros ``[B, 1, D]``: the head output is ``W h + b + residual``.
    attention_mask : torch.Tensor
        Ones ``[B, 1]``.
    """

    activations: torch.Tensor
    residual: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.attention_mask.shape[0])


def _embedding_functions(
    embedder: Any,
) -> tuple[Callable[[list[str]], Any], Callable[[list[str]], Any]]:
    """Return (query function, document function) for a supported embedder."""
    if hasattr(embedder, "embed_documents") and hasattr(embedder, "embed_query"):
        # LangChain Embeddings, duck-typed so that langchain need not be installed.
        def embed_queries(texts: list[str]) -> Any:
            return [embedder.embed_query(text) for text in texts]

        return embed_queries, embedder.embed_documents
    if hasattr(embedder, "encode") and callable(embedder.encode):
        return embedder.encode, embedder.encode
    if callable(embedder):
        return embedder, embedder
    raise TypeError(
        f"embedder must be a callable texts -> array [N, D], an object with .encode, or a "
        f"LangChain Embeddings (embed_documents/embed_query), got {type(embedder).__name__}"
    )


class HeadEncoder:
    """A black-box embedder with an identity linear head and a diagonal Laplace posterior.

    Implements :class:`~uec_rag.encoders.base.ProbabilisticMember`. See the module
    docstring for the variance formula.

    Parameters
    ----------
    embedder : callable or object
        A callable ``texts -> array [N, D]``, an object with ``.encode(texts)``
        (e.g. sentence-transformers), or a LangChain ``Embeddings`` (queries go
        through ``embed_query``, documents through ``embed_documents``).
    posterior : DiagonalPosterior, str, Path or None, default=None
        Posterior over the head, or its safetensors file; ``None`` uses the
        prior-only fallback (isotropic variance ``1 / prior_precision``).
    name : str
        Name of the embedder. It enters the model fingerprint, so a posterior
        fitted for one name is rejected by a head of another name.
    dim : int or None, default=None
        Output dimension ``D``; taken from the posterior, or from one call of
        the embedder on a probe text, when ``None``.
    prior_precision : float, default=DEFAULT_PRIOR_PRECISION
        Prior precision of the prior-only fallback (1e4).
    batch_size : int, default=32
        Texts per embedder call.

    Notes
    -----
    The fingerprint covers the name and dimension only, not the embedder's
    weights, which a black box does not expose.
    """

    def __init__(
        self,
        embedder: Any,
        posterior: DiagonalPosterior | str | Path | None = None,
        *,
        name: str,
        dim: int | None = None,
        prior_precision: float = DEFAULT_PRIOR_PRECISION,
        batch_size: int = 32,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._embed_query, self._embed_document = _embedding_functions(embedder)
        self._embedder = embedder
        self._name = name
        self._prior_precision = float(prior_precision)
        self._batch_size = int(batch_size)
        self._posterior_source = posterior
        self._dim = dim
        self._layer: nn.Linear | None = None
        self._posterior: DiagonalPosterior | None = None
        self._prior_warning_logged = False
        self._dim_passed = dim is not None
        if isinstance(posterior, DiagonalPosterior):
            self._dim = posterior.shape[1] if dim is None else dim
        elif posterior is not None:
            self._posterior = DiagonalPosterior.load(posterior)
            self._dim = self._posterior.shape[1] if dim is None else dim
        if posterior is not None:
            self.posterior  # noqa: B018  (checks shape and fingerprint now, without a call)

    # ------------------------------------------------------------- properties

    @property
    def name(self) -> str:
        """Name of the embedder."""
        return self._name

    @property
    def dim(self) -> int:
        """Embedding dimension ``D``."""
        if self._dim is None:
            self._dim = int(self._call(["dimension probe"], "document").shape[1])
        return self._dim

    @property
    def layer(self) -> nn.Linear:
        """The identity head ``nn.Linear(D, D)`` with ``W = I`` and ``b = 0``."""
        if self._layer is None:
            layer = nn.Linear(self.dim, self.dim)
            with torch.no_grad():
                layer.weight.copy_(torch.eye(self.dim))
                layer.bias.zero_()
            layer.requires_grad_(False)
            self._layer = layer
        return self._layer

    @property
    def layer_name(self) -> str:
        """``"identity_head"``."""
        return HEAD_LAYER_NAME

    @property
    def posterior(self) -> DiagonalPosterior:
        """The posterior in use (the prior-only fallback when none was given)."""
        if self._posterior is None:
            source = self._posterior_source
            if isinstance(source, DiagonalPosterior):
                posterior = source
            else:
                posterior = DiagonalPosterior.prior_only(
                    self.layer,
                    self._prior_precision,
                    model_fingerprint=self.model_fingerprint(),
                    layer_name=HEAD_LAYER_NAME,
                )
            self._posterior = posterior
        if self._posterior.shape != (self.dim, self.dim):
            source = (
                f"dim={self.dim} was passed"
                if self._dim_passed
                else f"{self._name} returns {self.dim}-dimensional vectors"
            )
            raise ValueError(
                f"posterior covers a {list(self._posterior.shape)} head, but {source}; "
                "pass the posterior fitted for this embedder and dimension"
            )
        self._posterior.check_compatible(self.model_fingerprint())
        return self._posterior

    @property
    def reference_trace(self) -> float | None:
        """Median trace on the fit data, from the posterior metadata (``None`` if unfitted)."""
        return self.posterior.metadata.reference_trace

    def model_fingerprint(self) -> str:
        """Fingerprint of the identity head, the embedder name and the dimension."""
        config = {"model_type": f"{HEAD_LAYER_NAME}:{self._name}", "hidden_size": self.dim}
        return model_fingerprint(self.layer, config)

    def fingerprint(self) -> str:
        """Sha256 of the model fingerprint, the posterior hash and the variance method."""
        parts = (self.model_fingerprint(), self.posterior.content_hash(), _VARIANCE_METHOD)
        return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()

    # ---------------------------------------------------------------- encoding

    def _call(self, texts: list[str], kind: Kind) -> np.ndarray:
        function = self._embed_query if kind == "query" else self._embed_document
        output = function(texts)
        if isinstance(output, torch.Tensor):
            output = output.detach().cpu().numpy()
        array = np.asarray(output, dtype=np.float32)
        if array.ndim != 2 or array.shape[0] != len(texts):
            raise ValueError(
                f"embedder {self._name!r} must return an array of shape [{len(texts)}, D] "
                f"for {len(texts)} texts, got shape {array.shape}"
            )
        if self._dim is not None and array.shape[1] != self._dim:
            raise ValueError(
                f"embedder {self._name!r} returned {array.shape[1]}-dimensional vectors, "
                f"expected {self._dim}"
            )
        if not np.isfinite(array).all():
            row = int(np.argwhere(~np.isfinite(array))[0][0])
            raise ValueError(
                f"embedder {self._name!r} returned a non-finite value for text {row}: "
                f"{texts[row]!r:.80}"
            )
        return array

    def _outputs(self, texts: list[str], kind: Kind, batch_size: int | None = None) -> np.ndarray:
        size = batch_size or self._batch_size
        parts = [self._call(texts[i : i + size], kind) for i in range(0, len(texts), size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def encode(
        self,
        texts: Sequence[str],
        kind: Kind = "document",
        *,
        batch_size: int | None = None,
        show_progress: bool | None = None,
    ) -> GaussianEmbedding:
        """Encode ``texts`` as Gaussians: mean ``h(x)``, variance from the head posterior.

        Parameters
        ----------
        texts : Sequence[str]
            Texts to embed.
        kind : {"query", "document"}, default="document"
            Routes LangChain embedders to ``embed_query`` or ``embed_documents``.
        batch_size : int or None, default=None
            Texts per embedder call; the constructor's value when ``None``.
        show_progress : bool or None, default=None
            Unused: the embedder controls its own progress output.
        """
        del show_progress
        items = check_texts(texts)
        kind = check_kind(kind)
        posterior = self.posterior
        if posterior.is_prior_only and not self._prior_warning_logged:
            logger.warning(
                "%s: no fitted posterior, using the prior-only fallback (variance %.3g)",
                self._name,
                1.0 / self._prior_precision,
            )
            self._prior_warning_logged = True
        outputs = self._outputs(items, kind, batch_size)
        weight_variance = posterior.scaled_weight_variance.numpy()
        bias_variance = posterior.scaled_bias_variance.numpy()
        variance = np.square(outputs) @ weight_variance.T + bias_variance
        return GaussianEmbedding(outputs, variance)

    # -------------------------------------------------------------- hooks API

    def capture(self, texts: Sequence[str], kind: Kind = "document") -> HeadCapture:
        """Call the embedder once per batch and return its outputs as a capture."""
        items = check_texts(texts)
        kind = check_kind(kind)
        if not items:
            raise ValueError("capture needs at least one text")
        outputs = torch.from_numpy(self._outputs(items, kind)).unsqueeze(1)
        return HeadCapture(
            activations=outputs,
            residual=torch.zeros_like(outputs),
            attention_mask=torch.ones(outputs.shape[:2], dtype=torch.long),
        )

    def embed_from_capture(
        self,
        captured: HeadCapture,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply the head ``W h + b``: ``[B, D]``, or ``[S, B, D]`` for ``[S, D, D]`` weights."""
        weight = self.layer.weight if weight is None else weight
        bias = self.layer.bias if bias is None else bias
        inputs = captured.activations[:, 0]
        residual = captured.residual[:, 0]
        if weight.ndim == 3:
            if bias.ndim == 1:
                bias = bias.expand(weight.shape[0], -1)
            return torch.einsum("bi,shi->sbh", inputs, weight) + bias[:, None] + residual
        return F.linear(inputs, weight, bias) + residual

    def variance_from_capture(self, captured: HeadCapture) -> torch.Tensor:
        """Return the exact head variance ``[B, D]`` for a capture."""
        posterior = self.posterior
        inputs = captured.activations[:, 0]
        return inputs.square() @ posterior.scaled_weight_variance.T + (
            posterior.scaled_bias_variance
        )

    def with_posterior(self, posterior: DiagonalPosterior | str | Path | None) -> HeadEncoder:
        """Return a head over the same embedder with another posterior (checked for fit)."""
        clone = HeadEncoder(
            self._embedder,
            posterior,
            name=self._name,
            dim=self._dim,
            prior_precision=self._prior_precision,
            batch_size=self._batch_size,
        )
        clone.posterior  # noqa: B018  (validates shape and fingerprint now)
        return clone

    # ---------------------------------------------------------------- pickling

    def __getstate__(self) -> dict[str, Any]:
        return {
            "embedder": self._embedder,
            "posterior": posterior_source_to_state(self._posterior_source),
            "name": self._name,
            "dim": self._dim,
            "prior_precision": self._prior_precision,
            "batch_size": self._batch_size,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["embedder"],
            posterior_source_from_state(state["posterior"]),
            name=state["name"],
            dim=state["dim"],
            prior_precision=state["prior_precision"],
            batch_size=state["batch_size"],
        )

    def __repr__(self) -> str:
        return f"HeadEncoder(name={self._name!r}, dim={self._dim})"
