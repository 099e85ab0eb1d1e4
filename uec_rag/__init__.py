"""uec_rag: uncertainty-aware ensembles of text-embedding models.

The names below are imported on first use, so ``import uec_rag`` stays cheap and
does not load torch or the framework integrations until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from uec_rag._version import __version__

if TYPE_CHECKING:
    from uec_rag.coefficients import CoefficientRule
    from uec_rag.encoders import ProbabilisticEncoder, ProbabilisticMember, load_encoder
    from uec_rag.encoders.head import HeadEncoder
    from uec_rag.ensemble import EnsembleEncoding, UECEnsemble
    from uec_rag.gaussian import GaussianEmbedding
    from uec_rag.index import GaussianIndex
    from uec_rag.laplace import DiagonalPosterior
    from uec_rag.similarity import Scores, uncertainty_similarity

__all__ = [
    "CoefficientRule",
    "DiagonalPosterior",
    "EnsembleEncoding",
    "GaussianEmbedding",
    "GaussianIndex",
    "HeadEncoder",
    "ProbabilisticEncoder",
    "ProbabilisticMember",
    "Scores",
    "UECEnsemble",
    "__version__",
    "load_encoder",
    "uncertainty_similarity",
]

_LAZY: dict[str, str] = {
    "CoefficientRule": "uec_rag.coefficients",
    "DiagonalPosterior": "uec_rag.laplace",
    "EnsembleEncoding": "uec_rag.ensemble",
    "GaussianEmbedding": "uec_rag.gaussian",
    "GaussianIndex": "uec_rag.index",
    "HeadEncoder": "uec_rag.encoders.head",
    "ProbabilisticEncoder": "uec_rag.encoders",
    "ProbabilisticMember": "uec_rag.encoders",
    "Scores": "uec_rag.similarity",
    "UECEnsemble": "uec_rag.ensemble",
    "load_encoder": "uec_rag.encoders",
    "uncertainty_similarity": "uec_rag.similarity",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'uec_rag' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
