"""3D HI detection quality (issue 21): the detection head against the SoFiA-style baseline.

    python -m cosmofm.bench.detect_quality --out docs/bench --n-train 960 --steps 1500 --lr 3e-3
        --calibration-cubes 2 --compare-before --seeds 0 1 2 --threads 1    (one line: docs/benchmarks.md)
    ... --save-model runs/det3d, then ... --model runs/det3d: train once, evaluate again

Training: `--n-train` labelled tiles (`Detection3DTask.labelled_mocks`, survey-cube
seeds 0, 1, ...: the quadrants of (C, 2H, 2W) cubes, each cube at a random place in the
950-1150 MHz band; a `--train-sparse-share` of them from sparse sky, the 1 GB survey
cube's density above log M_HI 9, universe seed 5) train the head on a fresh backbone
of the demo's shape (`--backbone` gives a pretrained one instead) for `--steps` optimizer
steps with the shared fine-tune loop and its strategies (`--strategy`: full, the default, trains
every weight, the backbone at `backbone_lr_scale` x `--lr`; frozen only the head; lora the head
and peft LoRA adapters, merged after training: `finetune.strategies`), each step's gradient norm clipped at
`--max-grad-norm` (one outlier source's NLL once gave a step ~1,000x the usual norm and ruined
the run; the record keeps the loss curve and the clipped steps). The objectness threshold and the merge factor are chosen
on `--calibration-cubes` held-out cubes of the test cubes' kind (seeds 2,000,000 + k:
neither training nor test) through the same `cosmofm detect` path, for the best SDC2 score
at purity >= `--min-purity` (`Detection3DTask.calibrate_catalogues`); with 0 of them, on
`--n-calibration` tiles of other cubes (universe seed 1, `Detection3DTask.calibrate`).
With `--fast` the cubes go through head_fast's options (below), else the plain tiles, and the
model records them (`Detection3DHeadConfig.inference`): `cosmofm detect --model` on a saved
model runs the path its threshold was calibrated on.

`--fast` adds the arm `head_fast`: the same model through `cosmofm detect`'s speed options
(`finetune.detect.HeadFinder`: the cube read as one tile, the network on `--tile` blocks of
it with `--overlap`, only the blocks the `--prefilter` smooth-and-clip marks, bfloat16
autocast unless `--no-bf16`), so the options' cost in score is measured on one network.

`--reliability R` adds the arm `head_fast_rel` (with `--fast`; else `head_rel`): the same
model and settings with the purity cut from the sign-flipped cube at R
(`Detection3DHeadConfig.reliability`, `detection3d_post.reliability_cut`), so its cost on
dense cubes is measured beside the arm without it. `--save-model` saves the model again after
the calibration, with its threshold, merge factor and (with `--reliability`) its cut: the
folder `cosmofm detect --model` then uses as calibrated.

`--compare-before` adds the arm `head_before`: the same weights decoded as before the
purity / PA work (no merging of duplicates, `merge_factor` 0; the regressed PA direction,
`pa_from` "regressed"; the threshold chosen on the tiles for the best score, no purity
floor), so the post-processing's effect is measured on one trained network. Every arm's
false detections are sorted (`false_positive_kinds`): inside the match window of a truth
source another candidate took (duplicates and fragments), within twice the window of a
truth source (misplaced), or farther (noise).

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
CALIBRATION_SEED_BASE = 2_000_000  # threshold calibration cubes
SNR_DETECTABLE = 4.0
# --train-sparse-share's tiles: the 1 GB survey cube's sky (`write_large_survey_cube`: the HI mass function's
# number above log M_HI 9, 240 galaxies in 1024 channels x 0.159 deg^2 at 950-981 MHz), per channel of the tile
SPARSE_DENSITY_PER_CHANNEL = 240 / 0.1586 / 1024  # galaxies per deg^2 per 30 kHz channel
SPARSE_LOG_MHI_MIN = 9.0
SPARSE_TRAIN_SEED = 5  # labelled_mocks universe seed of the sparse tiles (0: dense training, 1: calibration tiles)


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


def false_positive_kinds(score, cat: Table, truth: Table, beam: float) -> dict:
    """Counts of a catalogue's false detections by kind (module docstring): "duplicate" (inside the
    SDC2 match window of a truth source another candidate took), "near" (within twice the
    window of one), "noise" (farther from every truth source)."""
    from cosmofm.heads.sdc2_score import C_KMS, HI_REST_HZ, _columns

    out = {"duplicate": 0, "near": 0, "noise": 0}
    false = np.ones(len(cat), bool)
    false[score.candidate_index] = False
    if not false.any():
        return out
    t, s = _columns(truth, "truth", False), _columns(cat, "catalogue", True)
    conv = np.hypot(t["hi_size"], beam)
    spec = t["w20"] * t["central_freq"] ** 2 / (C_KMS * HI_REST_HZ)
    cosd = np.cos(np.radians(t["dec"]))
    for k in np.nonzero(false)[0]:
        dra = (s["ra"][k] - t["ra"] + 180.0) % 360.0 - 180.0
        pos = np.hypot(dra * cosd, s["dec"][k] - t["dec"]) * 3600.0 / conv
        freq = np.abs(s["central_freq"][k] - t["central_freq"]) / spec
        out["duplicate" if np.any((pos < 1) & (freq < 1)) else "near" if np.any((pos < 2) & (freq < 2)) else "noise"] += 1
    return out


def objectness(cat: Table, score) -> dict:
    """The head's objectness ("score" column) of the catalogue's true and false detections, sorted; {} for other finders."""
    if "score" not in cat.colnames:
        return {}
    values = np.asarray(cat["score"], np.float64)
    true = np.zeros(len(cat), bool)
    true[score.candidate_index] = True
    return {"objectness_true": sorted(values[true].tolist()), "objectness_false": sorted(values[~true].tolist())}


def loss_curve(step_losses, window: int = 100) -> dict:
    """The training loss in `window`-step means, and its spikes (steps above 3x the median of the
    `window` steps before): enough to tell divergence or a stall from convergence."""
    x = np.asarray(step_losses, np.float64)
    means = [float(x[i:i + window].mean()) for i in range(0, len(x), window)]
    spikes = [i for i in range(window, len(x)) if x[i] > 3 * np.median(x[i - window:i])]
    return {"window": window, "means": means, "n_spikes": len(spikes), "spike_steps": spikes[:20],
            "max": float(x.max()) if len(x) else None, "max_step": int(x.argmax()) if len(x) else None}


def summary(score, truth_bright: np.ndarray, cat: Table | None = None, truth: Table | None = None, beam: float = 7.0) -> dict:
    d = score.as_dict()
    d.pop("binned", None)
    matched = np.zeros(score.n_truth, bool)
    matched[score.truth_index] = True
    d["n_truth_snr4"] = int(truth_bright.sum())
    d["completeness_snr4"] = float(matched[truth_bright].mean()) if truth_bright.any() else float("nan")
    if cat is not None:
        d["false_kinds"] = false_positive_kinds(score, cat, truth, beam)
    return d


def test_cube(card, args, seed: int, work: Path, density: float | None = None, **sky) -> tuple[Path, Table, np.ndarray]:
    """A held-out survey cube written to FITS in `work`: (path, truth, expected S/N >= 4 rows).
    density: galaxies per deg^2 (default args.density); sky: more `mock_survey_cube` options."""
    cube, header, truth = mock_survey_cube(card, args.channels, args.size, density=args.density if density is None else density, seed=seed,
                                           log_mhi_min=args.log_mhi_min, frequency_start=args.frequency_start, as_sample=False, **sky)
    bright = detectable(truth, header, float(card.noise_per_channel))
    path = write_survey_cube_fits(work / f"cube-{seed}.fits", cube, header, truth)
    return path, truth, bright


def arm_totals(cubes: list[dict], m: str) -> dict:
    """One finder's figures over the test cubes (each cube's entry: "n_truth", "voxels" and, under
    `m`, `summary`'s dict with "seconds"): score summed, completeness and purity pooled, S/N >= 4
    completeness weighted by its sources, false kinds summed, voxels/s, median property errors."""
    ns = sum(c[m]["n_match"] for c in cubes)
    nc = sum(c[m]["n_candidates"] for c in cubes)
    nt = sum(c["n_truth"] for c in cubes)
    nb = sum(c[m]["n_truth_snr4"] for c in cubes)
    return {"score": sum(c[m]["score"] for c in cubes), "completeness": ns / nt if nt else float("nan"),
            "purity": ns / nc if nc else float("nan"), "n_candidates": nc, "n_match": ns, "n_truth": nt, "n_truth_snr4": nb,
            "completeness_snr4": sum(c[m]["completeness_snr4"] * c[m]["n_truth_snr4"] for c in cubes) / nb if nb else float("nan"),
            "false_kinds": {k: sum(c[m]["false_kinds"][k] for c in cubes) for k in cubes[0][m]["false_kinds"]},
            "voxels_per_s": sum(c["voxels"] for c in cubes) / sum(c[m]["seconds"] for c in cubes),
            "median_errors": {k: float(np.nanmedian([c[m]["median_errors"][k] for c in cubes])) for k in cubes[0][m]["median_errors"]}}


def plain_options(args) -> dict:
    """detect_cube's options for the arm `head`: tiles of --tile, the network on each whole tile, float32."""
    return {"tile": tuple(args.tile), "overlap": tuple(args.overlap), "head_block": None, "prefilter": None, "bf16": False}


