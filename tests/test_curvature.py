"""Diagonal GGN / empirical Fisher of the InfoNCE likelihood and the Laplace marginal likelihood.

Checked against a brute-force Jacobian computation on a small embedder in which
queries and passages both depend on the weights, and against laplace-torch
(Daxberger et al. 2021) on a classifier whose last Linear layer feeds
cross-entropy logits.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from uec_rag.laplace.curvature import infonce_curvature, infonce_nll
from uec_rag.laplace.marglik import log_marginal_likelihood, optimize_prior_precision

TEMPERATURE = 0.1


def _embed(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A toy embedder: a Linear layer, tanh, a fixed mix and L2 normalisation."""
    hidden = torch.tanh(inputs @ weight.T + bias)
    mixed = hidden + 0.3 * hidden.roll(1, dims=-1)
    return torch.nn.functional.normalize(mixed, dim=-1)


def _text_gradients(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    def gradients(index: int, cotangents: torch.Tensor) -> torch.Tensor:
        _, vjp = torch.func.vjp(lambda w, b: _embed(inputs[index], w, b), weight, bias)
        grad_weight, grad_bias = torch.func.vmap(vjp)(cotangents)
        return torch.cat([grad_weight.flatten(1), grad_bias], dim=1)

    return gradients


def _brute_force(query_inputs, passage_inputs, targets, mask, weight, bias):
    """Full Jacobian of the logit matrix, then the textbook formulas."""
    size = weight.numel()

    def logits_of(theta: torch.Tensor) -> torch.Tensor:
        w = theta[:size].view_as(weight)
        b = theta[size:]
        logits = _embed(query_inputs, w, b) @ _embed(passage_inputs, w, b).T / TEMPERATURE
        return logits.masked_fill(~mask, -1e9)

    theta = torch.cat([weight.flatten(), bias]).double()
    logits = logits_of(theta)
    jacobian = torch.func.jacrev(logits_of)(theta)  # [B, U, P]
    probs = torch.softmax(logits, dim=1)
    ggn = torch.zeros_like(theta)
    ef = torch.zeros_like(theta)
    for i in range(logits.shape[0]):
        hessian = torch.diag(probs[i]) - torch.outer(probs[i], probs[i])
        ggn += torch.einsum("up,uv,vp->p", jacobian[i], hessian, jacobian[i])
        residual = probs[i].clone()
        residual[targets[i]] -= 1
        ef += (residual @ jacobian[i]) ** 2
    return ggn, ef


def _query_side_curvature(toy_batch, **options):
    """Run infonce_curvature on ``toy_batch`` with gradients through the queries only."""
    weight, bias, query_inputs, passage_inputs, targets, _ = toy_batch
    return infonce_curvature(
        _embed(query_inputs, weight, bias),
        _embed(passage_inputs, weight, bias),
        targets,
        _text_gradients(query_inputs, weight, bias),
        None,
        **options,
    )


@pytest.fixture
def toy_batch():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, generator=generator, dtype=torch.float64) * 0.7
    bias = torch.randn(6, generator=generator, dtype=torch.float64) * 0.1
    query_inputs = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    passage_inputs = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 3, 1])
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[4, 3] = False
    return weight, bias, query_inputs, passage_inputs, targets, mask


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_curvature_matches_brute_force(toy_batch, curvature):
    weight, bias, query_inputs, passage_inputs, targets, mask = toy_batch
    expected_ggn, expected_ef = _brute_force(
        query_inputs, passage_inputs, targets, mask, weight, bias
    )
    result = infonce_curvature(
        _embed(query_inputs, weight, bias),
        _embed(passage_inputs, weight, bias),
        targets,
        _text_gradients(query_inputs, weight, bias),
        _text_gradients(passage_inputs, weight, bias),
        temperature=TEMPERATURE,
        curvature=curvature,
        mask=mask,
        max_chunk_bytes=1,
    )
    expected = expected_ggn if curvature == "ggn" else expected_ef
    torch.testing.assert_close(result.diagonal.double(), expected, rtol=1e-4, atol=1e-9)


def test_curvature_nll_matches_cross_entropy(toy_batch):
    weight, bias, query_inputs, passage_inputs, targets, mask = toy_batch
    queries = _embed(query_inputs, weight, bias)
    passages = _embed(passage_inputs, weight, bias)
    result = _query_side_curvature(toy_batch, temperature=TEMPERATURE, mask=mask)
    assert result.nll == pytest.approx(
        float(infonce_nll(queries, passages, targets, TEMPERATURE, mask)), rel=1e-6
    )


def test_curvature_rejects_masked_target(toy_batch):
    mask = toy_batch[-1].clone()
    mask[0, 0] = False
    with pytest.raises(ValueError, match="own target"):
        _query_side_curvature(toy_batch, mask=mask)


def test_curvature_rejects_unknown_option(toy_batch):
    with pytest.raises(ValueError, match="curvature must be one of"):
        _query_side_curvature(toy_batch, curvature="kfac")


