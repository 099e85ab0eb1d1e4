"""Per-item coefficient rules: exact values, edge cases and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from uec_rag.coefficients import CoefficientRule, compute_coefficients, member_traces
from uec_rag.gaussian import GaussianEmbedding


def test_inverse_trace_exact_values() -> None:
    traces = np.array([[1.0, 2.0, 4.0]])
    # 1/t = [1, 0.5, 0.25], sum 1.75
    expected = np.array([[1 / 1.75, 0.5 / 1.75, 0.25 / 1.75]])
    np.testing.assert_allclose(compute_coefficients(traces), expected, rtol=1e-6)


def test_tempered_inverse_trace_exact_values() -> None:
    traces = np.array([[1.0, 4.0]])
    rule = CoefficientRule("inverse_trace", temperature=2.0)
    # (1/t)^(1/2) = [1, 0.5]
    np.testing.assert_allclose(compute_coefficients(traces, rule), [[2 / 3, 1 / 3]], rtol=1e-6)


def test_softmax_exact_values() -> None:
    traces = np.array([[1.0, 3.0]])
    rule = CoefficientRule("softmax", temperature=2.0)
    logits = np.array([-0.5, -1.5])
    expected = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(compute_coefficients(traces, rule)[0], expected, rtol=1e-6)


def test_uniform_rule() -> None:
    coefficients = compute_coefficients(np.array([[1.0, 5.0, 9.0]]), CoefficientRule("uniform"))
    np.testing.assert_allclose(coefficients, np.full((1, 3), 1 / 3))


def test_normalised_traces_divide_by_reference() -> None:
    # Member 0 has twice the scale of member 1; normalised, both traces are 1.
    traces = np.array([[2.0, 1.0], [4.0, 1.0]])
    rule = CoefficientRule(normalize_traces=True)
    coefficients = compute_coefficients(traces, rule, reference_traces=[2.0, 1.0])
    np.testing.assert_allclose(coefficients[0], [0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(coefficients[1], [1 / 3, 2 / 3], rtol=1e-6)


def test_normalisation_without_reference_raises() -> None:
    rule = CoefficientRule(normalize_traces=True)
    with pytest.raises(ValueError, match="member 1 has no reference trace"):
        compute_coefficients(np.ones((2, 2)), rule, reference_traces=[1.0, None])
    with pytest.raises(ValueError, match="needs reference_traces"):
        compute_coefficients(np.ones((2, 2)), rule)
    with pytest.raises(ValueError, match="got 1 reference traces for 2 members"):
        compute_coefficients(np.ones((2, 2)), rule, reference_traces=[1.0])


def test_zero_trace_takes_all_weight() -> None:
    traces = np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0], [1e-30, 1.0, 1e30]])
    coefficients = compute_coefficients(traces)
    assert np.isfinite(coefficients).all()
    np.testing.assert_array_equal(coefficients[0], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(coefficients[1], [0.5, 0.5, 0.0])
    assert coefficients[2, 0] == pytest.approx(1.0)


def test_extreme_traces_stay_finite_in_softmax() -> None:
    traces = np.array([[1e-300, 1e300]])
    coefficients = compute_coefficients(traces, CoefficientRule("softmax", temperature=1e-3))
    assert np.isfinite(coefficients).all()
    assert coefficients.sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "traces",
    [np.array([[1.0, -1.0]]), np.array([[1.0, np.nan]]), np.array([[np.inf, 1.0]])],
)
def test_bad_traces_raise(traces: np.ndarray) -> None:
    with pytest.raises(ValueError, match="traces must be finite and >= 0"):
        compute_coefficients(traces)


def test_bad_shape_raises() -> None:
    with pytest.raises(ValueError, match=r"shape \[N, K\]"):
        compute_coefficients(np.ones(3))


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan])
def test_bad_temperature_raises(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        CoefficientRule(temperature=temperature)


def test_unknown_rule_raises() -> None:
    with pytest.raises(ValueError, match="rule must be one of"):
        CoefficientRule("median")  # type: ignore[arg-type]


def test_rule_dict_round_trip() -> None:
    rule = CoefficientRule("softmax", temperature=0.5, normalize_traces=True)
    settings = rule.to_dict()
    assert settings == {"rule": "softmax", "temperature": 0.5, "normalize_traces": True}
    assert CoefficientRule.from_dict(settings) == rule
    with pytest.raises(ValueError, match="unknown CoefficientRule settings"):
        CoefficientRule.from_dict({**settings, "temp": 1})


def test_default_rule_is_paper_rule() -> None:
    assert CoefficientRule() == CoefficientRule("inverse_trace", 1.0, False)


def test_member_traces_stacks_columns() -> None:
    first = GaussianEmbedding(np.zeros((2, 3)), np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 2.0]]))
    second = GaussianEmbedding(np.zeros((2, 2)), np.array([[0.5, 0.5], [4.0, 0.0]]))
    np.testing.assert_allclose(member_traces([first, second]), [[3.0, 1.0], [2.0, 4.0]])
    with pytest.raises(ValueError, match="same number of items"):
        member_traces([first, second[0]])
