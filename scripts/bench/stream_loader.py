"""Streaming loader benchmark: throughput against training, and memory as the corpus grows.

Two figures (issue 19, "Data at scale"):
  - loader_ratio: samples/s of the streaming loader (pretrain/streaming.py: datasets
    IterableDataset, weighted mixture, shuffle buffer, collated batches) over the demo
    corpus / samples/s of a training step of the demo model (the demo recipe's width,
    depth, objectives and global batch), both measured in this process; target >= 5.
  - peak RSS of a fresh process streaming one epoch of the demo corpus at 1x and at 10x
    rows (10 hard links to the 1x shard in a temporary dataset folder, so the same rows
    repeat); target: flat. The map-style path (memory-mapped `SampleDataset`, read once
    in order) is measured the same way for contrast: its touched pages count in RSS.
Run: `python -m cosmofm.bench.stream_loader [--corpus DIR] [--out docs/bench]`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TARGETS = {"loader_ratio": 5.0, "rss_10x_over_1x": 1.1}


def demo_recipe(work: Path, corpus: Path | None, extra: list[str] = ()):
    from cosmofm.pretrain.recipe import PretrainRecipe

    overrides = [f"run.output_dir={work}", "data.streaming=true", *extra]
    if corpus is not None:  # the mock corpus, stored in pairing blocks of 2 (corpus.PAIR_BLOCK)
        overrides += [f"data.datasets=[{corpus}]", "data.pair_block=2"]
    return PretrainRecipe.load("demo", overrides)


def demo_corpus(work: Path, corpus: Path | None) -> Path:
    """The demo's mock corpus (generated into `work` unless given)."""
    from cosmofm.pretrain.corpus import ensure_mock_corpus

    return corpus if corpus is not None else ensure_mock_corpus(demo_recipe(work, None).data, work)


