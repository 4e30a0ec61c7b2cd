"""Speed and memory of `cosmofm detect` (SoFiA-style finder, tiled) on a ~1 GB survey cube (issue 21).

    python -m cosmofm.bench.detect_speed --out docs/bench            # 512 x 512 x 1024, float32
    python -m cosmofm.bench.detect_speed --size 256 --channels 256   # a quick look

1. The cube is made by `data_cards.mocks.cube_survey.write_large_survey_cube` block of
   channels by block of channels (streamed into the FITS file; the cube is never held
   whole), with its TRUTH table. Skipped when --cube names an existing file.
2. `finetune.detect.detect_cube` runs in a fresh child process (so the numbers are the
   run's own, not the generator's): wall time of the run (`detect_s`: the noise pass over
   the cube, `noise_s`, plus the tiles, `tiles_s`) and of the whole child (imports
   included, `child_wall_s`), voxels / s over the cube's
   voxels, and memory: the largest resident set of one process (getrusage of the
   children: the run's process or one of its forked workers) and the peak of the sum over
   the process tree, sampled every 0.25 s (psutil; shared pages counted in each process,
   so an upper bound).
3. The catalogue is scored against the truth (`heads.sdc2_score`): completeness, purity,
   SDC2 score, so a speed-up that loses sources shows.

CPU time (`cpu_s`, user + system of the child and its workers) beside the wall time: the
load from other jobs stretches the wall time, much less the CPU time.

`--method head --model DIR` runs the detection3d model instead (`HeadFinder`: `--head-block`,
`--prefilter CLIP`, `--bf16`, `--reliability R`: the purity cut from the sign-flipped cube,
default the model's own; `--threads` torch threads per worker); `--name` the report's file.

Targets (issue 21): under 2 minutes and under 3 GB peak RSS on the 2-core CPU. The
machine's load is recorded before and after: other jobs on the cores make it slower.
Writes detect_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cosmofm.bench import write_report

CHILD = """
import json, sys
from cosmofm.finetune.detect import detect_cube
extra = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
summary = detect_cube(sys.argv[1], sys.argv[2], tile=tuple(json.loads(sys.argv[3])), overlap=tuple(json.loads(sys.argv[4])),
                      workers=int(sys.argv[5]), progress=False, **extra)
