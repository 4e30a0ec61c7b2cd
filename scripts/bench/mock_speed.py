"""Mock-generation speed: samples/s per modality and the time to build a corpus.

Measures each modality's generator on its default card in one process (and the cards of
VARIANTS, e.g. the survey-realism spectra), then the
parallel speed-up of `generate(..., workers=N)` on spectra in the same run, and
extrapolates the time for the issue's pretraining corpus (1M spectra, 100k stamps,
10k lightcone chunks) and for the demo corpus. Writes JSON.
Run: `python -m cosmofm.bench.mock_speed --out DIR`.
"""

from __future__ import annotations

import argparse
import os
import time

from cosmofm.bench import write_report
from cosmofm.bench.pretrain_throughput import machine_info
from cosmofm.data_cards.mocks.generators import generate
from cosmofm.data_cards.schema import DEFAULT_CARDS, load_card

CORPUS = {"spectrum": 1_000_000, "image": 100_000, "field": 10_000}
QUICK_N = {"spectrum": 400, "image": 200, "cube": 40, "field": 20}
# other cards of a modality timed beside its default one: (modality, card)
VARIANTS = (("spectrum", "sdss-like-survey"),)


def rate(card_name: str, n: int, workers: int = 1) -> tuple[float, int]:
    """(samples/s, elements per sample) generating n samples with `workers` processes."""
    card = load_card(card_name)
    next(generate(card, 1, seed=123))  # warm caches (imports, cosmology tables)
    t0 = time.perf_counter()
    size = 0
    for sample in generate(card, n, seed=0, workers=workers):
        size = sample.values.size
    return n / (time.perf_counter() - t0), size


def run(scale: float = 1.0) -> dict:
    workers = os.cpu_count() or 1
    result = {"machine": machine_info(), "cpu_count": workers, "per_modality": {}}
    for modality, card in DEFAULT_CARDS.items():
        n = max(4, int(QUICK_N[modality] * scale))
        per_s, size = rate(card, n)
        result["per_modality"][modality] = {"card": card, "samples": n, "samples_per_s_1_process": per_s, "elements_per_sample": size, "elements_per_s": per_s * size}
    result["variants"] = {}
    for modality, card in VARIANTS:
        n = max(4, int(QUICK_N[modality] * scale) // 4)
        per_s, size = rate(card, n)
        result["variants"][card] = {"modality": modality, "samples": n, "samples_per_s_1_process": per_s, "elements_per_s": per_s * size}
    par, _ = rate(DEFAULT_CARDS["spectrum"], max(8, int(QUICK_N["spectrum"] * scale)), workers=workers)
    speedup = par / result["per_modality"]["spectrum"]["samples_per_s_1_process"]
    result["parallel"] = {"workers": workers, "spectra_per_s": par, "speedup": speedup}
    corpus_s = sum(CORPUS[m] / (result["per_modality"][m]["samples_per_s_1_process"] * speedup) for m in CORPUS)
    result["corpus"] = {"counts": CORPUS, "estimated_seconds": corpus_s, "target_seconds": 3600, "meets_target": corpus_s < 3600}
    demo = {"spectrum": 768, "image": 768, "cube": 256, "field": 256}
    demo_s = sum(demo[m] / result["per_modality"][m]["samples_per_s_1_process"] for m in demo)
    result["demo_corpus"] = {"counts": demo, "seconds_1_process": demo_s, "target_seconds": 60, "meets_target": demo_s < 60}
    return result


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_results")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the sample counts (noise vs time)")
    args = p.parse_args(argv)
    result = run(args.scale)
    write_report(args.out, "mock_speed.json", result)
    for m, r in result["per_modality"].items():
        print(f"{m:8s} {r['card']:15s} {r['samples_per_s_1_process']:8.1f} samples/s  {r['elements_per_s'] / 1e6:6.2f} M elements/s")
    print(f"parallel x{result['parallel']['speedup']:.2f} on {result['parallel']['workers']} workers")
    print(f"corpus (1M spectra + 100k stamps + 10k lightcones): {result['corpus']['estimated_seconds'] / 60:.1f} min (target < 60)")
    print(f"demo corpus: {result['demo_corpus']['seconds_1_process']:.1f} s (target < 60)")
    return result


if __name__ == "__main__":
    main()
