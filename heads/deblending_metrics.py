"""Deblending metrics, shared by the deblending head, its classical baselines, tests and benchmarks.

Numpy-only functions that check their shapes, with the definitions of the blending
toolkit BTK (Mendoza et al. 2024, arXiv:2409.06986; `btk.match`, `btk.metrics`):

- **matching**: true objects and detections are paired by the Hungarian assignment
  (`scipy.optimize.linear_sum_assignment`) that minimises the summed pixel distance;
  pairs farther apart than `max_distance` pixels are no match. A matched detection is a
  true positive (TP), an unmatched detection a false positive (FP), an unmatched true
  object a false negative (FN).
- **detection**: precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = their
  harmonic mean = 2 TP / (2 TP + FP + FN); versus the separation of each true object to
  its nearest true neighbour in PSF FWHM (a detection takes its matched object's
  separation, a false positive that of the nearest true object).
- **flux**: per band, the relative error r = (f_pred - f_true) / f_true of matched
  objects; bias = median r, scatter = NMAD = 1.4826 median |r - median r|, mean
  absolute percentage error MAPE = 100 mean |r| (COIN, Boucaud et al. 2020); the
  *blended* sources are those with a true neighbour closer than 2 PSF FWHM
  (`BLENDED_FWHM`), and the statistics are binned by true magnitude and separation.
- **colour**: c = -2.5 log10(f_b / f_b+1) of adjacent bands (both fluxes > 0); colour
  bias = median (c_pred - c_true), its scatter the NMAD.
- **segmentation**: IoU = |A and B| / |A or B| of a true footprint and the matched
  detection's segment (0 for a missed object); `matched_iou` averages over true objects.
- **reconstruction**: chi^2 per pixel of data minus the model (the sum of the
  deblended per-object images), sum ivar (d - m)^2 / n over the n pixels with ivar > 0
  (1 for a model that leaves only noise).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

NMAD_SCALE = 1.4826  # median absolute deviation -> standard deviation of a Gaussian
BLENDED_FWHM = 2.0  # a source with a true neighbour closer than this many PSF FWHM is blended
AB_NJY = 31.4  # AB magnitude of 1 nJy (the image cards' flux unit)


def _points(name: str, xy) -> np.ndarray:
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2) if np.size(xy) == 0 else np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"{name}: expected (N, 2) pixel positions, got shape {xy.shape}")
    return xy


# ---------------------------------------------------------------------------- matching and detection


def match_detections(true_xy, pred_xy, max_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """(true_index, pred_index) of the Hungarian pairs, closer than `max_distance` pixels,
    minimising the summed distance. true_xy (N, 2), pred_xy (M, 2), same pixel axes."""
    from scipy.optimize import linear_sum_assignment

    t, p = _points("true_xy", true_xy), _points("pred_xy", pred_xy)
    if len(t) == 0 or len(p) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    dist = np.hypot(*(t[:, None, :] - p[None, :, :]).transpose(2, 0, 1))  # (N, M)
    # pairs beyond max_distance cost more than any allowed set of pairs, so they never displace one
    cost = np.where(dist <= max_distance, dist, max_distance * (len(t) + len(p) + 1))
    i, j = linear_sum_assignment(cost)
    keep = dist[i, j] <= max_distance
    return i[keep].astype(np.int64), j[keep].astype(np.int64)


def detection_scores(tp: int, n_true: int, n_pred: int) -> dict[str, float]:
    """Precision TP / n_pred, recall TP / n_true and F1 2 TP / (n_true + n_pred) (NaN when undefined)."""
    if not 0 <= tp <= min(n_true, n_pred):
        raise ValueError(f"need 0 <= tp <= min(n_true, n_pred), got tp={tp}, n_true={n_true}, n_pred={n_pred}")
    nan = float("nan")
    return {"precision": tp / n_pred if n_pred else nan, "recall": tp / n_true if n_true else nan,
            "f1": 2 * tp / (n_true + n_pred) if n_true + n_pred else nan, "tp": int(tp), "fp": int(n_pred - tp), "fn": int(n_true - tp)}


def nearest_neighbour_distance(xy) -> np.ndarray:
    """(N,) distance of each point to its nearest other point (inf for a lone point)."""
    xy = _points("xy", xy)
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    return d.min(axis=1) if len(xy) else np.zeros(0)


def detection_vs_separation(true_sep, true_matched, pred_sep, pred_matched, edges: Sequence[float]) -> list[dict]:
    """Detection scores per bin [edges[k], edges[k+1]) of separation (any unit, e.g. FWHM).

    true_sep (N,), true_matched (N,) bool: each true object's separation and whether it
    was detected; pred_sep (M,), pred_matched (M,) bool: each detection's separation (its
    object's, or its nearest true object's when unmatched) and whether it matched."""
    true_sep, pred_sep = np.asarray(true_sep, float), np.asarray(pred_sep, float)
    true_matched, pred_matched = np.asarray(true_matched, bool), np.asarray(pred_matched, bool)
    if true_sep.shape != true_matched.shape or pred_sep.shape != pred_matched.shape:
        raise ValueError("separations and matched flags must have one shape per side")
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        t, p = (true_sep >= lo) & (true_sep < hi), (pred_sep >= lo) & (pred_sep < hi)
        tp_true, tp_pred = int(np.sum(true_matched & t)), int(np.sum(pred_matched & p))
        n_true, n_pred = int(t.sum()), int(p.sum())
        nan = float("nan")
        rows.append({"lo": float(lo), "hi": float(hi), "n_true": n_true, "n_pred": n_pred,
                     "recall": tp_true / n_true if n_true else nan, "precision": tp_pred / n_pred if n_pred else nan,
                     "f1": (tp_true + tp_pred) / (n_true + n_pred) if n_true + n_pred else nan})
    return rows


# ---------------------------------------------------------------------------- fluxes and colours


def relative_flux_error(f_pred, f_true) -> np.ndarray:
    """(f_pred - f_true) / f_true, elementwise over arrays of one shape (f_true > 0)."""
    f_pred, f_true = np.asarray(f_pred, np.float64), np.asarray(f_true, np.float64)
    if f_pred.shape != f_true.shape:
        raise ValueError(f"f_pred {f_pred.shape} and f_true {f_true.shape} differ in shape")
    if np.any(f_true <= 0):
        raise ValueError("true fluxes must be > 0")
    return (f_pred - f_true) / f_true


def nmad(x) -> float:
    """NMAD_SCALE x median |x - median x| of the finite values (NaN if none)."""
    x = np.asarray(x, np.float64).ravel()
    x = x[np.isfinite(x)]
    return float(NMAD_SCALE * np.median(np.abs(x - np.median(x)))) if x.size else float("nan")


def flux_stats(rel) -> dict[str, float]:
    """bias = median r, scatter = NMAD r, mape = 100 mean |r| of the finite relative errors r
    (a missed object has no flux and is left out: detection counts it); n = how many."""
    r = np.asarray(rel, np.float64).ravel()
    r = r[np.isfinite(r)]
    if not r.size:
        return {"bias": float("nan"), "scatter": float("nan"), "mape": float("nan"), "n": 0}
    return {"bias": float(np.median(r)), "scatter": nmad(r), "mape": float(100 * np.mean(np.abs(r))), "n": int(r.size)}


def binned_flux_stats(rel, by, edges: Sequence[float]) -> list[dict]:
    """`flux_stats` of (N,) relative errors in bins [edges[k], edges[k+1]) of (N,) `by`
    (true magnitude, separation in FWHM, ...)."""
    rel, by = np.asarray(rel, np.float64), np.asarray(by, np.float64)
    if rel.shape != by.shape or rel.ndim != 1:
        raise ValueError(f"expected (N,) rel and by, got {rel.shape} and {by.shape}")
    return [{"lo": float(lo), "hi": float(hi), **flux_stats(rel[(by >= lo) & (by < hi)])} for lo, hi in zip(edges[:-1], edges[1:])]


def ab_magnitude(flux_njy) -> np.ndarray:
    """AB magnitude of fluxes in nJy (NaN for flux <= 0)."""
    f = np.asarray(flux_njy, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(f > 0, AB_NJY - 2.5 * np.log10(np.where(f > 0, f, 1.0)), np.nan)


def colour_bias(f_pred, f_true) -> dict[str, np.ndarray]:
    """Per adjacent band pair (B - 1,): bias = median (c_pred - c_true) and scatter = NMAD of
    the colour error, c = -2.5 log10(f_b / f_b+1) [mag], over objects with all four fluxes
    > 0. f_pred, f_true: (N, B)."""
    f_pred, f_true = np.asarray(f_pred, np.float64), np.asarray(f_true, np.float64)
    if f_pred.shape != f_true.shape or f_pred.ndim != 2 or f_pred.shape[1] < 2:
        raise ValueError(f"expected (N, B >= 2) fluxes of one shape, got {f_pred.shape} and {f_true.shape}")
    mp, mt = ab_magnitude(f_pred), ab_magnitude(f_true)
    dc = (mp[:, :-1] - mp[:, 1:]) - (mt[:, :-1] - mt[:, 1:])  # (N, B - 1), NaN where a flux <= 0
    bias = np.array([np.median(c[np.isfinite(c)]) if np.isfinite(c).any() else np.nan for c in dc.T])
    return {"bias": bias, "scatter": np.array([nmad(c) for c in dc.T]), "n": np.isfinite(dc).sum(axis=0)}


# ---------------------------------------------------------------------------- segmentation and reconstruction


def iou(mask_a, mask_b) -> float:
    """|A and B| / |A or B| of two boolean masks of one shape (NaN when both are empty)."""
    a, b = np.asarray(mask_a, bool), np.asarray(mask_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} and {b.shape}")
    union = np.sum(a | b)
    return float(np.sum(a & b) / union) if union else float("nan")


def matched_iou(true_masks, pred_segmentation, true_index, pred_index) -> np.ndarray:
    """(N,) IoU of each true object's mask (N, H, W) with its matched detection's segment
    (pixels of the (H, W) label map equal to pred_index + 1); 0 for unmatched objects."""
    true_masks, seg = np.asarray(true_masks, bool), np.asarray(pred_segmentation)
    if true_masks.ndim != 3 or seg.shape != true_masks.shape[1:]:
        raise ValueError(f"expected (N, H, W) masks and an (H, W) label map, got {true_masks.shape} and {seg.shape}")
    out = np.zeros(len(true_masks))
    for i, j in zip(np.asarray(true_index), np.asarray(pred_index)):
        out[i] = iou(true_masks[i], seg == j + 1)
    return out


def residual_chi2(values, ivar, model) -> float:
    """sum ivar (values - model)^2 / n over the n pixels with ivar > 0: ~1 when the model
    leaves only noise. values, ivar, model: arrays of one shape (e.g. (B, H, W))."""
    values, ivar, model = (np.asarray(a, np.float64) for a in (values, ivar, model))
    if not values.shape == ivar.shape == model.shape:
        raise ValueError(f"values {values.shape}, ivar {ivar.shape} and model {model.shape} differ in shape")
    good = (ivar > 0) & np.isfinite(values) & np.isfinite(model)
    return float(np.sum(ivar[good] * (values[good] - model[good]) ** 2) / good.sum()) if good.any() else float("nan")


# ---------------------------------------------------------------------------- the noise-floor oracle


def sky_sigma(ivar) -> np.ndarray:
    """(B,) typical sky sigma per band of (B, H, W) ivar: 1 / sqrt(median ivar of the measured
    pixels) (1 for a band with none); the unit of the head's background level eps_b."""
    ivar = np.asarray(ivar, np.float64)
    out = np.ones(len(ivar))
    for b in range(len(ivar)):
        good = ivar[b][ivar[b] > 0]
        if good.size:
            out[b] = 1 / np.sqrt(np.median(good))
    return out