# laplace-torch reference: a classifier whose last Linear layer feeds the CE logits.
# In InfoNCE terms the query embedding is the logit vector q = W phi(x) + b and the
# "passages" are fixed class vectors temperature * e_k, so logits = q . c / temperature = q.


def _classifier_setup():
    torch.manual_seed(1)
    inputs = torch.randn(48, 5)
    labels = torch.randint(0, 3, (48,))
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    with torch.no_grad():
        model[2].weight.mul_(3.0)
    return model, inputs, labels


def _our_classifier_curvature(model, inputs, labels, curvature, batch_size):
    last = model[2]
    total = torch.zeros(last.weight.numel() + last.bias.numel(), dtype=torch.float64)
    nll = 0.0
    classes = TEMPERATURE * torch.eye(3)
    for start in range(0, len(inputs), batch_size):
        with torch.no_grad():
            features = model[1](model[0](inputs[start : start + batch_size]))
            outputs = last(features)

        def gradients(index: int, cotangents: torch.Tensor, features=features) -> torch.Tensor:
            outer = cotangents[:, :, None] * features[index][None, None, :]
            return torch.cat([outer.flatten(1), cotangents], dim=1)

        result = infonce_curvature(
            outputs,
            classes,
            labels[start : start + batch_size],
            gradients,
            None,
            temperature=TEMPERATURE,
            curvature=curvature,
        )
        total += result.diagonal.double()
        nll += result.nll
    return total, nll


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_curvature_matches_laplace_torch(curvature):
    laplace = pytest.importorskip("laplace")
    from laplace.curvature import BackPackEF, BackPackGGN

    model, inputs, labels = _classifier_setup()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs, labels), batch_size=16
    )
    backend = BackPackGGN if curvature == "ggn" else BackPackEF
    reference = laplace.DiagLLLaplace(model, "classification", backend=backend, prior_precision=0.5)
    reference.fit(loader)

    ours, nll = _our_classifier_curvature(model, inputs, labels, curvature, batch_size=16)
    torch.testing.assert_close(ours, reference.H.double(), rtol=1e-4, atol=1e-7)

    parameters = torch.cat([model[2].weight.flatten(), model[2].bias]).detach()
    for precision in (0.05, 0.5, 5.0):
        expected = float(reference.log_marginal_likelihood(torch.tensor(precision)))
        value = float(log_marginal_likelihood(-nll, ours, parameters, precision))
        assert value == pytest.approx(expected, rel=1e-4)


def test_prior_precision_matches_laplace_torch_gradient_search():
    laplace = pytest.importorskip("laplace")
    from laplace.curvature import BackPackGGN

    model, inputs, labels = _classifier_setup()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs, labels), batch_size=16
    )
    reference = laplace.DiagLLLaplace(model, "classification", backend=BackPackGGN)
    reference.fit(loader)
    reference.optimize_prior_precision(
        pred_type="glm", method="marglik", prior_structure="scalar", n_steps=500, lr=0.1
    )

    ours, nll = _our_classifier_curvature(model, inputs, labels, "ggn", batch_size=16)
    parameters = torch.cat([model[2].weight.flatten(), model[2].bias]).detach()
    fit = optimize_prior_precision(-nll, ours, parameters)
    assert fit.prior_precision == pytest.approx(float(reference.prior_precision), rel=1e-3)


def test_prior_precision_beats_neighbours():
    generator = torch.Generator().manual_seed(3)
    curvature = torch.rand(1000, generator=generator, dtype=torch.float64) ** 4 * 50
    parameters = torch.randn(1000, generator=generator, dtype=torch.float64) * 0.05
    fit = optimize_prior_precision(-12.0, curvature, parameters)
    best = fit.log_marginal_likelihood
    for factor in (0.5, 2.0, 0.9, 1.1):
        neighbour = float(
            log_marginal_likelihood(-12.0, curvature, parameters, fit.prior_precision * factor)
        )
        assert best > neighbour
    gamma = float((curvature / (curvature + fit.prior_precision)).sum())
    assert fit.prior_precision == pytest.approx(gamma / float((parameters**2).sum()), rel=1e-8)


def test_prior_precision_rejects_zero_curvature():
    with pytest.raises(ValueError, match="curvature is zero"):
        optimize_prior_precision(0.0, torch.zeros(5), torch.ones(5))


def test_prior_precision_rejects_parameters_at_prior_mean():
    with pytest.raises(ValueError, match="prior mean"):
        optimize_prior_precision(0.0, torch.ones(5), torch.zeros(5))


def test_marginal_likelihood_formula():
    curvature = torch.tensor([1.0, 3.0])
    parameters = torch.tensor([0.5, -1.0])
    value = float(log_marginal_likelihood(-2.0, curvature, parameters, 2.0))
    expected = -2.0 - 0.5 * (math.log(3.0 / 2.0) + math.log(5.0 / 2.0) + 2.0 * 1.25)
    assert value == pytest.approx(expected, rel=1e-12)
