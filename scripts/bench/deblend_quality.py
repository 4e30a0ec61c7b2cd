r"""Deblending quality and speed: the deblending head against sep and photutils, on the same blends.

    python -m cosmofm.bench.deblend_quality --out docs/bench --n-train 1000 --n-test 100 --seeds 0 1 2 \
        --steps 1500 --batch-size 8 --lr 1.5e-3 --train-budget-s 1000

Held-out lsst-like 64 x 64 blends of 2-6 objects (`mock_blend`, universes `--seeds`, each
`--n-test` blends) are deblended by

- the head (`heads/deblending.py`) on a fresh backbone of the demo recipe's shape (or the
  pretrained backbone at `--backbone`), trained here for `--steps` steps on `--n-train`
  blends of universe 1000 (disjoint from the test universes); its peak threshold is
  chosen by detection F1 on training blends, as the baselines' contrasts are;
- sep and photutils (`heads/deblend_baseline.py`), their deblending contrast tuned on the
  same training blends (`tune_contrast`).

Reported per method (and per flux estimator of the baselines): detection precision /
recall / F1 overall and vs separation, the per-band flux bias / NMAD / MAPE of *blended*
sources (a true neighbour closer than 2 PSF FWHM), of *isolated* ones (none closer) and of
all matched ones, the blended sources' reference-band figures for galaxies and stars apart
(`flux_blended_by_kind`, the mocks' "galaxy" / "point"), colour bias,
and stamps per second, all measured in this process on the same stamps (torch threads
`--threads`; the load average is recorded: the machine is shared). On a CPU that computes
bfloat16 natively the head runs again under bf16 autocast ("head_bf16", the default of
`cosmofm deblend --model` there), for its speed beside float32's. The head is also
scored in known-positions mode (true centres given), which isolates its flux split from
its detection (sources at given positions get no outskirts correction), and in detection
mode again without the correction ("head_no_correction", `flux_correction=False`).
The noise-floor oracle splits the same stamps by the *true* fractions
(`oracle_catalogues`): "oracle (true fractions)" = iso_k / (sum_j iso_j + eps_b) of the
noiseless isolated images applied to the observed image as the head applies its own, and
"oracle (isolated + own noise)" = each source's true isolated image plus its own share of
the stamp's noise, measured the same way: what the data allow the head's estimator, so the
head's error beyond it is its fractions'. Flux statistics are also binned by true r
magnitude (`MAG_EDGES`, the mocks' range) and separation. Writes `deblend_quality.json`
and `deblend_panels.png` to `--out`.

`--baselines sep photutils scarlet2` adds scarlet2 (`scarlet2_deblend`; the extra `scarlet`,
which brings jax: run it from a venv that has it), in `--scarlet2-modes`: "known" (true
centres; rows "scarlet2_known_positions ...") and "detection" (sep's detections; rows
"scarlet2 ..."), fluxes "model" and "reweighted", with its seconds per blend; `--no-head`
skips training and scoring the head (and the figure) for a baselines-only run, e.g.

    python -m cosmofm.bench.deblend_quality --out OUT --no-head --n-train 60 --n-test 50 --seeds 0 1 2 \
        --baselines sep photutils scarlet2

`--test-shift KEY=VALUE ...` draws the test blends (only) with settings the head never saw
(`deblend_shifts.shifted_card`: worse or better seeing, shallower depth, a sky-subtraction residual),
the same objects as the unshifted test set, so the drop is paired, e.g. a saved head on
seeing 25 % worse than its card's:

    python -m cosmofm.bench.deblend_quality --out OUT --model DIR --n-train 60 --test-shift psf_scale=1.25

`--train-shifts SPEC ...` trains on such settings instead (an equal share of the training
blends per spec, `training_blends`), e.g. `--train-shifts none psf_scale=0.8 psf_scale=1.3
noise_scale=2`: a head that has seen the seeing and depth vary, for the same shifted tests.

`--model DIR` scores a head saved by `--save-model` instead of training one (its peak
threshold tuned again as above). `--train-seed` sets the head's initialisation and batch order (the blends stay the same);
`--seed-summary A.json B.json ...` then writes the mean +- std over those runs' training
seeds of every headline row and column (`seed_summary`) to `--out/deblend_quality_seeds.json`
(`--name` another file), one summary per test setting when the runs' --test-shift differ,
and beside it a figure of the blended scatter and MAPE against the seeing when two or more
psf_scale settings are among them (`deblend_report`: the headline rows, seed summaries and figures,
and `error_sources`, where the head's flux error lies).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cosmofm.bench.deblend_report import error_sources, headline, panels_figure, write_seed_summary
from cosmofm.bench.deblend_shifts import SHIFTS, offset_sky, shifted_card

SETTINGS = {"n_objects": (2, 6), "separation": (0.5, 3.0), "delta_mag": (0.0, 2.5)}
TRAIN_SEED = 1000  # the training universe; test universes are --seeds (must differ)
MAG_EDGES = (0.0, 19.0, 20.0, 21.0, 22.0, 30.0)  # true r magnitude bins: the test mocks span r ~ 16.5-23
ORACLES = ("oracle (true fractions)", "oracle (isolated + own noise)")


def training_blends(card, args) -> list:
    """The training blends: universe TRAIN_SEED, or under `--train-shifts` SPEC ... an equal
    share drawn per spec (comma-separated KEY=VALUE shifts, `shifted_card`; "none": the card
    as it is) from universes TRAIN_SEED + 0, 1, ..., interleaved so that every batch and the
    tuning blends (the first --n-tune, with truth) mix them."""
    if not args.train_shifts:
        return _blends(card, args.n_train, TRAIN_SEED, args.workers, n_truth=args.n_tune)  # truth only where tuned on
    specs = [{} if spec == "none" else key_values("--train-shifts", spec.split(",")) for spec in args.train_shifts]
    per = -(-args.n_train // len(specs))
    groups = []
    for g, shift in enumerate(specs):
        shifted, offset = shifted_card(card, shift, "--train-shifts")
        groups.append(offset_sky(_blends(shifted, per, TRAIN_SEED + g, args.workers, n_truth=-(-args.n_tune // len(specs))), shifted, offset))
    return [groups[i % len(specs)][i // len(specs)] for i in range(args.n_train)]


def _blends(card, n: int, seed: int, workers: int, n_truth: int | None = None):
    """(Sample, BlendTruth) pairs of universe `seed`: the Task's mocks, truth rebuilt from the attached arrays
    for the first `n_truth` blends (None: all) and None for the rest, whose float32 isolated
    images (~0.4 MB a blend) only the scoring and tuning read: training needs the Samples alone."""
    from cosmofm.data_cards.mocks.blends import BlendTruth, footprint_segmentation
    from cosmofm.data_cards.mocks.images import card_model
    from cosmofm.heads.deblending import DeblendingTask
    from cosmofm.heads.deblending_data import blend_truth_arrays

    samples = DeblendingTask.labelled_mocks(card, n, seed, workers=workers, stamp_size=None, **SETTINGS)
    sigma = card_model(card).sky_sigma  # as mock_blend's footprints
    out = []
    for i, s in enumerate(samples):
        if n_truth is not None and i >= n_truth:
            out.append((s, None))
            continue
        iso, centres, flux = blend_truth_arrays(s)
        foot, seg = footprint_segmentation(iso, sigma, 3.0)
        n_obj = len(centres)
        out.append((s, BlendTruth(iso, flux, np.zeros((n_obj, 2)), centres, seg, foot, [str(i) for i in range(n_obj)],
                                  list(s.meta["truth"]["filters"]))))
    return out


def scarlet2_results(blends, fwhm: float, bands: Sequence[str], ref: int, modes: Sequence[str], sep_cont: float,
                     steps: int) -> dict:
    """scarlet2's rows on the test blends: per mode ("known": true centres, "detection": sep's
    detections at contrast `sep_cont`), the metrics of its "model" and "reweighted" fluxes,
    stamps per second and the median / first seconds per blend (each fit compiles anew)."""
    import jax
    import scarlet2

    from cosmofm.heads.deblend_baseline import scarlet2_deblend

    out = {}
    for mode in modes:
        cats, times = [], []
        for i, (s, t) in enumerate(blends):
            t0 = time.perf_counter()
            cats.append(scarlet2_deblend(s, positions=t.pixel_positions if mode == "known" else None, fwhm_pixels=fwhm,
                                         deblend_cont=sep_cont, max_iter=steps))
            times.append(time.perf_counter() - t0)
            if i % 10 == 9:
                print(f"scarlet2 ({mode}): {i + 1} / {len(blends)} blends, {np.median(times):.1f} s per blend", flush=True)
        row = {"stamps_per_s": len(times) / sum(times), "seconds_per_blend_median": float(np.median(times)),
               "seconds_first_blend": times[0], "max_iter": steps, "positions": "true centres" if mode == "known" else f"sep, contrast {sep_cont}",
               "versions": {"scarlet2": scarlet2.__version__, "jax": jax.__version__}}
        for m in ("model", "reweighted"):
            res = summarise(cats, blends, fwhm, m, bands, ref)
            res.pop("_points")
            row[m] = res
        out["scarlet2_known_positions" if mode == "known" else "scarlet2"] = row
    return out


def oracle_catalogues(card, blends, background_level: float) -> dict[str, list]:
    """Per oracle of `ORACLES`, one `DeblendCatalog` (fluxes["oracle"]) per blend at the true
    centres (`deblending_metrics.fraction_fluxes`, eps_b = background_level x the stamp's sky
    sigma, as the head's targets). "isolated + own noise": source k alone, iso_k + n_k with
    n_k the stamp's noise realisation (values - sum_j iso_j) scaled to k's own variance
    (sky + its Poisson share, the mock's `observe_stamp` model), split by iso_k / (iso_k + eps_b)."""
    from cosmofm.data_cards.mocks.images import card_model
    from cosmofm.heads import deblending_metrics as dm
    from cosmofm.heads.deblend_baseline import DeblendCatalog

    model = card_model(card)
    sky = model.sky_sigma[:, None, None] ** 2
    gain = model.gain[:, None, None] if model.gain is not None else None
    out: dict[str, list] = {k: [] for k in ORACLES}
    for s, t in blends:
        values, ivar = np.asarray(s.values, np.float64), np.asarray(s.ivar, np.float64)
        iso = np.clip(np.asarray(t.isolated, np.float64), 0, None)
        eps = background_level * dm.sky_sigma(ivar)
        cats = [dm.fraction_fluxes(values, ivar, iso, eps)]
        noise = values - iso.sum(0)
        var_all = sky + (iso.sum(0) / gain if gain is not None else 0)
        alone = [dm.fraction_fluxes(iso[k] + noise * np.sqrt((sky + (iso[k] / gain if gain is not None else 0)) / var_all),
                                    ivar, iso[k][None], eps) for k in range(len(iso))]
        cats.append((np.concatenate([a[0] for a in alone]), np.concatenate([a[1] for a in alone])))
        for name, (f, e) in zip(ORACLES, cats):
            out[name].append(DeblendCatalog(np.asarray(t.pixel_positions, float), {"oracle": f}, {"oracle": e},
                                            np.asarray(t.segmentation, np.int32), "oracle", list(t.bands)))
    return out


def train_head(card, train, steps: int, batch_size: int, lr: float, seed: int, backbone: str | None, log_every: int = 25,
               budget_s: float | None = None, **head_settings):
    """The deblending head trained on `train` blends (AdamW, warmup + cosine, grad clip 1) for
    `steps` steps or, on a shared machine whose speed varies, until `budget_s` seconds: the
    cosine then follows max(step / steps, elapsed / budget_s), so the schedule ends either way.
    `head_settings`: DeblendingHeadConfig fields other than the card's (e.g. fraction_flux_weight)."""
    from cosmofm.finetune.run import build_task_model
    from cosmofm.heads.deblending import DeblendingHeadConfig, DeblendingTask
    from cosmofm.pretrain.recipe import PretrainRecipe

    head = DeblendingHeadConfig.from_card(card, **head_settings)
    config = None if backbone else {**PretrainRecipe.load("demo").model, "survey_names": [card.name]}
    model = build_task_model("deblending", head, seed, backbone, config)
    samples = [s for s, _ in train]
    task = DeblendingTask(head)
    targets = task.targets(samples)
    task.prepare(model, samples)  # records the training seeing (trained_psf_range)
    model.train()
    return model.eval(), fit(model, list(model.parameters()), samples, targets, steps, batch_size, lr, seed, budget_s, log_every)


def fit(model, parameters: list, samples, targets: dict, steps: int, batch_size: int, lr: float, seed: int,
        budget_s: float | None = None, log_every: int = 25, label: str = "step", **forward) -> dict:
    """Train `parameters` of `model` on random batches of `samples` (AdamW, warmup + cosine, grad
    clip 1) for `steps` steps or, on a shared machine whose speed varies, until `budget_s`
    seconds: the cosine then follows max(step / steps, elapsed / budget_s), so the schedule
    ends either way. `forward`: extra keywords of the model's forward (e.g. student=True).
    Leaves the model's train / eval mode as it is. Returns training facts."""
    from cosmofm.pretrain.data import collate_samples

    opt = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    progress = [0.0]

    def factor(k: int) -> float:
        return min(1.0, (k + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, max(k / steps, progress[0]))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        if budget_s is not None:
            progress[0] = (time.perf_counter() - t0) / budget_s
            if progress[0] >= 1.0:
                break
        idx = torch.randint(0, len(samples), (batch_size,), generator=gen)
        out = model(collate_samples([samples[i] for i in idx], model.config.survey_names), **forward, **{k: v[idx] for k, v in targets.items()})
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
        if step % log_every == 0 or step == steps - 1:
            print(f"{label} {step} loss {np.mean(losses[-log_every:]):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"losses_first": float(np.mean(losses[:10])), "losses_last": float(np.mean(losses[-10:])),
            "train_s": time.perf_counter() - t0, "steps": len(losses), "steps_asked": steps,
            "budget_s": budget_s,
            "loss_per_tenth": [float(np.mean(x)) for x in np.array_split(np.asarray(losses), 10)], "batch_size": batch_size, "lr": lr}


def run_head(args, card, train, tune, test, fwhm: float, bands: Sequence[str], ref: int, report: dict, results: dict):
    """Train the head (`train_head`), tune its peak threshold on `tune` (`tune_threshold`:
    matching within the training card's worst PSF FWHM) and score it on `test`
    in detection mode (with and without its outskirts correction) and with true centres; rows
    go to `results`, training facts to `report`. Returns (model, detection catalogues)."""
    from cosmofm.heads.deblending_predict import deblend_samples
    from cosmofm.heads.redshift_net_cpu import native_bf16_on

    samples = [s for s, _ in test]
    if args.model:
        from cosmofm.finetune.task_predict import load_task_model

        model, report["training"] = load_task_model(args.model, "deblending").eval(), {"loaded": str(args.model)}
    else:
        model, report["training"] = train_head(card, train, args.steps, args.batch_size, args.lr, args.train_seed, args.backbone,
                                                 budget_s=args.train_budget_s, **head_settings(args))
    model.head_config.peak_threshold = tune_threshold(model, tune)
    report["head_peak_threshold"] = model.head_config.peak_threshold
    centres = [t.pixel_positions for _, t in test]

    def scored(row: str, points: str | None = None, **options) -> list:
        """Deblend the test stamps with `options`, time and score them into results[row]
        (their error points kept for the figure under `points`); returns the catalogues."""
        cats, rate = _rate(lambda xs: deblend_samples(model, xs, batch_size=32, **options), samples)
        res = summarise(cats, test, fwhm, "head", bands, ref)
        pts = res.pop("_points")
        if points:
            results["_points"][points] = pts
        results[row] = {"stamps_per_s": rate, **res}
        return cats

    head_cats = scored("head", "head")
    if native_bf16_on(torch.device("cpu")):  # what `cosmofm deblend` runs here by default
        scored("head_bf16", bf16=True)
    scored("head_known_positions", "head (true centres)", positions=centres)  # plain fractions (see flux_correction)
    model.head_config.flux_correction = False  # ablation: the detected sources without the outskirts correction
    scored("head_no_correction")
    model.head_config.flux_correction = True
    results["head_error_sources"] = error_sources(model, test, fwhm, ref)
    return model, head_cats


def head_settings(args) -> dict:
    """DeblendingHeadConfig fields from `--fraction-flux-weight` and `--head-setting KEY=VALUE`."""
    settings = {} if args.fraction_flux_weight is None else {"fraction_flux_weight": args.fraction_flux_weight}
    return {**settings, **key_values("--head-setting", args.head_setting)}


def key_values(option: str, items: Sequence[str]) -> dict:
    """{KEY: VALUE} of `option`'s KEY=VALUE items, each value read as JSON, else kept as text."""
    from cosmofm.data_cards.errors import InputError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(option, f"{item!r} has no '='", "give KEY=VALUE, e.g. embed_size=16")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def tune_threshold(model, blends, **options) -> float:
    """The heatmap threshold with the best detection F1 on training blends (larger on ties):
    `DeblendingTask.calibrate` (the fine-tune's own calibration) on the model's outputs for
    them, the model's thresholds left as they were; `options` go to the forward (student=True
    tunes the student's path)."""
    from cosmofm.finetune.run import collect_outputs
    from cosmofm.heads.deblending import DeblendingTask
    from cosmofm.heads.deblending_predict import padded_positions

    h = model.head_config
    keep = {"peak_threshold": h.peak_threshold, "student_peak_threshold": h.student_peak_threshold}
    samples = [s for s, _ in blends]
    centres = padded_positions([t.pixel_positions for _, t in blends])
    fitted = DeblendingTask(h).calibrate(model, collect_outputs(model, samples, 32, **options), {"centres": centres},
                                         student=bool(options.get("student")))
    model._set_task(**keep)
    return fitted["peak_threshold"]


def summarise(cats, blends, fwhm: float, method: str, bands: Sequence[str], ref: int) -> dict:
    """BTK metrics of one method's catalogues (fluxes[method]) on the test blends."""
    from cosmofm.heads import deblending_metrics as dm
    from cosmofm.heads.deblend_baseline import score

    scores = [score(c, t, fwhm, method) for c, (_, t) in zip(cats, blends)]
    met = dm.deblending_metrics(scores, bands, ref, mag_edges=MAG_EDGES)
    ious = np.concatenate([dm.matched_iou(t.footprints, c.segmentation, s["true_index"], s["pred_index"])
                           for c, (_, t), s in zip(cats, blends, scores)])
    rel = [(s["f_pred"][:, ref] - s["f_true"][:, ref]) / s["f_true"][:, ref] for s in scores]
    sep = np.concatenate([s["sep_fwhm"] for s in scores])
    f_true = np.concatenate([s["f_true"] for s in scores])
    f_pred = np.concatenate([s["f_pred"] for s in scores])
    lone = (sep >= dm.BLENDED_FWHM) & np.all(f_true > 0, axis=1)  # no true neighbour within 2 FWHM
    isolated = {b: dm.flux_stats((f_pred[lone, k] - f_true[lone, k]) / f_true[lone, k]) for k, b in enumerate(bands)}
    mag = dm.ab_magnitude(f_true[:, ref])
    rel_ref = (f_pred[:, ref] - f_true[:, ref]) / np.where(f_true[:, ref] > 0, f_true[:, ref], np.nan)
    kind = np.concatenate([[o.get("kind", "?") for o in s.meta["truth"]["objects"]] for s, _ in blends])
    blended = (sep < dm.BLENDED_FWHM) & np.all(f_true > 0, axis=1) & np.isfinite(rel_ref)  # as deblending_metrics' blended
    by_kind = {k: dm.flux_stats(rel_ref[blended & (kind == k)]) for k in sorted(set(kind))}
    return {"flux_blended_by_kind": by_kind, "flux_isolated": isolated, "flux_isolated_vs_mag": dm.binned_flux_stats(rel_ref[lone], mag[lone], MAG_EDGES), "detection": met["detection"], "detection_vs_separation": met["detection_vs_separation"],
            "flux_blended": met["flux_blended"], "flux_all": met["flux_all"], "flux_vs_separation": met["flux_vs_separation"],
            "flux_blended_vs_mag": met["flux_blended_vs_mag"], "colour_blended": met["colour_blended"],
            "segmentation_iou_matched_mean": float(ious.mean()) if ious.size else float("nan"),
            "_points": (np.concatenate([s["sep_fwhm"] for s in scores]), np.concatenate(rel))}


def _rate(fn, items) -> tuple[list, float]:
    t0 = time.perf_counter()
    out = fn(items)
    return out, len(items) / (time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> dict:
    from cosmofm.bench.pretrain_throughput import machine_info
    from cosmofm.data_cards.errors import InputError
    from cosmofm.data_cards.io.atomic import atomic_write_bytes
    from cosmofm.data_cards.schema import load_card
    from cosmofm.heads.deblend_baseline import PIPELINES, SCARLET_STEPS, flux_methods, fwhm_in_pixels, reference_band, tune_contrast
    from cosmofm.heads.deblending import DeblendingHeadConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/bench")
    ap.add_argument("--card", default="lsst-like")
    ap.add_argument("--stamp-size", type=int, default=64)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=100, help="held-out blends per test seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="test universes (not the training one, 1000)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--train-seed", type=int, default=0,
                    help="seed of the head's initialisation and batch order (the training blends stay universe 1000)")
    ap.add_argument("--train-budget-s", type=float, default=None, help="stop training after this many seconds (schedule follows)")
    ap.add_argument("--fraction-flux-weight", type=float, default=None,
                    help="the head's fraction_flux_weight (default: the head's; 0 = cross-entropy fraction loss alone)")
    ap.add_argument("--head-setting", nargs="+", default=[], metavar="KEY=VALUE",
                    help="DeblendingHeadConfig fields for the head (e.g. embed_size=16); values read as JSON, else text")
    ap.add_argument("--save-model", default=None, metavar="DIR", help="save the trained head there as a release (save_release), for reuse")
    ap.add_argument("--model", default=None, metavar="DIR", help="score this saved head (--save-model) instead of training one")
    ap.add_argument("--n-tune", type=int, default=60, help="training blends the thresholds / contrasts are tuned on")
    ap.add_argument("--backbone", default=None, help="a pretrained backbone release (default: fresh, demo shape)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2 shared cores contend with 2)")
    ap.add_argument("--workers", type=int, default=2, help="processes making the mocks")
    ap.add_argument("--baselines", nargs="+", default=["sep", "photutils"], choices=["sep", "photutils", "scarlet2"],
                    help="classical baselines to run (scarlet2 needs the extra `scarlet`, i.e. jax)")
    ap.add_argument("--scarlet2-modes", nargs="+", default=["known"], choices=["known", "detection"],
                    help="scarlet2 at the true centres and / or at sep's detections")
    ap.add_argument("--scarlet2-steps", type=int, default=None, help="scarlet2's Adam steps (default SCARLET_STEPS, its tutorials' 1000)")
    ap.add_argument("--test-shift", nargs="+", default=[], metavar="KEY=VALUE",
                    help=f"draw the test blends with settings never trained on ({', '.join(SHIFTS)}; `shifted_card`)")
    ap.add_argument("--train-shifts", nargs="+", default=[], metavar="SPEC",
                    help="train on an equal share of blends per spec (KEY=VALUE[,KEY=VALUE], or none), e.g. none psf_scale=0.8 "
                         "psf_scale=1.3,noise_scale=2: observing conditions varied in training (`training_blends`)")
    ap.add_argument("--no-head", dest="head", action="store_false", help="baselines only: no head trained or scored, no figure")
    ap.add_argument("--seed-summary", nargs="+", default=None, metavar="JSON",
                    help="instead of a run: mean +- std over the training seeds of these runs' JSON (per --test-shift setting), "
                         "to --out/deblend_quality_seeds.json (or --name)")
    ap.add_argument("--name", default=None, help="file name of the --seed-summary JSON in --out")
    args = ap.parse_args(argv)
    if args.seed_summary:
        return write_seed_summary([Path(p) for p in args.seed_summary], Path(args.out), args.name or "deblend_quality_seeds.json")
    used = {TRAIN_SEED + g for g in range(max(1, len(args.train_shifts)))}
    if used & set(args.seeds):
        raise InputError("--seeds", f"include a training universe ({sorted(used)})", "use other test seeds")
    torch.set_num_threads(args.threads)
    card = dataclasses.replace(load_card(args.card), stamp_size=args.stamp_size)
    shift = key_values("--test-shift", args.test_shift)
    test_card, sky_offset = shifted_card(card, shift)
    tune_fwhm, fwhm = fwhm_in_pixels(card), fwhm_in_pixels(test_card)  # "blended" and matching: the test blends' own PSF
    bands = [b.name for b in card.bands]
    ref = reference_band(card)
    report: dict = {"card": card.name, "stamp_size": args.stamp_size, "fwhm_pixels": fwhm, "settings": SETTINGS, "args": vars(args),
                    "test_shift": shift, "machine": {**machine_info(), "loadavg_start": os.getloadavg()}, "reference_band": bands[ref]}
    t0 = time.perf_counter()
    train = training_blends(card, args)
    test = offset_sky([b for seed in args.seeds for b in _blends(test_card, args.n_test, seed, args.workers)], test_card, sky_offset)
    report["mock_s"] = time.perf_counter() - t0
    print(f"mocks: {len(train)} train, {len(test)} test ({report['mock_s']:.0f} s)", flush=True)

    tune = train[: args.n_tune]
    samples = [s for s, _ in test]
    results: dict = {"_points": {}}
    if args.head:
        model, head_cats = run_head(args, card, train, tune, test, fwhm, bands, ref, report, results)
        if args.save_model:
            from cosmofm.pretrain.checkpoint import save_release

            report["saved_model"] = str(save_release(model, args.save_model))
        background_level = model.head_config.background_level
    else:
        background_level = DeblendingHeadConfig.from_card(card).background_level
    for name, cats in oracle_catalogues(test_card, test, background_level).items():
        res = summarise(cats, test, fwhm, "oracle", bands, ref)
        pts = res.pop("_points")
        if name == ORACLES[0]:
            results["_points"]["oracle (true fractions)"] = pts
        results[name] = {"stamps_per_s": float("nan"), **res}
    contrasts = {}
    for name, (fn, arg) in PIPELINES.items():
        if name not in args.baselines:
            continue
        c = contrasts[name] = tune_contrast(name, tune, tune_fwhm)
        cats, rate = _rate(lambda xs: [fn(s, **{arg: c}, fwhm_pixels=fwhm) for s in xs], samples)
        results[name] = {arg: c, "stamps_per_s": rate}
        for m in flux_methods(name):
            res = summarise(cats, test, fwhm, m, bands, ref)
            pts = res.pop("_points")
            if m == {"sep": "isophotal", "photutils": "segment"}[name]:  # the figure's flux estimator of each
                results["_points"][f"{name} {m}"] = pts
            results[name][m] = res
        print(f"{name}: contrast {c}, {rate:.1f} stamps/s", flush=True)
    if "scarlet2" in args.baselines:
        sep_cont = contrasts["sep"] if "sep" in contrasts else tune_contrast("sep", tune, tune_fwhm)
        results.update(scarlet2_results(test, fwhm, bands, ref, args.scarlet2_modes, sep_cont, args.scarlet2_steps or SCARLET_STEPS))
    out = Path(args.out)
    if args.head:
        print(f"head: {results['head']['stamps_per_s']:.1f} stamps/s, threshold {report['head_peak_threshold']}", flush=True)
        panels_figure(out / "deblend_panels.png", test, head_cats, model, results, ref)
    results.pop("_points")
    report.update(results)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["headline"] = headline(report, bands[ref])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "deblend_quality.json", json.dumps(report, indent=1, default=float).encode())
    print(json.dumps(report["headline"], indent=1, default=float))
    return report




if __name__ == "__main__":
    main()
