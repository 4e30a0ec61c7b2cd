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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

WIDTH, DEPTH, HEADS, TOKENS, BATCH = 256, 4, 4, 256, 16
TARGETS = {"mfu_bf16": 0.5, "vs_plain_encoder_bf16": 0.9, "loader_ratio": 5.0}


def _time(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / _time(lambda: a @ b, repeats)


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


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_results")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--force-bf16", action="store_true", help="time bf16 even where the CPU has no native bf16 matmul")
    args = p.parse_args(argv)
    result = run(quick=args.quick, force_bf16=args.force_bf16)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pretrain_throughput.json"
    path.write_text(json.dumps(result, indent=2))
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