def fraction_fluxes(values, ivar, isolated, eps) -> tuple[np.ndarray, np.ndarray]:
    """(K, B) fluxes and pixel-noise errors of sources split from an observed (B, H, W) image
    by the *true* fractions iso_k / (sum_j iso_j + eps_b), as the deblending head splits it
    with its predicted ones (flux = sum fraction x image, masked pixels (ivar <= 0) count 0,
    error = sqrt(sum fraction^2 / ivar)).

    isolated: (K, B, H, W) noiseless image of each source (negatives clipped to 0, as the
    head's training targets); eps: (B,) background level (`background_level` x `sky_sigma`).
    Why: the flux error this leaves is what the data allow the head's estimator at best (the
    noise of the pixels each source gets, the outskirts eps_b gives to the background and the
    light outside the stamp), so the head's error beyond it is its fractions' (the oracle of
    the deblending bench)."""
    values, ivar = np.asarray(values, np.float64), np.asarray(ivar, np.float64)
    iso = np.clip(np.asarray(isolated, np.float64), 0, None)
    eps = np.asarray(eps, np.float64).reshape(-1, 1, 1)
    if iso.ndim != 4 or iso.shape[1:] != values.shape or ivar.shape != values.shape or len(eps) != len(values):
        raise ValueError(f"expected (K, B, H, W) isolated, (B, H, W) values / ivar and (B,) eps; got {iso.shape}, "
                         f"{values.shape}, {ivar.shape}, {eps.shape[:1]}")
    good = (ivar > 0) & np.isfinite(values)
    frac = iso / (iso.sum(0) + eps)  # (K, B, H, W)
    v = np.where(good, values, 0.0)
    var = np.where(good, 1 / np.where(good, ivar, 1.0), 0.0)
    return (frac * v).sum((-2, -1)), np.sqrt((frac**2 * var).sum((-2, -1)))


