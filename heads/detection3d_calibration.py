"""Choosing the detection head's objectness threshold (and merge factor) on held-out data.

SDC2 charges 1 per false detection and gives at most 1 per true one, so the best threshold
depends on the data's mix of faint and bright sources: it is fitted, not fixed. Two
evaluators feed one search (`choose_threshold`): held-out tiles scored in the pixel frame
(`calibrate_tiles`, what `cosmofm finetune` runs) and whole held-out cubes' catalogues
scored by the SDC2 scorer (`calibrate_catalogues`, what the benchmark runs). The
`Detection3DTask` methods of the same names call these.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.heads import detection3d_data as data


def calibrate_tiles(model, outputs: Mapping[str, Any], targets: Mapping[str, torch.Tensor], min_purity: float = 0.9) -> dict[str, float]:
    """The threshold on a held-out split of tiles: the one maximising the SDC2 score of its
    tiles (`detection3d_data.pixel_frame_score`) among those whose purity clears
    `min_purity` by its binomial error (`choose_threshold`), stored in `model`'s head config."""
    det = outputs["detections"]

    def evaluate(t):
        d = det.clone()
        d[d[..., 0] < t] = 0.0
        s = data.pixel_frame_score(d, targets["sources"], targets["tile"])
        return s["score"], s["purity"], s["n_candidates"]

    return choose_threshold(model, evaluate, min_purity)


def calibrate_catalogues(model, pairs: Sequence[tuple], beam_arcsec: float, min_purity: float = 0.9,
                         merge_factors: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0)) -> dict[str, float]:
    """As `calibrate_tiles`, on whole cubes, for the threshold and the `merge_factor` together:
    `pairs` of (the catalogue `cosmofm detect` wrote for a held-out cube with this model at
    its floor threshold and `merge_factor` 0, the cube's truth), each candidate setting
    applied to the catalogue (rows at or above the threshold, then
    `detection3d_post.merge_catalogue`) and scored by `heads.sdc2_score.score_catalogue`,
    summed over the cubes. Thresholding afterwards is the same as decoding at that threshold
    (a detection is only merged away by a stronger one), and the cube-wide merge covers the
    per-tile one. Cube level is what the benchmark measures (tile edges, the cross-tile
    merge), which tile-level calibration does not see."""
    from cosmofm.heads.detection3d_post import merge_catalogue
    from cosmofm.heads.sdc2_score import score_catalogue

    def evaluate(t, f):
        scores = [score_catalogue(merge_catalogue(cat[np.asarray(cat["score"]) >= t], beam_arcsec, f), truth, beam_arcsec)
                  for cat, truth in pairs]
        n_cand = sum(x.n_candidates for x in scores)
        return sum(x.total for x in scores), (sum(x.n_match for x in scores) / n_cand if n_cand else 1.0), n_cand

    return choose_threshold(model, evaluate, min_purity, merge_factors)


def choose_threshold(model, evaluate: Callable, min_purity: float, merge_factors=None) -> dict[str, float]:
    """The best (threshold, merge factor) by `evaluate(t[, f]) -> (score, purity, candidates)`
    among those whose purity less its binomial error sqrt(p (1 - p) / candidates) is at least
    min_purity (else among all), set in `model`'s head config; thresholds from 0.05 to 0.90,
    at or above the one the outputs were decoded with. The best score sits where purity just
    reaches the floor, so without the margin held-out data land below it about half the time
    (session 12: purity 0.90 on two calibration cubes, 0.88 on three held-out ones); one sigma
    is ~0.025 for the ~150 candidates of two survey cubes."""
    if not 0 <= min_purity <= 1:
        raise InputError("min_purity", f"is {min_purity!r}", "give a purity in [0, 1], e.g. 0.9")
    head = model.head_config
    tried = []  # (threshold, merge factor, score, purity, purity less its binomial error)
    # Steps of 0.01: the objectness of true detections spans ~0.05-0.3 on survey cubes, and
    # 0.05 steps jumped from purity 0.65 (0.10) to 0.97 (0.15) past the best setting.
    for t in np.round(np.arange(0.05, 0.9001, 0.01), 2):
        if t < head.threshold - 1e-9:
            continue
        for f in merge_factors or (None,):
            s, p, n = evaluate(float(t)) if f is None else evaluate(float(t), float(f))
            tried.append((float(t), f, float(s), float(p), float(p) - math.sqrt(p * (1 - p) / n) if n else float(p)))
    if not tried:  # decoded above 0.9 already: nothing to choose
        return {"threshold": head.threshold, "sdc2_score_calibration": float("nan"), "purity_calibration": float("nan"),
                "purity_reached": False}
    pure = [x for x in tried if x[4] >= min_purity] or tried
    best_t, best_f, best_s, best_p, best_bound = max(pure, key=lambda x: x[2])
    # the thresholds next to it that keep the same catalogues (no calibration candidate in
    # between): take the middle of that run, not its lowest end, for a margin on both sides
    run = [x for x in tried if x[1] == best_f]
    at = next(k for k, x in enumerate(run) if x[0] == best_t)
    hi = at
    while hi + 1 < len(run) and run[hi + 1][2] == best_s and run[hi + 1][3] == best_p:
        hi += 1
    best_t = run[(at + hi) // 2][0]
    model._set_task(threshold=round(best_t, 2), **({} if best_f is None else {"merge_factor": best_f}))
    head = model.head_config
    return {"threshold": head.threshold, "merge_factor": head.merge_factor, "sdc2_score_calibration": best_s,
            "purity_calibration": best_p, "purity_bound_calibration": best_bound, "purity_reached": best_bound >= min_purity}


__all__ = ["calibrate_catalogues", "calibrate_tiles", "choose_threshold"]
