r"""The deblending head's fast path: a distilled convolutional student against the head and sep.

    python -m cosmofm.bench.deblend_student --out docs/bench --steps 1500 --student-steps 1500 \
        --seeds 0 1 2 --arms distilled scratch

The speed target of issue 20 is half of sep's stamps per second; the head runs at ~0.1x,
its backbone and full-resolution decoder most of the time (docs/benchmarks.md,
deblending). `heads/deblending_student.PixelStudent` computes the decoder's outputs from the
pixels alone; peaks, the split, the refiner and the fluxes stay the head's. Here:

1. a head (the "teacher") is trained on `--n-train` lsst-like blends of universe 1000 as
   `deblend_quality` trains it (`train_head`; or loaded with `--model DIR`), its peak
   threshold tuned by detection F1 on training blends;
2. per arm and seed a student of `--student-widths` is trained on the same blends for
   `--student-steps` steps, the head frozen: arm "distilled" with the task loss plus
   `distillation_loss` against the head's outputs (distill_weight 1), arm "scratch" with
   the task loss alone (distill_weight 0: does the student need the backbone at all?);
   its own peak threshold tuned the same way;
3. the head, each student and sep (contrast tuned on the training blends) deblend the same
   held-out blends (universes `--test-seeds`); detection and flux figures as
   `deblend_quality` (`summarise`, `headline`), and stamps per second in `--rounds`
   interleaved rounds on one torch thread, sep in the same rounds: the speed ratio is
   measured in one process on one load, as the target asks.

`--test-shift KEY=VALUE ...` draws the test blends with settings nothing was trained on
(`deblend_shifts.shifted_card`: seeing, depth, a sky residual; thresholds and sep's contrast
stay as tuned on the training blends); with `--model DIR` holding a distilled student, arm
"loaded" scores that student as saved (its own peak threshold) without training one, e.g.

    python -m cosmofm.bench.deblend_student --out OUT --model DIR --arms loaded --test-shift psf_scale=1.25

Writes `deblend_student.json` to `--out` (machine and load recorded); `--save-model DIR`
saves the head with the last distilled student and both peak thresholds
(`cosmofm deblend --model DIR --student`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from cosmofm.bench.deblend_quality import TRAIN_SEED, _blends, fit, summarise, train_head, tune_threshold
from cosmofm.bench.deblend_report import headline

ARMS = {"distilled": 1.0, "scratch": 0.0, "loaded": None}  # arm -> distill_weight (loaded: the saved model's student, as saved)


def train_student(model, train, widths: Sequence[int], steps: int, batch_size: int, lr: float, seed: int,
                  distill_weight: float, log_every: int = 100, refine_channels: int = 0) -> dict:
    """Attach a fresh `PixelStudent` (seeded by `seed`) to `model` and train it alone on the
    `train` blends for `steps` AdamW steps (warmup + cosine, grad clip 1), everything else
    frozen and in eval mode: loss = the task loss on the student's path + distill_weight x
    `distillation_loss` (with `refine_channels`, the student's own refiner of that width, which
    also learns the head's refined fractions). Returns training facts."""
    from cosmofm.heads.deblending import DeblendingTask
    from cosmofm.heads.deblending_student import PixelStudent

    model._set_task(student_widths=[int(w) for w in widths], distill_weight=float(distill_weight),  # config.task in step: saved as trained
                    student_refine_channels=int(refine_channels))
    h = model.head_config
    torch.manual_seed(seed)
    model.student = PixelStudent.from_head(h)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("student."))
    samples = [s for s, _ in train]
    model.eval()  # the frozen head without dropout; the student has none
    facts = fit(model, list(model.student.parameters()), samples, DeblendingTask(h).targets(samples), steps, batch_size, lr, seed,
                log_every=log_every, label="student step", student=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return {"train_s": facts["train_s"], "steps": steps, "losses_first": facts["losses_first"], "losses_last": facts["losses_last"],
            "parameters": sum(p.numel() for p in model.student.parameters())}


def timed_rounds(runs: dict, samples, rounds: int) -> dict:
    """Stamps per second of each `runs` callable (samples -> anything) over `samples`, in
    `rounds` interleaved rounds; plus each run's ratio to "sep" in the same round."""
    rate = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn(samples)
            rate[name].append(len(samples) / (time.perf_counter() - t0))
    out = {name: {"stamps_per_s": r} for name, r in rate.items()}
    for name in runs:
        if "sep" in rate and name != "sep":
            out[name]["ratio_to_sep"] = [a / b for a, b in zip(rate[name], rate["sep"])]
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    from cosmofm.bench.deblend_quality import key_values
    from cosmofm.bench.deblend_shifts import offset_sky, shifted_card
    from cosmofm.bench.pretrain_throughput import machine_info
    from cosmofm.data_cards.errors import InputError
    from cosmofm.data_cards.io.atomic import atomic_write_bytes
    from cosmofm.data_cards.schema import load_card
    from cosmofm.heads.deblend_baseline import fwhm_in_pixels, reference_band, sep_deblend, tune_contrast
    from cosmofm.heads.deblending_predict import deblend_samples

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--card", default="lsst-like")
    ap.add_argument("--model", help="a saved deblending head (the teacher) instead of training one")
    ap.add_argument("--backbone", help="pretrained backbone for the teacher (default: a fresh one of the demo recipe's shape)")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-tune", type=int, default=200, help="training blends (with truth) the peak thresholds and sep's contrast are tuned on")
    ap.add_argument("--n-test", type=int, default=100, help="held-out blends per test universe")
    ap.add_argument("--test-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1500, help="the teacher's training steps")
    ap.add_argument("--student-steps", type=int, default=1500)
    ap.add_argument("--student-widths", type=int, nargs="+", default=[16, 32, 48, 64])
    ap.add_argument("--student-lr", type=float, default=2e-3)
    ap.add_argument("--student-refine-channels", type=int, default=0, help="the student's own refiner's width (0: the head's refiner)")
    ap.add_argument("--arms", nargs="+", default=["distilled", "scratch"], choices=sorted(ARMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="student seeds per arm")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1.5e-3, help="the teacher's learning rate")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--save-model", help="save the head with the last distilled student here")
    ap.add_argument("--test-shift", nargs="*", default=[], metavar="KEY=VALUE",
                    help="draw the test blends with these settings (deblend_shifts.SHIFTS: psf_scale, noise_scale, sky_offset)")
    ap.add_argument("--save-teacher", help="save the trained head (before any student) here, for --model in later runs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    card = dataclasses.replace(load_card(args.card), stamp_size=64)
    shift = key_values("--test-shift", args.test_shift)
    test_card, sky_offset = shifted_card(card, shift)
    # matching and "blended" in the test blends' own PSF; tuning on the training blends' (as deblend_quality)
    tune_fwhm, fwhm, bands, ref = fwhm_in_pixels(card), fwhm_in_pixels(test_card), [b.name for b in card.bands], reference_band(card)
    report: dict = {"card": card.name, "args": vars(args), "test_shift": shift, "machine": {**machine_info(), "loadavg_start": os.getloadavg()},
                    "reference_band": bands[ref], "arms": {}}
    train = _blends(card, args.n_train, TRAIN_SEED, args.workers, n_truth=args.n_tune)
    tune = train[: args.n_tune]
    test = offset_sky([b for seed in args.test_seeds for b in _blends(test_card, args.n_test, seed, args.workers)], test_card, sky_offset)
    samples = [s for s, _ in test]
    print(f"mocks: {len(train)} train, {len(test)} test", flush=True)
    if args.model:
        from cosmofm.finetune.task_predict import load_task_model

        model, report["teacher_training"] = load_task_model(args.model, "deblending"), {"loaded": str(args.model)}
    else:
        model, report["teacher_training"] = train_head(card, train, args.steps, args.batch_size, args.lr, 0, args.backbone)
        if args.save_teacher:
            from cosmofm.pretrain.manifest import save_release

            report["saved_teacher"] = str(save_release(model, args.save_teacher))
    model.eval()
    if "loaded" in args.arms and model.student is None:
        raise InputError("--arms loaded", f"{args.model or 'the trained head'} has no distilled student", "give --model DIR saved with one (--save-model)")
    h = model.head_config
    loaded = (model.student, h.student_peak_threshold or h.peak_threshold, (list(h.student_widths), h.student_refine_channels))
    model.student = None
    model._set_task(student_widths=[], student_peak_threshold=0.0, student_refine_channels=0)
    head_threshold = tune_threshold(model, tune)
    sep_cont = tune_contrast("sep", tune, tune_fwhm)
    report.update(head_peak_threshold=head_threshold, sep_contrast=sep_cont)

    def head_run(xs):
        model.head_config.peak_threshold = head_threshold
        return deblend_samples(model, xs, batch_size=32)

    def sep_run(xs):
        return [sep_deblend(s, sep_cont, fwhm_pixels=fwhm) for s in xs]

    scored = {"head": summarise(head_run(samples), test, fwhm, "head", bands, ref),
              "head_known_positions": summarise(deblend_samples(model, samples, [t.pixel_positions for _, t in test], batch_size=32),
                                                test, fwhm, "head", bands, ref),
              "sep": summarise(sep_run(samples), test, fwhm, "aperture", bands, ref)}
    keep = None  # the last distilled student, for --save-model
    for arm in args.arms:
        for seed in args.seeds:
            if arm == "loaded":
                if seed != args.seeds[0]:
                    continue  # one saved student: nothing to seed
                name, facts, (model.student, threshold, (widths, channels)) = "student loaded", {"loaded": str(args.model)}, loaded
                model._set_task(student_widths=widths, student_refine_channels=channels)
            else:
                name = f"student {arm} seed {seed}"
                facts = train_student(model, train, args.student_widths, args.student_steps, args.batch_size, args.student_lr, seed, ARMS[arm],
                                      refine_channels=args.student_refine_channels)
                threshold = tune_threshold(model, tune, student=True)

            def student_run(xs, threshold=threshold):
                model.head_config.peak_threshold = threshold
                return deblend_samples(model, xs, batch_size=32, student=True)

            scored[name] = summarise(student_run(samples), test, fwhm, "head", bands, ref)
            known = summarise(deblend_samples(model, samples, [t.pixel_positions for _, t in test], batch_size=32, student=True),
                              test, fwhm, "head", bands, ref)
            speed = timed_rounds({"sep": sep_run, "head": head_run, name: student_run}, samples, args.rounds)
            report["arms"][name] = {"arm": arm, "seed": seed, "distill_weight": ARMS[arm], "peak_threshold": threshold, "training": facts,
                                    "speed": speed, "known_positions": {k: v for k, v in known.items() if k != "_points"}}
            print(f"{name}: {json.dumps(speed, default=float)}", flush=True)
            if arm == "distilled":
                keep = (model.student, threshold)
    for res in scored.values():
        res.pop("_points", None)
        res["stamps_per_s"] = float("nan")  # speeds are in report["arms"][...]["speed"], measured in interleaved rounds
    report["results"] = scored
    report["headline"] = headline(scored, bands[ref])
    report["machine"]["loadavg_end"] = os.getloadavg()
    if args.save_model and keep is not None:
        from cosmofm.pretrain.manifest import save_release

        model.student = keep[0]
        model._set_task(student_widths=[int(w) for w in args.student_widths], distill_weight=ARMS["distilled"], peak_threshold=head_threshold,
                        student_peak_threshold=keep[1], student_refine_channels=args.student_refine_channels)
        report["saved_model"] = str(save_release(model, args.save_model))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "deblend_student.json", json.dumps(report, indent=1, default=float).encode())
    for name, row in report["headline"].items():
        print(f"{name:32s} F1 {row['f1']:.3f} blended bias {row['blended_bias']:+.3f} NMAD {row['blended_nmad']:.3f} "
              f"MAPE {row['blended_mape']:.1f} % isolated NMAD {row['isolated_nmad']:.3f}", flush=True)
    return report


if __name__ == "__main__":
    main()