def fast_options(args) -> dict:
    """detect_cube's options for the arm `head_fast`: the whole cube as one tile, the network on
    --tile blocks of it, only those the --prefilter marks, bfloat16 unless --no-bf16."""
    return {"tile": (args.channels, args.size, args.size), "overlap": tuple(args.overlap), "head_block": tuple(args.tile),
            "prefilter": args.prefilter or None, "bf16": not args.no_bf16}


def calibrate_on_cubes(model, task, card, args, work: Path) -> dict:
    """The threshold chosen on `--calibration-cubes` held-out cubes (`Detection3DTask.calibrate_catalogues`):
    one `cosmofm detect` pass per cube at the head's floor threshold, then the sweep on the catalogues."""
    beam = float(card.beam_fwhm.to_value(u.arcsec))
    model._set_task(merge_factor=0.0)  # the catalogues un-merged: calibrate_catalogues chooses the factor
    # On the path the model will run: head_fast's with --fast, else the plain tiles; recorded
    # in the model (`Detection3DHeadConfig.inference`) as what `cosmofm detect --model` runs.
    options = fast_options(args) if args.fast else plain_options(args)
    pairs = []
    for k in range(args.calibration_cubes):
        path, truth, _ = test_cube(card, args, CALIBRATION_SEED_BASE + k, work)
        with torch.no_grad():
            cat, _ = run_detect(path, work / f"calibration-{k}.fits", model=model, **options)
        pairs.append((cat, truth))
    chosen = task.calibrate_catalogues(model, pairs, beam, args.min_purity)
    model._set_task(inference={"head_block": list(args.tile), "block_overlap": list(args.overlap), "prefilter": options["prefilter"],
                               "bf16": options["bf16"]})
    chosen["inference"] = dict(model.head_config.inference)
    if args.reliability and args.fast:  # the purity cut's noise prior: the same cubes' flipped detections, head_fast's options
        from cosmofm.finetune.detect import calibrate_noise_prior

        chosen["noise_prior"] = calibrate_noise_prior(model, [work / f"cube-{CALIBRATION_SEED_BASE + k}.fits" for k in range(args.calibration_cubes)],
                                                      **fast_options(args))
    for k in range(args.calibration_cubes):
        (work / f"cube-{CALIBRATION_SEED_BASE + k}.fits").unlink()
    return {**chosen, "diagnostics": calibration_diagnostics(pairs, beam, model.head_config.merge_factor)}


