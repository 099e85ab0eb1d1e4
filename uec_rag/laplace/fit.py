"""Fit a diagonal Laplace posterior over an encoder's last linear layer from query-passage pairs.

The driver streams the pairs in windows of a few InfoNCE batches. For each
window it runs the frozen model once without gradients (:meth:`capture`) on
the window's distinct texts, sorted by length so that little padding is
computed, and keeps each text's activations cut to its own tokens. For each
batch it then reruns only the last block's output module for the parameter
gradients of each text (:meth:`embed_from_capture`) and adds the batch's
diagonal curvature of the InfoNCE negative log-likelihood
(:mod:`uec_rag.laplace.curvature`). The batches, and so the likelihood, do
not depend on the window. Memory is bounded by one window of activations
plus the ``[P]`` accumulator.

Then

1. the prior precision maximises the Laplace log marginal likelihood
   (:mod:`uec_rag.laplace.marglik`), with the prior mean at zero;
2. the posterior precision is ``curvature + prior precision`` and its inverse
   is the stored variance;
3. the variance scale ``s`` makes the predicted spread of held-out pairs
   match the observed one (method of moments). Under the model
   ``q = z + e_q``, ``c = z + e_c`` with independent ``e ~ N(0, s Sigma)``, a
   query and its positive passage differ by ``E ||q - c||^2 = s (tr Sigma_q +
   tr Sigma_c)``, so::

       s = sum_i ||mu(q_i) - mu(c_i)||^2 / sum_i (tr Sigma(q_i) + tr Sigma(c_i)),

   with ``Sigma`` under the unscaled posterior (the delta-method variance is
   linear in ``s``). Each member's traces are thereby measured in the units of
   its own held-out error, which makes them comparable across members. The fit
   also reports the held-out InfoNCE log-likelihood of the uncertainty-aware
   similarity (probit approximation, MacKay 1992) at ``s``, at scale 1 and
   without variance::

       mu_ij = q_i . c_j,
       var_ij = s sum_d (q_id^2 v_c,jd + c_jd^2 v_q,id) + s^2 sum_d v_q,id v_c,jd,
       logits_ij = mu_ij / sqrt(1 + pi / 8 var_ij) / temperature;

4. the reference trace is the median trace of the embedding covariance (with
   the scale applied) over the distinct held-out texts, which step 3 has
   already encoded (over up to 256 fit texts when nothing is held out).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from uec_rag.laplace.curvature import (
    CURVATURE_NAMES,
    DEFAULT_CURVATURE,
    DEFAULT_TEMPERATURE,
    Curvature,
    TextGradients,
    check_curvature,
    check_temperature,
    infonce_curvature,
)
from uec_rag.laplace.marglik import optimize_prior_precision
from uec_rag.laplace.posterior import DiagonalPosterior, PosteriorMetadata

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_HELD_OUT_FRACTION",
    "FitResult",
    "FittableMember",
    "fit_posterior",
]

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
"""Pairs per InfoNCE batch. The curvature costs ``O(B)`` per pair, so larger batches
(more negatives) cost proportionally more time."""

DEFAULT_HELD_OUT_FRACTION = 0.2
"""Share of the pairs kept out of the curvature and used to choose the variance scale."""

REFERENCE_TEXTS = 256
"""Maximum number of fit texts whose median trace is the reference trace when nothing
is held out."""

CAPTURE_WINDOW = 32
"""Pairs whose distinct texts are captured together. Larger windows pad less and
hold more activations (up to about 8 MiB per 384-token text for a base-size model)."""

CAPTURE_BATCH_SIZE = 16
"""Texts per forward pass while capturing, after sorting a window's texts by length."""


