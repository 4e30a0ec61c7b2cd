"""3D HI detection quality (issue 21): the detection head against the SoFiA-style baseline.

    python -m cosmofm.bench.detect_quality --out docs/bench --n-train 160 --steps 300 --seeds 0 1

Training: `--n-train` labelled tiles (`Detection3DTask.labelled_mocks`, survey-cube
seeds 0, 1, ...: the quadrants of (C, 2H, 2W) cubes) train the head on a fresh backbone
of the demo's shape (`--backbone` gives a pretrained one instead) for `--steps` optimizer
steps with the shared fine-tune loop (strategy full); `--n-calibration` tiles of other
cubes (universe seed 1) choose the objectness threshold (`Detection3DTask.calibrate`).

Test: held-out mock survey cubes (`mock_survey_cube`, seeds 1,000,000 + each of
`--seeds`: never a training seed), `--channels` x `--size`^2, `--density` galaxies per
deg^2 with log M_HI >= `--log-mhi-min`. On each cube, in the same process:

* the head, through `cosmofm detect`'s tiled path (`finetune.detect.detect_cube` with the
  model, tiles of `--tile` with `--overlap`), one worker;
* the SoFiA-style finder through the same path, tuned (`SOFIA_TUNED`, the fair baseline:
  `scripts/bench/sofia_tuning.py`) and at SoFiA's own defaults.

Both catalogues are scored by `heads.sdc2_score.score_catalogue` (beam 7 arcsec)
against the whole truth (SDC2's rule: missed faint sources cost nothing, false detections
cost 1 each), and completeness is also given against the truth above an expected
integrated S/N of 4 (`detection3d_data.pixel_frame`'s snr). Speed: voxels/s of each,
wall clock in this process (the machine's load is recorded: shared CPUs, ratios count).
Writes OUT/detect_quality.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import astropy.units as u
import numpy as np
import torch
from astropy.table import Table

from cosmofm.bench.pretrain_throughput import machine_info
from cosmofm.data_cards.io.atomic import atomic_write_bytes
from cosmofm.data_cards.mocks.cubes import mock_survey_cube, write_survey_cube_fits
from cosmofm.data_cards.schema import load_card
from cosmofm.heads import detection3d_data as data
from cosmofm.heads.detection3d import Detection3DHeadConfig, Detection3DTask
from cosmofm.heads.sdc2_score import read_catalogue, score_catalogue
from cosmofm.heads.sofia_baseline import SofiaConfig

TEST_SEED_BASE = 1_000_000  # test cubes; training cubes use seeds 0 .. n_train / 4
SNR_DETECTABLE = 4.0
ARMS = ("head", "sofia", "sofia_defaults")  # sofia: SOFIA_TUNED


def load_info() -> dict:
    return {"loadavg": list(os.getloadavg()), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_detect(path: Path, output: Path, **kwargs) -> tuple[Table, float]:
    """`cosmofm detect`'s path (finetune.detect.detect_cube, tiled) on the cube file: (catalogue, seconds)."""
    from cosmofm.finetune.detect import detect_cube

    t0 = time.perf_counter()
    detect_cube(path, output, workers=1, progress=False, overwrite=True, **kwargs)
    return read_catalogue(output, "catalogue"), time.perf_counter() - t0


def detectable(truth: Table, header, noise: float) -> np.ndarray:
    """Truth rows whose expected integrated S/N (detection3d_data.pixel_frame) is >= SNR_DETECTABLE."""
    scales = data.tile_scales(header, noise)
    cols = {k: u.Quantity(truth[k], unit).value for k, unit in data.SDC2_PROPERTY_UNITS.items()}
    cols["central_freq"] = u.Quantity(truth["central_freq"], u.Hz).value
    return data.pixel_frame(cols, scales)["snr"] >= SNR_DETECTABLE


def summary(score, truth_bright: np.ndarray) -> dict:
    d = score.as_dict()
    d.pop("binned", None)
    matched = np.zeros(score.n_truth, bool)
    matched[score.truth_index] = True
    d["n_truth_snr4"] = int(truth_bright.sum())
    d["completeness_snr4"] = float(matched[truth_bright].mean()) if truth_bright.any() else float("nan")
    return d


