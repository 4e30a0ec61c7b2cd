"""Photometric-redshift metrics, shared by the photo-z head, its baseline, fine-tunes, tests and benchmarks.

Small numpy functions that check their shapes (with `heads.metrics`' check; the
spectroscopic redshift figures, with their far tighter catastrophic threshold, are
`heads.metrics.redshift_metrics`). Point estimates are judged on
dz/(1 + z) = (z_phot - z_true)/(1 + z_true), the convention of photo-z surveys
(e.g. Ilbert et al. 2006, A&A 457, 841; Pasquet et al. 2019, A&A 621, A26):

- NMAD = 1.4826 median |dz/(1+z) - median(dz/(1+z))|, a robust standard deviation;
- outlier fraction: |dz|/(1 + z) > 0.15 (the usual catastrophic threshold of photo-z);
- bias: mean dz/(1 + z).

Distributions are judged by the probability integral transform, PIT = CDF_i(z_true,i)
(Dawid 1984; Polsterer et al. 2016): uniform on [0, 1] for a calibrated p(z); we report
its Kolmogorov-Smirnov distance from uniform and a 10-bin histogram, and the coverage
of the central 68 % and 95 % intervals (should be 0.68 and 0.95).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from cosmofm.heads.metrics import NMAD_SCALE, _same_shape_1d

OUTLIER_DZ = 0.15  # |dz| / (1 + z) above this is a photo-z outlier


def _vectors(**arrays) -> list[np.ndarray]:
    """The arrays as float64 numpy, refused unless all are 1-D of one length."""
    return [v.astype(np.float64) for v in _same_shape_1d(**arrays)]


def nmad(x) -> float:
    """NMAD_SCALE x median |x - median x| of the finite values of a 1-D array (NaN if none)."""
    (x,) = _vectors(x=x)
    x = x[np.isfinite(x)]
    return float(NMAD_SCALE * np.median(np.abs(x - np.median(x)))) if x.size else float("nan")


def point_metrics(z_true, z_pred, outlier_dz: float = OUTLIER_DZ) -> dict[str, float]:
    """NMAD, outlier fraction (|dz|/(1+z) > outlier_dz; a NaN prediction counts as one) and
    bias (mean dz/(1+z), finite ones) of (N,) point estimates."""
    z_true, z_pred = _vectors(z_true=z_true, z_pred=z_pred)
    dz = (z_pred - z_true) / (1 + z_true)
    finite = dz[np.isfinite(dz)]
    return {
        "nmad": nmad(dz),
        "outlier_fraction": float(np.mean(~(np.abs(dz) <= outlier_dz))),
        "bias": float(np.mean(finite)) if finite.size else float("nan"),
    }


def binned_cdf(probs, edges, z) -> np.ndarray:
    """(N,) CDF of each binned p(z) at its z (linear within a bin; 0 below the grid, 1 above):
    the PIT when z is the true redshift. probs (N, B) (normalised here), edges (B + 1,)."""
    probs, edges = np.asarray(probs, dtype=np.float64), np.asarray(edges, dtype=np.float64)
    (z,) = _vectors(z=z)
    if probs.ndim != 2 or probs.shape[0] != z.shape[0] or edges.shape != (probs.shape[1] + 1,):
        raise ValueError(f"expected probs (N, B), edges (B + 1,) and z (N,), got {probs.shape}, {edges.shape}, {z.shape}")
    if np.any(np.diff(edges) <= 0):
        raise ValueError("bin edges must increase")
    cdf = np.concatenate([np.zeros((len(z), 1)), np.cumsum(probs, axis=1)], axis=1)  # (N, B + 1) at the edges
    cdf /= cdf[:, -1:]
    i = np.clip(np.searchsorted(edges, z, side="right") - 1, 0, len(edges) - 2)  # bin holding z
    frac = np.clip((z - edges[i]) / (edges[i + 1] - edges[i]), 0, 1)
    rows = np.arange(len(z))
    return cdf[rows, i] + frac * (cdf[rows, i + 1] - cdf[rows, i])


def pit_ks(pit) -> float:
    """Kolmogorov-Smirnov distance of PIT values from the uniform distribution on [0, 1]."""
    (pit,) = _vectors(pit=pit)
    if pit.size == 0:
        return float("nan")
    u = np.sort(np.clip(pit, 0, 1))
    n = u.size
    return float(max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n)))


def pit_histogram(pit, n_bins: int = 10) -> list[float]:
    """Fractions of PIT values in `n_bins` equal bins of [0, 1] (each 1 / n_bins if calibrated)."""
    (pit,) = _vectors(pit=pit)
    counts, _ = np.histogram(np.clip(pit, 0, 1), bins=n_bins, range=(0, 1))
    return (counts / max(pit.size, 1)).tolist()


def interval_coverage(z_true, lo, hi) -> float:
    """Fraction of true redshifts inside [lo, hi]."""
    z_true, lo, hi = _vectors(z_true=z_true, lo=lo, hi=hi)
    return float(np.mean((z_true >= lo) & (z_true <= hi)))


def photoz_metrics(z_true, z_pred, pit, intervals: Mapping[str, tuple]) -> dict:
    """The photo-z suite: `point_metrics` of z_pred, `pit_ks` and `pit_histogram` of pit, and
    `coverage_<name>` of each central interval {"68": (lo, hi), "95": (lo, hi)}; (N,) arrays."""
    out: dict = point_metrics(z_true, z_pred)
    out["pit_ks"] = pit_ks(pit)
    out["pit_histogram"] = pit_histogram(pit)
    for name, (lo, hi) in intervals.items():
        out[f"coverage_{name}"] = interval_coverage(z_true, lo, hi)
    return out


__all__ = ["OUTLIER_DZ", "binned_cdf", "interval_coverage", "nmad", "photoz_metrics", "pit_histogram", "pit_ks", "point_metrics"]