print("SUMMARY " + json.dumps(summary, default=str))
"""


def run_measured(code: str, args: list[str], interval: float = 0.25) -> dict:
    """Run `python -c code *args` and measure it: {"wall_s", "cpu_s" (user + system CPU
    time of the child and its workers), "peak_rss_tree_mb" (sampled sum
    over the process and its descendants), "peak_rss_one_process_mb" (getrusage of the
    children), "stdout"}. Shared with deblend_memory."""
    import psutil

    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = usage0.ru_maxrss
    t0 = time.perf_counter()
    # the environment as is: OMP_NUM_THREADS=1 would make the run see one core (data_cards.workers.n_workers) and use one worker
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.Error:
                total = 0
            peak[0] = max(peak[0], total)
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the measured run failed ({proc.returncode}):\n{err[-3000:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    one = usage.ru_maxrss  # kB on Linux; the max over all children so far
    cpu = (usage.ru_utime + usage.ru_stime) - (usage0.ru_utime + usage0.ru_stime)  # the run and its reaped workers
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_tree_mb": peak[0] / 2**20, "peak_rss_one_process_mb": max(one, before) / 1024,
            "peak_rss_one_process_is_this_run": one > before, "stdout": out}


def machine() -> dict:
    import platform

    import psutil

    from cosmofm.bench.pretrain_throughput import cpu_model

    return {**cpu_model(), "cpu_count": os.cpu_count(), "memory_gb": psutil.virtual_memory().total / 2**30, "python": platform.python_version(),
            "loadavg": list(os.getloadavg()), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512, help="pixels on a side")
    ap.add_argument("--channels", type=int, default=1024)
    ap.add_argument("--tile", default="256,256,256", help="channels,rows,cols")
    ap.add_argument("--overlap", default="64,24,24")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cube", help="the cube FITS to use (made here when it does not exist; default a temporary file)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/bench")
    ap.add_argument("--method", choices=("sofia", "head"), default="sofia", help="head: the detection3d model --model")
    ap.add_argument("--model", default=None, help="a detection3d model folder (--method head)")
    ap.add_argument("--prefilter", type=float, default=None, help="head: the prefilter's clip level [rms] (finetune.detect.HeadFinder)")
    ap.add_argument("--head-block", default="64,32,32", help="head: the network's block inside each tile ('none': the whole tile)")
    ap.add_argument("--bf16", action="store_true", help="head: bfloat16 autocast")
    ap.add_argument("--reliability", type=float, default=None, help="head: the purity cut from the sign-flipped cube (default: the model's own; 0 = off)")
    ap.add_argument("--threads", type=int, default=1, help="head: torch threads per worker (the parent keeps its own, so --workers stays as given)")
    ap.add_argument("--name", default="detect_speed.json", help="the report's file name in --out")
    args = ap.parse_args(argv)
    if (args.method == "head") != (args.model is not None):
        from cosmofm.data_cards.errors import InputError

        raise InputError("--model", "goes with --method head (and only with it)", "give both, or neither for the SoFiA-style finder")

    from astropy.table import Table

    from cosmofm.data_cards.schema import load_card
    from cosmofm.heads.sdc2_score import read_catalogue, score_catalogue

    report: dict = {"machine_before": machine(), "cube_shape": [args.channels, args.size, args.size], "tile": args.tile, "overlap": args.overlap,
                    "workers": args.workers, "method": args.method}
    extra: dict = {}
    if args.method == "head":
        block = None if args.head_block == "none" else [int(v) for v in args.head_block.split(",")]
        extra = {"model": args.model, "head_block": block, "prefilter": args.prefilter, "bf16": args.bf16, "head_threads": args.threads,
                 "reliability": args.reliability}
        report["head_options"] = dict(extra)
    with tempfile.TemporaryDirectory(prefix="detect_speed.") as tmp:
        cube = Path(args.cube) if args.cube else Path(tmp) / "cube.fits"
        if not cube.exists():
            from cosmofm.data_cards.mocks.cube_survey import write_large_survey_cube

            t0 = time.perf_counter()
            write_large_survey_cube(cube, load_card("ska-hi-like"), args.channels, args.size, seed=args.seed, block_channels=32)
            report["make_cube_s"] = time.perf_counter() - t0
        report["cube_bytes"] = cube.stat().st_size
        catalogue = Path(tmp) / "sources.fits"
        tile = [int(v) for v in args.tile.split(",")]
        overlap = [int(v) for v in args.overlap.split(",")]
        run = run_measured(CHILD, [str(cube), str(catalogue), json.dumps(tile), json.dumps(overlap), str(args.workers), json.dumps(extra)])
        summary = json.loads(next(line for line in run.pop("stdout").splitlines() if line.startswith("SUMMARY "))[8:])
        voxels = args.channels * args.size**2
        total = summary["seconds"] + summary["noise_s"]
        report.update({"detect_s": total, "tiles_s": summary["seconds"], "noise_s": summary["noise_s"], "child_wall_s": run["wall_s"],
                       "voxels": voxels, "voxels_per_s": voxels / total,
                       "n_tiles": summary["n_tiles"], "n_sources": summary["n_sources"], "n_candidates": summary.get("n_candidates"),
                       "reliability_s": summary.get("reliability_s"), "head_stats": summary.get("head_stats"), "merge_s": summary.get("merge_s"),
                       "head_reliability": summary.get("reliability"), **run})
        truth = Table.read(cube, hdu="TRUTH")
        in_cube = truth[(truth["central_freq"] > 0)]
        score = score_catalogue(read_catalogue(catalogue, "catalogue"), in_cube)
        report["score"] = {k: v for k, v in score.as_dict().items() if not isinstance(v, (list, dict))}
        report["n_truth"] = len(in_cube)
    report["machine_after"] = {"loadavg": list(os.getloadavg())}
    report["targets"] = {"seconds": 120, "peak_rss_gb": 3}
    report = write_report(args.out, args.name, report)
    print(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