# ---------------------------------------------------------------------------- one stamp, many stamps


def score_stamp(true_xy, true_flux, pred_xy, pred_flux, fwhm_pixels: float, max_distance: float | None = None) -> dict:
    """Match one stamp's detections to its truth; per true object (N,): separation to the
    nearest true neighbour [FWHM], matched flag, true and predicted (NaN if missed) fluxes
    (N, B); per detection (M,): separation and matched flag; and the matched index pairs.
    max_distance defaults to one PSF FWHM [pixels]."""
    t, p = _points("true_xy", true_xy), _points("pred_xy", pred_xy)
    true_flux = np.asarray(true_flux, np.float64).reshape(len(t), -1)
    pred_flux = np.asarray(pred_flux, np.float64).reshape(len(p), true_flux.shape[1] if not len(p) else -1)
    if true_flux.shape[0] != len(t) or (len(p) and pred_flux.shape[1] != true_flux.shape[1]):
        raise ValueError(f"fluxes {true_flux.shape} / {pred_flux.shape} do not match {len(t)} true / {len(p)} detected objects")
    ti, pi = match_detections(t, p, fwhm_pixels if max_distance is None else max_distance)
    sep = nearest_neighbour_distance(t) / fwhm_pixels
    matched = np.zeros(len(t), bool)
    matched[ti] = True
    flux = np.full(true_flux.shape, np.nan)
    flux[ti] = pred_flux[pi]
    pred_matched = np.zeros(len(p), bool)
    pred_matched[pi] = True
    pred_sep = np.full(len(p), np.inf)
    pred_sep[pi] = sep[ti]
    if len(t):
        lone = np.flatnonzero(~pred_matched)  # a false positive takes its nearest true object's separation
        nearest = np.argmin(np.hypot(*(p[lone, None, :] - t[None, :, :]).transpose(2, 0, 1)), axis=1) if len(lone) else []
        pred_sep[lone] = sep[nearest]
    return {"sep_fwhm": sep, "matched": matched, "f_true": true_flux, "f_pred": flux,
            "pred_sep_fwhm": pred_sep, "pred_matched": pred_matched, "true_index": ti, "pred_index": pi}


