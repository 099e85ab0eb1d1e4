"""Evaluation of UEC against its members and simpler ensembles (``uec-rag eval``).

:func:`run_evaluation` scores every method of :func:`build_methods` on BEIR
retrieval sets and STS files found by :func:`find_tasks`, from per-member
embeddings stored once by :class:`EmbeddingStore`. The metrics, calibration
measures, report writers and plots are importable on their own.
"""

from uec_rag.evaluation.calibration import (
    LogisticCalibrator,
    auroc,
    expected_calibration_error,
    reliability_bins,
)
from uec_rag.evaluation.embedding_store import EmbeddingStore
from uec_rag.evaluation.methods import build_methods, pair_scores
from uec_rag.evaluation.metrics import (
    RETRIEVAL_METRICS,
    Judgements,
    mean_metrics,
    retrieval_metrics,
    spearman,
)
from uec_rag.evaluation.runner import (
    DEFAULT_MEMBERS,
    EvalSettings,
    RetrievalTask,
    StsTask,
    bad_member_path,
    encode_tasks,
    find_tasks,
    run_evaluation,
)

__all__ = [
    "DEFAULT_MEMBERS",
    "RETRIEVAL_METRICS",
    "EmbeddingStore",
    "EvalSettings",
    "Judgements",
    "LogisticCalibrator",
    "RetrievalTask",
    "StsTask",
    "auroc",
    "bad_member_path",
    "build_methods",
    "encode_tasks",
    "expected_calibration_error",
    "find_tasks",
    "mean_metrics",
    "pair_scores",
    "reliability_bins",
    "retrieval_metrics",
    "run_evaluation",
    "spearman",
]
