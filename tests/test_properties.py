"""Property tests (hypothesis) of coefficients, combinations and the score."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from uec_rag.coefficients import CoefficientRule, compute_coefficients, member_traces
from uec_rag.combine import direct_sum
from uec_rag.gaussian import GaussianEmbedding
from uec_rag.similarity import naive_similarity, uncertainty_similarity

TRACE = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)
TEMPERATURE = st.floats(min_value=0.25, max_value=4.0)
RULES = st.builds(
    CoefficientRule,
    rule=st.sampled_from(["inverse_trace", "softmax"]),
    temperature=TEMPERATURE,
)


def trace_matrix(max_members: int = 5):
    return st.integers(1, max_members).flatmap(
        lambda k: arrays(np.float64, st.tuples(st.integers(1, 6), st.just(k)), elements=TRACE)
    )


@st.composite
def gaussians(draw, n: int, dim: int, zero_variance: bool = False) -> GaussianEmbedding:
    """Random Gaussians from a drawn seed and scales (cheap to generate, unlike element-wise
    array draws, which trip the input-generation speed check on a loaded machine)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mean_scale = draw(st.sampled_from([0.01, 0.5, 2.0]))
    mean = mean_scale * rng.standard_normal((n, dim))
    if zero_variance:
        variance = np.zeros((n, dim))
    else:
        variance_scale = draw(st.sampled_from([1e-3, 0.1, 2.0]))
        variance = variance_scale * rng.uniform(0.01, 1.0, size=(n, dim))
    return GaussianEmbedding(mean, variance)


@given(trace_matrix(), RULES)
def test_coefficients_positive_and_sum_to_one(traces: np.ndarray, rule: CoefficientRule) -> None:
    if rule.rule == "softmax":
        # Keep -t/T differences within float32 range (exp(-40) ~ 4e-18), so no weight underflows.
        traces = traces / 100
    coefficients = compute_coefficients(traces, rule)
    assert (coefficients > 0).all()
    np.testing.assert_allclose(coefficients.sum(axis=1), 1, rtol=1e-5)


@given(st.integers(1, 6), TRACE, RULES)
def test_equal_traces_give_uniform(n_members: int, trace: float, rule: CoefficientRule) -> None:
    coefficients = compute_coefficients(np.full((3, n_members), trace), rule)
    np.testing.assert_allclose(coefficients, 1 / n_members, rtol=1e-6)


@given(trace_matrix(4).filter(lambda t: t.shape[1] >= 2), TEMPERATURE)
def test_vanishing_trace_takes_weight(traces: np.ndarray, temperature: float) -> None:
    rule = CoefficientRule("inverse_trace", temperature)
    previous = None
    for tiny in (1e-8, 1e-16, 1e-32, 0.0):
        shrunk = traces.copy()
        shrunk[:, 0] = tiny
        weight = compute_coefficients(shrunk, rule)[:, 0]
        if previous is not None:
            assert (weight >= previous - 1e-6).all()
        previous = weight
    np.testing.assert_array_equal(previous, 1.0)


@settings(max_examples=50)
@given(st.data(), st.integers(2, 4), st.sampled_from(["inverse_trace", "softmax"]))
def test_permuting_members_permutes_coefficients(data, n_members: int, rule_name: str) -> None:
    rule = CoefficientRule(rule_name)  # type: ignore[arg-type]
    dims = data.draw(st.lists(st.integers(1, 4), min_size=n_members, max_size=n_members))
    queries = [data.draw(gaussians(2, dim)) for dim in dims]
    documents = [data.draw(gaussians(3, dim)) for dim in dims]
    permutation = data.draw(st.permutations(range(n_members)))

    def scores(order):
        q_members = [queries[k] for k in order]
        d_members = [documents[k] for k in order]
        pi_q = compute_coefficients(member_traces(q_members), rule)
        pi_d = compute_coefficients(member_traces(d_members), rule)
        combined = uncertainty_similarity(direct_sum(q_members, pi_q), direct_sum(d_members, pi_d))
        return pi_q, combined.score

    pi, score = scores(list(range(n_members)))
    pi_permuted, score_permuted = scores(permutation)
    np.testing.assert_allclose(pi_permuted, pi[:, permutation], rtol=1e-5)
    np.testing.assert_allclose(score_permuted, score, rtol=1e-4, atol=1e-5)


@settings(max_examples=50)
@given(st.data(), st.integers(1, 8))
def test_zero_variance_score_is_inner_product(data, dim: int) -> None:
    queries = data.draw(gaussians(2, dim, zero_variance=True))
    documents = data.draw(gaussians(3, dim, zero_variance=True))
    scores = uncertainty_similarity(queries, documents)
    np.testing.assert_allclose(scores.score, queries.mean @ documents.mean.T, rtol=1e-6)


@settings(max_examples=50)
@given(st.data(), st.integers(1, 8))
def test_positive_variance_shrinks_score(data, dim: int) -> None:
    queries = data.draw(gaussians(2, dim))
    documents = data.draw(gaussians(3, dim))
    scores = naive_similarity(queries, documents)
    nonzero = np.abs(scores.mu_s) > 1e-9
    assume(nonzero.any())
    assert (np.abs(scores.score[nonzero]) < np.abs(scores.mu_s[nonzero])).all()
    fast = uncertainty_similarity(queries, documents)
    np.testing.assert_allclose(fast.score, scores.score, rtol=1e-4, atol=1e-5)


@settings(max_examples=50)
@given(st.data(), st.integers(1, 8))
def test_direct_sum_single_member_is_identity(data, dim: int) -> None:
    member = data.draw(gaussians(4, dim))
    coefficients = compute_coefficients(member_traces([member]))
    np.testing.assert_array_equal(coefficients, 1.0)
    combined = direct_sum([member], coefficients)
    np.testing.assert_array_equal(combined.mean, member.mean)
    np.testing.assert_array_equal(combined.variance, member.variance)