def training_samples_per_s(recipe, batches: list, survey_names: list[str], steps: int = 6) -> float:
    """Samples/s of a demo-size training step (forward, backward, AdamW), median of `steps`."""
    from cosmofm.pretrain import CosmoFMConfig, CosmoFMForPretraining
    from cosmofm.pretrain.train import build_optimizer

    torch.manual_seed(0)
    model = CosmoFMForPretraining(CosmoFMConfig(survey_names=survey_names, **recipe.model)).train()
    opt = build_optimizer(model, recipe)
    times = []
    for batch in itertools.islice(itertools.cycle(batches), steps + 2):
        t0 = time.perf_counter()
        model(batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return len(batches[0]) / statistics.median(times[2:])  # the first two warm up


def stream_samples_per_s(plan, recipe, num_workers: int, batches: int) -> tuple[float, float, list]:
    """(samples/s after the first batch, seconds to the first batch, a few batches) of the streaming loader."""
    from cosmofm.pretrain.streaming import streaming_loader

    recipe.data.num_workers = num_workers
    t0 = time.perf_counter()
    it = iter(streaming_loader(plan, recipe, 0, 1, 0, plan.cards))
    kept = [next(it)]
    first = time.perf_counter() - t0
    t1, n = time.perf_counter(), 0
    for batch in itertools.islice(it, batches):
        n += len(batch)
        if len(kept) < 4:
            kept.append(batch)
    return n / (time.perf_counter() - t1), first, kept


def scaled_corpus(corpus: Path, factor: int, folder: Path) -> Path:
    """A dataset folder of `factor` hard links (copies where links fail) to the corpus's shards."""
    state = json.loads((corpus / "state.json").read_text())
    files = [corpus / f["filename"] for f in state["_data_files"]]
    folder.mkdir(parents=True)
    names = []
    for k, f in enumerate(files * factor):
        name = f"data-{k:05d}-of-{len(files) * factor:05d}.arrow"
        try:
            os.link(f, folder / name)
        except OSError:
            shutil.copyfile(f, folder / name)
        names.append({"filename": name})
    for extra in ("dataset_info.json",):
        shutil.copyfile(corpus / extra, folder / extra)
    (folder / "state.json").write_text(json.dumps({**state, "_data_files": names}))
    return folder


def rss_child(corpus: str, mode: str) -> dict:
    """Runs in a fresh process: stream (or read map-style) one epoch; peak RSS and rows."""
    import numpy as np

    work = Path(tempfile.mkdtemp(prefix="stream-rss-"))
    t0 = time.perf_counter()
    n = 0
    if mode == "stream":
        from cosmofm.pretrain.streaming import build_plan, streaming_loader

        recipe = demo_recipe(work, Path(corpus))
        plan = build_plan(recipe.data, work)
        total = sum(plan.blocks(p) for p in plan.parts) * plan.pair_block
        for batch in streaming_loader(plan, recipe, 0, 1, 0, plan.cards):
            n += len(batch)
            if n >= total:
                break
    else:
        from cosmofm.data_cards.io.hf_io import SampleDataset
        from cosmofm.pretrain.data import collate_samples

        ds = SampleDataset(corpus)
        total = len(ds)
        for start in range(0, total, 32):
            batch = collate_samples([ds[i] for i in range(start, min(start + 32, total))], ds.cards)
            n += len(batch)
            np.asarray(batch.groups[0].values).sum()
    shutil.rmtree(work, ignore_errors=True)
    return {"rows": n, "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident set (`observe.peak_memory_bytes`: VmHWM, since Linux
    carries getrusage's ru_maxrss over fork and exec)."""
    from cosmofm.pretrain.observe import peak_memory_bytes

    return round(peak_memory_bytes(torch.device("cpu"))[0] / 2**20, 1)


# glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after
# which the streamed blocks (0.1-1 MB each, allocated and freed at a high rate) come from
# the heap and fragment it: RSS then creeps up over the first epochs before it levels
# off. A fixed threshold turns that off; we measure both.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _peak_rss(corpus: Path, mode: str, env: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **(env or {}))
    done = subprocess.run([sys.executable, "-m", "cosmofm.bench.stream_loader", "--rss-child", str(corpus), mode],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(corpus: Path | None = None, batches: int = 48, workers: tuple[int, ...] = (0, 2)) -> dict:
    from cosmofm.bench.pretrain_throughput import machine_info
    from cosmofm.pretrain.streaming import build_plan

    work = Path(tempfile.mkdtemp(prefix="stream-bench-"))
    try:
        corpus = demo_corpus(work, corpus)
        recipe = demo_recipe(work, corpus)
        t0 = time.perf_counter()
        plan = build_plan(recipe.data, work)
        result = {"machine": machine_info(), "corpus": {"path": str(corpus), "rows": sum(plan.blocks(p) for p in plan.parts) * plan.pair_block,
                                                         "parts": {p: plan.blocks(p) for p in plan.parts}, "plan_seconds": round(time.perf_counter() - t0, 2)},
                  "recipe": {"global_batch": recipe.optim.global_batch, "shuffle_buffer": recipe.data.shuffle_buffer, "piece_rows": recipe.data.piece_rows,
                             "model": recipe.model}, "loader": {}}
        kept = None
        for w in workers:
            rate, first, some = stream_samples_per_s(plan, recipe, w, batches)
            result["loader"][f"workers_{w}"] = {"samples_per_s": round(rate, 1), "first_batch_s": round(first, 2)}
            kept = kept or some
        train = training_samples_per_s(recipe, kept, plan.cards)
        result["training_samples_per_s"] = round(train, 1)
        for w in workers:
            result["loader"][f"workers_{w}"]["ratio_to_training"] = round(result["loader"][f"workers_{w}"]["samples_per_s"] / train, 2)
        result["loader_ratio"] = result["loader"][f"workers_{workers[0]}"]["ratio_to_training"]  # the demo's own setting (no workers)
        big = scaled_corpus(corpus, 10, work / "corpus-10x")
        sizes = ((1, corpus), (10, big))
        result["rss"] = {f"{mode}_{k}x": _peak_rss(c, mode) for mode in ("stream", "map") for k, c in sizes}
        result["rss"].update({f"stream_{k}x_fixed_mmap_threshold": _peak_rss(c, "stream", FIXED_MMAP_THRESHOLD) for k, c in sizes})
        rss = result["rss"]
        result["rss_10x_over_1x"] = round(rss["stream_10x"]["peak_rss_mb"] / rss["stream_1x"]["peak_rss_mb"], 3)
        result["rss_10x_over_1x_fixed_mmap_threshold"] = round(rss["stream_10x_fixed_mmap_threshold"]["peak_rss_mb"] / rss["stream_1x_fixed_mmap_threshold"]["peak_rss_mb"], 3)
        result["targets"] = TARGETS
        result["meets"] = {"loader_ratio": result["loader_ratio"] >= TARGETS["loader_ratio"], "rss_flat": result["rss_10x_over_1x"] <= TARGETS["rss_10x_over_1x"],
                            "rss_flat_fixed_mmap_threshold": result["rss_10x_over_1x_fixed_mmap_threshold"] <= TARGETS["rss_10x_over_1x"]}
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, help="the demo corpus folder, if already written (else generated in a temp folder)")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    parser.add_argument("--batches", type=int, default=48)
    parser.add_argument("--rss-child", nargs=2, metavar=("CORPUS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(*args.rss_child)))
        return
    result = run(args.corpus, args.batches)
    from cosmofm.pretrain.manifest import atomic_write_json

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "stream_loader.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
