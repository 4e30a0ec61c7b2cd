"""Through what a classifier sees Milky-Way dust: flux or inverse variance (issue 17).

    python -m cosmofm.bench.classify_dust_probe --work WORK --models WORK/finetune-dereddened-seed0/model ... --out docs/bench

The survey mocks' reddening shift (`classify_survey`, "reddening x3") observes the test
block's objects again behind three times their E(B-V). Dividing a spectrum by the
generator's own dust (CCM89 and interstellar Na D at the true E(B-V), `stellar.galactic_extinction`)
gives back its flux up to a constant, but not its inverse variance: photon noise was set by
the light that arrived, so ivar x T^2 keeps a 1/T shape. For the F5-K5 stars of the test
block (A0 stars are never in doubt), each model's accuracy on:
  A  the in-distribution spectra with their own dust taken out exactly;
  B  A scaled to the shifted spectra's flux level (a brighter object at the same S/N);
  C  the shifted spectra with their dust taken out exactly;
  D  C's flux with B's ivar;
  E  B's flux with C's ivar.
C against B is what remains of the shift once the dust's colour is gone; D and E say
whether the flux or the ivar carries it. The models see these as given (their own
de-reddening is told the spectrum is done).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cosmofm.bench.pretrain_throughput import machine_info
from cosmofm.data_cards.dust import divided
from cosmofm.data_cards.io.hf_io import SampleDataset
from cosmofm.data_cards.mocks import stellar
from cosmofm.data_cards.sample import Sample

N = 14000  # classify_survey's default labelled block
SHIFT = "reddening x3"  # of classify_survey.SHIFTS


def undusted(s: Sample) -> Sample:
    """`s` divided by the generator's whole Milky-Way dust at its true E(B-V), marked de-reddened."""
    ebv = s.meta["truth"]["params"]["ebv_mw"]
    return divided(s, stellar.galactic_extinction(s.coords["wavelength"], ebv), ebv)


def probe_sets(work: Path, n_stars: int) -> tuple[dict[str, list[Sample]], np.ndarray]:
    """The five sets of the module docstring and the stars' true classes."""
    from cosmofm.bench.classify_survey import CARD, SPLIT, labelled_folder, shift_folder
    from cosmofm.finetune.classification import FinetuneConfig
    from cosmofm.finetune.run import split_indices

    base = SampleDataset(str(labelled_folder(work, CARD, N)))  # read lazily: only the stars probed
    shifted = SampleDataset(str(shift_folder(work, SHIFT, N)))
    test_index = split_indices(N, FinetuneConfig(**SPLIT))["test"]
    pairs = []
    for j, i in enumerate(test_index):
        s = shifted[j]
        cls = s.meta["labels"]["spectral_class"]
        if cls.startswith("STAR_") and cls != "STAR_A0":
            b = base[int(i)]
            assert b.meta["pair_id"] == s.meta["pair_id"], "the shift set is not the test block's objects in order"
            pairs.append((undusted(b), undusted(s)))
        if len(pairs) == n_stars:
            break
    a, c = [p[0] for p in pairs], [p[1] for p in pairs]
    ratio = [float(np.median(y.values[(y.ivar > 0) & (x.ivar > 0)] / x.values[(y.ivar > 0) & (x.ivar > 0)])) for x, y in zip(a, c)]
    b = [Sample(x.modality, x.values * r, x.ivar / r**2, x.coords, dict(x.meta)) for x, r in zip(a, ratio)]
    sets = {"A": a, "B": b, "C": c,
            "D": [Sample(y.modality, y.values, x.ivar, y.coords, dict(y.meta)) for x, y in zip(b, c)],
            "E": [Sample(x.modality, x.values, y.ivar, x.coords, dict(x.meta)) for x, y in zip(b, c)]}
    return sets, np.array([x.meta["labels"]["spectral_class"] for x in a])


def main(argv: Sequence[str] | None = None) -> dict:
    from cosmofm.finetune.classify import load_classifier, predict

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="classify_survey's --work (its labelled block and reddening-shift set)")
    p.add_argument("--models", nargs="+", required=True, help="fine-tuned classifiers (e.g. one per seed)")
    p.add_argument("--stars", type=int, default=500, help="F5-K5 stars of the test block, in order")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--name", default="classify_dust_probe")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sets, truth = probe_sets(Path(args.work), args.stars)
    report = {"machine": machine_info(), "work": args.work, "n_stars": len(truth), "sets": __doc__.split("accuracy on:\n")[1].split("\nC against")[0],
              "models": {}}
    for path in args.models:
        model = load_classifier(path)
        names = np.asarray(model.class_names)
        report["models"][path] = {k: float((names[predict(model, v, batch_size=128)["logits"].argmax(1)] == truth).mean()) for k, v in sets.items()}
        print(path, report["models"][path], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
