"""Does a deblending head use the seeing it is told? Saved heads on test blends at one seeing,
each told (`psf_conditioning`) the true PSF or another one, scored at the true centres.

    python -m cosmofm.bench.deblend_told_seeing --out OUT --models A B --true 0.8 1.0 1.25 --told 0.8 1.0 1.25

For each saved head, test seeing X (every band's PSF FWHM x X, `deblend_shifts.shifted_card`;
universe --seed, --n blends) and told seeing Y: the blended sources' r-band flux MAPE, NMAD
and bias with the true centres given (known-positions mode, so detection plays no part).
A head without `psf_conditioning` ignores what it is told: run it with one --told value.
Writes OUT/deblend_told_seeing.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence


def test_blends(card, true_scale: float, n: int, seed: int) -> tuple[list, float]:
    """(blends 0..n-1 of universe `seed` observed at `true_scale` x the card's seeing, their worst PSF FWHM [pixels])."""
    from cosmofm.bench import deblend_quality as dq
    from cosmofm.bench.deblend_shifts import shifted_card
    from cosmofm.heads.deblend_baseline import fwhm_in_pixels

    test_card, _ = shifted_card(card, {"psf_scale": true_scale})
    return dq._blends(test_card, n, seed, 1), fwhm_in_pixels(test_card)


def told_rows(model, card, true_scale: float, test: list, fwhm: float, told: Sequence[float]) -> dict:
    """{told: {mape, nmad, bias, n}} of `model` on `test` blends (`test_blends`) observed at `true_scale`."""
    from cosmofm.bench import deblend_quality as dq
    from cosmofm.heads.deblend_baseline import reference_band
    from cosmofm.heads.deblending_predict import deblend_samples

    bands, ref = [b.name for b in card.bands], reference_band(card)
    out = {}
    for y in told:
        said = [b.psf_fwhm.to_value("arcsec") * y for b in card.bands]
        samples = [dataclasses.replace(s, meta={**s.meta, "psf_fwhm_arcsec": said}) for s, _ in test]  # what the head is told
        cats = deblend_samples(model, samples, [t.pixel_positions for _, t in test], batch_size=32)
        flux = dq.summarise(cats, test, fwhm, "head", bands, ref)["flux_blended"][bands[ref]]
        out[f"{y:g}"] = {"mape": flux["mape"], "nmad": flux["scatter"], "bias": flux["bias"], "n": flux["n"]}
        print(f"true {true_scale:g} told {y:g}: MAPE {flux['mape']:.1f} %, NMAD {flux['scatter']:.3f}", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    import torch

    from cosmofm.bench.pretrain_throughput import machine_info
    from cosmofm.data_cards.io.atomic import atomic_write_bytes
    from cosmofm.data_cards.schema import load_card
    from cosmofm.finetune.task_predict import load_task_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/bench")
    ap.add_argument("--models", nargs="+", required=True, metavar="DIR", help="saved deblending heads (deblend_quality --save-model)")
    ap.add_argument("--true", nargs="+", type=float, default=[0.8, 1.0, 1.25], help="test seeings, x the card's PSF FWHM")
    ap.add_argument("--told", nargs="+", type=float, default=[0.8, 1.0, 1.25], help="seeings the heads are told")
    ap.add_argument("--card", default="lsst-like")
    ap.add_argument("--n", type=int, default=100, help="test blends")
    ap.add_argument("--seed", type=int, default=0, help="test universe (not a training one, 1000+)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    card = dataclasses.replace(load_card(args.card), stamp_size=64)
    report: dict = {"args": vars(args), "machine": {**machine_info(), "loadavg_start": os.getloadavg()}, "heads": {}}
    tests = {x: test_blends(card, x, args.n, args.seed) for x in args.true}  # made once, scored by every head
    for path in args.models:
        model = load_task_model(path, "deblending").eval()
        told = args.told if model.head_config.psf_conditioning else [1.0]
        report["heads"][path] = {"psf_conditioning": model.head_config.psf_conditioning,
                                 "trained_psf_range": model.head_config.trained_psf_range,
                                 "by_true_seeing": {f"{x:g}": told_rows(model, card, x, *tests[x], told) for x in args.true}}
    report["machine"]["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "deblend_told_seeing.json", json.dumps(report, indent=1, default=float).encode())
    return report


if __name__ == "__main__":
    main()