def deblending_metrics(stamps: Sequence[dict], band_names: Sequence[str], reference_band: int,
                       sep_edges: Sequence[float] = (0.0, 1.0, 1.5, 2.0, 3.0, np.inf),
                       mag_edges: Sequence[float] = (16.0, 20.0, 22.0, 23.0, 24.0, 25.0, 28.0),
                       blended_fwhm: float = BLENDED_FWHM) -> dict:
    """The suite over `score_stamp` outputs: detection (overall and vs separation), per band
    flux bias / scatter / MAPE of all matched and of blended (separation < blended_fwhm)
    objects, the reference band's blended statistics by true magnitude and by separation,
    and the colour bias of blended objects."""
    cat = lambda k: np.concatenate([s[k] for s in stamps]) if stamps else np.zeros(0)  # noqa: E731
    sep, matched, psep, pmatched = cat("sep_fwhm"), cat("matched").astype(bool), cat("pred_sep_fwhm"), cat("pred_matched").astype(bool)
    f_true, f_pred = cat("f_true"), cat("f_pred")
    f_true = f_true.reshape(len(sep), len(band_names))
    f_pred = f_pred.reshape(len(sep), len(band_names))
    out: dict = {"detection": detection_scores(int(matched.sum()), len(sep), len(psep)),
                 "detection_vs_separation": detection_vs_separation(sep, matched, psep, pmatched, sep_edges)}
    good = matched & np.all(f_true > 0, axis=1)
    rel = np.full(f_true.shape, np.nan)
    rel[good] = relative_flux_error(f_pred[good], f_true[good])
    blended = good & (sep < blended_fwhm)
    out["flux_all"] = {b: flux_stats(rel[good, k]) for k, b in enumerate(band_names)}
    out["flux_blended"] = {b: flux_stats(rel[blended, k]) for k, b in enumerate(band_names)}
    mag = ab_magnitude(f_true[:, reference_band])
    out["flux_blended_vs_mag"] = binned_flux_stats(rel[blended, reference_band], mag[blended], mag_edges)
    out["flux_vs_separation"] = binned_flux_stats(rel[good, reference_band], sep[good], sep_edges)
    out["colour_blended"] = {k: v.tolist() for k, v in colour_bias(f_pred[blended], f_true[blended]).items()} if blended.sum() else {}
    return out


__all__ = [
    "BLENDED_FWHM", "NMAD_SCALE", "ab_magnitude", "binned_flux_stats", "colour_bias", "deblending_metrics",
    "detection_scores", "detection_vs_separation", "flux_stats", "fraction_fluxes", "iou", "match_detections", "matched_iou",
    "nearest_neighbour_distance", "nmad", "relative_flux_error", "residual_chi2", "score_stamp", "sky_sigma",
]
