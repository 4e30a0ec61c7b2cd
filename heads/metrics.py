"""Evaluation metrics of classification and redshift, shared by `Task.metrics`, the fine-tunes, the tests and the benchmarks.

Small functions on numpy arrays that check their shapes (the_well's `metrics/` in
spirit). Calibration (temperature, ECE, reliability, conformal sets, MC-dropout
ensembles) lives in `heads/calibration.py`.

Redshift errors are measured as dz / (1 + z), the convention of photometric- and
spectroscopic-redshift surveys: NMAD = 1.4826 median |dz/(1+z) - median| (a robust
standard deviation), a catastrophic fraction above a threshold, the median as bias.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cosmofm.heads.calibration import _check

CATASTROPHIC_DZ = 0.0033  # |dz| / (1 + z) above this is a catastrophic redshift (~1000 km/s)
NMAD_SCALE = 1.4826  # median absolute deviation -> standard deviation of a Gaussian
MIN_PULLS = 20  # objects a pull width needs


def _same_shape_1d(**arrays) -> list[np.ndarray]:
    values = [np.asarray(a) for a in arrays.values()]  # dtypes kept: float32 predictions, float32 arithmetic
    shapes = {name: v.shape for name, v in zip(arrays, values)}
    if values[0].ndim != 1 or len(set(shapes.values())) != 1:
        raise ValueError(f"expected 1-D arrays of one length, got shapes {shapes}")
    return values


def redshift_metrics(z_true, z_pred) -> dict[str, float]:
    """Catastrophic fraction (|dz|/(1+z) > CATASTROPHIC_DZ, or no redshift at all: NaN),
    NMAD and bias (median dz/(1+z)) over the redshifts given; (N,) arrays each."""
    z_true, z_pred = _same_shape_1d(z_true=z_true, z_pred=z_pred)
    dz = (z_pred - z_true) / (1 + z_true)
    given = dz[np.isfinite(dz)]
    return {
        "redshift_catastrophic_fraction": float(np.mean(~(np.abs(dz) <= CATASTROPHIC_DZ))),  # NaN counts as a failure
        "redshift_nmad": float(NMAD_SCALE * np.median(np.abs(given - np.median(given)))) if given.size else float("nan"),
        "redshift_bias": float(np.median(given)) if given.size else float("nan"),
    }


def classification_metrics(probs, labels, class_names: Sequence[str]) -> dict:
    """Accuracy, per-class and macro recall (classes present in `labels` only), confusion
    matrix (rows true, columns predicted) of (N, C) probabilities and (N,) class ids."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    _check(probs, labels)
    c = len(class_names)
    if probs.shape[1] != c:
        raise ValueError(f"expected probabilities over the {c} classes {list(class_names)}, got {probs.shape[1]} columns")
    pred = probs.argmax(axis=1)
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    support = confusion.sum(axis=1)
    recall = {name: float(confusion[i, i] / support[i]) for i, name in enumerate(class_names) if support[i] > 0}
    return {
        "accuracy": float(np.mean(pred == labels)),
        "macro_recall": float(np.mean(list(recall.values()))),
        "per_class_recall": recall,
        "confusion": confusion,
    }


def pull_width(z_true, z, z_err) -> float:
    """NMAD_SCALE x median |(z - z_true) / z_err| over the objects whose redshift is not
    catastrophic (1 for errors that match the scatter); NaN below MIN_PULLS objects."""
    z_true, z, z_err = _same_shape_1d(z_true=z_true, z=z, z_err=z_err)
    ok = np.isfinite(z) & np.isfinite(z_err) & (z_err > 0) & (np.abs(z - z_true) / (1 + z_true) <= CATASTROPHIC_DZ)
    return float(NMAD_SCALE * np.median(np.abs((z - z_true)[ok] / z_err[ok]))) if ok.sum() >= MIN_PULLS else float("nan")


def redshift_error_scale(z_true, z, z_err) -> float:
    """The factor that makes redshift errors match the scatter on held-out objects: the
    `pull_width` (1 when it cannot be measured). Like the temperature of the class
    probabilities, fitted on a calibration block; the chi-square curvature alone
    underestimates the errors of the binned redshift scan ~1.3x on our mocks (binning
    and template mismatch)."""
    width = pull_width(z_true, z, z_err)
    return float(width) if np.isfinite(width) and width > 0 else 1.0
