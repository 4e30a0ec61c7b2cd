r"""Value of pretraining for the deblending head (issue 20): the shared backbone vs scratch.

    python -m cosmofm.bench.deblend_pretraining --out docs/bench --work /tmp/deblend_arms \
        --n-train 1000 --n-test 100 --steps 1500 --seeds 0 1 2 --fractions 0.1 1.0

Arms, each fine-tuned through the shared path (`finetune.run.finetune_task`, the same one
`cosmofm finetune --task deblending` runs) for the same number of optimizer steps:
- `scratch`: the head on a fresh backbone of the pretrained one's shape (its config.json:
  width, depth, patch sizes, survey table), everything trained;
- `frozen`, `lora`, `full`: the head on the project's one multi-modal backbone, `--backbone`
  (e.g. the recipe `shared` release), else the demo recipe's checkpoint
  (`photoz_quality.demo_backbone`: spectra, images, HI cubes and 21cm chunks of mock
  universe 0, pretrained once into WORK/pretrain).
Label fractions (`--fractions`) take the first fraction of the training block
(`TaskFinetuneConfig.label_fraction`). Training blends come from universe 1000; the test
blends from universes `--test-universes` (default 1, 2, 3: not universe 0, whose objects
the demo backbone saw unlabelled; the `shared` recipe's corpus is universe 101, its
mock_seed). Each run's heatmap threshold is tuned by detection F1 on `--n-tune` training
blends, as in `deblend_quality`, and the run is scored with the same BTK metrics
(`deblend_quality.summarise`) in the r band.

Results go to OUT/deblend_pretraining.json after every run (a rerun with the same --out
skips finished runs), with mean and spread over seeds per arm and fraction.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

ARMS = ("scratch", "frozen", "lora", "full")
HEADLINE = ("f1", "blended_bias", "blended_nmad", "blended_mape", "isolated_bias", "isolated_nmad")


def headline_of(res: dict, band: str) -> dict:
    """The run's headline figures: detection F1 and r-band flux bias / NMAD / MAPE of blended and isolated sources."""
    fb, fi = res["flux_blended"][band], res["flux_isolated"][band]
    return {"f1": res["detection"]["f1"], "blended_bias": fb["bias"], "blended_nmad": fb["scatter"], "blended_mape": fb["mape"],
            "isolated_bias": fi["bias"], "isolated_nmad": fi["scatter"]}


def one_run(arm: str, fraction: float, seed: int, train, test, card, args, backbone: str, shape: dict) -> dict:
    """Fine-tune one arm on the first `fraction` of the training blends; its BTK metrics on `test`."""
    from cosmofm.bench.deblend_quality import summarise, tune_threshold
    from cosmofm.finetune.run import TaskFinetuneConfig, finetune_task, split_indices
    from cosmofm.heads.deblend_baseline import fwhm_in_pixels, reference_band
    from cosmofm.heads.deblending_predict import deblend_samples

    samples = [s for s, _ in train]
    cfg = TaskFinetuneConfig(strategy="full" if arm == "scratch" else arm, batch_size=args.batch_size, lr=args.lr, seed=seed,
                             label_fraction=fraction, max_steps=args.steps, progress=args.progress)
    n_train = len(split_indices(len(samples), cfg)["train"])
    cfg = dataclasses.replace(cfg, epochs=max(1, int(np.ceil(args.steps / np.ceil(n_train / args.batch_size)))))
    t0 = time.perf_counter()
    kw = {"backbone_config": shape} if arm == "scratch" else {"backbone": backbone}
    r = finetune_task("deblending", samples, card, cfg, **kw)
    model = r["model"].eval()
    fwhm = fwhm_in_pixels(card)
    model.head_config.peak_threshold = tune_threshold(model, train[: min(args.n_tune, n_train)])
    bands = [b.name for b in card.bands]
    ref = reference_band(card)
    res = summarise(deblend_samples(model, [s for s, _ in test], batch_size=32), test, fwhm, "head", bands, ref)
    res.pop("_points")
    return {"test": headline_of(res, bands[ref]), "detection_vs_separation": res["detection_vs_separation"],
            "n_train": n_train, "epochs": cfg.epochs, "steps": args.steps, "peak_threshold": model.head_config.peak_threshold,
            "seconds": round(time.perf_counter() - t0, 1), "final_loss": r["history"][-1] if r["history"] else None}


def markdown_table(summary: dict) -> str:
    """The summary as the docs' table (mean +- spread over seeds)."""
    rows = ["| arm | labels | seeds | F1 | blended bias | blended NMAD | blended MAPE | isolated bias | isolated NMAD |",
            "|---|---|---|---|---|---|---|---|---|"]
    for key, e in summary.items():
        arm, fraction = key.rsplit("/", 1)
        f = lambda m: f"{e['test_' + m][0]:.3f} +- {e['test_' + m][1]:.3f}"  # noqa: E731
        rows.append(f"| {arm} | {float(fraction):.0%} | {e['seeds']} | " + " | ".join(f(m) for m in HEADLINE) + " |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> dict:
    from cosmofm.bench import seed_summary, write_report
    from cosmofm.bench.deblend_quality import TRAIN_SEED, _blends
    from cosmofm.bench.photoz_quality import demo_backbone
    from cosmofm.bench.pretrain_throughput import machine_info
    from cosmofm.data_cards.errors import InputError
    from cosmofm.data_cards.schema import load_card
    from cosmofm.pretrain.configuration_cosmofm import CosmoFMConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/bench")
    ap.add_argument("--work", default="/tmp/deblend_pretraining", help="where the demo backbone is pretrained (once)")
    ap.add_argument("--card", default="lsst-like")
    ap.add_argument("--n-train", type=int, default=1000, help="training blends (universe 1000); 60 %% form the training block")
    ap.add_argument("--n-test", type=int, default=100, help="held-out blends per test universe")
    ap.add_argument("--test-universes", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tune seeds")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps of every arm")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--n-tune", type=int, default=60, help="training blends the heatmap threshold is tuned on")
    ap.add_argument("--backbone", default=None, help="a pretrained release instead of the demo's multi-modal backbone")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="processes making the mocks")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if TRAIN_SEED in args.test_universes or 0 in args.test_universes:
        raise InputError("--test-universes", f"include the training universe {TRAIN_SEED} or the backbone's universe 0", "use others, e.g. 1 2 3")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    path = out / "deblend_pretraining.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    report.update(args=vars(args), machine=machine_info())
    runs = report.setdefault("runs", {})
    card = dataclasses.replace(load_card(args.card), stamp_size=64)
    train = _blends(card, args.n_train, TRAIN_SEED, args.workers)
    test = [b for u in args.test_universes for b in _blends(card, args.n_test, u, args.workers)]
    backbone = args.backbone or str(demo_backbone(Path(args.work)))
    shape = CosmoFMConfig.from_pretrained(backbone).to_dict()  # scratch: a fresh copy of the backbone's own shape
    for fraction in args.fractions:
        for seed in args.seeds:
            for arm in args.arms:
                key = f"{arm}/{fraction}/{seed}"
                if key in runs:
                    continue
                runs[key] = one_run(arm, fraction, seed, train, test, card, args, backbone, shape)
                print(key, {k: round(v, 4) for k, v in runs[key]["test"].items()}, flush=True)
                write_report(out, path.name, report)
    report["summary"] = seed_summary(runs, ARMS, HEADLINE)
    write_report(out, path.name, report)
    print(markdown_table(report["summary"]))
    return report


if __name__ == "__main__":
    main()