def calibration_diagnostics(pairs, beam: float, merge_factor: float) -> dict:
    """What the threshold was chosen from: on the calibration cubes' floor catalogues merged at
    the chosen factor, the objectness of the true and false detections (`objectness`; counts in
    bins of 0.025 and the ten highest) and the SDC2 score and purity at every threshold of the
    search (`detection3d_calibration.choose_threshold`'s grid)."""
    from cosmofm.heads.detection3d_post import merge_catalogue

    merged = [(merge_catalogue(cat, beam, merge_factor), truth) for cat, truth in pairs]
    split = [objectness(cat, score_catalogue(cat, truth, beam)) for cat, truth in merged]
    sweep = []
    for t in np.arange(0.05, 0.901, 0.05):
        scores = [score_catalogue(cat[np.asarray(cat["score"]) >= t], truth, beam) for cat, truth in merged]
        n_cand = sum(x.n_candidates for x in scores)
        sweep.append({"threshold": round(float(t), 2), "score": sum(x.total for x in scores), "n_candidates": n_cand,
                      "n_match": sum(x.n_match for x in scores),
                      "purity": sum(x.n_match for x in scores) / n_cand if n_cand else float("nan")})
    bins = np.round(np.arange(0.05, 1.0001, 0.025), 3)
    out = {"merge_factor": merge_factor, "objectness_bins": bins.tolist()}
    for kind in ("objectness_true", "objectness_false"):
        v = np.sort([x for d in split for x in d.get(kind, [])])
        out[kind] = {"n": len(v), "counts": np.histogram(v, bins)[0].tolist(), "top10": v[::-1][:10].round(4).tolist()}
    return {**out, "sweep": sweep}


