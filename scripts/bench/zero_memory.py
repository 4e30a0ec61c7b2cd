"""ZeRO memory benchmark: the bytes of model state each rank holds (ZeRO-1, -2, -3, FSDP2), and a sizing table.

Measured: a CosmoFM model (the demo recipe's shape at width 384, so that every weight
matrix is above DeepSpeed's stage3_param_persistence_threshold of 1e5 elements and is
partitioned) in 1 process (the plain model, as DDP holds it) and under DeepSpeed ZeRO-1,
ZeRO-2 and ZeRO-3 (fp32 and bf16) and FSDP2 with 2 gloo processes on CPU, each through the
pretraining loop's own Accelerator, `apply` and `prepare`. Each rank takes one whole
optimizer step (so AdamW's state exists), then the forward and backward pass of a second
step, and counts the tensors it holds there, before that step's optimizer update: the point
where parameters, gradients and optimizer state are all alive (under DeepSpeed the engine's
own backward, which reduces and partitions the gradients; Accelerate's backward would also
step and free them); ZeRO-1 is counted at the end of that backward pass, before the engine
reduces its whole gradients into partitions, where it holds what the paper's stage 1 holds.
Each storage is counted once: parameters (its partitions and
DeepSpeed's persistent small parameters), gradients (whole, or DeepSpeed's gradient
partitions) and optimizer state (AdamW's moments, DeepSpeed's fp32 master partitions).
Activations and communication buffers (DeepSpeed's reduce buckets) are not model state and
are left out. The batch holds all four modalities (so that every parameter has a gradient
and AdamW state, as in a real run), except under DeepSpeed, which needs one modality and
holds gradient and state for every parameter whatever the batch.

The sizing table is the ZeRO paper's (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models", section 3 and figure 1): mixed-precision Adam holds
2 bytes of bf16/fp16 weights, 2 of gradients and K = 12 of optimizer state (fp32 master
weights, momentum, variance) per parameter, Psi parameters over N_d data-parallel GPUs:

    stage 0 (DDP) 16 Psi;  stage 1  4 Psi + 12 Psi / N_d;  stage 2  2 Psi + 14 Psi / N_d;  stage 3  16 Psi / N_d.

The measured points are checked against the same formulas with their own bytes per
parameter of weights, gradients and optimizer state (`MEASURED`): fp32 runs hold 4 + 4 + 8
in one process and under FSDP2, and 4 + 4 + 12 under DeepSpeed, which keeps an fp32 master
copy beside fp32 weights; bf16 DeepSpeed runs 2 + 2 + 12, the paper's.
Run: `python -m cosmofm.bench.zero_memory --out docs/bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from cosmofm.data_cards.io.atomic import atomic_write_json

WIDTH, HEADS = 384, 6
BATCH = 8
MIXED = {"sdss-like": 2, "lsst-like": 2, "ska-hi-like": 2, "lightcone-21cm": 2}  # a batch that uses every parameter
SIZES = {"100M": 100e6, "1B": 1e9, "7B": 7e9}
GPUS = (1, 8, 64)
TARGET = 0.55  # ZeRO-3 per-rank model state over the single process's, at 2 ranks


def zero_bytes_per_gpu(params: float, stage: int, gpus: int, k: float = 12.0, weights: float = 2.0, grads: float = 2.0) -> float:
    """Bytes of model state per GPU under ZeRO `stage` (0 = plain data parallel): `weights`,
    `grads` and `k` bytes of optimizer state per parameter (mixed-precision Adam: 2, 2, 12)."""
    weights, grads, optim = weights * params, grads * params, k * params
    if stage == 0:
        return weights + grads + optim
    if stage == 1:
        return weights + grads + optim / gpus
    if stage == 2:
        return weights + (grads + optim) / gpus
    if stage == 3:
        return (weights + grads + optim) / gpus
    raise ValueError(f"ZeRO stage {stage}: use 0 to 3")


def sizing_table(demo_params: float) -> list[dict]:
    """GB of model state per GPU for each model size x GPU count x stage (activations not included)."""
    rows = []
    for name, psi in {"demo": demo_params, **SIZES}.items():
        for gpus in GPUS:
            rows.append({"model": name, "params": psi, "gpus": gpus,
                         **{f"zero{s}_gb": zero_bytes_per_gpu(psi, s, gpus) / 1e9 for s in range(4)}})
    return rows


def _recipe(backend: str, precision: str):
    from cosmofm.pretrain.recipe import PretrainRecipe

    return PretrainRecipe.load("demo", [f"model.hidden_size={WIDTH}", f"model.num_attention_heads={HEADS}", "model.objectives=[masked]",
                                        "data.mock_cards=[sdss-like]", f"data.mock_counts=[{BATCH}]", f"run.backend={backend}",
                                        f"optim.global_batch={BATCH}", "run.trackers=[]", f'run.mixed_precision="{precision}"'])


def _tensors(obj):
    """The tensors in an attribute value: a tensor, or a list / tuple / dict of them."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x) if isinstance(x, (list, tuple)) or torch.is_tensor(x) else ()
    elif isinstance(obj, dict):  # e.g. ZeRO-1/2's averaged_gradients: group -> [partition tensors]
        for x in obj.values():
            yield from _tensors(x) if isinstance(x, (list, tuple)) or torch.is_tensor(x) else ()


