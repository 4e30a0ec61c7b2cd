"""Out-of-set detection: flag inputs that belong to none of the classes a head was trained on.

A classifier's softmax answers "which of my classes?", never "none of them": a real
galaxy unlike the training mocks was called a star with p = 0.999 (issue 17). The
score here asks the features instead.

- Mahalanobis score (Lee, Lee, Lee & Shin 2018, NeurIPS, "A simple unified framework
  for detecting out-of-distribution samples and adversarial attacks"): class-conditional
  Gaussians with one shared (tied) covariance on the features a head reads (for the
  spectral classifier its pooled embedding next to its hidden layer); the score is the
  squared Mahalanobis distance to the nearest class mean. The covariance is estimated on
  the training block with Ledoit-Wolf shrinkage towards a scaled identity (Ledoit & Wolf
  2004, J. Multivariate Anal. 88, 365): with hundreds of feature dimensions and few
  spectra the plain estimate is singular or nearly so, and its inverse would let
  directions of no variance dominate the distance (with 2100 training spectra the
  fitted shrinkage was < 0.01: it costs nothing where it is not needed).
- Energy score (Liu, Wang, Owens & Li 2020, NeurIPS, "Energy-based out-of-distribution
  detection"): E = -T logsumexp(logits / T), higher = less like the training data.
  Measured beside the Mahalanobis score on our mocks (`out_of_set_metrics`); it did not
  help (see `OutOfSetDetector`), so the detector uses the Mahalanobis score alone.
- The threshold is the conformal (1 - rate) quantile of the scores of a calibration
  block the detector was not fitted on (`flag_threshold`; Bates, Candes, Lei, Romano &
  Sesia 2023, Ann. Statist. 51, 149, "Testing for outliers with conformal p-values"):
  for exchangeable in-set data the expected rate of false flags is <= `rate`.
- Data quality (`spectrum_quality`, `log_wavelength_coverage`): what a spectrum's pixels
  say before any network sees them (median S/N, fraction of pixels with ivar > 0,
  fraction of the log-wavelength range covered; the last is `cosmofm classify`'s
  LOW_COVERAGE). An S/N cut as an out-of-set flag was measured and left out: at median
  S/N < 1 or < 1.5 (no in-set survey mock is below 1.7) it caught no sky or broken fibre
  that the feature score had not already flagged, and a fibre with ivar = 0 almost
  everywhere is skipped before the network anyway (`finetune.classify.classifiable`).
- Which features (`OOD_FEATURES`, the classifier's `ood_features`): "backbone", the mean
  over valid tokens of the backbone's last transformer block *before* its final LayerNorm
  (`block_output`, `pretrain.modeling_cosmofm.masked_token_mean`), is the default since session 10; "head", the
  pooled embedding next to the head's hidden layer, is what older models carry. Measured
  on the shared backbone's three fine-tunes (sdss-like-survey, 2,100 in-set test spectra,
  1,000 out-of-set mocks of seed 7, fitted on the training block, thresholded at 1.5 % on
  the calibration block): AUROC 0.977 +- 0.007 against 0.967 +- 0.006, carbon stars flagged
  34 % against 12 %, M stars 58 % against 36 %, white dwarfs 77 % against 65 %, false flags
  1.19 % against 1.00 %; confirmed on a fresh set (seed 8, see docs/benchmarks.md). The
  head's features are trained to separate the 13 classes, so an object of none of them
  collapses onto the nearest (carbon and M stars onto quiescent galaxies); the final norm
  divides each token by its own scale, which the head then no longer sees (a likely
  reason, not isolated by a measurement). Lee et al.'s
  feature ensemble (each block's mean-pooled tokens and the stem's, conformal p-values
  combined by their minimum with a Bonferroni or a calibrated threshold) and a spectral
  chi-square against the predicted class's mean training spectrum (or its 8 principal
  components) with a free degree-3 continuum were measured too and were weaker (ensemble
  AUROC 0.948-0.955, carbon 11-19 %; chi-square alone AUROC 0.69-0.74, its class being
  mostly a galaxy smeared over redshifts; with the last block +3 points on carbon stars,
  -16 on white dwarfs): the early blocks see carbon stars no better than the last.

`OutOfSetDetector` is a module of persistent buffers (class means, precision), so a
fitted detector travels in model.safetensors; it takes features and labels only, so
any head can carry one.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from cosmofm.data_cards.errors import InputError
from cosmofm.heads.calibration import _as_numpy, error_detection_auroc

DEFAULT_FALSE_FLAG_RATE = 0.015  # target rate of in-set spectra flagged; the issue allows <= 2 % on the test block
OOD_FEATURES = ("backbone", "head")  # what the detector reads: the last block's pre-norm token mean, or the head's input


@contextmanager
def block_output(module: nn.Module):
    """Within the block, `kept["output"]` is what `module` returned on its last call from
    this thread (a forward hook, removed on exit): the tokens of a transformer block that the
    backbone's output no longer shows, e.g. the last block's before the final norm. Only this
    thread's calls count: worker threads share one model (classify where processes cannot
    fork), and every hook sees every thread's forward."""
    kept: dict[str, torch.Tensor] = {}
    owner = threading.get_ident()

    def keep(_module, _inputs, output):
        if threading.get_ident() == owner:
            kept["output"] = output

    handle = module.register_forward_hook(keep)
    try:
        yield kept
    finally:
        handle.remove()


