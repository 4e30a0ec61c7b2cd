"""Temperature scaling, ECE and conformal sets on synthetic classifiers with known truth."""

import numpy as np
import pytest

from cosmofm.heads.calibration import (
    ConformalClassifier,
    coverage,
    expected_calibration_error,
    fit_temperature,
    reliability_curve,
    softmax,
)


def _calibrated_logits(n, n_classes=13, seed=0):
    """Logits whose softmax is the true class distribution, and labels drawn from it."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (n, n_classes))
    p = softmax(logits)
    labels = np.array([rng.choice(n_classes, p=row) for row in p])
    return logits, labels


def test_temperature_scaling_undoes_overconfidence():
    logits, labels = _calibrated_logits(20000)
    over = logits * 3.0  # an overconfident network: same ranking, sharper probabilities
    assert expected_calibration_error(softmax(over), labels) > 0.1
    t = fit_temperature(over, labels)
    assert t == pytest.approx(3.0, rel=0.05)
    assert expected_calibration_error(softmax(over, t), labels) < 0.02


def test_reliability_curve_of_a_calibrated_model_is_diagonal():
    logits, labels = _calibrated_logits(30000, seed=1)
    curve = reliability_curve(softmax(logits), labels, n_bins=10)
    full = curve.counts > 500
    assert np.all(np.abs(curve.accuracy[full] - curve.confidence[full]) < 0.03)
    assert curve.counts.sum() == 30000


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_conformal_coverage_is_nominal(alpha):
    logits, labels = _calibrated_logits(40000, seed=2)
    probs = softmax(logits * 1.7)  # miscalibrated on purpose: conformal does not care
    cal, test = slice(0, 20000), slice(20000, None)
    conformal = ConformalClassifier.fit(probs[cal], labels[cal], alpha=alpha)
    sets = conformal.predict_sets(probs[test])
    assert coverage(sets, labels[test]) == pytest.approx(1 - alpha, abs=0.01)
    assert sets.sum(axis=1).min() >= 1


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="labels"):
        expected_calibration_error(np.full((3, 2), 0.5), np.array([0, 1]))
    with pytest.raises(ValueError, match="alpha"):
        ConformalClassifier.fit(np.full((3, 2), 0.5), np.array([0, 1, 1]), alpha=1.5)
