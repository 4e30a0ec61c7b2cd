"""Paper sizing for 3D source finding (issue 21): the full SKA SDC2 cube on N GPUs.

From the detection head's measured cost per 64 x 32 x 32 block to the time for the whole
SDC2 challenge cube (Hartley et al. 2023, arXiv:2303.07943; sdc2.skao.int: 20 deg^2 at
2.8 arcsec pixels, 950-1150 MHz in 30 kHz channels = 6,668 channels; the 1 deg^2
development cube is 1286 x 1286 x 6668 voxels, so the full one is ~5,751^2 x 6,668 =
2.2e11 voxels, ~0.88 TB in float32: "around 1 TB").

What is measured here, in one process: the model FLOPs of one block's forward
(`torch.utils.flop_counter.FlopCounterMode`: matrix products and convolutions, the counter
pretraining's MFU uses, `pretrain/observe.py`), and the seconds per block on this CPU in
float32 and under bfloat16 autocast (`Detection3DTask.find_in_tile`, the path
`cosmofm detect --head-block` runs per block). A block's core (what it contributes once the
overlap is discounted) is (64 - 16) x (32 - 8) x (32 - 8) voxels, so
FLOPs per cube voxel = FLOPs per block / core voxels; the prefilter (`--prefilter 5`) runs
only a share of the blocks (58 % on the dense test cubes, 6.4 % on the sparse 1 GB cube:
docs/benchmarks.md), given here as a range.

GPU time = cube voxels x FLOPs per voxel x share of blocks run / (GPUs x peak x MFU), with the
H100 SXM bf16 dense peak (989.4 TFLOP/s, the figure docs/scale.md uses) and an MFU range
stated as an assumption (a small 3D network is launch-bound; no GPU was lent to measure it).
What stays on the host CPU of a GPU node (reading the tiles, the noise pass, the prefilter,
decoding and merging) is costed from the measured idle run on the 1 GB cube
(`--speed-json`, written by `detect_speed --method head`): its CPU seconds minus those of its
network, per voxel, spread over `--host-cores` per 8-GPU node. And a read floor: the cube's
bytes over a stated read bandwidth per node. The time per configuration is the largest of
the three (they overlap in a pipelined run).

    python -m cosmofm.bench.detect_sizing --out docs/bench
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from cosmofm.bench.pretrain_throughput import machine_info
from cosmofm.data_cards.io.atomic import atomic_write_bytes

SDC2_VOXELS = (6668, 5751, 5751)  # channels, rows, columns: 20 deg^2 at 2.8 arcsec, 950-1150 MHz / 30 kHz
H100_BF16_PEAK = 989.4e12  # FLOP/s, dense (docs/scale.md)
MFU_RANGE = (0.10, 0.40)  # assumed for a small 3D network in bf16 (not measured: no GPU here)
BLOCKS_RUN = {"dense cubes (10^4 galaxies / deg^2)": 0.58, "every block": 1.0}  # measured shares (docs/benchmarks.md)
READ_GB_PER_S = 2.0  # per node, a parallel file system read (assumption, stated in the table)
HOST_CORES = 64  # host CPU cores per 8-GPU node given to the tile pipeline (assumption; a DGX H100 has 112)
GPUS = (8, 64)


def one_block(block=(64, 32, 32), seed: int = 0):
    """A held-out survey cube's first block (values, ivar, header) of the ska-hi-like card."""
    from cosmofm.data_cards.mocks.cube_survey import mock_survey_cube
    from cosmofm.data_cards.schema import load_card
    from cosmofm.heads.detection3d_data import tile_header

    card = load_card("ska-hi-like")
    cube, header, _ = mock_survey_cube(card, block[0], (block[1], block[2]), density=1e4, seed=seed, log_mhi_min=9.5,
                                       frequency_start=1050e6, as_sample=False)
    values = np.asarray(cube, dtype=np.float32)
    ivar = np.full_like(values, 1.0 / float(card.noise_per_channel) ** 2)
    return card, values, ivar, tile_header(header, 0, 0, 0, values.shape)


def fresh_model(card, recipe: str = "demo"):
    """The head on a fresh backbone of `recipe`'s shape (FLOPs and speed do not depend on the weights)."""
    from cosmofm.finetune.run import build_task_model
    from cosmofm.heads.detection3d import Detection3DHeadConfig
    from cosmofm.pretrain.recipe import PretrainRecipe

    head = Detection3DHeadConfig.from_card(card)
    return build_task_model("detection3d", head, 0, None, {**PretrainRecipe.load(recipe).model, "survey_names": [card.name]}).eval()


def block_cost(model, values, ivar, header, repeats: int) -> dict:
    """FLOPs of one block's forward and its median seconds in float32 and bf16 autocast."""
    from torch.utils.flop_counter import FlopCounterMode

    from cosmofm.heads.detection3d import Detection3DTask
    from cosmofm.pretrain.observe import median_seconds

    task = Detection3DTask(model.head_config)
    counter = FlopCounterMode(display=False)
    with counter:
        task.find_in_tile(model, values, ivar, header)
    out = {"flops_per_block": float(counter.get_total_flops())}
    for name, bf16 in (("float32", False), ("bf16", True)):
        out[f"seconds_per_block_{name}"] = median_seconds(lambda: task.find_in_tile(model, values, ivar, header, bf16=bf16), repeats)
    return out