def train(card, args) -> tuple:
    from cosmofm.finetune.loop import LoopConfig, finetune_loop
    from cosmofm.finetune.run import build_task_model
    from cosmofm.finetune.strategies import Strategy
    from cosmofm.pretrain.recipe import PretrainRecipe

    samples = Detection3DTask.labelled_mocks(card, args.n_train, 0, tile=tuple(args.tile), density=args.train_density,
                                             log_mhi_min=args.log_mhi_min)
    head = Detection3DHeadConfig.from_card(card)
    task = Detection3DTask(head)
    backbone_config = None if args.backbone else {**PretrainRecipe.load(args.backbone_recipe).model, "survey_names": [card.name]}
    model = build_task_model("detection3d", head, args.train_seed, args.backbone, backbone_config)
    steps_per_epoch = math.ceil(len(samples) / args.batch_size)
    cfg = LoopConfig(epochs=math.ceil(args.steps / steps_per_epoch), batch_size=args.batch_size, lr=args.lr, max_steps=args.steps,
                     seed=args.train_seed, progress=args.progress)
    t0 = time.perf_counter()
    run = finetune_loop(model, samples, task.targets, Strategy("full"), cfg)
    # the objectness threshold, chosen on held-out tiles (universe seed 1: other cubes than training and test)
    calibration = Detection3DTask.labelled_mocks(card, args.n_calibration, 1, tile=tuple(args.tile), density=args.train_density,
                                                 log_mhi_min=args.log_mhi_min)
    from cosmofm.finetune.run import collect_outputs

    fitted = task.calibrate(run.model, collect_outputs(run.model, calibration, 8), task.targets(calibration))
    task = Detection3DTask(run.model.head_config)
    info = {"calibration": fitted, "n_calibration_tiles": len(calibration), "n_tiles": len(samples), "n_sources": int(sum(s.meta["labels"]["n_sources"] for s in samples)), "steps": run.steps,
            "seconds": time.perf_counter() - t0, "final_loss": run.step_losses[-1] if run.step_losses else None,
            "first_loss": run.step_losses[0] if run.step_losses else None}
    return run.model.eval(), task, info


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--n-train", type=int, default=160, help="labelled training tiles")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--n-calibration", type=int, default=48, help="held-out tiles the objectness threshold is chosen on")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="held-out test cubes (seed 1,000,000 + each)")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--density", type=float, default=10000.0, help="test galaxies per deg^2 (log M_HI >= --log-mhi-min)")
    p.add_argument("--train-density", type=float, default=10000.0)
    p.add_argument("--log-mhi-min", type=float, default=9.5)
    p.add_argument("--frequency-start", type=float, default=1050e6, help="test cubes: centre of channel 0 [Hz] (the band is 950-1150 MHz)")
    p.add_argument("--tile", type=int, nargs=3, default=[64, 32, 32], help="training and inference tile (C, H, W)")
    p.add_argument("--overlap", type=int, nargs=3, default=[16, 8, 8])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--backbone", default=None, help="a pretrained release; default a fresh backbone of --backbone-recipe's shape")
    p.add_argument("--backbone-recipe", default="demo")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.train_seed)
    card = load_card("ska-hi-like")
    result = {"machine": machine_info(), "load_start": load_info(), "args": vars(args),
              "inference": "cosmofm detect's tiled path (finetune.detect.detect_cube), one worker"}
    model, task, result["train"] = train(card, args)
    result["load_after_training"] = load_info()
    cubes = []
    for seed in args.seeds:
        cube, header, truth = mock_survey_cube(card, args.channels, args.size, density=args.density, seed=TEST_SEED_BASE + seed,
                                               log_mhi_min=args.log_mhi_min, frequency_start=args.frequency_start, as_sample=False)
        bright = detectable(truth, header, float(card.noise_per_channel))
        work = Path(tempfile.mkdtemp(prefix="detect_quality_"))
        path = write_survey_cube_fits(work / "cube.fits", cube, header, truth)
        del cube
        beam = float(card.beam_fwhm.to_value(u.arcsec))
        entry = {"seed": TEST_SEED_BASE + seed, "shape": [args.channels, args.size, args.size], "n_truth": len(truth),
                 "voxels": args.channels * args.size**2}
        arms = {"head": {"model": model, "tile": tuple(args.tile), "overlap": tuple(args.overlap)},
                "sofia": {"method": "sofia"}, "sofia_defaults": {"method": "sofia", "config": SofiaConfig()}}
        for name, kwargs in arms.items():
            with torch.no_grad():
                cat, seconds = run_detect(path, work / f"{name}.fits", **kwargs)
            entry[name] = {**summary(score_catalogue(cat, truth, beam), bright), "seconds": seconds, "voxels_per_s": entry["voxels"] / seconds}
        shutil.rmtree(work, ignore_errors=True)
        cubes.append(entry)
        print(json.dumps({k: entry[k] for k in ("seed", "n_truth")} | {m: {k: entry[m][k] for k in ("score", "completeness", "purity",
              "completeness_snr4", "voxels_per_s")} for m in ARMS}), flush=True)
    result["cubes"] = cubes
    totals = {}
    for m in ARMS:
        ns = sum(c[m]["n_match"] for c in cubes)
        nc = sum(c[m]["n_candidates"] for c in cubes)
        nt = sum(c["n_truth"] for c in cubes)
        nb = sum(c[m]["n_truth_snr4"] for c in cubes)
        totals[m] = {"score": sum(c[m]["score"] for c in cubes), "completeness": ns / nt if nt else float("nan"),
                     "purity": ns / nc if nc else float("nan"), "n_candidates": nc, "n_match": ns, "n_truth": nt, "n_truth_snr4": nb,
                     "completeness_snr4": sum(c[m]["completeness_snr4"] * c[m]["n_truth_snr4"] for c in cubes) / nb if nb else float("nan"),
                     "voxels_per_s": sum(c["voxels"] for c in cubes) / sum(c[m]["seconds"] for c in cubes),
                     "median_errors": {k: float(np.nanmedian([c[m]["median_errors"][k] for c in cubes])) for k in cubes[0][m]["median_errors"]}}
    totals["score_ratio_head_over_sofia"] = totals["head"]["score"] / totals["sofia"]["score"] if totals["sofia"]["score"] else float("nan")
    result["totals"] = totals
    result["load_end"] = load_info()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "detect_quality.json", json.dumps(result, indent=2, default=float).encode())
    print(json.dumps(totals, indent=2, default=float))
    return result


if __name__ == "__main__":
    main()