def _is_zero(optimizer) -> bool:
    """DeepSpeed's ZeRO optimizer (stage 3, or stages 1-2), which holds the partitions itself."""
    return hasattr(optimizer, "fp32_partitioned_groups_flat") or hasattr(optimizer, "single_partition_of_fp32_groups")


def held_bytes(model, optimizer) -> dict:
    """Bytes of parameters, gradients and optimizer state this rank holds, each storage once.

    DTensors (FSDP2) count their local shard; DeepSpeed ZeRO-3 parameters their partition
    (`ds_tensor`) and, for the small persistent ones, the whole; the DeepSpeed optimizer's own
    tensors by what they are (its fp32 master partitions are optimizer state)."""
    seen, out = set(), {"parameters": 0, "gradients": 0, "optimizer": 0}

    def add(kind, tensor):
        if hasattr(tensor, "to_local"):
            tensor = tensor.to_local()
        storage = tensor.untyped_storage()
        if tensor.numel() == 0 or storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        out[kind] += storage.nbytes()

    params = list(model.parameters())
    for p in params:
        add("parameters", p.ds_tensor if hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False) else p.data)
    raw = optimizer
    while hasattr(raw, "optimizer") and not _is_zero(raw):
        raw = raw.optimizer  # Accelerate's wrapper, then DeepSpeed's ZeRO optimizer or torch's AdamW
    inner = raw.optimizer if _is_zero(raw) else None
    if inner is not None:  # DeepSpeed: classify its tensors by name
        for name, value in vars(raw).items():
            lowered = name.lower()
            kind = ("gradients" if "grad" in lowered and "norm" not in lowered else
                    "optimizer" if "fp32" in lowered else
                    "parameters" if any(k in lowered for k in ("fp16", "bit16", "lp_param", "param", "persistent")) else None)
            if kind is not None:
                for t in _tensors(value):
                    add(kind, t)
        raw = inner
    for p in params:
        if p.grad is not None:
            add("gradients", p.grad)
    for state in raw.state.values():
        for t in state.values():
            if torch.is_tensor(t):
                add("optimizer", t)
    out["total"] = sum(out.values())
    return out


