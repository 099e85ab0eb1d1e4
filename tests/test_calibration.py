"""AUROC, ECE, reliability bins and the logistic calibrator on hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest

from uec_rag.evaluation.calibration import (
    LogisticCalibrator,
    auroc,
    expected_calibration_error,
    reliability_bins,
)


def _pairwise_auroc(u: np.ndarray, wrong: np.ndarray) -> float:
    positive = u[wrong][:, None]
    negative = u[~wrong][None, :]
    return float(((positive > negative) + 0.5 * (positive == negative)).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_pairwise_count(seed):
    rng = np.random.default_rng(seed)
    wrong = rng.random(300) < 0.3
    # Rounded values create many ties, which count one half.
    u = np.round(rng.normal(size=300) + wrong, 1)
    assert auroc(u, wrong) == pytest.approx(_pairwise_auroc(u, wrong), abs=1e-12)


def test_auroc_extremes_and_undefined():
    wrong = np.array([True, True, False, False])
    assert auroc(np.array([3.0, 4.0, 1.0, 2.0]), wrong) == 1.0
    assert auroc(np.array([1.0, 2.0, 3.0, 4.0]), wrong) == 0.0
    assert auroc(np.ones(4), wrong) == 0.5
    assert np.isnan(auroc(np.arange(3.0), np.zeros(3, dtype=bool)))
    with pytest.raises(ValueError, match="non-finite"):
        auroc(np.array([np.nan, 1.0]), np.array([True, False]))


def test_ece_hand_computed():
    probability = np.array([0.05, 0.15, 0.15, 0.95, 1.0])
    correct = np.array([0, 1, 0, 1, 1])
    # Bins: [0, .1): p=.05 acc 0; [.1, .2): conf .15 acc .5; [.9, 1]: conf .975 acc 1.
    expected = (1 * 0.05 + 2 * abs(0.5 - 0.15) + 2 * abs(1 - 0.975)) / 5
    assert expected_calibration_error(probability, correct) == pytest.approx(expected)

    bins = reliability_bins(probability, correct)
    assert bins["count"].tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert np.isnan(bins["accuracy"][2])


def test_ece_zero_when_calibrated():
    probability = np.full(8, 0.75)
    correct = np.array([1, 1, 1, 0] * 2)
    assert expected_calibration_error(probability, correct) == pytest.approx(0.0, abs=1e-12)


def test_reliability_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability_bins(np.array([1.2]), np.array([1]))


def test_logistic_calibrator_recovers_parameters():
    rng = np.random.default_rng(0)
    score = rng.normal(size=20000)
    correct = rng.random(20000) < 1 / (1 + np.exp(-(2.0 * score - 0.5)))
    calibrator = LogisticCalibrator.fit(score, correct)
    probe = np.array([-1.0, 0.0, 1.0])
    expected = 1 / (1 + np.exp(-(2.0 * probe - 0.5)))
    np.testing.assert_allclose(calibrator.predict(probe), expected, atol=0.03)


def test_logistic_calibrator_separable_stays_finite():
    score = np.array([0.1, 0.2, 0.8, 0.9])
    calibrator = LogisticCalibrator.fit(score, np.array([0, 0, 1, 1]))
    predicted = calibrator.predict(score)
    assert np.isfinite(predicted).all()
    assert predicted[0] < 0.01
    assert predicted[-1] > 0.99