def training_tiles(card, args) -> tuple[list, int]:
    """The `--n-train` labelled tiles (module docstring), dense first, and how many are from sparse sky."""
    n_sparse = round(args.n_train * args.train_sparse_share)
    samples = Detection3DTask.labelled_mocks(card, args.n_train - n_sparse, 0, tile=tuple(args.tile), density=args.train_density,
                                             log_mhi_min=args.log_mhi_min) if n_sparse < args.n_train else []
    if n_sparse:  # sparse sky (universe seed SPARSE_TRAIN_SEED: other cubes than the dense ones and the calibration tiles)
        density = SPARSE_DENSITY_PER_CHANNEL * args.tile[0]
        samples += Detection3DTask.labelled_mocks(card, n_sparse, SPARSE_TRAIN_SEED, tile=tuple(args.tile), density=density,
                                                  log_mhi_min=SPARSE_LOG_MHI_MIN)
    return samples, n_sparse


def changed_parameters(model, before: dict) -> dict:
    """Which of `model`'s weights differ from `before` (its state dict's tensors, copied before
    training), split into backbone and head: what the strategy really trained (LoRA's adapters,
    merged, change their layers' whole weight matrices)."""
    prefix = model.base_model_prefix + "."
    out = {"backbone_tensors": [], "backbone_values": 0, "head_tensors": 0, "head_values": 0}
    for name, value in model.state_dict().items():
        if name in before and not torch.equal(before[name], value):
            part = "backbone" if name.startswith(prefix) else "head"
            if part == "backbone":
                out["backbone_tensors"].append(name[len(prefix):])
            else:
                out["head_tensors"] += 1
            out[f"{part}_values"] += int((before[name] != value).sum())
    return out


def trainable_counts(model, strategy) -> dict:
    """The parameters `strategy` trains in `model` (`apply_strategy` on a copy): backbone (with
    LoRA: its adapters) and head, as numbers of values."""
    import copy

    from cosmofm.finetune.strategies import apply_strategy

    probe = copy.deepcopy(model)
    apply_strategy(probe, strategy, 1.0, 0.0)
    prefix = probe.base_model_prefix + "."
    out = {"backbone": 0, "head": 0}
    for name, param in probe.named_parameters():
        if param.requires_grad:
            out["backbone" if name.startswith(prefix) else "head"] += param.numel()
    return out