def worker(backend: str, precision: str, out_dir: str) -> None:
    """One rank: build, one optimizer step, then the backward pass of a second; count there,
    write rank<i>.json."""
    from cosmofm.data_cards.mocks.generators import mock_samples
    from cosmofm.data_cards.schema import load_card
    from cosmofm.pretrain import CosmoFMConfig, CosmoFMForPretraining, collate_samples
    from cosmofm.pretrain.backend import apply, autocast, load_backend, prepare, resolve
    from cosmofm.pretrain.train import build_optimizer, make_accelerator

    world = int(os.environ.get("WORLD_SIZE", "1"))
    recipe = _recipe(backend, precision)
    config = resolve(load_backend(backend), recipe, world)
    accelerator = make_accelerator(recipe, config)
    torch.manual_seed(0)
    model = CosmoFMForPretraining(CosmoFMConfig(**recipe.model, survey_names=list(MIXED)))
    n_params = sum(p.numel() for p in model.parameters())
    model = apply(model, config)
    optimizer = build_optimizer(model, recipe)
    model, optimizer = prepare(accelerator, config, model, optimizer)
    # every parameter used, so that every one has a gradient and AdamW state as in a real run;
    # DeepSpeed needs one modality (backend.check_modalities) and holds them all anyway
    cards = {"sdss-like": BATCH} if config.kind == "deepspeed" else MIXED
    samples = [s for card, n in cards.items() for s in mock_samples(load_card(card), n, seed=1)]
    mine = list(range(accelerator.process_index, BATCH, world))
    batch = collate_samples([samples[i] for i in mine], list(MIXED), seeds=mine).to(accelerator.device)
    with autocast(accelerator, config):
        out = model(batch)
    accelerator.backward(out.loss)  # under DeepSpeed also its step (Accelerate's wrapper)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with autocast(accelerator, config):
        out = model(batch)
    unwrapped = accelerator.unwrap_model(model) if config.kind != "fsdp2" else model
    before = {}
    if config.kind == "deepspeed":
        # ZeRO-1 (and ZeRO-2 for the gradients of the last reduce bucket) holds whole gradients
        # until the engine reduces them at the end of its backward: counted there too
        reduce = model.allreduce_gradients

        def counting_reduce(*args, **kwargs):
            before.update(held_bytes(unwrapped, optimizer))
            return reduce(*args, **kwargs)

        model.allreduce_gradients = counting_reduce
        model.backward(out.loss)  # the engine's backward: gradients reduced and partitioned, no step
    else:
        accelerator.backward(out.loss)  # DDP and FSDP2 reduce during the backward pass
    counted = held_bytes(unwrapped, optimizer)
    atomic_write_json(Path(out_dir, f"rank{accelerator.process_index}.json"),
                      {"params": n_params, **counted, "before_reduce": before or counted})
    accelerator.wait_for_everyone()


def _launch(backend: str, precision: str, processes: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        module = ["-m", "cosmofm.bench.zero_memory", "--worker", backend, "--precision", precision, "--out", tmp]
        if processes == 1:
            cmd = [sys.executable, *module]
        else:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *module]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"{backend} {precision} x{processes} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        return [json.loads(Path(tmp, f"rank{i}.json").read_text()) for i in range(processes)]


# Bytes per parameter of the model state each measured layout holds (weights, gradients,
# optimizer state), for the formula check, and its ZeRO stage (0: all whole; 1: optimizer
# state sharded; 2: and gradients; 3: and weights).
FP32_TORCH, FP32_DEEPSPEED, MIXED_ADAM = (4, 4, 8), (4, 4, 12), (2, 2, 12)  # DeepSpeed: + an fp32 master copy
MEASURED = [  # (name, backend, precision, processes, bytes per parameter, ZeRO stage)
    ("single_fp32", "ddp", "no", 1, FP32_TORCH, 0),
    ("single_bf16_autocast", "ddp", "bf16", 1, FP32_TORCH, 0),
    ("fsdp2_fp32", "fsdp2", "no", 2, FP32_TORCH, 3),
    ("zero1_fp32", "zero1", "no", 2, FP32_DEEPSPEED, 1),
    ("zero1_bf16", "zero1", "bf16", 2, MIXED_ADAM, 1),
    ("zero2_fp32", "zero2", "no", 2, FP32_DEEPSPEED, 2),
    ("zero2_bf16", "zero2", "bf16", 2, MIXED_ADAM, 2),
    ("zero3_fp32", "zero3", "no", 2, FP32_DEEPSPEED, 3),
    ("zero3_bf16", "zero3", "bf16", 2, MIXED_ADAM, 3),
]