class FittableMember(Protocol):
    """Encoder interface used by fitting: the hooks API and a way to set the posterior."""

    @property
    def layer(self) -> nn.Linear: ...

    @property
    def layer_name(self) -> str: ...

    def model_fingerprint(self) -> str: ...

    def capture(self, texts: Sequence[str], kind: Any = "document") -> Any: ...

    def embed_from_capture(
        self, captured: Any, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor: ...

    def with_posterior(self, posterior: DiagonalPosterior) -> Any: ...


@dataclass(frozen=True)
class FitResult:
    """Outcome of :func:`fit_posterior`.

    Attributes
    ----------
    posterior : DiagonalPosterior
        The fitted posterior, with all metadata set.
    prior_precision : float
        Maximiser of the Laplace log marginal likelihood.
    log_marginal_likelihood : float
        Laplace log marginal likelihood at that prior precision.
    effective_parameters : float
        ``sum_p h_p / (h_p + prior_precision)``.
    nll : float
        InfoNCE negative log-likelihood of the fit pairs at the pretrained weights.
    variance_scale : float
        Chosen on the held-out pairs (1.0 when there are fewer than two).
    held_out_log_likelihood : float or None
        Mean held-out InfoNCE log-likelihood per query at the chosen scale.
    held_out_log_likelihood_unscaled : float or None
        The same at scale 1.
    held_out_log_likelihood_deterministic : float or None
        The same with zero variance (the plain InfoNCE likelihood of the means).
    reference_trace : float
        Median embedding-covariance trace, scale applied, over the distinct held-out
        texts (up to 256 fit texts when nothing is held out).
    n_fit : int
        Pairs used for the curvature.
    n_held_out : int
        Pairs used for the variance scale.
    seconds : float
        Wall-clock time of the whole fit.
    curvature : torch.Tensor
        The summed diagonal curvature ``[P]`` (float64; weight entries first, row-major,
        then the bias), from which the prior precision was chosen.
    """

    posterior: DiagonalPosterior
    prior_precision: float
    log_marginal_likelihood: float
    effective_parameters: float
    nll: float
    variance_scale: float
    held_out_log_likelihood: float | None
    held_out_log_likelihood_unscaled: float | None
    held_out_log_likelihood_deterministic: float | None
    reference_trace: float
    n_fit: int
    n_held_out: int
    seconds: float
    curvature: torch.Tensor


@dataclass(frozen=True)
class _Batch:
    queries: list[str]
    passages: list[str]
    targets: torch.Tensor
    mask: torch.Tensor


def _make_batches(
    pairs: Sequence[tuple[str, str]], batch_size: int, positives: dict[str, set[str]]
) -> list[_Batch]:
    """Group pairs into batches whose candidates are the batch's distinct passages.

    A column that is another positive of the same query is masked out of that
    query's softmax, so a duplicate passage or a second positive never counts
    as a negative.
    """
    batches = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        passages: list[str] = []
        column: dict[str, int] = {}
        for _, passage in chunk:
            if passage not in column:
                column[passage] = len(passages)
                passages.append(passage)
        targets = torch.tensor([column[passage] for _, passage in chunk], dtype=torch.long)
        mask = torch.ones(len(chunk), len(passages), dtype=torch.bool)
        for row, (query, passage) in enumerate(chunk):
            for other in positives[query]:
                if other != passage and other in column:
                    mask[row, column[other]] = False
        batches.append(_Batch([query for query, _ in chunk], passages, targets, mask))
    return batches


def _slice_capture(captured: Any, index: int) -> Any:
    """Return the capture of text ``index`` alone, cut to its attended tokens.

    Works on any dataclass with an ``attention_mask [B, T]`` field whose tensor
    fields have the batch as first dimension. A field whose second dimension has
    length ``T`` is taken to be indexed by token there. The result owns its
    memory, so the batch capture can be freed.
    """
    mask = captured.attention_mask
    batch, length = mask.shape
    positions = torch.nonzero(mask[index], as_tuple=True)[0]
    values = {}
    for item in dataclasses.fields(captured):
        value = getattr(captured, item.name)
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
            value = value[index : index + 1]
            if value.ndim >= 2 and value.shape[1] == length:
                value = value[:, positions]
            value = value.clone()
        values[item.name] = value
    return dataclasses.replace(captured, **values)


class _CapturedText:
    """One text's capture (cut to its tokens), its embedding, and its vector-Jacobian product."""

    __slots__ = ("_pullback", "capture", "embedding", "member")

    def __init__(self, member: FittableMember, capture: Any, embedding: torch.Tensor) -> None:
        self.member = member
        self.capture = capture
        self.embedding = embedding
        self._pullback: Any = None

    def gradients(self, cotangents: torch.Tensor) -> torch.Tensor:
        """Return the parameter gradients ``[m, P]`` of ``cotangent . embedding``.

        The capture's ``residual`` enters the block output as ``z = W a + b + r``,
        so the gradient with respect to ``r`` is the gradient ``delta [T, H]``
        with respect to the layer output. Autograd runs once per text through the
        block output module, pooling and normalisation, and the weight gradient
        is one matrix product ``delta^T a`` per cotangent.
        """
        if self._pullback is None:
            single = self.capture

            def embed(residual: torch.Tensor) -> torch.Tensor:
                replaced = dataclasses.replace(single, residual=residual)
                return self.member.embed_from_capture(replaced)

            _, self._pullback = torch.func.vjp(embed, single.residual)
        activations = self.capture.activations[0]
        (delta,) = torch.func.vmap(self._pullback)(cotangents[:, None, :].to(activations.dtype))
        delta = delta[:, 0]  # [m, T, H]
        copies, hidden = cotangents.shape[0], delta.shape[2]
        weight_size = hidden * activations.shape[1]
        # Weight gradients [m, H, I] and bias gradients [m, H] written side by side.
        result = torch.empty(copies, weight_size + hidden, dtype=delta.dtype, device=delta.device)
        torch.bmm(
            delta.transpose(1, 2),
            activations.expand(copies, -1, -1),
            out=result[:, :weight_size].view(copies, hidden, -1),
        )
        torch.sum(delta, dim=1, out=result[:, weight_size:])
        return result


def _capture_texts(
    member: FittableMember, texts: Sequence[str], kind: str
) -> dict[str, _CapturedText]:
    """Capture distinct texts in forward passes of similar length (by characters)."""
    # The text breaks ties, so the sub-batches, and so the float rounding, repeat across runs.
    ordered = sorted(set(texts), key=lambda text: (len(text), text))
    captured: dict[str, _CapturedText] = {}
    for start in range(0, len(ordered), CAPTURE_BATCH_SIZE):
        chunk = ordered[start : start + CAPTURE_BATCH_SIZE]
        batch_capture = member.capture(chunk, kind)
        with torch.no_grad():
            embeddings = member.embed_from_capture(batch_capture)
        for index, text in enumerate(chunk):
            captured[text] = _CapturedText(
                member, _slice_capture(batch_capture, index), embeddings[index]
            )
    return captured


def _text_gradients(texts: list[_CapturedText]) -> TextGradients:
    """Build ``(index, cotangents [m, D]) -> [m, P]`` over the texts of one batch."""

    def gradients(index: int, cotangents: torch.Tensor) -> torch.Tensor:
        return texts[index].gradients(cotangents)

    return gradients


def _accumulate_curvature(
    member: FittableMember,
    batches: list[_Batch],
    temperature: float,
    curvature: Curvature,
    show_progress: bool,
) -> tuple[torch.Tensor, float]:
    layer = member.layer
    total = torch.zeros(layer.weight.numel() + layer.bias.numel(), dtype=torch.float64)
    nll = 0.0
    per_window = max(1, CAPTURE_WINDOW // len(batches[0].queries))
    progress = tqdm(
        total=sum(len(batch.queries) for batch in batches),
        desc=f"curvature ({curvature})",
        unit="pair",
        disable=not show_progress,
    )
    with progress:
        for first in range(0, len(batches), per_window):
            window = batches[first : first + per_window]
            queries = _capture_texts(
                member, [text for batch in window for text in batch.queries], "query"
            )
            passages = _capture_texts(
                member, [text for batch in window for text in batch.passages], "document"
            )
            for batch in window:
                batch_queries = [queries[text] for text in batch.queries]
                batch_passages = [passages[text] for text in batch.passages]
                result = infonce_curvature(
                    torch.stack([text.embedding for text in batch_queries]),
                    torch.stack([text.embedding for text in batch_passages]),
                    batch.targets,
                    _text_gradients(batch_queries),
                    _text_gradients(batch_passages),
                    temperature=temperature,
                    curvature=curvature,
                    mask=batch.mask,
                )
                total += result.diagonal.double()
                nll += result.nll
                progress.update(len(batch.queries))
            del queries, passages
    return total, nll


def _probit_log_likelihood(
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    scale: float,
    temperature: float,
) -> float:
    """Mean held-out InfoNCE log-likelihood of the probit similarity at variance scale ``scale``."""
    total = 0.0
    count = 0
    for terms, targets, mask in batches:
        mean, linear, quadratic = terms
        variance = scale * linear + scale**2 * quadratic
        logits = mean / torch.sqrt(1.0 + math.pi / 8.0 * variance) / temperature
        logits = logits.masked_fill(~mask, float("-inf"))
        log_probs = torch.log_softmax(logits, dim=1)
        total += float(log_probs[torch.arange(len(targets)), targets].sum())
        count += len(targets)
    return total / count


@dataclass(frozen=True)
class _ScaleChoice:
    """Variance scale, held-out log-likelihoods and unscaled held-out traces."""

    scale: float
    log_likelihood: float
    log_likelihood_unscaled: float
    log_likelihood_deterministic: float
    traces: np.ndarray


def _text_traces(encoded: Any) -> np.ndarray:
    """Return the covariance trace of each encoded text, in float64."""
    return encoded.variance.astype(np.float64).sum(axis=1)


def _encode_distinct(member: Any, texts: Sequence[str], kind: str) -> tuple[Any, dict[str, int]]:
    """Encode each distinct text once (the encoder sorts by length) and index the rows by text."""
    distinct = sorted(set(texts))
    return member.encode(distinct, kind, show_progress=False), {
        text: row for row, text in enumerate(distinct)
    }


def _select_variance_scale(member: Any, batches: list[_Batch], temperature: float) -> _ScaleChoice:
    """Choose the moment-matched scale and report the held-out log-likelihoods.

    The member must carry the unscaled posterior (``variance_scale`` 1). The
    result also carries the unscaled traces of the distinct held-out texts.
    """
    query, query_rows = _encode_distinct(
        member, [text for batch in batches for text in batch.queries], "query"
    )
    passage, passage_rows = _encode_distinct(
        member, [text for batch in batches for text in batch.passages], "document"
    )
    query_mean = torch.from_numpy(query.mean).double()
    query_variance = torch.from_numpy(query.variance).double()
    passage_mean = torch.from_numpy(passage.mean).double()
    passage_variance = torch.from_numpy(passage.variance).double()

    prepared = []
    squared_error = 0.0
    trace = 0.0
    for batch in batches:
        rows_q = torch.tensor([query_rows[text] for text in batch.queries])
        rows_c = torch.tensor([passage_rows[text] for text in batch.passages])
        mu_q, var_q = query_mean[rows_q], query_variance[rows_q]
        mu_c, var_c = passage_mean[rows_c], passage_variance[rows_c]
        positive_mean, positive_variance = mu_c[batch.targets], var_c[batch.targets]
        squared_error += float((mu_q - positive_mean).square().sum())
        trace += float(var_q.sum() + positive_variance.sum())
        mean = mu_q @ mu_c.T
        linear = mu_q.square() @ var_c.T + var_q @ mu_c.square().T
        quadratic = var_q @ var_c.T
        prepared.append(((mean, linear, quadratic), batch.targets, batch.mask))

    if not (trace > 0.0 and math.isfinite(trace)):
        raise ValueError(
            f"invalid covariance trace {trace} over the held-out pairs: the posterior "
            "variances must be finite and positive; check the posterior"
        )
    if squared_error <= 0.0:
        raise ValueError(
            "every held-out query embeds exactly onto its positive passage, so the "
            "variance scale would be 0; hold out pairs whose texts differ"
        )
    scale = squared_error / trace
    return _ScaleChoice(
        scale=scale,
        log_likelihood=_probit_log_likelihood(prepared, scale, temperature),
        log_likelihood_unscaled=_probit_log_likelihood(prepared, 1.0, temperature),
        log_likelihood_deterministic=_probit_log_likelihood(prepared, 0.0, temperature),
        traces=np.concatenate([_text_traces(query), _text_traces(passage)]),
    )


def _reference_trace(member: Any, pairs: Sequence[tuple[str, str]], seed: int) -> float:
    queries = sorted({query for query, _ in pairs})
    passages = sorted({passage for _, passage in pairs})
    texts = [(text, "query") for text in queries] + [(text, "document") for text in passages]
    random.Random(seed).shuffle(texts)
    texts = texts[:REFERENCE_TEXTS]
    traces: list[np.ndarray] = []
    for kind in ("query", "document"):
        selected = [text for text, text_kind in texts if text_kind == kind]
        if selected:
            traces.append(_text_traces(member.encode(selected, kind, show_progress=False)))
    return float(np.median(np.concatenate(traces)))


def fit_posterior(
    member: FittableMember,
    pairs: Sequence[tuple[str, str]],
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    curvature: Curvature = DEFAULT_CURVATURE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION,
    seed: int = 0,
    data_description: str = "",
    show_progress: bool | None = None,
) -> FitResult:
    """Fit the diagonal Laplace posterior of ``member``'s last linear layer.

    Parameters
    ----------
    member : FittableMember
        A :class:`~uec_rag.encoders.ProbabilisticEncoder` or
        :class:`~uec_rag.encoders.head.HeadEncoder`.
    pairs : Sequence[tuple[str, str]]
        ``(query, positive passage)`` pairs, e.g. from :func:`uec_rag.datasets.load_pairs`.
    temperature : float, default=DEFAULT_TEMPERATURE
        InfoNCE temperature (0.05).
    curvature : {"ggn", "ef"}, default="ggn"
        Diagonal generalised Gauss-Newton or diagonal empirical Fisher.
    batch_size : int, default=DEFAULT_BATCH_SIZE
        Pairs per InfoNCE batch (8); the other passages of a batch are the negatives.
    held_out_fraction : float, default=DEFAULT_HELD_OUT_FRACTION
        Share of the pairs (after a seeded shuffle) held out to choose the
        variance scale (0.2). With ``0`` or fewer than two held-out pairs the
        scale is 1.
    seed : int, default=0
        Seed of the shuffle and of the reference-trace subsample.
    data_description : str, default=""
        Stored in the posterior metadata field ``data``.
    show_progress : bool or None, default=None
        Show a tqdm bar; ``None`` shows it for more than 64 pairs.

    Returns
    -------
    FitResult

    Raises
    ------
    ValueError
        If there are fewer than two pairs, an argument is out of range, or a
        pair is not two strings.
    """
    started = time.perf_counter()
    temperature = check_temperature(temperature)
    curvature = check_curvature(curvature)
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (in-batch negatives), got {batch_size}")
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    items = list(pairs)
    for index, pair in enumerate(items):
        if not (
            isinstance(pair, tuple)
            and len(pair) == 2
            and all(isinstance(text, str) for text in pair)
        ):
            raise ValueError(
                f"pairs[{index}] must be a (query, passage) tuple of str, got {pair!r:.80}"
            )
    if len(items) < 2:
        raise ValueError(f"fitting needs at least 2 pairs, got {len(items)}")
    if show_progress is None:
        show_progress = len(items) > 64

    positives: dict[str, set[str]] = {}
    for query, passage in items:
        positives.setdefault(query, set()).add(passage)
    random.Random(seed).shuffle(items)
    n_held_out = round(len(items) * held_out_fraction)
    if n_held_out < 2:
        n_held_out = 0
    fit_pairs, held_out = items[n_held_out:], items[:n_held_out]
    if len(fit_pairs) < 2:
        raise ValueError(f"fitting needs at least 2 pairs after holding out {n_held_out}")

    diagonal, nll = _accumulate_curvature(
        member,
        _make_batches(fit_pairs, batch_size, positives),
        temperature,
        curvature,
        bool(show_progress),
    )
    layer = member.layer
    parameters = torch.cat([layer.weight.detach().flatten(), layer.bias.detach()])
    # NOTE: with the zero prior mean and a few hundred pairs the maximiser is small
    # (0.4 to 2.7 for the presets), so most weights keep nearly their prior variance.
    prior = optimize_prior_precision(-nll, diagonal, parameters.double())
    logger.info(
        "prior precision %.6g maximises the log marginal likelihood %.6g "
        "(%.1f effective parameters of %d)",
        prior.prior_precision,
        prior.log_marginal_likelihood,
        prior.effective_parameters,
        diagonal.numel(),
    )

    variance = (1.0 / (diagonal + prior.prior_precision)).float()
    weight_size = layer.weight.numel()
    metadata = PosteriorMetadata(
        model_fingerprint=member.model_fingerprint(),
        layer_name=member.layer_name,
        prior_precision=prior.prior_precision,
        curvature=CURVATURE_NAMES[curvature],
        temperature=temperature,
        data=data_description or f"{len(fit_pairs)} query-passage pairs",
        n_data=len(fit_pairs),
    )
    posterior = DiagonalPosterior(
        variance[:weight_size].view_as(layer.weight), variance[weight_size:], metadata
    )

    scale, held_out_ll, held_out_ll_unscaled, held_out_ll_deterministic = 1.0, None, None, None
    if held_out:
        choice = _select_variance_scale(
            member.with_posterior(posterior),
            _make_batches(held_out, batch_size, positives),
            temperature,
        )
        scale = choice.scale
        held_out_ll = choice.log_likelihood
        held_out_ll_unscaled = choice.log_likelihood_unscaled
        held_out_ll_deterministic = choice.log_likelihood_deterministic
        logger.info(
            "variance scale %.4g: held-out log-likelihood %.4f per query "
            "(%.4f at scale 1, %.4f without variance)",
            scale,
            held_out_ll,
            held_out_ll_unscaled,
            held_out_ll_deterministic,
        )
        # The delta-method variance is linear in the scale.
        reference = float(np.median(scale * choice.traces))
    else:
        # Without held-out pairs the scale is 1, so the unscaled posterior is the final one.
        reference = _reference_trace(member.with_posterior(posterior), fit_pairs, seed)
    posterior = posterior.with_metadata(variance_scale=scale, reference_trace=reference)

    return FitResult(
        posterior=posterior,
        prior_precision=prior.prior_precision,
        log_marginal_likelihood=prior.log_marginal_likelihood,
        effective_parameters=prior.effective_parameters,
        nll=nll,
        variance_scale=scale,
        held_out_log_likelihood=held_out_ll,
        held_out_log_likelihood_unscaled=held_out_ll_unscaled,
        held_out_log_likelihood_deterministic=held_out_ll_deterministic,
        reference_trace=reference,
        n_fit=len(fit_pairs),
        n_held_out=len(held_out),
        seconds=time.perf_counter() - started,
        curvature=diagonal,
    )