def train(card, args) -> tuple:
    from cosmofm.finetune.loop import LoopConfig, finetune_loop
    from cosmofm.finetune.run import build_task_model
    from cosmofm.finetune.strategies import Strategy
    from cosmofm.pretrain.recipe import PretrainRecipe

    samples, n_sparse = training_tiles(card, args)
    head = Detection3DHeadConfig.from_card(card)
    task = Detection3DTask(head)
    backbone_config = None if args.backbone else {**PretrainRecipe.load(args.backbone_recipe).model, "survey_names": [card.name]}
    model = build_task_model("detection3d", head, args.train_seed, args.backbone, backbone_config)
    steps_per_epoch = math.ceil(len(samples) / args.batch_size)
    cfg = LoopConfig(epochs=math.ceil(args.steps / steps_per_epoch), batch_size=args.batch_size, lr=args.lr, max_steps=args.steps,
                     seed=args.train_seed, progress=args.progress, max_grad_norm=args.max_grad_norm)
    strategy = Strategy(args.strategy)
    trainable = trainable_counts(model, strategy)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    run = finetune_loop(model, samples, task.targets, strategy, cfg)
    info = {"n_tiles": len(samples), "n_sparse_tiles": n_sparse, "n_sources": int(sum(s.meta["labels"]["n_sources"] for s in samples)),
            "n_tiles_without_target": int(sum(not any(r["snr"] >= head.target_min_snr for r in s.meta["labels"]["sources"])
                                              for s in samples)),
            "steps": run.steps,
            "seconds": time.perf_counter() - t0, "final_loss": run.step_losses[-1] if run.step_losses else None,
            "first_loss": run.step_losses[0] if run.step_losses else None, "loss_curve": loss_curve(run.step_losses),
            "clipped_steps": run.clipped_steps, "backbone": args.backbone or f"fresh ({args.backbone_recipe} recipe's shape)",
            "strategy": {**vars(strategy), "backbone_lr": args.lr * strategy.backbone_lr_scale if args.strategy == "full" else None},
            "trainable": trainable, "changed": changed_parameters(run.model, before),
            "step_losses": [round(float(v), 4) for v in run.step_losses]}
    return run.model.eval(), task, info


def calibrate(model, task, card, args, work: Path, before: bool = False) -> dict:
    """Set the model's threshold (module docstring); `before`: the old rule (tiles, best score, no purity floor)."""
    from cosmofm.finetune.run import collect_outputs

    floor = Detection3DHeadConfig().threshold
    model._set_task(threshold=floor)
    task = Detection3DTask(model.head_config)
    if args.calibration_cubes and not before:
        return {"on": f"{args.calibration_cubes} cubes", **calibrate_on_cubes(model, task, card, args, work)}
    # held-out tiles (universe seed 1: other cubes than training and test)
    tiles = Detection3DTask.labelled_mocks(card, args.n_calibration, 1, tile=tuple(args.tile), density=args.train_density,
                                           log_mhi_min=args.log_mhi_min)
    fitted = task.calibrate(model, collect_outputs(model, tiles, 8), task.targets(tiles), 0.0 if before else args.min_purity)
    return {"on": f"{len(tiles)} tiles", **fitted}


POST_BEFORE = {"merge_factor": 0.0, "pa_from": "regressed", "reliability": 0.0}  # the decoding before the purity / PA work