def run(only: list[str] | None = None) -> dict:
    from cosmofm.bench.pretrain_throughput import machine_info

    result = {"machine": machine_info(), "shape": {"recipe": "demo", "hidden_size": WIDTH, "heads": HEADS, "modality": "spectrum"},
              "measured": {}}
    for name, backend, precision, processes, per_param, stage in MEASURED:
        if only and name not in only:
            continue
        ranks = _launch(backend, precision, processes)
        params = ranks[0]["params"]
        # ZeRO-1 holds its whole gradients until the reduction at the end of the backward pass (the
        # paper's stage-1 state): counted there. ZeRO-2/3 reduce into partitions bucket by bucket;
        # before the last reduction their gradients are views of DeepSpeed's reduce bucket (a
        # communication buffer of reduce_bucket_size elements, not model state): counted after.
        point = "before_reduce" if stage == 1 else "after_backward"
        counts = [r["before_reduce"] if stage == 1 else r for r in ranks]
        worst = max(counts, key=lambda r: r["total"])
        # the formula with this layout's own bytes per parameter (2 + 2 + 12 = 16 in mixed precision)
        w, g, k = per_param
        expected = zero_bytes_per_gpu(params, stage, processes, k=k, weights=w, grads=g)
        result["measured"][name] = {"backend": backend, "precision": precision, "processes": processes, "params": params,
                                    "stage": stage, "bytes_per_param": per_param, "per_rank": ranks, "counted_at": point, "max_rank_bytes": worst["total"],
                                    "formula_bytes": expected, "measured_over_formula": worst["total"] / expected,
                                    # the paper's ratio to one process for this layout's bytes, next to the measured one
                                    "formula_over_single": expected / (sum(FP32_TORCH) * params)}
    m = result["measured"]
    if "single_fp32" in m:
        base = m["single_fp32"]["max_rank_bytes"]
        result["ratios"] = {f"{k}_over_single": v["max_rank_bytes"] / base for k, v in m.items() if v["processes"] > 1}
        result["target"] = {"zero3_over_single": TARGET}
        result["meets_target"] = {k: r <= TARGET for k, r in result["ratios"].items() if k.startswith("zero3")}
        from cosmofm.pretrain import CosmoFMConfig, CosmoFMForPretraining
        from cosmofm.pretrain.recipe import PretrainRecipe

        demo = CosmoFMForPretraining(CosmoFMConfig(**PretrainRecipe.load("demo").model, survey_names=["sdss-like", "lsst-like", "ska-hi-like", "lightcone-21cm"]))
        result["sizing_table"] = sizing_table(sum(p.numel() for p in demo.parameters()))
    return result


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_results")
    p.add_argument("--only", nargs="*", help="measure only these layouts (names in MEASURED)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="no", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        from cosmofm.pretrain.backend import close_process_group

        worker(args.worker, args.precision, args.out)
        close_process_group()  # gloo's threads joined before the interpreter exits (see there)
        return None
    result = run(args.only)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "zero_memory.json"
    atomic_write_json(path, result)
    for name, r in result["measured"].items():
        print(f"{name:22s} {r['max_rank_bytes'] / 1e6:8.1f} MB per rank at {r['counted_at']} (formula {r['formula_bytes'] / 1e6:8.1f} MB, "
              f"x{r['measured_over_formula']:.3f})")
    for k, v in result.get("ratios", {}).items():
        formula = result["measured"][k.removesuffix("_over_single")]["formula_over_single"]
        print(f"{k}: {v:.3f} (formula {formula:.3f})" + (f" (target <= {TARGET})" if k.startswith("zero3") else ""))
    print(f"written: {path}")
    return result


if __name__ == "__main__":
    main()
