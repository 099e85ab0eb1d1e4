"""Probabilistic text encoders and :func:`load_encoder`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from uec_rag.encoders.base import KINDS, Kind, ProbabilisticMember, check_kind, check_texts
from uec_rag.encoders.pooling import PoolingConfig, read_pooling_config
from uec_rag.encoders.transformer import CapturedBatch, ProbabilisticEncoder
from uec_rag.laplace.posterior import DEFAULT_PRIOR_PRECISION, DiagonalPosterior

__all__ = [
    "KINDS",
    "CapturedBatch",
    "Kind",
    "PoolingConfig",
    "ProbabilisticEncoder",
    "ProbabilisticMember",
    "check_kind",
    "check_texts",
    "load_encoder",
    "read_pooling_config",
    "shipped_posterior_path",
]

POSTERIOR_DIR = Path(__file__).resolve().parent.parent / "posteriors"
"""Folder of the posteriors shipped with the package, ``<preset>.safetensors``."""

# ModelSpec uses short pooling names; PoolingConfig uses the sentence-transformers ones.
_POOLING_NAMES = {"mean_sqrt_len": "mean_sqrt_len_tokens"}


def shipped_posterior_path(name: str) -> Path | None:
    """Return the shipped posterior file for preset ``name``, or ``None`` if there is none."""
    path = POSTERIOR_DIR / f"{name}.safetensors"
    return path if path.is_file() else None


def _pooling_from_spec(spec: Any) -> PoolingConfig:
    do_lower_case = False
    path = Path(spec.path)
    if path.is_dir() and (path / "sentence_bert_config.json").is_file():
        with open(path / "sentence_bert_config.json", encoding="utf-8") as handle:
            do_lower_case = bool(json.load(handle).get("do_lower_case", False))
    return PoolingConfig(
        mode=_POOLING_NAMES.get(spec.pooling, spec.pooling),
        normalize=bool(spec.normalize),
        max_seq_length=int(spec.max_seq_length),
        do_lower_case=do_lower_case,
    )


def load_encoder(
    name_or_path: str | os.PathLike[str],
    posterior: Literal["auto"] | str | os.PathLike[str] | DiagonalPosterior | None = "auto",
    **settings: Any,
) -> ProbabilisticEncoder:
    """Load a preset, local model folder or hub id as a :class:`ProbabilisticEncoder`.

    Parameters
    ----------
    name_or_path : str or PathLike
        Preset name (``"minilm"``, ``"mpnet"``, ``"e5-small"``), a local
        transformers or sentence-transformers folder, or a Hugging Face hub id.
    posterior : "auto", str, PathLike, DiagonalPosterior or None, default="auto"
        ``"auto"`` loads ``uec_rag/posteriors/<preset>.safetensors`` when it is
        shipped and otherwise uses the prior-only fallback. A path loads that
        file, and ``None`` selects the prior-only fallback (isotropic variance
        ``1 / prior_precision``).
    **settings
        Keyword arguments of :class:`ProbabilisticEncoder`, e.g. ``batch_size``,
        ``device``, ``prior_precision`` (default ``DEFAULT_PRIOR_PRECISION``).

    Raises
    ------
    ValueError
        If the preset is unknown, or the posterior belongs to another model
        (:class:`~uec_rag.laplace.posterior.PosteriorMismatchError`).
    """
    from uec_rag.encoders.presets import resolve_model

    spec = resolve_model(name_or_path)
    if isinstance(posterior, str) and posterior == "auto":
        posterior = shipped_posterior_path(spec.name)
    elif isinstance(posterior, os.PathLike):
        posterior = Path(posterior)
    settings.setdefault("prior_precision", DEFAULT_PRIOR_PRECISION)
    settings.setdefault("pooling", _pooling_from_spec(spec))
    return ProbabilisticEncoder(
        spec.path,
        posterior,
        name=spec.name,
        query_prefix=spec.query_prefix,
        document_prefix=spec.document_prefix,
        **settings,
    )
