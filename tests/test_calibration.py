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


def test_conformal_sets_emptied_for_flagged_objects_still_cover_nominally():
    """A detector empties the sets of 3 % of the objects (at random here): counted as misses on
    the calibration block, the other sets widen so that all of them together cover 1 - alpha."""
    logits, labels = _calibrated_logits(40000, seed=3)
    probs = softmax(logits)
    flagged = np.random.default_rng(4).random(40000) < 0.03
    cal, test = slice(0, 20000), slice(20000, None)
    for uncovered, expected in ((None, 0.9 - 0.03 * 0.9), (flagged[cal], 0.9)):
        sets = ConformalClassifier.fit(probs[cal], labels[cal], alpha=0.1, uncovered=uncovered).predict_sets(probs[test])
        sets[flagged[test]] = False
        assert coverage(sets, labels[test]) == pytest.approx(expected, abs=0.01)
    # flags alone beyond alpha: every class in every other set, not an infinite threshold
    assert ConformalClassifier.fit(probs[cal], labels[cal], alpha=0.02, uncovered=flagged[cal]).threshold == 1.0


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="labels"):
        expected_calibration_error(np.full((3, 2), 0.5), np.array([0, 1]))
    with pytest.raises(ValueError, match="alpha"):
        ConformalClassifier.fit(np.full((3, 2), 0.5), np.array([0, 1, 1]), alpha=1.5)


def test_ensemble_splits_entropy_into_aleatoric_and_epistemic():
    from cosmofm.heads.calibration import ensemble_prediction

    rng = np.random.default_rng(1)
    agree = np.repeat(rng.normal(0, 1, (1, 50, 5)), 8, axis=0)  # 8 identical members: no epistemic part
    ens = ensemble_prediction(agree)
    np.testing.assert_allclose(ens.epistemic, 0, atol=1e-9)
    np.testing.assert_allclose(ens.total_entropy, ens.aleatoric, atol=1e-9)
    disagree = np.stack([np.eye(5)[rng.integers(5, size=50)] * 10 for _ in range(8)])  # confident, different classes
    ens2 = ensemble_prediction(disagree)
    assert np.all(ens2.aleatoric < 0.01) and ens2.epistemic.mean() > 0.8
    np.testing.assert_allclose(ens2.probs.sum(1), 1)
    with pytest.raises(ValueError, match="member logits"):
        ensemble_prediction(agree[0])


def test_error_detection_auroc():
    from cosmofm.heads.calibration import error_detection_auroc

    errors = np.array([0, 0, 0, 1, 1], bool)
    assert error_detection_auroc(np.array([0.1, 0.2, 0.3, 0.8, 0.9]), errors) == 1.0
    assert error_detection_auroc(np.array([0.9, 0.8, 0.7, 0.1, 0.2]), errors) == 0.0
    assert error_detection_auroc(np.ones(5), errors) == 0.5
    assert np.isnan(error_detection_auroc(np.ones(3), np.zeros(3, bool)))


def test_default_alpha_follows_the_calibration_error_rate():
    """Sets that always keep the top class are informative only at alpha below its error rate."""
    from cosmofm.heads.calibration import default_alpha

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=2000)

    def probs_with_error(rate):
        top = labels.copy()
        wrong = rng.random(len(labels)) < rate
        top[wrong] = (labels[wrong] + 1) % 5
        p = np.full((len(labels), 5), 0.05)
        p[np.arange(len(labels)), top] = 0.8
        return p

    assert default_alpha(probs_with_error(0.30), labels) == 0.1  # a weak classifier: the usual 90 %
    assert default_alpha(probs_with_error(0.015), labels) == 0.01  # 98.5 % accurate: 99 % sets
    assert default_alpha(probs_with_error(0.0), labels) == 0.005
    assert default_alpha(probs_with_error(0.0)[:50], labels[:50]) == 0.02  # 50 calibration objects resolve alpha >= 1/51
