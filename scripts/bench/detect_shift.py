"""3D HI detection on skies the model never saw (issue 21): the shift suite.

    python -m cosmofm.bench.detect_shift --models M0 M1 M2 --seeds 0 1 2 --out docs/bench --threads 1

The detection models of detect_quality (`--save-model`: trained on unclustered survey
tiles at the card's noise and beam, calibrated on cubes of that kind) meet held-out
cubes of the same universe seeds (1,000,000 + each of `--seeds`, detect_quality's test
cubes) observed under settings no training or calibration cube had (SHIFTS): more noise,
larger beams, clustered galaxies, three times the density, continuum-subtraction
residuals, flagged (blank) channels, and the primary beam's noise rising towards the
cube's corners. Nothing is re-tuned: each model runs what it recorded (`cosmofm detect
--model M`: its threshold, merge factor, purity cut, blocks and prefilter), the
SoFiA-style finder its tuned settings (`SOFIA_TUNED`, tuned on unshifted cubes) and its
own defaults, all through `finetune.detect.detect_cube` in this process, one worker.

Per shift and finder: the SDC2 score over the cubes (beam: the shifted card's), purity,
completeness above an expected integrated S/N of 4 (at the shifted noise), false
detections by kind, and for the head the purity cut's own view of the cube (`reliability`
summary: flipped-cube detections, threshold): whether the cube looked unlike the
calibration cubes to it. A shifted sky that lowers the score of every finder alike is a
harder sky; what the suite measures is the head's score against SoFiA's on the same cubes
(in distribution 1.2x) and whether its purity holds. A finder that refuses a cube (the head:
a beam more than 25 % from its training beam) is recorded as refused, with its message.
Writes OUT/detect_shift.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import astropy.units as u
import numpy as np
import torch

from cosmofm.bench.detect_quality import TEST_SEED_BASE, arm_totals, load_info, summary, test_cube
from cosmofm.bench.pretrain_throughput import machine_info
from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.io.atomic import atomic_write_bytes
from cosmofm.data_cards.mocks.cube_sky import PrimaryBeam
from cosmofm.data_cards.schema import load_card
from cosmofm.finetune.detect import detect_cube
from cosmofm.heads.sdc2_score import read_catalogue, score_catalogue
from cosmofm.heads.sofia_baseline import SofiaConfig

CARD = "ska-hi-like"
# name -> changes: "card" fields of the cube card replaced, "cube" options of mock_survey_cube,
# "density_scale" on --density. The training and calibration cubes had none of them.
SHIFTS = {
    "in distribution": {},
    "noise x1.5": {"card": {"noise_scale": 1.5}},
    "beam 8.4 arcsec (7 in training)": {"card": {"beam_fwhm": 8.4 * u.arcsec}},
    "beam 10.5 arcsec (beyond the head's 25 %: refused)": {"card": {"beam_fwhm": 10.5 * u.arcsec}},
    "clustered sky (groups)": {"cube": {"clustering": True}},
    "density x3": {"density_scale": 3.0},
    "continuum residuals 1e-2 (a 10 sigma one)": {"cube": {"continuum_residual": 1e-2}},
    "flagged channels 5 %": {"cube": {"flagged_channels": 0.05}},
    "primary-beam noise (150 m dish: 2x at the corners)": {"cube": {"primary_beam": PrimaryBeam(dish_diameter_m=150.0)}},
}
FINDERS = ("sofia", "sofia_defaults")  # beside each model: the tuned SoFiA-style finder and its defaults


def shifted_card(card, change: dict):
    """The cube card with a shift's "card" changes (noise_scale multiplies noise_per_channel)."""
    fields = dict(change.get("card", {}))
    if "noise_scale" in fields:
        fields["noise_per_channel"] = card.noise_per_channel * fields.pop("noise_scale")
    return dataclasses.replace(card, **fields)


def shifted_cube(card, change: dict, args, seed: int, work: Path):
    """A test cube under the shift, written to FITS (detect_quality's `test_cube`): (path, truth,
    S/N >= 4 rows at the shifted noise, scoring beam [arcsec])."""
    sky = shifted_card(card, change)
    path, truth, bright = test_cube(sky, args, seed, work, density=args.density * change.get("density_scale", 1.0), **change.get("cube", {}))
    return path, truth, bright, float(sky.beam_fwhm.to_value(u.arcsec))


