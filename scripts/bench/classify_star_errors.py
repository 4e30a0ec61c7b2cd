"""Where survey classifiers miss the star classes: recall of the stars of the classify_survey
test block by each star's true parameters (issue 17).

    python -m cosmofm.bench.classify_star_errors --labelled WORK/labelled-sdss-like-survey-14000-seed21 \
        --models WORK/finetune-shared-multimodal-seed0/model ... --out docs/bench

The star classes of `sdss-like-survey` are Teff classes (`mocks.spectra.STAR_TEFF`: centres
300-600 K apart, each star drawn 80 K rms about its centre) with log g, [Fe/H], Galactic
E(B-V), flux-calibration errors and S/N drawn independently, so a star's recall can be
binned by each. The test block is the bench's (the last 15 % of the labelled mocks, by index);
with several models (fine-tune seeds) a star counts by the share of models that got it right.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

BINS = {  # parameter -> bin edges
    "abs_dteff_K": (0, 40, 80, 120, 160, 1000),
    "feh": (-3.0, -1.5, -1.0, -0.5, 0.0, 1.0),
    "logg": (0.0, 2.5, 3.5, 4.2, 6.0),
    "ebv": (0.0, 0.02, 0.05, 0.1, 0.2, 2.0),
    "snr": (0, 5, 10, 20, 40, 1000),
}
TEST_FRACTION = 0.15  # classify_survey's SPLIT


def star_parameters(samples) -> dict[str, np.ndarray]:
    """Each star's |Teff - its class centre|, [Fe/H], log g, E(B-V) and target S/N from its mock truth."""
    from cosmofm.data_cards.mocks.spectra import STAR_TEFF

    params = [s.meta["truth"]["params"] for s in samples]
    centre = np.array([STAR_TEFF[s.meta["labels"]["spectral_class"]] for s in samples])
    return {"abs_dteff_K": np.abs(np.array([p["teff"] for p in params]) - centre), "feh": np.array([p["feh"] for p in params]),
            "logg": np.array([p["logg"] for p in params]), "ebv": np.array([p["ebv_mw"] for p in params]),
            "snr": np.array([s.meta["truth"]["instrument"]["snr_target"] for s in samples])}


def main(argv: Sequence[str] | None = None) -> dict:
    import cosmofm
    from cosmofm.bench.pretrain_throughput import machine_info
    from cosmofm.data_cards.io.hf_io import SampleDataset
    from cosmofm.finetune.classify import predict

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labelled", required=True, help="the bench's labelled datasets folder (WORK/labelled-...)")
    p.add_argument("--models", nargs="+", required=True, help="fine-tuned classifier folders (WORK/finetune-...-seedS/model)")
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--name", default="classify_star_errors")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ds = SampleDataset(args.labelled)
    n = len(ds)
    test = [ds[i] for i in range(n - round(TEST_FRACTION * n), n)]
    stars = [s for s in test if s.meta["labels"]["spectral_class"].startswith("STAR")]
    truth = np.array([s.meta["labels"]["spectral_class"] for s in stars])
    right = []
    for folder in args.models:
        model = cosmofm.from_pretrained(folder).eval()
        with torch.no_grad():
            logits = predict(model, stars, batch_size=256)["logits"]
        right.append(np.array(model.class_names)[logits.argmax(1)] == truth)
    share = np.mean(right, axis=0)
    params = star_parameters(stars)
    report = {"machine": machine_info(), "labelled": args.labelled, "models": args.models, "n_stars": len(stars),
              "star_recall": float(share.mean()), "by": {}}
    for name, edges in BINS.items():
        x = params[name]
        report["by"][name] = [{"lo": lo, "hi": hi, "n": int(m.sum()), "recall": float(share[m].mean()) if m.any() else None}
                              for lo, hi in zip(edges[:-1], edges[1:]) for m in [(x >= lo) & (x < hi)]]
    bright, central = params["snr"] >= 20, params["abs_dteff_K"] < 80
    report["snr_ge_20"] = {"recall": float(share[bright].mean()), "within_80K": float(share[bright & central].mean()),
                           "beyond_80K": float(share[bright & ~central].mean())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("n_stars", "star_recall", "snr_ge_20")}), flush=True)
    return report


if __name__ == "__main__":
    main()