def host_voxels_per_cpu_s(speed_json: Path) -> float:
    """Voxels per CPU-second of everything but the network, from a measured `detect_speed --method head` run."""
    run = json.loads(Path(speed_json).read_text())
    return run["voxels"] / (run["cpu_s"] - run["head_stats"]["seconds_network"])


def sizing(flops_per_voxel: float, host_rate: float, read_gb_per_s: float = READ_GB_PER_S, host_cores: int = HOST_CORES) -> list[dict]:
    """Rows of the GPU table: GPUs x share of blocks run -> seconds for the SDC2 cube: the network on
    the GPUs at each MFU of the range, the host pipeline, the read floor, and the largest of them."""
    voxels = float(np.prod(SDC2_VOXELS))
    rows = []
    for share_name, share in BLOCKS_RUN.items():
        for gpus in GPUS:
            nodes = max(1, gpus // 8)
            row = {"blocks_run": share_name, "gpus": gpus, "read_floor_s": voxels * 4 / (read_gb_per_s * 1e9) / nodes,
                   "host_pipeline_s": voxels / host_rate / (host_cores * nodes)}
            for mfu in MFU_RANGE:
                row[f"network_s_mfu_{int(mfu * 100)}"] = voxels * flops_per_voxel * share / (gpus * H100_BF16_PEAK * mfu)
            row["total_s"] = max(row["read_floor_s"], row["host_pipeline_s"], row[f"network_s_mfu_{int(MFU_RANGE[0] * 100)}"])
            rows.append(row)
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per precision (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the CPU timing")
    p.add_argument("--overlap", type=int, nargs=3, default=[16, 8, 8], help="the block overlap of cosmofm detect --head-block")
    p.add_argument("--speed-json", default="docs/bench/detect_speed_head_idle.json", help="a measured idle detect_speed --method head run")
    p.add_argument("--host-cores", type=int, default=HOST_CORES, help="host CPU cores per 8-GPU node for the tile pipeline")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    card, values, ivar, header = one_block()
    model = fresh_model(card)
    cost = block_cost(model, values, ivar, header, args.repeats)
    core = int(np.prod([b - o for b, o in zip(values.shape, args.overlap)]))
    flops_per_voxel = cost["flops_per_block"] / core
    voxels = float(np.prod(SDC2_VOXELS))
    cpu = {name: core / cost[f"seconds_per_block_{name}"] for name in ("float32", "bf16")}  # voxels/s per thread, every block run
    host_rate = host_voxels_per_cpu_s(args.speed_json)
    result = {
        "machine": machine_info(), "load_average": list(os.getloadavg()), "block": list(values.shape),
        "overlap": args.overlap, "core_voxels_per_block": core, **cost, "flops_per_voxel": flops_per_voxel,
        "cpu_voxels_per_s_per_thread": cpu,
        "sdc2_voxels": list(SDC2_VOXELS), "sdc2_total_voxels": voxels, "sdc2_bytes_float32": voxels * 4,
        "sdc2_flops_every_block": voxels * flops_per_voxel,
        "cpu_core_hours_every_block_bf16": voxels / cpu["bf16"] / 3600,
        "host_voxels_per_cpu_s": host_rate, "speed_json": str(args.speed_json),
        "assumptions": {"h100_bf16_peak_flops": H100_BF16_PEAK, "mfu_range": list(MFU_RANGE), "read_gb_per_s_per_node": READ_GB_PER_S,
                        "host_cores_per_node": args.host_cores, "blocks_run": BLOCKS_RUN},
        "gpu_rows": sizing(flops_per_voxel, host_rate, host_cores=args.host_cores),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "detect_sizing.json", json.dumps(result, indent=2).encode())
    print(f"{cost['flops_per_block'] / 1e9:.2f} GFLOP per block, {flops_per_voxel / 1e3:.1f} kFLOP per cube voxel; "
          f"SDC2 cube {voxels:.3g} voxels = {voxels * flops_per_voxel:.3g} FLOP with every block run")
    print(f"CPU, one thread: {cpu['float32']:.3g} voxels/s float32, {cpu['bf16']:.3g} bf16 "
          f"-> {result['cpu_core_hours_every_block_bf16']:.0f} core-hours for the SDC2 cube (every block, bf16)")
    print(f"host pipeline (all but the network): {host_rate:.3g} voxels per CPU-second ({args.speed_json})")
    for row in result["gpu_rows"]:
        print(f"{row['blocks_run']:>38} {row['gpus']:>3} GPUs: network {row['network_s_mfu_40']:6.1f}-{row['network_s_mfu_10']:6.1f} s "
              f"(MFU 40-10 %), host pipeline {row['host_pipeline_s'] / 60:5.1f} min, read floor {row['read_floor_s'] / 60:4.1f} min "
              f"-> {row['total_s'] / 60:5.1f} min")
    return result


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"{time.perf_counter() - t0:.0f} s")
