"""Classification throughput: `cosmofm classify` end to end vs the template-fitting baseline.

End to end = read a FITS file of N spectra, tokenize, infer (class probabilities,
conformal sets, redshift), write the FITS catalogue. The baseline is the chi-square
template fitter (heads/template_fit.py) on a subset of the same spectra, in the same
process, so the ratio is robust to machine noise. The model has the shape of the
quality benchmark's (recipe `spectra-small`: convolutional stem, 64-pixel tokens, 2
blocks of width 64, attention-pooled head); weights do not change the arithmetic.
Target (issue 5): 40,000 spectra in <= 10 s on a 2-core CPU and >= 100x the baseline.
Run: `python -m cosmofm.bench.classify_throughput --n 40000 --out DIR`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cosmofm.data_cards.fits_io import write_fits
from cosmofm.data_cards.mock import generate
from cosmofm.data_cards.schema import load_card
from cosmofm.finetune.classification import FinetuneConfig, build_model, classify
from cosmofm.heads.template_fit import TemplateFitter
from cosmofm.pretrain.checkpoint import write_manifest
from cosmofm.pretrain.recipe import PretrainRecipe


def run(n: int, n_baseline: int = 20, batch_size: int = 256, overrides: list[str] = ()) -> dict:
    card = load_card("sdss-like")
    spectra = list(generate(card, n, seed=3, workers=2))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_fits(spectra, tmp / "spectra.fits", card)
        model = build_model(card, FinetuneConfig(), backbone_config=dict(PretrainRecipe.load("spectra-small", [f"model.{o}" for o in overrides]).model, survey_names=[card.name]))
        model.save_pretrained(tmp / "model")
        write_manifest(tmp / "model")
        classify([str(tmp / "spectra.fits")], str(tmp / "model"), tmp / "warm.fits", batch_size=batch_size, progress=False)  # warm-up
        t0 = time.perf_counter()
        classify([str(tmp / "spectra.fits")], str(tmp / "model"), tmp / "out.fits", batch_size=batch_size, progress=False)
        seconds = time.perf_counter() - t0
    fitter = TemplateFitter()
    subset = spectra[:n_baseline]
    t0 = time.perf_counter()
    for s in subset:
        fitter.fit(s.coords["wavelength"], s.values, s.ivar)
    baseline_per_s = n_baseline / (time.perf_counter() - t0)
    per_s = n / seconds
    return {
        "n_spectra": n, "seconds_end_to_end": seconds, "spectra_per_s": per_s,
        "seconds_for_40000": 40000 / per_s, "template_fit_spectra_per_s": baseline_per_s,
        "ratio_vs_template_fit": per_s / baseline_per_s, "torch_threads": torch.get_num_threads(),
        "model_overrides": list(overrides), "targets": {"seconds_for_40000": 10.0, "ratio_vs_template_fit": 100.0},
    }


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--out", default="bench_results")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model setting of the spectra-small recipe to change, e.g. spectrum_stem_stride=4")
    p.add_argument("--name", default="classify_throughput", help="JSON file name (without .json)")
    args = p.parse_args(argv)
    result = run(args.n, overrides=args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    print(f"{result['spectra_per_s']:.0f} spectra/s end to end -> 40,000 in {result['seconds_for_40000']:.1f} s (target <= 10 s)")
    print(f"template fitting: {result['template_fit_spectra_per_s']:.2f} spectra/s; ratio {result['ratio_vs_template_fit']:.0f}x (target >= 100x)")
    return result


if __name__ == "__main__":
    main()
