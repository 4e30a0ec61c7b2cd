"""The deblending head in float32 and under bfloat16 autocast (`deblend_samples(bf16=True)`,
`cosmofm deblend --bf16`), on the same held-out stamps: speed and the flux metrics.

    python -m cosmofm.bench.deblend_bf16 --out docs/bench --n-train 1000 --steps 600

A head is trained here for the comparison (`deblend_quality.train_head`: a fresh backbone of the
demo recipe's shape on `--n-train` lsst-like blends of universe 1000, `--steps` steps of 8, lr
1.5e-3; its peak threshold tuned on 200 of them), then the 300 blends of universes 0, 1 and 2
(`--n-test` each) are deblended in float32 and in bf16 in interleaved rounds, each timed by
this process's CPU time (the machine is shared: wall time would measure the neighbours), and
both answers scored by `deblend_quality.summarise` (detection mode and true centres given).
`--model DIR` takes a head saved by `deblend_quality --save-model` instead (no training), and
`--name` names the JSON (default deblend_bf16.json).
The gain needs a CPU with native bf16 matrix units (AVX512-BF16, AMX: recorded in the JSON);
without them autocast emulates bf16 and is slower.
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

from cosmofm.bench.deblend_quality import TRAIN_SEED, _blends, summarise, train_head, tune_threshold
from cosmofm.bench.pretrain_throughput import machine_info
from cosmofm.data_cards.io.atomic import atomic_write_bytes

N_TUNE = 200  # training blends the peak threshold is tuned on


def main(argv: Sequence[str] | None = None) -> dict:
    from cosmofm.data_cards import load_card
    from cosmofm.heads.deblend_baseline import fwhm_in_pixels, reference_band
    from cosmofm.heads.deblending_predict import deblend_samples

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--n-test", type=int, default=100, help="held-out blends per test universe (0, 1, 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved float32 / bf16 timing rounds")
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--model", default=None, metavar="DIR", help="a saved deblending head to time and score (default: train one)")
    p.add_argument("--name", default="deblend_bf16.json", help="the output file's name in --out")
    p.add_argument("--n-tune", type=int, default=N_TUNE, help="training blends the peak threshold is tuned on")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    card = dataclasses.replace(load_card("lsst-like"), stamp_size=64)
    fwhm, ref, bands = fwhm_in_pixels(card), reference_band(card), [b.name for b in card.bands]
    train = _blends(card, args.n_tune if args.model else max(args.n_train, args.n_tune), TRAIN_SEED, 1, n_truth=args.n_tune)
    test = [b for seed in (0, 1, 2) for b in _blends(card, args.n_test, seed, 1)]
    t0 = time.perf_counter()
    if args.model:
        from cosmofm.finetune.task_predict import load_task_model

        model = load_task_model(args.model, "deblending").eval()
    else:
        model, _ = train_head(card, train, args.steps, 8, 1.5e-3, args.train_seed, None)
    report = {"machine": machine_info(), "args": vars(args), "train_s": time.perf_counter() - t0, "loadavg_start": os.getloadavg(), "rounds": []}
    model.head_config.peak_threshold = tune_threshold(model, train[:args.n_tune])
    samples, centres = [s for s, _ in test], [t.pixel_positions for _, t in test]
    for _ in range(args.rounds):
        for bf16 in (False, True):
            t = time.process_time()
            deblend_samples(model, samples, batch_size=32, bf16=bf16)
            report["rounds"].append({"bf16": bf16, "stamps_per_cpu_s": len(samples) / (time.process_time() - t)})
    for bf16 in (False, True):
        scores = {}
        for mode, given in (("detection", None), ("true_centres", centres)):
            scores[mode] = summarise(deblend_samples(model, samples, positions=given, batch_size=32, bf16=bf16), test, fwhm, "head", bands, ref)
            scores[mode].pop("_points", None)
        report["bf16" if bf16 else "float32"] = scores
    report["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / args.name, json.dumps(report, indent=1, default=float).encode())
    print(json.dumps(report["rounds"]), flush=True)
    return report


if __name__ == "__main__":
    main()
