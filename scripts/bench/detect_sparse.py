"""Purity of the 3D detection head on sparse, survey-like cubes (issue 21).

    python -m cosmofm.bench.detect_sparse --model MODEL --out docs/bench --seeds 11 12 13 14

The dense benchmark cubes (`detect_quality.py`: 10^4 galaxies / deg^2 above log M_HI 9.5)
are where the head's threshold is calibrated; a survey is mostly empty sky. Here the
cubes are `data_cards.mocks.cube_survey.write_large_survey_cube`'s, the generator of the
~1 GB speed cube (`detect_speed.py`): the HI mass function's own number of galaxies above
log M_HI 9 (~1 per 1.1 M voxels, 240 in 1024 x 512 x 512), `--channels` x `--size`^2,
seeds `--seeds` (none a test, bench or training seed). On each cube, through
`cosmofm detect`'s path (`finetune.detect.detect_cube`, tiles `--tile` with `--overlap`,
one worker, one torch thread):

* head_fast: the model as calibrated (`--model`, saved by `detect_quality.py --save-model`,
  its threshold and merge factor; its purity cut off), with the speed options of the
  1 GB run (`--head-block`, `--prefilter`, bfloat16);
* head_fast_rel: the same with the purity cut from the sign-flipped cube at `--reliability`
  (`Detection3DHeadConfig.reliability`, `detection3d_post.reliability_cut`), with the
  model's noise prior where it has one (`Detection3DHeadConfig.noise_prior`; its summary
  also gives `threshold_without_prior`, the cut from the cube's own flipped detections alone);
* sofia, sofia_defaults: the SoFiA-style finder, `SOFIA_TUNED` and SoFiA's defaults.

Scored by `heads.sdc2_score.score_catalogue` against the cube's TRUTH (completeness,
purity, SDC2 score; false detections sorted as `detect_quality.false_positive_kinds`),
with each arm's seconds (load average recorded); the head arms also give the objectness of
their true and false detections, and head_fast_rel the flipped cube's (`reliability`'s
negative_scores). Writes OUT/--name.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import astropy.units as u
import torch
from astropy.io import fits
from astropy.table import Table

from cosmofm.bench.detect_quality import detectable, load_info, objectness, summary
from cosmofm.bench.pretrain_throughput import machine_info
from cosmofm.data_cards.io.atomic import atomic_write_bytes
from cosmofm.data_cards.mocks.cube_survey import write_large_survey_cube
from cosmofm.data_cards.schema import load_card
from cosmofm.finetune.detect import detect_cube
from cosmofm.heads.sdc2_score import read_catalogue, score_catalogue
from cosmofm.heads.sofia_baseline import SofiaConfig

ARMS = ("head_fast", "head_fast_rel", "sofia", "sofia_defaults")
KEYS = ("score", "n_candidates", "n_match", "completeness", "purity", "completeness_snr4", "false_kinds", "seconds")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a detection3d model folder, calibrated (detect_quality.py --save-model)")
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--name", default="detect_sparse.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13, 14])
    p.add_argument("--channels", type=int, default=512)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--tile", type=int, nargs=3, default=[256, 256, 256])
    p.add_argument("--overlap", type=int, nargs=3, default=[16, 8, 8])
    p.add_argument("--head-block", type=int, nargs=3, default=[64, 32, 32])
    p.add_argument("--prefilter", type=float, default=5.0)
    p.add_argument("--reliability", type=float, default=0.9, help="head_fast_rel's purity cut")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="the arms to run (the SoFiA-style ones do not depend on --model)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from cosmofm.finetune.task_predict import load_task_model

    card = load_card("ska-hi-like")
    beam = float(card.beam_fwhm.to_value(u.arcsec))
    model = load_task_model(args.model, expect_task="detection3d").eval()
    calibrated = {name: getattr(model.head_config, name) for name in ("threshold", "merge_factor", "reliability")}
    result = {"machine": machine_info(), "load_start": load_info(), "args": vars(args), "model_settings": calibrated}
    fast = {"model": model, "tile": tuple(args.tile), "overlap": tuple(args.overlap), "head_block": tuple(args.head_block),
            "prefilter": args.prefilter or None, "bf16": True, "head_threads": args.threads}
    arms = {"head_fast": {**fast, "reliability": 0.0}, "head_fast_rel": {**fast, "reliability": args.reliability},
            "sofia": {"method": "sofia"}, "sofia_defaults": {"method": "sofia", "config": SofiaConfig()}}
    arms = {name: kwargs for name, kwargs in arms.items() if name in args.arms}
    work = Path(tempfile.mkdtemp(prefix="detect_sparse_"))
    cubes = []
    try:
        for seed in args.seeds:
            path = write_large_survey_cube(work / f"cube-{seed}.fits", card, args.channels, args.size, seed=seed, block_channels=32)
            truth = Table.read(path, hdu="TRUTH")
            truth = truth[truth["central_freq"] > 0]
            bright = detectable(truth, fits.getheader(path), float(card.noise_per_channel))
            entry = {"seed": seed, "shape": [args.channels, args.size, args.size], "n_truth": len(truth), "n_truth_snr4": int(bright.sum())}
            for name, kwargs in arms.items():
                t0 = time.perf_counter()
                with torch.no_grad():
                    run = detect_cube(path, work / f"{name}.fits", workers=1, progress=False, overwrite=True, **kwargs)
                seconds = time.perf_counter() - t0
                cat = read_catalogue(work / f"{name}.fits", "catalogue")
                extra = {k: run[k] for k in ("head_stats", "reliability") if k in run}
                score = score_catalogue(cat, truth, beam)
                entry[name] = {**summary(score, bright, cat, truth, beam), "seconds": seconds, **extra, **objectness(cat, score)}
            path.unlink()
            cubes.append(entry)
            print(json.dumps({"seed": seed, "n_truth": len(truth)} | {m: {k: entry[m].get(k) for k in KEYS} for m in arms}, default=float), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["cubes"] = cubes
    totals = {}
    for m in arms:
        nm, nc = sum(c[m]["n_match"] for c in cubes), sum(c[m]["n_candidates"] for c in cubes)
        nt, nb = sum(c["n_truth"] for c in cubes), sum(c["n_truth_snr4"] for c in cubes)
        totals[m] = {"score": sum(c[m]["score"] for c in cubes), "n_candidates": nc, "n_match": nm, "n_false": nc - nm,
                     "purity": nm / nc if nc else float("nan"), "completeness": nm / nt if nt else float("nan"),
                     "completeness_snr4": sum(c[m]["completeness_snr4"] * c["n_truth_snr4"] for c in cubes if c["n_truth_snr4"]) / nb
                     if nb else float("nan"),  # a cube without bright sources has nan there
                     "false_kinds": {k: sum(c[m]["false_kinds"][k] for c in cubes) for k in cubes[0][m]["false_kinds"]},
                     "seconds": sum(c[m]["seconds"] for c in cubes)}
    result["totals"] = totals
    result["load_end"] = load_info()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / args.name, json.dumps(result, indent=2, default=float).encode())
    print(json.dumps(totals, indent=2, default=float))
    return result


if __name__ == "__main__":
    main()