def save_model(model, folder, record: dict) -> None:
    """The model (its head config as it is now) and its training record, with a manifest."""
    from cosmofm.pretrain.checkpoint import write_manifest

    model.save_pretrained(folder)
    atomic_write_bytes(Path(folder) / "train_record.json", json.dumps(record, default=float).encode())
    write_manifest(folder)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--n-train", type=int, default=160, help="labelled training tiles")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--calibration-cubes", type=int, default=2, help="held-out cubes the objectness threshold is chosen on (0: tiles)")
    p.add_argument("--min-purity", type=float, default=0.9, help="the threshold's purity floor on the calibration data")
    p.add_argument("--n-calibration", type=int, default=48, help="held-out tiles for the threshold when --calibration-cubes is 0")
    p.add_argument("--compare-before", action="store_true", help="add the arm head_before (the old decoding, same weights)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="held-out test cubes (seed 1,000,000 + each)")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--density", type=float, default=10000.0, help="test galaxies per deg^2 (log M_HI >= --log-mhi-min)")
    p.add_argument("--train-density", type=float, default=10000.0)
    p.add_argument("--train-sparse-share", type=float, default=0.0,
                   help="share of the training tiles cut from sparse sky (the 1 GB survey cube's density, log M_HI >= 9); 0 = none")
    p.add_argument("--log-mhi-min", type=float, default=9.5)
    p.add_argument("--frequency-start", type=float, default=1050e6, help="test cubes: centre of channel 0 [Hz] (the band is 950-1150 MHz)")
    p.add_argument("--tile", type=int, nargs=3, default=[64, 32, 32], help="training and inference tile (C, H, W)")
    p.add_argument("--overlap", type=int, nargs=3, default=[16, 8, 8])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-grad-norm", type=float, default=100.0,
                   help="clip each step's gradient norm to this (LoopConfig.max_grad_norm; ordinary steps: 10-30); 0 = off, as before 2026-12-06")
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--backbone", default=None, help="a pretrained release; default a fresh backbone of --backbone-recipe's shape")
    p.add_argument("--backbone-recipe", default="demo")
    p.add_argument("--strategy", default="full", choices=("full", "frozen", "lora"),
                   help="what trains (finetune.strategies): full (all, the backbone at backbone_lr_scale 0.3 x --lr), frozen (the head), lora (head + adapters)")
    p.add_argument("--save-model", default=None, help="save the trained model (and its training record) to this folder")
    p.add_argument("--model", default=None, help="a model saved by --save-model: skip the training (its record is reported)")
    p.add_argument("--fast", action="store_true", help="add the arm head_fast: the same model with cosmofm detect's speed options")
    p.add_argument("--prefilter", type=float, default=5.0, help="head_fast: the prefilter's clip [rms] (finetune.detect.HeadFinder); 0 = off")
    p.add_argument("--no-bf16", action="store_true", help="head_fast: float32 instead of bfloat16 autocast")
    p.add_argument("--reliability", type=float, default=0.0,
                   help="add the arm head_fast_rel (head_rel without --fast): the purity cut from the sign-flipped cube at this purity; 0 = none")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    if not 0.0 <= args.train_sparse_share <= 1.0:
        p.error(f"--train-sparse-share is {args.train_sparse_share}; give a share in [0, 1], e.g. 0.5")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.train_seed)
    card = load_card("ska-hi-like")
    beam = float(card.beam_fwhm.to_value(u.arcsec))
    result = {"machine": machine_info(), "load_start": load_info(), "args": vars(args),
              "inference": "cosmofm detect's tiled path (finetune.detect.detect_cube), one worker"}
    if args.model:
        from cosmofm.finetune.task_predict import load_task_model

        model = load_task_model(args.model, expect_task="detection3d").eval()
        task = Detection3DTask(model.head_config)
        record = Path(args.model) / "train_record.json"
        result["train"] = {"loaded": str(args.model), **(json.loads(record.read_text()) if record.is_file() else {})}
        model._set_task(reliability=0.0)  # the calibration's catalogues are uncut; the arms set their own
    else:
        model, task, result["train"] = train(card, args)
        print(json.dumps({k: result["train"][k] for k in ("backbone", "strategy", "trainable", "changed")}), flush=True)
    if args.save_model:
        save_model(model, args.save_model, result["train"])
    result["load_after_training"] = load_info()
    work = Path(tempfile.mkdtemp(prefix="detect_quality_"))
    post = {name: getattr(model.head_config, name) for name in POST_BEFORE}
    heads = {"head": {**post}}
    if args.compare_before:
        model._set_task(**POST_BEFORE)
        heads["head_before"] = {**POST_BEFORE, "threshold": calibrate(model, task, card, args, work, before=True)["threshold"]}
        model._set_task(**post)
    result["calibration"] = calibrate(model, task, card, args, work)
    heads["head"] = {name: getattr(model.head_config, name) for name in ("merge_factor", "pa_from", "threshold", "reliability")}
    if args.fast:
        heads["head_fast"] = dict(heads["head"])
    if args.reliability:
        heads["head_fast_rel" if args.fast else "head_rel"] = {**heads["head"], "reliability": args.reliability}
    if args.save_model:  # again, calibrated (with the purity cut when asked for): what cosmofm detect --model uses
        model._set_task(**{**heads["head"], "reliability": args.reliability})
        save_model(model, args.save_model, {**result["train"], "calibration": result["calibration"]})
    result["head_settings"] = heads
    arms_run = (*heads, "sofia", "sofia_defaults")
    cubes = []
    for seed in args.seeds:
        path, truth, bright = test_cube(card, args, TEST_SEED_BASE + seed, work)
        entry = {"seed": TEST_SEED_BASE + seed, "shape": [args.channels, args.size, args.size], "n_truth": len(truth),
                 "voxels": args.channels * args.size**2}
        arms = {name: {"model": model, **plain_options(args)} for name in heads}
        if args.fast:
            arms["head_fast"] = {"model": model, **fast_options(args)}
        for name in heads:
            if name.endswith("_rel"):
                arms[name] = dict(arms[name[: -len("_rel")]])
        arms.update({"sofia": {"method": "sofia"}, "sofia_defaults": {"method": "sofia", "config": SofiaConfig()}})
        for name, kwargs in arms.items():
            if name in heads:
                model._set_task(**heads[name])
            with torch.no_grad():
                cat, seconds = run_detect(path, work / f"{name}.fits", **kwargs)
            entry[name] = {**summary(score_catalogue(cat, truth, beam), bright, cat, truth, beam), "seconds": seconds,
                           "voxels_per_s": entry["voxels"] / seconds}
        path.unlink()
        cubes.append(entry)
        print(json.dumps({k: entry[k] for k in ("seed", "n_truth")} | {m: {k: entry[m][k] for k in ("score", "completeness", "purity",
              "completeness_snr4", "false_kinds", "voxels_per_s") if k in entry[m]} for m in arms_run}), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    result["cubes"] = cubes
    totals = {m: arm_totals(cubes, m) for m in arms_run}
    best = max(totals["sofia"]["score"], totals["sofia_defaults"]["score"])
    totals["score_ratio_head_over_sofia"] = totals["head"]["score"] / totals["sofia"]["score"] if totals["sofia"]["score"] else float("nan")
    totals["score_ratio_head_over_best_baseline"] = totals["head"]["score"] / best if best else float("nan")
    for m in heads:  # throughput against the baseline in the same run (shared CPUs: the ratio is the figure)
        totals[f"voxels_per_s_ratio_{m}_over_sofia"] = totals[m]["voxels_per_s"] / totals["sofia"]["voxels_per_s"]
    for m in ("head_fast", "head_rel", "head_fast_rel"):
        if m in totals:
            totals[f"score_ratio_{m}_over_best_baseline"] = totals[m]["score"] / best if best else float("nan")
    result["totals"] = totals
    result["load_end"] = load_info()
    result["train"].pop("step_losses", None)  # every step's loss: in the model folder's train_record.json only
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "detect_quality.json", json.dumps(result, indent=2, default=float).encode())
    print(json.dumps(totals, indent=2, default=float))
    return result


if __name__ == "__main__":
    main()
