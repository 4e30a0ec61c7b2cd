"""Classification throughput: `cosmofm classify` end to end vs the template-fitting baseline.

End to end = read a FITS file of N spectra, tokenize, infer (class probabilities,
conformal sets, redshift), write the FITS catalogue. The baseline is the chi-square
template fitter (heads/template_fit.py) on a subset of the same spectra, in the same
process, so the ratio is robust to machine noise. The model has the shape of a shipped
recipe (`spectra-small`, the benchmark classifier, or `spectra-fast`, its distilled
student); weights do not change the arithmetic. The timed run is repeated after a
warm-up and the median reported, with the spread, since these machines are noisy; a
cold run of the CLI in a fresh process (start-up included) is timed once beforehand.
Target (issue 5): 40,000 spectra in <= 10 s on a 2-core CPU and >= 100x the baseline.
`--redshift scan network` times each redshift method in turn in the same process (one JSON,
`runs` by method); `--redshift-net DIR` puts a trained redshift network (a
heads/redshift_net.py checkpoint) into the timed model, which random weights lack.
Run: `python -m cosmofm.bench.classify_throughput --n 40000 --recipe spectra-fast --out DIR`.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cosmofm.bench import write_report
from cosmofm.bench.pretrain_throughput import machine_info
from cosmofm.data_cards.io.fits_io import read_fits, write_fits
from cosmofm.data_cards.mocks.generators import generate
from cosmofm.data_cards.schema import load_card
from cosmofm.finetune.classification import FinetuneConfig, build_model
from cosmofm.finetune.classify import classify, load_classifier
from cosmofm.heads.redshift_net import RedshiftNetConfig, load_redshift_net
from cosmofm.heads.template_fit import REDSHIFT_METHODS
from cosmofm.heads.template_fit import TemplateFitter
from cosmofm.pretrain.checkpoint import save_release
from cosmofm.pretrain.recipe import PretrainRecipe


def spectra_file(work: Path, n: int, seed: int = 3) -> Path:
    """A FITS file of n sdss-like mocks, written once per (n, seed) under `work`."""
    card = load_card("sdss-like")
    path = work / f"{card.name}-{n}-seed{seed}.fits"
    if not path.exists():
        work.mkdir(parents=True, exist_ok=True)
        write_fits(list(generate(card, n, seed=seed, workers=2)), path, card)
    return path


def on_card_grid(net, card):
    """`net` with the card's own pixel grid (`RedshiftNetConfig.for_card`) when it has the card's
    pixel count: the benchmark networks (scripts/bench/redshift_net.py) learned from arrays of
    sdss-like-survey mocks, which share this card's grid, under the nominal step of 1e-4 dex;
    on the card's exact grid, `spectra_on_grid` copies the spectra instead of resampling each."""
    grid = RedshiftNetConfig.for_card(card)
    if net.cfg.n_pixels == grid.n_pixels:
        net.cfg.log_lambda_start, net.cfg.log_lambda_step = grid.log_lambda_start, grid.log_lambda_step
    return net


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads, and of its finished children
    (`classify`'s worker processes, counted once they are joined at the end of a run)."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def run(n: int, n_baseline: int = 20, batch_size: int = 256, recipe: str = "spectra-small", overrides: list[str] = (),
        repeats: int = 3, work: Path | None = None, model: str | None = None, redshift: str | None = None, redshift_net: str | None = None) -> dict:
    """`model`: a trained classifier to time (e.g. classify_quality's distilled student);
    without it, random weights in the recipe's shape. Weights change no arithmetic of the
    network, but the default redshift scan costs more for a QSO than for a star, so only a
    trained model's classes give its true share of the time. `redshift_net`: a redshift
    network checkpoint (heads.redshift_net.save_redshift_net) carried by the timed model."""
    card = load_card("sdss-like")
    trained = model
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spectra = spectra_file(Path(work) if work else tmp, n)
        if model is None or redshift_net:
            built = (load_classifier(model) if model else
                     build_model(card, FinetuneConfig(), backbone_config=dict(PretrainRecipe.load(recipe, [f"model.{o}" for o in overrides]).model, survey_names=[card.name])))
            if redshift_net:
                built.set_redshift_net(on_card_grid(load_redshift_net(redshift_net), card))
            save_release(built, tmp / "model")
            model = str(tmp / "model")
        # cold: `cosmofm classify` as a user runs it, in a fresh process (interpreter, imports,
        # model load, redshift templates); then the first run in this process (model load,
        # templates), which is also the warm-up of the timed runs
        command = [sys.executable, "-m", "cosmofm", "classify", str(spectra), "--model", model, "--output", str(tmp / "cold.fits"), "--batch-size", str(batch_size)]
        t0 = time.perf_counter()
        subprocess.run(command + (["--redshift", redshift] if redshift else []), check=True, capture_output=True)
        cold_cli = time.perf_counter() - t0
        t0 = time.perf_counter()
        classify([str(spectra)], model, tmp / "warm.fits", batch_size=batch_size, progress=False, redshift=redshift)
        first_in_process = time.perf_counter() - t0
        seconds, cpu_seconds = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), _cpu_seconds()
            classify([str(spectra)], model, tmp / "out.fits", batch_size=batch_size, progress=False, redshift=redshift, overwrite=True)
            seconds.append(time.perf_counter() - t0)
            cpu_seconds.append(_cpu_seconds() - c0)
        subset = read_fits(spectra, rows=slice(0, n_baseline))
    fitter = TemplateFitter()
    t0 = time.perf_counter()
    for s in subset:
        fitter.fit(s.coords["wavelength"], s.values, s.ivar)
    baseline_per_s = n_baseline / (time.perf_counter() - t0)
    load_end = os.getloadavg()
    median = statistics.median(seconds)
    per_s = n / median
    return {
        "machine": machine_info(), "n_spectra": n, "seconds_end_to_end": median, "seconds_cold_cli": cold_cli, "seconds_first_in_process": first_in_process, "seconds_all_repeats": seconds, "cpu_seconds_all_repeats": cpu_seconds, "spectra_per_s": per_s,
        "seconds_for_40000": 40000 / per_s, "template_fit_spectra_per_s": baseline_per_s,
        "ratio_vs_template_fit": per_s / baseline_per_s, "torch_threads": torch.get_num_threads(),
        "recipe": recipe, "model_overrides": list(overrides), "model": trained,
        "redshift": redshift or "default", "redshift_net": redshift_net, "batch_size": batch_size, "load_average_end": load_end,
        "targets": {"seconds_for_40000": 10.0, "ratio_vs_template_fit": 100.0},
    }


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--out", default="bench_results")
    p.add_argument("--recipe", default="spectra-small", help="shipped recipe whose model shape is timed (spectra-small, spectra-fast)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model setting of the recipe to change, e.g. spectrum_stem_stride=4")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up; the median is reported")
    p.add_argument("--work", default=None, help="folder caching the spectra file between runs (default: a temporary one)")
    p.add_argument("--name", default="classify_throughput", help="JSON file name (without .json)")
    p.add_argument("--model", default=None, help="a trained classification model to time instead of random weights in the recipe's shape")
    p.add_argument("--redshift", choices=REDSHIFT_METHODS, nargs="+", default=[None], help="as `cosmofm classify --redshift`; several: each in turn, same process")
    p.add_argument("--redshift-net", default=None, help="a redshift network checkpoint folder to put into the timed model")
    args = p.parse_args(argv)
    runs = {}
    for method in args.redshift:
        result = runs[method or "default"] = run(args.n, recipe=args.recipe, overrides=args.set, repeats=args.repeats, work=args.work, model=args.model,
                                                 redshift=method, redshift_net=args.redshift_net)
        spread = ", ".join(f"{s:.1f} ({c:.0f} s CPU)" for s, c in zip(result["seconds_all_repeats"], result["cpu_seconds_all_repeats"]))
        print(f"[{result['redshift']}] {result['spectra_per_s']:.0f} spectra/s end to end -> 40,000 in {result['seconds_for_40000']:.1f} s (target <= 10 s; runs: {spread} s)")
        print(f"template fitting: {result['template_fit_spectra_per_s']:.2f} spectra/s; ratio {result['ratio_vs_template_fit']:.0f}x (target >= 100x)")
        print(f"cold `cosmofm classify` (fresh process): {result['seconds_cold_cli']:.1f} s; first run in this process: {result['seconds_first_in_process']:.1f} s")
    result = result if len(runs) == 1 else {"machine": result["machine"], "runs": runs}
    write_report(args.out, f"{args.name}.json", result)
    return result


if __name__ == "__main__":
    main()
