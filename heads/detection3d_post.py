"""The 3D detection head's post-processing: duplicate merging in source units and the
receding side of the major axis from the cube's own velocity gradient (issue 21).

Split from `heads/detection3d_data.py` (targets, peaks, units); both act on the
`detections` rows (`detection3d_data.DETECTION_FIELDS`).

* `merge_duplicates`: SDC2 matches a candidate to a truth source when its position error
  is below the source's beam-convolved size and its frequency error below its line width,
  and charges 1 for every other candidate inside that window. A local-maximum box
  (`nms_window`, ~ the beam x a typical width) is far smaller than a large or wide galaxy,
  so one galaxy can give two peaks (its two horns, its two halves) and a source split by a
  tile edge gives one peak in each tile: the second is a sure false detection. So,
  best first, a detection suppresses every weaker one inside its own window
  (`factor` x the scorer's: separation < factor x sqrt(size^2 + beam^2), frequency offset
  < factor x w20), its size and width being the head's regressed ones. Per tile in the
  forward (pixel frame) and once more over the whole catalogue after the tiles
  (`merge_catalogue`, world units), as SoFiA's reliability pass runs once over all tiles.
* `receding_direction`: the SDC2 PA points to the receding (redshifted) half of the major
  axis, which only the velocity gradient tells, and a rotating disk's gradient lies along
  its major axis. The regressed direction did not learn it (median PA error 96 deg: the
  8-channel tokens average over the gradient and the half-resolution cell sees a few
  voxels of a source 20-40 channels wide). The first moment does: in a box of the
  detection's regressed width and size, on the S/N cube boxcar-smoothed (`kernel`) and
  cut at `clip` x its robust rms, the covariance of line-of-sight velocity (channel
  offset, signed by the channel direction of frequency) and sky position is a vector
  pointing to the receding side, in pixel coordinates (col, row): the regressed ux, uy's
  frame. On the truth centres of two mock cubes its median error is ~43 deg over
  S/N >= 4 (~30 deg at S/N 6-10, ~65 deg at S/N 4-6: noise-limited), against 90 deg for
  a random direction.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from astropy.table import Table
from scipy.spatial import cKDTree
from torch.nn import functional as F

from cosmofm.data_cards.errors import InputError
from cosmofm.heads.detection3d_data import DETECTION_FIELDS

_F = {name: i for i, name in enumerate(DETECTION_FIELDS)}


def merge_keep(score: np.ndarray, xy: np.ndarray, z: np.ndarray, conv: np.ndarray, spec: np.ndarray, factor: float) -> np.ndarray:
    """(M,) bool: which detections survive a greedy merge, best `score` first: a survivor
    removes every weaker detection j with |xy_j - xy_i| < factor x conv_i and
    |z_j - z_i| < factor x spec_i (xy, conv in one unit; z, spec in another). factor 0: all kept."""
    score, z, conv, spec = (np.asarray(a, np.float64).reshape(-1) for a in (score, z, conv, spec))
    xy = np.asarray(xy, np.float64).reshape(len(score), 2)
    keep = np.ones(len(score), bool)
    if factor <= 0 or len(score) < 2:
        return keep
    ok = np.isfinite(xy).all(1) & np.isfinite(z) & np.isfinite(conv) & np.isfinite(spec)
    rows = np.nonzero(ok)[0]
    if len(rows) < 2:
        return keep
    # a KD-tree on (xy / the largest spatial window, z / the largest spectral one) finds a superset
    sw, zw = factor * max(conv[rows].max(), 1e-12), factor * max(spec[rows].max(), 1e-12)
    pts = np.column_stack([xy[rows] / sw, z[rows] / zw])
    pairs = cKDTree(pts).query_pairs(math.sqrt(2.0) * 1.001, output_type="ndarray")
    if not len(pairs):
        return keep
    a, b = rows[pairs[:, 0]], rows[pairs[:, 1]]
    # orient each pair (stronger i, weaker j); ties broken by row order
    swap = (score[b] > score[a]) | ((score[b] == score[a]) & (b < a))
    i, j = np.where(swap, b, a), np.where(swap, a, b)
    inside = (np.hypot(*(xy[j] - xy[i]).T) < factor * conv[i]) & (np.abs(z[j] - z[i]) < factor * spec[i])
    i, j = i[inside], j[inside]
    order = np.argsort(-score[i], kind="stable")
    for k in order:  # in order of the stronger one: a removed detection removes nothing
        if keep[i[k]]:
            keep[j[k]] = False
    return keep


def merge_duplicates(det: torch.Tensor, beam_pix: float, factor: float) -> torch.Tensor:
    """(n, K, len(DETECTION_FIELDS)) detections (best first, padded with score 0) with the
    weaker of any two inside one source's window (`merge_keep`, pixel frame: size and beam
    in pixels, w20 in channels) zeroed and the survivors moved to the front."""
    if factor <= 0:
        return det
    out = torch.zeros_like(det)
    d = det.detach().double().cpu().numpy()
    for t in range(len(d)):
        live = np.nonzero(d[t, :, 0] > 0)[0]
        if not len(live):
            continue
        r = d[t, live]
        keep = merge_keep(r[:, 0], r[:, [_F["col"], _F["row"]]], r[:, _F["chan"]],
                          np.hypot(10 ** r[:, _F["mu_log_size_pix"]], beam_pix), 10 ** r[:, _F["mu_log_w20_chan"]], factor)
        kept = torch.as_tensor(live[keep], device=det.device)
        out[t, :len(kept)] = det[t, kept]
    return out


def merge_catalogue(table: Table, beam_arcsec: float, factor: float) -> Table:
    """The rows of a detect catalogue (ra, dec [deg], central_freq [Hz], hi_size [arcsec],
    w20 [km/s], score) left after `merge_keep` in world units (the scorer's window:
    sqrt(hi_size^2 + beam^2) arcsec, w20 as a frequency width at the row's frequency)."""
    import astropy.units as u

    from cosmofm.data_cards.mocks.cube_survey import w20_width_hz

    if "score" not in table.colnames:
        raise InputError("catalogue", "has no score column", "merge the head's own catalogue (cosmofm detect --model)")
    if len(table) < 2 or factor <= 0:
        return table
    ra, dec = u.Quantity(table["ra"], u.deg).value, u.Quantity(table["dec"], u.deg).value
    nu = u.Quantity(table["central_freq"], u.Hz).value
    dec0 = float(np.nanmedian(dec))
    ra0 = float(np.nanmedian(ra))
    # a local flat frame (arcsec): cubes of a few deg; ra wrapped around the median
    east = ((ra - ra0 + 180.0) % 360.0 - 180.0) * np.cos(np.radians(dec)) * 3600.0
    north = (dec - dec0) * 3600.0
    conv = np.hypot(u.Quantity(table["hi_size"], u.arcsec).value, beam_arcsec)
    spec = w20_width_hz(u.Quantity(table["w20"], u.km / u.s).value, nu)
    keep = merge_keep(np.asarray(table["score"], float), np.column_stack([east, north]), nu, conv, spec, factor)
    return table[keep]


def receding_direction(snr: torch.Tensor, det: torch.Tensor, channel_sign: torch.Tensor, kernel=(5, 3), clip: float = 2.0) -> torch.Tensor:
    """(n, K, 2) unit vectors (col, row) towards the receding half of each detection's major
    axis (module docstring), NaN where the box holds no signal; `snr` (n, C, H, W) the S/N
    cube, `det` (n, K, len(DETECTION_FIELDS)) its detections, `channel_sign` (n,) +1 where
    frequency grows with channel (the receding side is then at lower channels), -1 else."""
    n, c, h, w = snr.shape
    kc, kxy = min(kernel[0], c - (c + 1) % 2), min(kernel[1], min(h, w) - (min(h, w) + 1) % 2)
    x = F.avg_pool3d(snr.float().unsqueeze(1), (kc, kxy, kxy), stride=1, padding=(kc // 2, kxy // 2, kxy // 2),
                     count_include_pad=False)[:, 0, :c, :h, :w]
    rms = 1.4826 * x.abs().flatten(1).median(dim=1).values.clamp(min=1e-6)
    x = (x / rms.view(-1, 1, 1, 1)).cpu().double().numpy()
    d = det.detach().double().cpu().numpy()
    out = np.full((n, d.shape[1], 2), np.nan)
    for t in range(n):
        for k in np.nonzero(d[t, :, 0] > 0)[0]:
            row = d[t, k]
            hc = int(math.ceil(0.6 * min(10 ** row[_F["mu_log_w20_chan"]], 4 * c))) + 2
            hs = int(math.ceil(0.6 * min(10 ** row[_F["mu_log_size_pix"]], 4 * max(h, w)) + 3))
            cc, yy, xx = (int(round(row[_F[a]])) for a in ("chan", "row", "col"))
            box = x[t, max(cc - hc, 0):cc + hc + 1, max(yy - hs, 0):yy + hs + 1, max(xx - hs, 0):xx + hs + 1]
            wt = np.where(box > clip, box, 0.0)
            if not wt.sum() > 0:  # nothing above the clip: every positive voxel
                wt = np.clip(box, 0.0, None)
            total = wt.sum()
            if not total > 0:
                continue
            zc, yc, xc = np.indices(box.shape, dtype=np.float64)
            v = -float(channel_sign[t]) * zc  # line-of-sight velocity grows towards lower frequency
            dv = v - (wt * v).sum() / total
            g = np.array([(wt * dv * (xc - (wt * xc).sum() / total)).sum(), (wt * dv * (yc - (wt * yc).sum() / total)).sum()])
            norm = np.hypot(*g)
            if norm > 0:
                out[t, k] = g / norm
    return torch.as_tensor(out, dtype=det.dtype, device=det.device)


def _logit(p):
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1.0 - 1e-12)
    return np.log(p / (1.0 - p))


# The noise prior (session 10). A sparse cube's flipped copy holds a handful of detections
# (0-9 on a 512 x 256^2 cube, 0-3 in most), too few to fit the tail's scale: with 1-2 of them
# just above the floor the fitted scale is tiny and a positive a little above them passes as
# "far in the tail". So the cube's own negatives are blended with a prior learnt on the
# calibration cubes (`fit_noise_prior`, stored in `Detection3DHeadConfig.noise_prior` at
# calibration, as the threshold is): conjugate Gamma priors worth PRIOR_WEIGHT pseudo-detections,
# on the exponential's rate (the scale: (sum of excesses + k x prior scale) / (n + k)) and on
# the Poisson rate of noise detections per flipped block run (the count: (n + k) x mu0 /
# (mu0 + k), mu0 the prior's count for this cube's flipped blocks run). SDC2 charges a false
# detection 1 and pays a true one at most 1 (~0.5-0.7 for the faint ones a sparse cube holds),
# so a prior that errs towards more noise costs less than one that errs towards less.
PRIOR_WEIGHT = 3.0
PRIOR_MIN_TAIL = 10  # the calibration's tail fit uses at least this many flipped detections


def fit_noise_prior(negative, blocks: int, threshold: float, floor: float, min_tail: int = PRIOR_MIN_TAIL) -> dict:
    """The noise prior of the purity cut from held-out cubes' sign-flipped detections, pooled:
    `negative` their scores decoded at `floor` (<= `threshold`, the calibrated one), `blocks`
    the flipped blocks run to find them. Two held-out 256 x 128^2 cubes hold 0-2 flipped
    detections above a calibrated threshold of 0.15-0.20 but 60-90 above the floor 0.05, so
    the tail is fitted above a level u: the threshold where at least `min_tail` lie above it,
    else the (min_tail + 1)-th highest score (not below `floor`): a peaks-over-threshold fit on
    the top order statistics, scale = their mean excess of logit(score) over logit(u), and the
    expected count above the threshold n_u exp(-(logit t - logit u) / scale), per block run.
    On those cubes the tail above 0.05-0.10 is heavier than higher up (mean excess 0.30-0.50
    above 0.05-0.10, 0.07-0.20 above 0.15-0.20 on sparse cubes), so the prior errs towards
    more noise. {} when there is no flipped detection at all (no prior: the cube's own fit)."""
    if isinstance(blocks, bool) or not isinstance(blocks, (int, np.integer)) or blocks < 1:
        raise InputError("blocks", f"is {blocks!r}", "give the number of flipped blocks run (HeadFinder.negative_blocks_run()), >= 1")
    if not 0 < floor <= threshold < 1:
        raise InputError("floor / threshold", f"are {floor!r} / {threshold!r}", "decode the negatives at a floor <= the threshold, both in (0, 1)")
    neg = np.sort(np.asarray(negative, np.float64).reshape(-1))[::-1]
    neg = neg[neg >= floor]
    if not len(neg):
        return {}
    if (neg >= threshold).sum() >= min_tail:
        level = threshold
    else:
        level = max(floor, float(neg[min_tail])) if len(neg) > min_tail else floor
    tail = neg[neg >= level] if level == floor else neg[neg > level]
    x_u = float(_logit(level))
    scale = max(float(np.mean(_logit(tail) - x_u)), 1e-6)
    count = len(tail) * math.exp(-max(float(_logit(threshold)) - x_u, 0.0) / scale)
    return {"per_block": count / blocks, "tail_scale": scale, "threshold": float(threshold), "level": float(level),
            "n_tail": int(len(tail)), "blocks": int(blocks)}


def noise_tail(negative, floor: float, prior: dict | None = None, blocks: int | None = None,
               weight: float = PRIOR_WEIGHT) -> tuple[float, float]:
    """(expected number of noise detections above `floor`, the exponential scale of their
    logit excess) for one cube: from its `negative` scores alone (count n, scale their mean
    excess: the rule without a prior), or blended with `prior` (`fit_noise_prior`'s dict; the
    count part only with `blocks`, this cube's flipped blocks run) as the comment above says."""
    neg = np.asarray(negative, np.float64).reshape(-1)
    neg = neg[neg >= floor]
    x0 = float(_logit(floor))
    excess = float(np.sum(_logit(neg) - x0)) if len(neg) else 0.0
    n = len(neg)
    scale0 = float((prior or {}).get("tail_scale", 0.0))
    if scale0 <= 0:
        return float(n), (max(excess / n, 1e-6) if n else 0.0)
    scale = (excess + weight * scale0) / (n + weight)
    count = float(n)
    if blocks and prior.get("per_block", 0.0) > 0:  # the prior's count at its threshold, moved to this floor along its tail
        mu0 = prior["per_block"] * blocks * math.exp(-(x0 - float(_logit(prior["threshold"]))) / scale0)
        count = (n + weight) * mu0 / (mu0 + weight)
    return count, scale


def expected_false(t, negative, floor: float, prior: dict | None = None, blocks: int | None = None) -> np.ndarray:
    """The expected number of noise detections with objectness >= `t` (scalar or array, each
    >= `floor`), from the `negative` scores (the sign-flipped cube's detections, decoded at
    `floor`): peaks over a threshold, with the excess of logit(score) over logit(floor)
    exponential (the tail of the maxima of a noise field): N x exp(-(logit t - logit floor) / scale),
    N and the scale from `noise_tail` (the negatives' count and mean excess, the maximum
    likelihood fit, blended with the calibration's `prior` when given). A fitted tail,
    not the raw count N(>=t): a cube holds a handful of noise detections, all close to the
    floor, and the raw count is 0 above the highest one, which would let any positive
    above it through."""
    t = np.asarray(t, np.float64)
    count, scale = noise_tail(negative, floor, prior, blocks)
    if count <= 0:
        return np.zeros_like(t)
    return count * np.exp(-np.maximum(_logit(t) - float(_logit(floor)), 0.0) / scale)


def purity_threshold(positive, negative, min_purity: float, floor: float, prior: dict | None = None,
                     blocks: int | None = None) -> tuple[float, float]:
    """(t, estimated purity): the lowest objectness threshold t >= `floor` (one of the
    `positive` scores) at which the positive detections at or above t have an estimated
    purity 1 - F(t) / P(>=t) >= `min_purity`, F the expected number of noise detections
    above t (`expected_false`, from the `negative` scores: the sign-flipped cube's detections,
    the false ones the noise gives in the same volume, decoded at `floor`; with the
    calibration's `prior` and this cube's `blocks` flipped blocks run when given). None reaches it:
    (inf, nan), the empty catalogue (a cube of noise). Benjamini & Hochberg's step-up rule
    with the flipped cube as the null; SoFiA-2's reliability R = (P - N) / P, cumulative in
    the one parameter the head ranks its detections by."""
    if not 0 <= min_purity <= 1:
        raise InputError("min_purity", f"is {min_purity!r}", "give a purity in [0, 1], e.g. 0.9")
    if not 0 < floor < 1:
        raise InputError("floor", f"is {floor!r}", "give the objectness threshold the detections were decoded at, in (0, 1)")
    pos = np.sort(np.asarray(positive, np.float64).reshape(-1))
    pos = pos[pos >= floor]
    ts = np.unique(pos)  # ascending: the lowest threshold that reaches the purity
    n_pos = len(pos) - np.searchsorted(pos, ts, side="left")
    purity = 1.0 - expected_false(ts, negative, floor, prior, blocks) / np.maximum(n_pos, 1)
    ok = np.nonzero(purity >= min_purity - 1e-12)[0]
    return (float(ts[ok[0]]), float(purity[ok[0]])) if len(ok) else (math.inf, math.nan)


def reliability_cut(table: Table, beam_arcsec: float, merge_factor: float, min_purity: float, floor: float,
                    prior: dict | None = None, blocks: int | None = None) -> tuple[Table, dict]:
    """A detect catalogue of both signs (`sign` +1 / -1: `finetune.detect.HeadFinder(negatives=True)`)
    -> (the positive rows at or above `purity_threshold`, each sign merged first by
    `merge_catalogue`; `sign` dropped, and a summary: threshold, estimated purity, counts,
    the noise tail used and the threshold the cube's own negatives alone would give).
    The threshold adapts to the cube: where sources are dense the noise's few false
    detections hardly move it; on empty sky, where they are most of the catalogue, it rises
    until they are a (1 - min_purity) share (the same false-detection density per volume,
    a different source density). `prior`, `blocks`: the calibration's noise prior and this
    cube's flipped blocks run (`noise_tail`); None: the cube's own negatives only."""
    if "sign" not in table.colnames:
        raise InputError("catalogue", "has no sign column", "run the head with negatives (HeadFinder(negatives=True), cosmofm detect --reliability)")
    sign = np.asarray(table["sign"])
    pos = merge_catalogue(table[sign > 0], beam_arcsec, merge_factor)
    neg = merge_catalogue(table[sign < 0], beam_arcsec, merge_factor)
    t, purity = purity_threshold(pos["score"], neg["score"], min_purity, floor, prior, blocks)
    out = pos[np.asarray(pos["score"], np.float64) >= t]
    out.remove_column("sign")
    count, scale = noise_tail(neg["score"], floor, prior, blocks)
    info = {"threshold": t, "estimated_purity": purity, "n_positive": len(pos), "n_negative": len(neg),
            "n_negative_above": int((np.asarray(neg["score"], np.float64) >= t).sum()), "n_kept": len(out),
            "noise_count": count, "noise_scale": scale, "prior": dict(prior or {}), "blocks_run_negative": blocks,
            "threshold_without_prior": purity_threshold(pos["score"], neg["score"], min_purity, floor)[0] if prior else t,
            "negative_scores": sorted(float(v) for v in neg["score"]), "positive_scores": sorted(float(v) for v in pos["score"])}
    return out, info


__all__ = ["PRIOR_WEIGHT", "expected_false", "fit_noise_prior", "merge_catalogue", "merge_duplicates", "merge_keep", "noise_tail", "purity_threshold", "receding_direction", "reliability_cut"]
