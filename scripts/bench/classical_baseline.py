"""Benchmark of the classical spectral classifier (heads/classical_classifier.py, issue 17).

On `sdss-like-survey` mocks (default 2,000, seed 11: off the training seeds) it reports
accuracy, macro and per-class recall, and per family (by true class) the redshift
catastrophic fraction (|dz|/(1+z) > 0.0033) and NMAD of the classifier's redshift, and
spectra per second; on basic `sdss-like` mocks (default 1,000, seed 11) the per-class
recall of the classical classifier beside the old TemplateFitter (heads/template_fit.py).
Writes JSON with the machine (CPU model) to --out.

    OMP_NUM_THREADS=1 python -m cosmofm.bench.classical_baseline --out bench_results/classical_baseline.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from cosmofm.bench import write_report
from cosmofm.bench.pretrain_throughput import machine_info
from cosmofm.data_cards.mocks.generators import generate
from cosmofm.data_cards.mocks.spectra import CLASSES
from cosmofm.data_cards.schema import load_card
from cosmofm.heads.classical_classifier import classify_samples
from cosmofm.heads.metrics import classification_metrics, redshift_metrics
from cosmofm.heads.template_fit import TemplateFitter, class_family


def scores(true_classes, pred_classes, z_true, z_pred) -> dict:
    """Accuracy, recalls and per-family redshift metrics of predicted classes and redshifts."""
    names = list(CLASSES)
    labels = np.array([names.index(c) for c in true_classes])
    onehot = np.eye(len(names))[[names.index(c) for c in pred_classes]]
    m = classification_metrics(onehot, labels, names)
    families = np.array([class_family(c) for c in true_classes])
    per_family = {f: {**redshift_metrics(z_true[families == f], z_pred[families == f]), "n": int(np.sum(families == f))}
                  for f in ("STAR", "GALAXY", "QSO") if np.any(families == f)}
    return {"accuracy": m["accuracy"], "macro_recall": m["macro_recall"], "per_class_recall": m["per_class_recall"],
            "redshift_by_true_family": per_family, "confusion": m["confusion"].tolist(), "class_names": names}


def run_card(card: str, n: int, seed: int, workers: int, old_fitter: bool, extra_star_degrees: tuple[int, ...] = ()) -> dict:
    """Mocks of `card`, classified by the classical classifier (and, with `extra_star_degrees`,
    again with those multiplicative star-polynomial degrees; with `old_fitter`, by TemplateFitter)."""
    t0 = time.perf_counter()
    samples = list(generate(load_card(card), n, seed=seed))
    t_mock = time.perf_counter() - t0
    true = [s.meta["labels"]["spectral_class"] for s in samples]
    z_true = np.array([s.meta["labels"]["redshift"] for s in samples], float)
    res = classify_samples(samples, workers=workers, progress=True)
    out = {"card": card, "n": n, "seed": seed, "workers": workers, "mock_seconds": t_mock, "spectra_per_s": res["spectra_per_s"],
           "spectra_per_cpu_s": res["spectra_per_cpu_s"], "classical": scores(true, res["classes"], z_true, res["z"])}
    for degree in extra_star_degrees:
        again = classify_samples(samples, workers=workers, progress=False, star_poly_degree=degree)
        out[f"classical_star_poly_degree_{degree}"] = scores(true, again["classes"], z_true, again["z"])
    if old_fitter:
        fitter = TemplateFitter()
        t0 = time.perf_counter()
        c0 = time.process_time()
        fits = [fitter.fit(s.coords["wavelength"], s.values, s.ivar) for s in samples]
        out["template_fit_spectra_per_s"] = n / (time.perf_counter() - t0)
        out["template_fit_spectra_per_cpu_s"] = n / (time.process_time() - c0)
        out["template_fit"] = scores(true, [f.spectral_class for f in fits], z_true, np.array([f.z for f in fits]))
    return out


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_results/classical_baseline.json")
    p.add_argument("--n-survey", type=int, default=2000)
    p.add_argument("--n-basic", type=int, default=1000)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    report = {"machine": machine_info(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "survey": run_card("sdss-like-survey", args.n_survey, args.seed, args.workers, old_fitter=False)}
    if args.n_basic > 0:
        # the basic card has no flux-calibration error: a user would lower the stars' polynomial degree there
        report["basic"] = run_card("sdss-like", args.n_basic, args.seed, args.workers, old_fitter=True, extra_star_degrees=(1,))
    out = Path(args.out)
    write_report(out.parent, out.name, report)
    s = report["survey"]["classical"]
    print(f"survey: accuracy {s['accuracy']:.3f}, macro recall {s['macro_recall']:.3f}, {report['survey']['spectra_per_s']:.1f} spectra/s "
          f"({report['survey']['spectra_per_cpu_s']:.1f} per CPU-second)")


if __name__ == "__main__":
    main()
