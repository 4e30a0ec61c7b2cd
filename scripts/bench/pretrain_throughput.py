"""Pretraining throughput benchmark: CPU "MFU", plain-encoder ratio, loader ratio.

All figures are ratios against baselines measured in the same process, because these
machines are noisy:
  - mfu: backbone training FLOP/s / FLOP/s of a large square matmul in the same dtype;
  - vs_plain_encoder: backbone training FLOP/s / FLOP/s of a `torch.nn.TransformerEncoder`
    training step of the same width, depth and tokens per sample;
  - loader_ratio: DataLoader samples/s (memory-mapped Arrow -> Sample -> batch) /
    training samples/s.
FLOPs follow the usual 6 x (matmul parameters) per token plus attention
(12 x layers x width x tokens), PaLM (Chowdhery et al. 2022) appendix B.
Run: `cosmofm bench` or `python -m cosmofm.bench.pretrain_throughput --out DIR`.

Two more modes:
  - `--backends ddp fsdp2 zero2 zero3`: the CPU MFU of the pretraining loop itself under each
    backend, 2 processes (gloo) and 1 for DDP, as the loop's observe.jsonl reports it
    (pretrain/observe.py: model FLOPs from the config over the matmul peak measured in each
    process), at the demo recipe's shape on spectra (DeepSpeed needs one modality);
  - `--sizing`: the model FLOPs per sample of each modality at the demo recipe's shapes, for
    the demo model and a 100M-parameter one, checked against torch's FlopCounterMode, and the
    time to pretrain on a paper-size corpus on H100s (docs/scale.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from cosmofm.bench import write_report
from cosmofm.pretrain.observe import matmul_peak_flops as matmul_flops  # the loop's MFU divides by the same peak
from cosmofm.pretrain.observe import median_seconds as _time

WIDTH, DEPTH, HEADS, TOKENS, BATCH = 256, 4, 4, 256, 16
TARGETS = {"mfu_bf16": 0.5, "vs_plain_encoder_bf16": 0.9, "loader_ratio": 5.0}




def _autocast(dtype: torch.dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, loss_fn, dtype: torch.dtype):
    def step():
        with _autocast(dtype):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _flops_per_token(dense_params: int, tokens: int) -> float:
    return 6 * dense_params + 12 * DEPTH * WIDTH * tokens


def plain_encoder_flops(dtype: torch.dtype, repeats: int) -> float:
    layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 4 * WIDTH, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
    model = nn.TransformerEncoder(layer, DEPTH, enable_nested_tensor=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(BATCH, TOKENS, WIDTH)
    dense = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    seconds = _time(_train_step(model, opt, lambda: model(x).float().square().mean(), dtype), repeats)
    return BATCH * TOKENS * _flops_per_token(dense, TOKENS) / seconds


def _bench_model_and_batch():
    from cosmofm.data_cards.mocks.generators import mock_samples
    from cosmofm.data_cards.schema import load_card
    from cosmofm.pretrain import CosmoFMConfig, CosmoFMForPretraining, collate_samples

    card = load_card("sdss-like")
    patch = card.n_pixels // TOKENS  # 4608 / 256 = 18 pixels per token
    config = CosmoFMConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, spectrum_patch_size=patch, survey_names=[card.name])
    model = CosmoFMForPretraining(config)
    samples = mock_samples(card, BATCH, seed=1)
    return card, model, collate_samples(samples, config.survey_names)


def cosmofm_flops(dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    """(model FLOP/s, training samples/s) of the backbone + objectives on 256-token spectra."""
    _, model, batch = _bench_model_and_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tok = model.cosmofm.embeddings.tokenizers["spectrum"]
    # matmul parameters touched per token: encoder, this modality's tokenizer and decoder, projection
    used = [model.cosmofm.encoder, tok, model.masked.decoders["spectrum"]]
    dense = sum(p.numel() for m in used for p in m.parameters() if p.dim() == 2)
    seconds = _time(_train_step(model, opt, lambda: model(batch).loss, dtype), repeats)
    return BATCH * TOKENS * _flops_per_token(dense, TOKENS) / seconds, BATCH / seconds


def loader_samples_per_s(num_workers: int, n: int = 1024, batches: int = 48) -> float:
    """Samples/s through the training input path: Arrow on disk -> Sample -> CosmoFMBatch."""
    from torch.utils.data import DataLoader

    from cosmofm.data_cards.io.hf_io import SampleDataset, write_dataset
    from cosmofm.data_cards.mocks.generators import mock_samples
    from cosmofm.data_cards.schema import load_card
    from cosmofm.pretrain.data import Collator, GlobalBatchSampler, SeededSamples

    card = load_card("sdss-like")
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset((s for i in range(n) for s in mock_samples(card, 1, seed=2, start=i)), Path(tmp) / "ds", [card])
        ds = SampleDataset(Path(tmp) / "ds")
        sampler = GlobalBatchSampler(len(ds), BATCH, n_steps=batches)
        loader = DataLoader(SeededSamples(ds), batch_sampler=sampler, collate_fn=Collator([card.name]), num_workers=num_workers)
        it = iter(loader)
        next(it)  # worker start-up is not throughput
        t0 = time.perf_counter()
        count = sum(len(b) for b in it)
        return count / (time.perf_counter() - t0)


def cpu_model() -> dict:
    """The CPU's model name and the vector extensions that decide our speed (these VMs move
    between AVX2-only and AVX512 / native-bf16 machines), from /proc/cpuinfo where there is one."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu_model": platform.processor() or platform.machine(), "cpu_flags": []}
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    wanted = sorted(f for f in flags if f == "avx2" or f.startswith(("avx512", "amx")))
    return {"cpu_model": name, "cpu_flags": wanted}


