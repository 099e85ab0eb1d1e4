"""Pooling of token embeddings into one sentence embedding, with the attention mask.

The settings come from a model folder in the sentence-transformers layout:
``modules.json`` lists the pipeline (Transformer, Pooling, optional Normalize),
the Pooling folder's ``config.json`` names the mode, and
``sentence_bert_config.json`` contains ``max_seq_length`` and ``do_lower_case``.
A plain transformers folder without these files gets what sentence-transformers
itself would build for it: mean pooling, no normalisation, and the tokenizer's
``model_max_length`` capped at the model's position embeddings.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

__all__ = [
    "LINEAR_MODES",
    "POOLING_MODES",
    "PoolingConfig",
    "PoolingMode",
    "pool",
    "pooling_weights",
    "read_pooling_config",
]

logger = logging.getLogger(__name__)

PoolingMode = Literal["mean", "cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]

LINEAR_MODES: tuple[str, ...] = ("mean", "cls", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
"""Modes that are a fixed weighted sum of token embeddings, ``e = sum_t w_t y_t``."""

POOLING_MODES: tuple[str, ...] = (*LINEAR_MODES, "max")

_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}

_KNOWN_MODULES = {"Transformer", "Pooling", "Normalize"}


@dataclass(frozen=True)
class PoolingConfig:
    """Sentence-embedding settings of a model.

    Parameters
    ----------
    mode : str, default="mean"
        One of :data:`POOLING_MODES`.
    normalize : bool, default=False
        Whether the pooled vector is L2-normalised.
    max_seq_length : int or None, default=None
        Token limit per text including special tokens; ``None`` uses the tokenizer's.
    do_lower_case : bool, default=False
        Whether texts are lower-cased before tokenisation.
    """

    mode: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ValueError(f"pooling mode must be one of {POOLING_MODES}, got {self.mode!r}")
        if self.max_seq_length is not None and self.max_seq_length < 2:
            raise ValueError(f"max_seq_length must be >= 2, got {self.max_seq_length}")


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _mode_from_pooling_config(config: dict, source: Path) -> str:
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes)
    else:
        modes = [mode for key, mode in _LEGACY_KEYS.items() if config.get(key, False)]
        modes = modes or ["mean"]
    if len(modes) != 1:
        raise ValueError(
            f"{source} concatenates the pooling modes {modes}; only a single pooling mode "
            "is supported"
        )
    if modes[0] not in POOLING_MODES:
        raise ValueError(f"{source}: unsupported pooling mode {modes[0]!r}")
    return modes[0]


def read_pooling_config(model_dir: str | Path) -> PoolingConfig:
    """Read the pooling, normalisation and length settings of a model folder.

    Parameters
    ----------
    model_dir : str or Path
        A sentence-transformers model folder, or a plain transformers folder.

    Raises
    ------
    ValueError
        If ``modules.json`` contains a module other than Transformer, Pooling and
        Normalize (for example a Dense projection), because the delta method here
        covers only that pipeline, or if the pooling concatenates several modes.
    """
    model_dir = Path(model_dir)
    modules_file = model_dir / "modules.json"
    bert_config_file = model_dir / "sentence_bert_config.json"

    max_seq_length = None
    do_lower_case = False
    if bert_config_file.is_file():
        bert_config = _read_json(bert_config_file)
        max_seq_length = bert_config.get("max_seq_length")
        do_lower_case = bool(bert_config.get("do_lower_case", False))

    if not modules_file.is_file():
        logger.debug("%s has no modules.json; using mean pooling without normalisation", model_dir)
        return PoolingConfig("mean", False, max_seq_length, do_lower_case)

    modules = _read_json(modules_file)
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _KNOWN_MODULES:
            raise ValueError(
                f"{modules_file} contains the module {module.get('type')!r}; only "
                "Transformer -> Pooling -> Normalize pipelines are supported"
            )

    mode = "mean"
    normalize = False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            pooling_file = model_dir / module.get("path", "") / "config.json"
            mode = _mode_from_pooling_config(_read_json(pooling_file), pooling_file)
        elif kind == "Normalize":
            normalize = True
    return PoolingConfig(mode, normalize, max_seq_length, do_lower_case)


def pooling_weights(mode: str, attention_mask: torch.Tensor) -> torch.Tensor:
    """Return the token weights ``w [B, T]`` of a linear pooling mode, ``e = sum_t w_t y_t``.

    Padded positions get weight 0. A row without any attended token (which a
    tokenizer that adds special tokens never produces) gets all-zero weights.

    Parameters
    ----------
    mode : str
        One of :data:`LINEAR_MODES`.
    attention_mask : torch.Tensor
        ``[B, T]`` tensor of 0/1.
    """
    mask = attention_mask.to(torch.float32)
    if mode in ("mean", "mean_sqrt_len_tokens"):
        count = mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
        return mask / (count if mode == "mean" else count.sqrt())
    if mode == "weightedmean":
        # Position weights 1, 2, ... counted from the first attended token, as in
        # sentence-transformers (this also handles left padding).
        first = attention_mask.to(torch.int32).argmax(dim=1, keepdim=True)
        positions = torch.arange(1, mask.shape[1] + 1, dtype=torch.float32, device=mask.device)
        weighted = mask * (positions.unsqueeze(0) - first.to(torch.float32))
        return weighted / weighted.sum(dim=1, keepdim=True).clamp(min=1e-9)
    if mode == "cls":
        index = attention_mask.to(torch.int32).argmax(dim=1)
    elif mode == "lasttoken":
        flipped = attention_mask.flip(1).to(torch.int32)
        values, offset = flipped.max(dim=1)
        index = torch.where(values == 0, mask.shape[1] - 1, mask.shape[1] - 1 - offset)
    else:
        raise ValueError(f"{mode!r} is not a linear pooling mode; expected one of {LINEAR_MODES}")
    weights = torch.zeros_like(mask)
    weights.scatter_(1, index.unsqueeze(1), 1.0)
    return weights * mask


def pool(
    mode: str, token_embeddings: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pool token embeddings ``[..., B, T, H]`` into sentence embeddings ``[..., B, H]``.

    Leading dimensions (for example a batch of weight samples) are broadcast.

    Parameters
    ----------
    mode : str
        One of :data:`POOLING_MODES`.
    token_embeddings : torch.Tensor
        ``[..., B, T, H]`` output of the transformer.
    attention_mask : torch.Tensor
        ``[B, T]`` tensor of 0/1.

    Returns
    -------
    pooled : torch.Tensor
        ``[..., B, H]``.
    argmax : torch.Tensor or None
        For ``mode="max"`` the selected token per dimension ``[..., B, H]``, else ``None``.
    """
    if mode == "max":
        padding = (attention_mask == 0).unsqueeze(-1)
        values, argmax = token_embeddings.masked_fill(padding, float("-inf")).max(dim=-2)
        return values, argmax
    if mode in ("mean", "mean_sqrt_len_tokens"):
        # Same operation order as sentence-transformers: masked sum, then divide.
        mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
        total = (token_embeddings * mask).sum(dim=-2)
        count = mask.sum(dim=-2).clamp(min=1e-9)
        return total / (count if mode == "mean" else count.sqrt()), None
    weights = pooling_weights(mode, attention_mask).to(token_embeddings.dtype)
    return torch.einsum("...bth,bt->...bh", token_embeddings, weights), None