def reliability_view(run: dict) -> dict:
    """What the head's purity cut saw of the cube (`detect_cube`'s "reliability" summary)."""
    rel = run.get("reliability") or {}
    keys = ("threshold", "estimated_purity", "n_positive", "n_negative", "n_negative_above", "n_kept", "blocks_run_negative",
            "noise_count", "threshold_without_prior")
    return {k: rel[k] for k in keys if k in rel}


def run_shift(name: str, change: dict, models: dict, card, args, work: Path) -> dict:
    """Every finder on the shift's cubes: per cube and summed."""
    cubes = []
    for seed in args.seeds:
        path, truth, bright, beam = shifted_cube(card, change, args, TEST_SEED_BASE + seed, work)
        entry = {"seed": TEST_SEED_BASE + seed, "n_truth": len(truth), "n_truth_snr4": int(bright.sum()), "voxels": args.channels * args.size**2}
        arms = {m: {"model": model} for m, model in models.items()}
        arms.update({"sofia": {"method": "sofia"}, "sofia_defaults": {"method": "sofia", "config": SofiaConfig()}})
        for arm, kwargs in arms.items():
            out = work / f"{arm}.fits"
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    run = detect_cube(path, out, workers=1, progress=False, overwrite=True, **kwargs)
            except InputError as err:  # a cube the finder will not read (the head: a beam unlike its training's)
                entry[arm] = {"refused": str(err)}
                continue
            seconds = time.perf_counter() - t0
            cat = read_catalogue(out, "catalogue")
            entry[arm] = {**summary(score_catalogue(cat, truth, beam), bright, cat, truth, beam), "seconds": seconds}
            if arm in models:
                entry[arm]["reliability"] = reliability_view(run)
        path.unlink()
        cubes.append(entry)
        print(json.dumps({"shift": name, "seed": entry["seed"], **{a: round(entry[a]["score"], 1) if "score" in entry[a] else "refused" for a in arms}}), flush=True)
    refused = {arm: next((c[arm]["refused"] for c in cubes if "refused" in c[arm]), None) for arm in (*models, *FINDERS)}
    totals = {arm: {"refused": why} if why else arm_totals(cubes, arm) for arm, why in refused.items()}
    return {"change": json.loads(json.dumps(change, default=str)), "cubes": cubes, "totals": totals, "summary": shift_summary(totals, models)}


def shift_summary(totals: dict, models: dict) -> dict:
    """The head's score over the models (mean, std), its ratio to the better SoFiA setting, purity per model."""
    ran = [m for m in models if "refused" not in totals[m]]
    best = max(totals[f].get("score", -np.inf) for f in FINDERS)
    out = {"head_refused": len(models) - len(ran), "sofia_best_score": best,
           "sofia_purity": [totals[f].get("purity") for f in FINDERS], "sofia_completeness_snr4": [totals[f].get("completeness_snr4") for f in FINDERS]}
    if ran:
        head = np.array([totals[m]["score"] for m in ran])
        out.update({"head_score": [float(head.mean()), float(head.std())],
                    "ratio_head_over_sofia_best": [float((head / best).mean()), float((head / best).std())] if best > 0 else None,
                    "head_purity": [totals[m]["purity"] for m in ran], "head_completeness_snr4": [totals[m]["completeness_snr4"] for m in ran]})
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True, help="detection models saved by detect_quality --save-model (calibrated)")
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--name", default="detect_shift", help="the report is written to OUT/NAME.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="test cubes (seed 1,000,000 + each), as detect_quality's")
    p.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--density", type=float, default=10000.0, help="galaxies per deg^2 (log M_HI >= --log-mhi-min) before density_scale")
    p.add_argument("--log-mhi-min", type=float, default=9.5)
    p.add_argument("--frequency-start", type=float, default=1050e6)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from cosmofm.finetune.task_predict import load_task_model

    card = load_card(CARD)
    models = {f"head_{k}": load_task_model(m, expect_task="detection3d").eval() for k, m in enumerate(args.models)}
    result = {"machine": machine_info(), "load_start": load_info(), "args": vars(args),
              "models": {k: {"path": m, "head": {f: getattr(models[k].head_config, f) for f in ("threshold", "merge_factor", "reliability", "inference")}}
                         for k, m in zip(models, args.models)},
              "shifts": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="detect_shift_"))
    try:
        for name in args.shifts:
            result["shifts"][name] = run_shift(name, SHIFTS[name], models, card, args, work)
            result["load_end"] = load_info()
            atomic_write_bytes(out / f"{args.name}.json", json.dumps(result, indent=2, default=float).encode())
            print(json.dumps({"shift": name, **result["shifts"][name]["summary"]}, default=float), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