def shrunk_covariance(centred: np.ndarray) -> tuple[np.ndarray, float]:
    """(covariance (F, F), shrinkage in [0, 1]) of centred rows (N, F): the Ledoit-Wolf
    estimate (1 - s) S + s mu I, with mu = tr(S) / F and the s minimising the expected
    Frobenius error (Ledoit & Wolf 2004, Lemma 3.1 and Theorem 3.1; as scikit-learn's
    `ledoit_wolf_shrinkage`)."""
    x = np.asarray(centred, dtype=np.float64)
    n, p = x.shape
    s = x.T @ x / n  # (F, F)
    mu = np.trace(s) / p
    x2 = x**2
    beta = (np.sum(x2.T @ x2) / n - np.sum(s**2)) / (p * n)  # variance of the entries of S
    delta = (np.sum(s**2) - 2 * mu * np.trace(s) + p * mu**2) / p  # distance of S from mu I
    shrinkage = 0.0 if delta <= 0 else float(np.clip(beta / delta, 0.0, 1.0))
    return (1 - shrinkage) * s + shrinkage * mu * np.eye(p), shrinkage


def class_gaussians(features, labels, n_classes: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(means (C, F), tied precision (F, F), shrinkage) of features (N, F) with integer labels (N,).
    A class without samples keeps a mean of +inf (it is never the nearest)."""
    f, y = _as_numpy(features).astype(np.float64), _as_numpy(labels).astype(np.int64)
    if f.ndim != 2 or y.shape != (len(f),):
        raise InputError("features / labels", f"shapes {f.shape} and {y.shape}", "give (N, F) features and (N,) integer labels")
    if len(f) < 2 or y.min() < 0 or y.max() >= n_classes:
        raise InputError("labels", f"need >= 2 samples with labels in [0, {n_classes})", "fit on the labelled training block")
    means = np.full((n_classes, f.shape[1]), np.inf)
    for c in np.unique(y):
        means[c] = f[y == c].mean(axis=0)
    covariance, shrinkage = shrunk_covariance(f - means[y])
    return means, np.linalg.inv(covariance), shrinkage


def mahalanobis_score(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(N,) squared Mahalanobis distance of features (N, F) to the nearest of the means (C, F)
    under the tied precision (F, F); float64 (the expansion cancels large terms), on the CPU
    where the device has no float64 (Apple MPS)."""
    where = torch.device("cpu") if features.device.type == "mps" else features.device
    f, m, p = (t.to(where, torch.float64) for t in (features, means, precision))
    fp = f @ p  # (N, F)
    finite = torch.isfinite(m).all(dim=1)
    m = m[finite]  # classes unseen in the fit are never the nearest
    d2 = (fp * f).sum(1, keepdim=True) - 2 * fp @ m.T + ((m @ p) * m).sum(1)  # (N, C')
    return d2.min(dim=1).values.clamp(min=0)


def energy_score(logits, temperature: float = 1.0) -> np.ndarray:
    """(N,) free energy -T logsumexp(logits / T) of (N, C) logits (Liu et al. 2020); higher = more out of set."""
    z = torch.as_tensor(_as_numpy(logits), dtype=torch.float64) / temperature
    return (-temperature * torch.logsumexp(z, dim=1)).numpy()


def flag_threshold(calibration_scores, rate: float = DEFAULT_FALSE_FLAG_RATE) -> float:
    """The score above which a spectrum is flagged: the conformal (1 - rate) quantile of the
    in-set `calibration_scores` (the ceil((n + 1)(1 - rate))-th smallest), so that a fresh
    in-set score exceeds it with probability <= rate (Bates et al. 2023). +inf (nothing
    flagged) when the block is too small to resolve `rate` (n + 1 < 1 / rate)."""
    s = np.sort(_as_numpy(calibration_scores).astype(np.float64).ravel())
    if not 0 < rate < 1:
        raise InputError("out_of_set_rate", f"must be in (0, 1), got {rate}", "e.g. 0.015 for 1.5 % false flags")
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise InputError("calibration_scores", "are empty or not finite", "score a calibration block of in-set spectra")
    k = int(np.ceil((s.size + 1) * (1 - rate)))
    return float("inf") if k > s.size else float(s[k - 1])


class OutOfSetDetector(nn.Module):
    """Class-conditional Gaussians with a tied covariance on (N, F) features (Lee et al. 2018):
    persistent buffers `means` (C, F) and `precision` (F, F), zeros and identity until `fit`.
    `forward(features)` is the (N,) squared Mahalanobis distance to the nearest class mean.

    The energy of the logits was measured as a second score (issue 17: 32- and 64-wide
    classifiers fine-tuned on sdss-like-survey mocks; 500 held-out in-set and 500
    out-of-set mocks): alone its AUROC was 0.40 / 0.36 (out-of-set spectra got *more*
    confident logits than in-set ones), and adding it z-scored with weight 0.25 / 0.5 / 1
    lowered the AUROC (0.898 -> 0.897 / 0.890 / 0.875 and 0.907 -> 0.899 / 0.886 / 0.861)
    without a gain in detections at the same false-flag rate, so it is not part of the
    detector (`energy_score` stays for such measurements).
    """

    def __init__(self, n_classes: int, n_features: int):
        super().__init__()
        self.register_buffer("means", torch.zeros(n_classes, n_features))
        self.register_buffer("precision", torch.eye(n_features))

    def fit(self, features, labels) -> dict:
        """Means and shrunk tied precision from training features (N, F) and labels (N,); returns {"shrinkage"}."""
        means, precision, shrinkage = class_gaussians(features, labels, self.means.shape[0])
        if means.shape[1] != self.means.shape[1]:
            raise InputError("features", f"have {means.shape[1]} columns, the detector {self.means.shape[1]}", "fit on the head's own features")
        self.means.copy_(torch.as_tensor(means, dtype=self.means.dtype))
        self.precision.copy_(torch.as_tensor(precision, dtype=self.precision.dtype))
        return {"shrinkage": shrinkage}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return mahalanobis_score(features, self.means, self.precision)


# ---------------------------------------------------------------------------- data quality of a spectrum


def spectrum_quality(values, ivar) -> dict[str, float]:
    """{"median_snr": median |flux| sqrt(ivar) over pixels with ivar > 0 (0 when none),
    "valid_fraction": fraction of pixels with ivar > 0} of one spectrum."""
    v, w = _as_numpy(values).astype(np.float64), _as_numpy(ivar).astype(np.float64)
    valid = w > 0
    snr = float(np.median(np.abs(v[valid]) * np.sqrt(w[valid]))) if valid.any() else 0.0
    return {"median_snr": snr, "valid_fraction": float(valid.mean()) if valid.size else 0.0}


_WIDTHS: dict[tuple, tuple[np.ndarray, float]] = {}  # (pixel_log_widths, their sum) of the grids seen, by (size, first, middle, last)


def pixel_log_widths(wavelength) -> tuple[np.ndarray, float]:
    """((P,) width of each pixel in ln(lambda), read-only; their sum): a pixel's width is the
    smaller gap to a neighbour, so a gap between two spectrograph windows is not counted as
    covered. Remembered per grid (by its size, ends and middle): the spectra of a survey
    file share one, and computing it for each was most of `log_wavelength_coverage`'s time
    (130 us per BOSS spectrum before, ~30 us after)."""
    wave = np.asarray(wavelength)
    if wave.size < 2:
        return np.zeros(wave.size), 0.0
    key = (wave.size, float(wave[0]), float(wave[wave.size // 2]), float(wave[-1]))
    if key not in _WIDTHS:
        gaps = np.abs(np.diff(np.log(wave.astype(np.float64))))
        widths = np.minimum(np.r_[gaps[0], gaps], np.r_[gaps, gaps[-1]])
        widths.flags.writeable = False
        if len(_WIDTHS) >= 64:
            _WIDTHS.clear()
        _WIDTHS[key] = widths, float(widths.sum())
    return _WIDTHS[key]


def log_wavelength_coverage(wavelength, ivar, span: float | None = None) -> float:
    """Fraction of a ln(lambda) `span` covered by pixels with ivar > 0 (each counts its
    `pixel_log_widths`); `span` None = the spectrum's own grid. Capped at 1."""
    widths, grid = pixel_log_widths(wavelength)
    total = grid if span is None else float(span)
    if total <= 0:
        return 0.0
    masked = np.flatnonzero(~(_as_numpy(ivar) > 0))  # usually a few pixels: cheaper to take them off the grid's sum
    return float(min(1.0, (grid - widths[masked].sum()) / total))


# ---------------------------------------------------------------------------- metrics


def out_of_set_metrics(scores_in, scores_out, flags_in, flags_out, kinds_out) -> dict:
    """How well a detector separates in-set from out-of-set spectra.

    scores_in (N,), scores_out (M,): detector scores (higher = more out of set);
    flags_in (N,), flags_out (M,): what was flagged (bool); kinds_out (M,): the kind of each
    out-of-set spectrum (e.g. OOS_WD). Returns auroc (the probability that an out-of-set
    spectrum scores above an in-set one; `heads.calibration.error_detection_auroc`),
    false_flag_rate (in-set flagged), detection_rate (out-of-set flagged) and
    detection_rate_per_kind, with n_in and n_out.
    """
    s_in, s_out = _as_numpy(scores_in).astype(float), _as_numpy(scores_out).astype(float)
    f_in, f_out, kinds = _as_numpy(flags_in).astype(bool), _as_numpy(flags_out).astype(bool), np.asarray(kinds_out).astype(str)
    if f_in.shape != s_in.shape or f_out.shape != s_out.shape or kinds.shape != s_out.shape:
        raise InputError("out_of_set_metrics", f"shapes differ: scores {s_in.shape}/{s_out.shape}, flags {f_in.shape}/{f_out.shape}, "
                         f"kinds {kinds.shape}", "give one score, flag and kind per spectrum")
    auroc = error_detection_auroc(np.concatenate([s_in, s_out]), np.r_[np.zeros(len(s_in), bool), np.ones(len(s_out), bool)])
    return {"auroc": auroc, "false_flag_rate": float(f_in.mean()) if f_in.size else float("nan"),
            "detection_rate": float(f_out.mean()) if f_out.size else float("nan"),
            "detection_rate_per_kind": {str(k): float(f_out[kinds == k].mean()) for k in np.unique(kinds)},
            "n_in": int(len(s_in)), "n_out": int(len(s_out))}


__all__ = [
    "DEFAULT_FALSE_FLAG_RATE",
    "OOD_FEATURES",
    "OutOfSetDetector",
    "block_output",
    "class_gaussians",
    "energy_score",
    "flag_threshold",
    "log_wavelength_coverage",
    "mahalanobis_score",
    "out_of_set_metrics",
    "pixel_log_widths",
    "shrunk_covariance",
    "spectrum_quality",
]