def machine_info() -> dict:
    return {
        **cpu_model(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def bf16_is_accelerated() -> tuple[bool, float]:
    """Whether bf16 matmuls run natively (AMX / AVX512-BF16 / CUDA): a small probe.

    On CPUs with only AVX2, PyTorch's bf16 GEMM falls back to a scalar path ~100x
    slower than fp32; timing a whole training step there would take many minutes and
    measure nothing useful.
    """
    ratio = matmul_flops(torch.bfloat16, n=256, repeats=3) / matmul_flops(torch.float32, n=256, repeats=3)
    return ratio > 0.5, ratio


def run(quick: bool = False, force_bf16: bool = False) -> dict:
    torch.manual_seed(0)
    repeats = 3 if quick else 7
    result = {"machine": machine_info(), "shape": {"width": WIDTH, "depth": DEPTH, "heads": HEADS, "tokens": TOKENS, "batch": BATCH}}
    accelerated, probe = bf16_is_accelerated()
    result["machine"]["bf16_matmul_vs_fp32"] = probe
    dtypes = [("fp32", torch.float32)]
    if accelerated or force_bf16:
        dtypes.insert(0, ("bf16", torch.bfloat16))
    else:
        result["bf16"] = {"skipped": f"bf16 matmul runs at {probe:.3f}x fp32 on this CPU (no AMX / AVX512-BF16); use --force-bf16 to time it anyway"}
    for name, dtype in dtypes:
        peak = matmul_flops(dtype)
        plain = plain_encoder_flops(dtype, repeats)
        ours, samples_s = cosmofm_flops(dtype, repeats)
        result[name] = {
            "matmul_flops": peak,
            "plain_encoder_flops": plain,
            "cosmofm_flops": ours,
            "train_samples_per_s": samples_s,
            "mfu": ours / peak,
            "plain_encoder_mfu": plain / peak,
            "vs_plain_encoder": ours / plain,
        }
    workers = 2 if (os.cpu_count() or 1) > 2 else 1
    loader = loader_samples_per_s(num_workers=0)
    loader_w = loader_samples_per_s(num_workers=workers)
    train = max(result[name]["train_samples_per_s"] for name, _ in dtypes)
    result["loader"] = {"samples_per_s_in_process": loader, f"samples_per_s_{workers}_workers": loader_w, "train_samples_per_s": train}
    result["ratios"] = {"loader_ratio": max(loader, loader_w) / train}
    for name, _ in dtypes:
        result["ratios"][f"mfu_{name}"] = result[name]["mfu"]
        result["ratios"][f"vs_plain_encoder_{name}"] = result[name]["vs_plain_encoder"]
    result["targets"] = TARGETS
    result["meets_target"] = {k: (result["ratios"][k] >= v if k in result["ratios"] else "not measured") for k, v in TARGETS.items()}
    return result


# -- the loop's MFU per backend ------------------------------------------------------------

MFU_RECIPE = ["--set", "data.mock_cards=[sdss-like]", "--set", "data.mock_counts=[512]", "--set", "model.objectives=[masked]",
              "--set", "run.save_every=1000", "--set", "run.trackers=[]", "--set", "run.progress=false"]


def backend_mfu(backends: list[str], steps: int = 30, log_every: int = 10) -> dict:
    """{backend: the loop's last interval row (observe.jsonl)}: `cosmofm pretrain --config demo`
    on spectra for `steps` steps, DDP in 1 process and each backend in 2 (accelerate launch, gloo).
    The first interval (start-up, first-step allocations) is left out: the figures are the mean
    of the later intervals."""
    import socket

    out = {}
    for name in ["ddp_1proc", *backends]:
        processes, backend = (1, "ddp") if name == "ddp_1proc" else (2, name)
        with tempfile.TemporaryDirectory() as tmp:
            cli = ["-m", "cosmofm.cli", "pretrain", "--config", "demo", *MFU_RECIPE, "--set", f"optim.max_steps={steps}",
                   "--set", f"run.log_every={log_every}", "--backend", backend, "--output", str(Path(tmp) / "run")]
            if processes == 1:
                cmd = [sys.executable, *cli]
            else:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    port = sock.getsockname()[1]
                cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                       "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *cli]
            # one thread per process: on a shared 2-core machine two threads per process contend
            # (measured: DDP in 1 process at 27 samples/s with 2 threads, 80-100 with 1)
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                raise RuntimeError(f"{name}: {done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            rows = [json.loads(line) for line in (Path(tmp) / "run" / "observe.jsonl").read_text().splitlines()][1:]
        seconds = sum(r["seconds"] for r in rows)
        flops = sum(r["model_flops"] for r in rows)
        peak = rows[-1]["peak_flops_per_s_per_device"]
        out[name] = {"processes": processes, "threads_per_process": int(env["OMP_NUM_THREADS"]), "steps_timed": sum(r["steps"] for r in rows),
                     "samples_per_s": sum(r["samples"] for r in rows) / seconds, "model_flops_per_s": flops / seconds,
                     "peak_flops_per_s_per_process": peak, "mfu": flops / seconds / (peak * processes),
                     "memory_bytes_by_rank": rows[-1]["memory_bytes_by_rank"]}
    base = out["ddp_1proc"]["samples_per_s"]
    for name in backends:
        out[name]["throughput_over_ddp_1proc"] = out[name]["samples_per_s"] / base
    if "ddp" in backends:
        for name in backends:
            out[name]["throughput_over_ddp_2proc"] = out[name]["samples_per_s"] / out["ddp"]["samples_per_s"]
    return out


# -- paper sizing ------------------------------------------------------------------------

SIZING_CARDS = {"spectrum": "sdss-like", "image": "lsst-like", "cube": "ska-hi-like", "field": "lightcone-21cm"}
PAPER_CORPUS = {"spectrum": 1_000_000, "image": 100_000, "cube": 10_000}
PAPER_EPOCHS = 100
H100_BF16 = 989.4e12  # dense, SXM (pretrain/observe.py GPU_PEAK_TFLOPS)
MFU_RANGE = (0.40, 0.58)  # torchtitan's reported range (docs/scale.md)
MODEL_100M = {"hidden_size": 768, "num_hidden_layers": 14, "num_attention_heads": 12, "projection_dim": 256}


def flops_per_sample(model_overrides: dict) -> dict:
    """Per modality at the demo recipe's patch shapes: tokens per sample of the shipped mock card,
    the formula's training FLOPs per sample (observe.FlopCount) and torch's FlopCounterMode count of
    one forward + backward (math attention kernel, which it can count)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from cosmofm.data_cards.mocks.generators import mock_samples
    from cosmofm.data_cards.schema import load_card
    from cosmofm.pretrain import CosmoFMConfig, CosmoFMForPretraining, collate_samples
    from cosmofm.pretrain.observe import FlopCount
    from cosmofm.pretrain.recipe import PretrainRecipe

    torch.manual_seed(0)
    config = CosmoFMConfig(**{**PretrainRecipe.load("demo").model, **model_overrides}, survey_names=list(SIZING_CARDS.values()))
    model = CosmoFMForPretraining(config)
    count = FlopCount.of(model)
    result = {"params": sum(p.numel() for p in model.parameters()), "hidden_size": config.hidden_size,
              "layers": config.num_hidden_layers, "per_modality": {}}
    for modality, card in SIZING_CARDS.items():
        batch = collate_samples(mock_samples(load_card(card), 2, seed=0), list(SIZING_CARDS.values()), seeds=[0, 1])
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            out = model(batch)
            out.loss.backward()
        model.zero_grad(set_to_none=True)
        tokens = int(out.backbone.token_groups[0].content.shape[1])
        formula = count.per_sample(modality, tokens)
        result["per_modality"][modality] = {"card": card, "tokens": tokens, "flops_formula": formula,
                                            "flops_torch_counter": counter.get_total_flops() / 2,
                                            "formula_over_counter": formula / (counter.get_total_flops() / 2)}
    return result


def sizing() -> dict:
    """FLOPs per sample (demo and ~100M models) and days to pretrain on PAPER_CORPUS for PAPER_EPOCHS
    on 8 and 64 H100s at MFU_RANGE."""
    result = {"corpus": PAPER_CORPUS, "epochs": PAPER_EPOCHS, "h100_bf16_dense_flops": H100_BF16, "mfu_range": MFU_RANGE, "models": {}}
    for name, overrides in (("demo", {}), ("100M", MODEL_100M)):
        m = flops_per_sample(overrides)
        per_epoch = sum(n * m["per_modality"][mod]["flops_formula"] for mod, n in PAPER_CORPUS.items())
        m["flops_per_epoch"] = per_epoch
        m["hours"] = {f"{gpus}xH100_mfu{round(mfu * 100)}": {"per_epoch": per_epoch / (gpus * H100_BF16 * mfu) / 3600,
                                                           "total": PAPER_EPOCHS * per_epoch / (gpus * H100_BF16 * mfu) / 3600}
                      for gpus in (8, 64) for mfu in MFU_RANGE}
        result["models"][name] = m
    return result


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_results")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--force-bf16", action="store_true", help="time bf16 even where the CPU has no native bf16 matmul")
    p.add_argument("--backends", nargs="*", help="instead: the loop's CPU MFU under these backends (ddp fsdp2 zero2 zero3)")
    p.add_argument("--steps", type=int, default=30, help="with --backends: steps per run")
    p.add_argument("--sizing", action="store_true", help="instead: FLOPs per sample and paper sizing (docs/scale.md)")
    args = p.parse_args(argv)
    if args.backends or args.sizing:
        from cosmofm.data_cards.io.atomic import atomic_write_json

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.sizing:
            result = {"machine": machine_info(), **sizing()}
            atomic_write_json(out / "pretrain_sizing.json", result)
            for name, m in result["models"].items():
                print(name, f"{m['params'] / 1e6:.1f}M params", {k: f"{v['flops_formula'] / 1e9:.3f} GFLOP ({v['formula_over_counter']:.4f} of torch's count)"
                                                                 for k, v in m["per_modality"].items()})
        if args.backends:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            result = {"machine": machine_info(), "load_average_1min_before": load, "steps": args.steps, "backends": backend_mfu(args.backends, args.steps)}
            result["load_average_1min_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            atomic_write_json(out / "pretrain_backends_mfu.json", result)
            for name, r in result["backends"].items():
                print(f"{name:10s} MFU {r['mfu']:.3f}  {r['samples_per_s']:.1f} samples/s")
        return result
    result = run(quick=args.quick, force_bf16=args.force_bf16)
    path = Path(args.out) / "pretrain_throughput.json"
    write_report(path.parent, path.name, result)
    r = result["ratios"]
    for name in ("bf16", "fp32"):
        if f"mfu_{name}" in r:
            print(f"{name}: MFU {r[f'mfu_{name}']:.2f} (plain encoder {result[name]['plain_encoder_mfu']:.2f}), vs plain nn.TransformerEncoder {r[f'vs_plain_encoder_{name}']:.2f}")
        else:
            print(f"{name}: {result[name]['skipped']}")
    print(f"loader / training samples/s: {r['loader_ratio']:.1f} (target >= {TARGETS['loader_ratio']})")
    print(f"written: {path}")
    return result


if __name__ == "__main__":
    main()
