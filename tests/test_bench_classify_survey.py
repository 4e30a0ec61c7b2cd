"""Helpers of the survey classification bench (scripts/bench/classify_survey.py) that need no training."""

import numpy as np

from cosmofm.bench.classify_survey import recall_by_redshift


def test_recall_by_redshift_bins_each_extragalactic_class_over_its_own_range():
    names = ["STAR_G2", "QSO", "GALAXY"]
    z = np.concatenate([np.zeros(10), np.linspace(3.5, 4.2, 40), np.linspace(0.3, 0.5, 20)])
    labels = np.array([0] * 10 + [1] * 40 + [2] * 20)
    pred = labels.copy()
    pred[40:50] = 0  # the ten highest-redshift QSOs called stars: only the top bin fails
    out = recall_by_redshift(pred, labels, z, names)
    assert set(out) == {"QSO", "GALAXY"}  # stars have no redshift range to bin
    qso = np.array(out["QSO"])
    assert qso[0, 0] == 3.5 and abs(qso[-1, 1] - 4.2) < 1e-6 and qso[:, 2].sum() == 40
    assert list(qso[:, 3]) == [1.0, 1.0, 1.0, 0.0]
    assert [row[3] for row in out["GALAXY"]] == [1.0] * 4
