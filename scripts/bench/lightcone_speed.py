"""Speed and memory of the embedded 21cm model (issue 18's speed targets).

Three measurements, each lightcone made in a fresh child process (so its peak resident
memory is its own), one thread (OMP / OpenBLAS set to 1 before numpy loads in the child;
numpy's and scipy's FFTs are single-threaded unless asked):

1. A paper-size lightcone: 140 x 140 x 2350 voxels of 200/140 Mpc from z = 5 (to z ~ 25),
   the lightcones of Neutsch et al. 2022 and 21cmPIE-INN (184 MB in float32), spin
   temperature and RSD on. Target: under 2 minutes on one core.
2. The training size of the simulation bank (the shipped `lightcone-21cm` card: 64 Mpc,
   32 x 32 x 1811 slices, z 5-30): seconds per lightcone over a few draws of the card's
   prior, and the time to bank 2,000 of them with the machine's cores (target: 2 hours).
   Each lightcone is also made with the reference filtering (numpy FFTs and the window on the
   full k grid, `reference_smoother`, what the model did before the quarter-grid window and
   scipy's FFT, shared by the excursion set and the heating shells; the velocities then make
   their own scipy transform) in the same run, so the speed-up is a ratio on the same machine load.
3. Optionally (--with-21cmfast, needs the [21cmfast] extra) the same training-size lightcone
   run by 21cmFAST 4.1.1 (`sim21cm.reference.run_21cmfast_lightcone`) for the time ratio.

Run: python -m cosmofm.bench.lightcone_speed --out docs/bench [--with-21cmfast]
Writes lightcone_speed.json. Machine load is recorded: time on a busy machine is longer. Each
lightcone's CPU time (`cpu_seconds`, the child's user + system time) is recorded beside its wall
time: on a shared machine it moves far less with the load than the wall time does.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from pathlib import Path
from queue import Empty

PAPER = {"box_size": 200.0, "n_cells": 140, "n_los": 2350, "z_min": 5.0}
TRAINING_DRAWS = 3
BANK_SIZE, BANK_TARGET_S = 2000, 7200.0


def reference_smoother(field, cell):
    """The direct filter that `density.tophat_smoother` replaces (tests/test_sim21cm_filters.py holds them equal)."""
    import numpy as np

    from cosmofm.data_cards.mocks.sim21cm.cosmology import tophat_window
    from cosmofm.data_cards.mocks.sim21cm.density import k_magnitude

    dk, kmag = np.fft.rfftn(field), k_magnitude(field.shape, cell)

    def smooth(radius, out=None):
        result = np.fft.irfftn(dk * tophat_window(kmag * radius), s=field.shape, axes=(0, 1, 2))
        if out is None:
            return result
        out[...] = result
        return out
    return smooth


def _child(job: dict, queue) -> None:
    os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    import resource

    import numpy as np

    from cosmofm.data_cards.mocks.sim21cm import reionization, spin
    from cosmofm.data_cards.mocks.sim21cm.reionization import lightcone_at_redshifts, lightcone_slices

    if job.get("reference"):
        reionization.tophat_smoother = spin.tophat_smoother = reference_smoother
    t0, c0 = time.perf_counter(), time.process_time()
    if job["kind"] == "paper":
        lc = lightcone_slices({}, PAPER["box_size"], PAPER["n_cells"], PAPER["z_min"], PAPER["n_los"], seed=0)
    elif job["kind"] == "training":
        lc = lightcone_at_redshifts(job["params"], job["box"], job["n_cells"], np.asarray(job["z"]), job["seed"])
    else:
        from cosmofm.data_cards.mocks.sim21cm.reference import run_21cmfast_lightcone

        lc = run_21cmfast_lightcone(job["params"], job["box"], job["n_cells"], np.asarray(job["z"]), job["seed"], n_threads=1)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    queue.put({"seconds": seconds, "cpu_seconds": cpu_seconds, "shape": list(lc.brightness_temp.shape), "mb_float32": lc.brightness_temp.size * 4 / 1e6,
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6})


def timed(job: dict) -> dict:
    """Run one job in a fresh process; its seconds, shape and peak memory."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(job, queue))
    proc.start()
    while True:  # a child that dies (an error, the OOM killer) puts nothing: say so instead of waiting forever
        try:
            out = queue.get(timeout=5.0)
            break
        except Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the {job['kind']} job's process ended with exit code {proc.exitcode} and no result (its traceback is above)")
    proc.join()
    return {**out, "load_average_1min": os.getloadavg()[0]}


def training_jobs() -> list[dict]:
    from cosmofm.data_cards.mocks import fields
    from cosmofm.data_cards.schema import load_card

    card = load_card("lightcone-21cm")
    z, _ = fields.lightcone_grid(card)
    jobs = []
    for r in range(TRAINING_DRAWS):
        params, _ = fields.draw_params(card, 0, r)
        jobs.append({"kind": "training", "params": params.to_dict(), "box": card.box_size.to_value("Mpc"), "n_cells": card.n_cells,
                     "z": z.tolist(), "seed": fields.density_seed(0, r)})
    return jobs


def run(with_21cmfast: bool = False) -> dict:
    from cosmofm.bench.pretrain_throughput import machine_info

    cores = os.cpu_count() or 1
    paper, paper_ref = timed({"kind": "paper"}), timed({"kind": "paper", "reference": True})
    result = {"machine": machine_info(), "paper_size": {**PAPER, **paper, "meets_target": paper["seconds"] < 120.0,
                                                        "reference_filtering": paper_ref,
                                                        "speedup": paper_ref["seconds"] / paper["seconds"]}}
    jobs = training_jobs()
    fast = [timed(j) for j in jobs]
    ref = [timed({**j, "reference": True}) for j in jobs]
    per = sum(r["seconds"] for r in fast) / len(fast)
    bank_s = BANK_SIZE * per / cores
    result["training_size"] = {
        "card": "lightcone-21cm", "shape": fast[0]["shape"], "mb_float32": fast[0]["mb_float32"],
        "seconds_per_lightcone": [r["seconds"] for r in fast], "seconds_reference_filtering": [r["seconds"] for r in ref],
        "speedup": sum(r["seconds"] for r in ref) / sum(r["seconds"] for r in fast),
        "peak_rss_gb": max(r["peak_rss_gb"] for r in fast),
        "bank": {"lightcones": BANK_SIZE, "cores": cores, "estimated_seconds": bank_s, "target_seconds": BANK_TARGET_S,
                 "meets_target": bank_s < BANK_TARGET_S},
    }
    if with_21cmfast:  # the first draw with cold dark matter (21cmFAST 4 has no M_WDM), timed by both simulators
        same = {**jobs[0], "params": {**jobs[0]["params"], "M_WDM": 0.0}}
        ours, theirs = timed(same), timed({**same, "kind": "21cmfast"})
        result["training_size"]["21cmfast"] = {**theirs, "ours_same_parameters": ours,
                                               "time_ratio_21cmfast_over_ours": theirs["seconds"] / ours["seconds"]}
    return result


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_results")
    ap.add_argument("--with-21cmfast", action="store_true", help="also time 21cmFAST 4.1.1 on the training-size lightcone")
    args = ap.parse_args(argv)
    result = run(args.with_21cmfast)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from cosmofm.pretrain.manifest import atomic_write_json

    atomic_write_json(out / "lightcone_speed.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
