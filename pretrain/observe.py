"""What a pretraining run reports about itself: throughput, MFU, memory, loss per modality.

Per logging interval (`run.log_every` steps) the loop (train.py) writes one row to
``<run>/observe.jsonl`` and to its trackers (TensorBoard, wandb offline): tokens/s,
samples/s overall and per modality, model FLOP/s and MFU, the peak memory of every rank,
and the loss and reduced chi-square per modality. Every figure is over all ranks: the
per-modality losses were, before this module, rank 0's batch alone.

Model FLOPs (the count behind MFU, as in PaLM, Chowdhery et al. 2022, appendix B, and
nanoGPT's `estimate_mfu`). A training step is a forward pass and a backward pass of
twice its cost, 3 x 2 FLOPs per multiply-add, except that a map applied to the data
themselves needs no gradient for its input, 2 x 2. A sample of modality m with T tokens costs

    F(m, T) = 6 * T * N_m  +  4 * T * D_m  +  12 * L * d * T**2  +  6 * d * p

- N_m: the weights of the matrices a token of modality m passes through after its
  tokenizer: the encoder's (L * (4 + 2r) * d**2: fused qkv 3d**2, attention output d**2,
  MLP 2 r d**2) and, with the masked objective, its decoder's (d x P).
- D_m: its tokenizer's, applied to the data: the patch-content map 2P x d (P pixels per
  patch with their weights) and the Fourier position map 2 F C x d (F frequencies of C
  coordinates). Biases, norms, embeddings looked up and the optional convolutional
  spectrum stem are not counted.
- 12 L d T**2: attention's two T x T products (Q K^T and A V, 2 T**2 d each forward) in L layers.
- 6 d p: the contrastive projection of the pooled token (d -> p), once per sample.
T counts a sample's own tokens, not the padding to the batch's longest sample: padding is
work that does not count, so it lowers MFU, as it should. Checked against
`torch.utils.flop_counter.FlopCounterMode` (with the math attention kernel, which it can
count) on the demo recipe's shapes: docs/scale.md.

The peak: on CUDA the datasheet's dense peak of the device by its name (`GPU_PEAK_TFLOPS`);
on CPU the FLOP/s of a large square matmul in the training dtype, measured once per
process (`matmul_peak_flops`, which scripts/bench/pretrain_throughput.py also uses), so CPU
"MFU" is the step's FLOP/s over what this machine's BLAS reaches under the same load.
`run.peak_tflops` in the recipe overrides both.
"""

from __future__ import annotations

import functools
import math
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from cosmofm.data_cards.sample import MODALITIES

# Dense (no 2:4 sparsity) tensor-core peaks per GPU in TFLOP/s, from NVIDIA's datasheets,
# by a substring of torch.cuda.get_device_name(); the first match wins, so the specific
# names come before the general ones. fp32 is the plain (non-TF32) peak.
GPU_PEAK_TFLOPS = (
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
)


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall seconds per call of fn(), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def _matmul_peak(dtype: torch.dtype, n: int, repeats: int, threads: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats)


def matmul_peak_flops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n CPU matmul in `dtype` (median of `repeats`), measured once per process
    for each (dtype, n, repeats, torch thread count)."""
    return _matmul_peak(dtype, n, repeats, torch.get_num_threads())


def device_peak_flops(device: torch.device, precision: str, override_tflops: float = 0.0) -> tuple[float | None, str]:
    """(peak FLOP/s of one device in `precision` ("fp32", "bf16" or "fp16"), where it came from).

    CUDA: `GPU_PEAK_TFLOPS` by device name (None for a device not in it). CPU: the measured
    matmul peak (1024 x 1024, so that it costs well under a second). `override_tflops` > 0 wins."""
    if override_tflops > 0:
        return override_tflops * 1e12, "run.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAK_TFLOPS:
            if key in name and precision in peaks:
                return peaks[precision] * 1e12, f"datasheet {key} {precision} dense"
        return None, f"no datasheet peak for {name!r} in {precision}; set run.peak_tflops"
    if device.type == "cpu":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return matmul_peak_flops(dtype, n=1024, repeats=3), f"measured {precision} 1024x1024 matmul, {torch.get_num_threads()} threads"
    return None, f"no peak known for {device.type}; set run.peak_tflops"


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """(peak bytes, what was measured) of this process: CUDA's max_memory_allocated on a GPU;
    on CPU the peak resident set (VmHWM: getrusage's ru_maxrss carries a parent's over fork)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "cpu_peak_rss"
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss"


def dense_params_per_token(model) -> tuple[dict[str, int], dict[str, int]]:
    """(N_m, D_m) of the module docstring for each modality, counted on the model: the matrix
    weights a token of modality m passes through after its tokenizer (encoder + its masked
    decoder), and those of its tokenizer (applied to the data)."""
    def matrices(module) -> int:
        return sum(p.numel() for p in module.parameters() if p.dim() == 2)

    backbone = model.cosmofm
    encoder = matrices(backbone.encoder)
    dense, data = {}, {}
    for m in MODALITIES:
        dense[m] = encoder + (matrices(model.masked.decoders[m]) if model.masked is not None else 0)
        data[m] = matrices(backbone.embeddings.tokenizers[m])
    return dense, data


@dataclass
class FlopCount:
    """F(m, T) of the module docstring for one model."""

    dense: dict[str, int]  # N_m per modality
    data: dict[str, int]  # D_m per modality
    layers: int
    width: int
    projection: int = 0  # p, 0 without the contrastive objective

    @classmethod
    def of(cls, model) -> "FlopCount":
        c = model.config
        projection = c.projection_dim if model.contrastive is not None else 0
        return cls(*dense_params_per_token(model), c.num_hidden_layers, c.hidden_size, projection)

    def per_sample(self, modality: str, tokens: int) -> float:
        """Training FLOPs (forward + backward) of one sample of `modality` with `tokens` tokens."""
        t = tokens
        return (6.0 * t * self.dense[modality] + 4.0 * t * self.data[modality] + 12.0 * self.layers * self.width * t * t
                + 6.0 * self.width * self.projection)


def modality_loss_sums(out, log_loss: bool) -> torch.Tensor:
    """(len(MODALITIES), 3) float32 on the loss's device: per modality the sum of the samples'
    masked loss (log chi2 or chi2, as `config.masked_loss` trains), the sum of their reduced
    chi-square, and how many samples counted: a sample counts when at least one of its hidden
    pixels was measured (ivar > 0), as MaskedReconstruction counts it. Sums and counts, not
    means, so that an all_reduce over ranks gives the figures of the whole global batch."""
    device = out.loss.device
    sums = torch.zeros(len(MODALITIES), 3, dtype=torch.float32, device=device)
    if out.per_sample_chi2 is None or out.backbone is None:
        return sums
    backbone = out.backbone
    for g in backbone.token_groups:
        t = g.patches.shape[1]
        hidden = backbone.token_mask[g.rows, :t].unsqueeze(-1)  # (n_g, t, 1)
        counted = ((g.patch_ivar * hidden) > 0).flatten(1).any(1).float()  # (n_g,)
        chi2 = out.per_sample_chi2[g.rows].float()
        loss = chi2.clamp(min=1e-6).log() if log_loss else chi2
        i = MODALITIES.index(g.modality)
        sums[i] += torch.stack([(loss * counted).sum(), (chi2 * counted).sum(), counted.sum()])
    return sums.detach()


def means_by_modality(sums) -> tuple[dict[str, float], dict[str, float]]:
    """({modality: mean loss}, {modality: mean reduced chi2}) from `modality_loss_sums` rows
    (a tensor or nested list), leaving out modalities without a counted sample."""
    rows = sums.tolist() if hasattr(sums, "tolist") else sums
    loss = {m: r[0] / r[2] for m, r in zip(MODALITIES, rows) if r[2] > 0}
    chi2 = {m: r[1] / r[2] for m, r in zip(MODALITIES, rows) if r[2] > 0}
    return loss, chi2


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over all ranks (the tensor itself in one process); a new tensor."""
    reduced = tensor.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


@dataclass
class Observer:
    """Counts what one rank trained since the last row; `interval_row` sums it over ranks.

    Host-side counts (samples and tokens per modality, model FLOPs) come from the batches'
    shapes and cost no device sync; the per-modality losses arrive already summed over ranks
    with each step's metrics (`add_step`). `interval_row` is a collective: call it on every
    rank at the same steps."""

    flops: FlopCount
    device: torch.device
    precision: str = "fp32"
    peak_tflops: float = 0.0
    rank: int = 0
    world: int = 1
    samples: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MODALITIES, 0.0))
    tokens: float = 0.0
    model_flops: float = 0.0
    loss_sums: list = field(default_factory=lambda: [[0.0, 0.0, 0.0] for _ in MODALITIES])
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add_batch(self, out) -> None:
        """One micro-batch of this rank, from the shapes of its token groups."""
        for g in out.backbone.token_groups:
            n, t = len(g.rows), int(g.content.shape[1])
            self.samples[g.modality] += n
            self.tokens += n * t
            self.model_flops += n * self.flops.per_sample(g.modality, t)

    def add_step(self, global_sums) -> None:
        """One optimizer step's `modality_loss_sums`, already summed over ranks."""
        for row, new in zip(self.loss_sums, global_sums.tolist() if hasattr(global_sums, "tolist") else global_sums):
            for k in range(3):
                row[k] += new[k]
        self.steps += 1

    def interval_row(self, step: int) -> dict:
        """The row of the interval that ends at `step`, over all ranks; then starts the next."""
        seconds = max(time.perf_counter() - self.started, 1e-9)
        memory, memory_kind = peak_memory_bytes(self.device)
        # one collective: counts summed, and each rank's memory in its own slot
        local = [self.samples[m] for m in MODALITIES] + [self.tokens, self.model_flops] + [0.0] * self.world
        local[len(MODALITIES) + 2 + self.rank] = float(memory)
        summed = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=self.device)).tolist()
        samples = dict(zip(MODALITIES, summed[: len(MODALITIES)]))
        tokens, flops = summed[len(MODALITIES)], summed[len(MODALITIES) + 1]
        memory_by_rank = [int(b) for b in summed[len(MODALITIES) + 2:]]
        peak, peak_source = device_peak_flops(self.device, self.precision, self.peak_tflops)
        loss, chi2 = means_by_modality(self.loss_sums)
        total = sum(samples.values())
        row = {
            "step": step,
            "steps": self.steps,
            "seconds": seconds,
            "world_size": self.world,
            "samples": total,
            "tokens": tokens,
            "samples_per_s": total / seconds,
            "tokens_per_s": tokens / seconds,
            "samples_per_s_by_modality": {m: samples[m] / seconds for m in MODALITIES if samples[m] > 0},
            "model_flops": flops,
            "model_flops_per_s": flops / seconds,
            "peak_flops_per_s_per_device": peak,
            "peak_source": peak_source,
            "mfu": flops / seconds / (peak * self.world) if peak else None,
            "memory_bytes_by_rank": memory_by_rank,
            "memory_kind": memory_kind,
            "loss_by_modality": loss,
            "chi2_by_modality": chi2,
        }
        self.reset()
        return row

    def reset(self) -> None:
        self.samples = dict.fromkeys(MODALITIES, 0.0)
        self.tokens = self.model_flops = 0.0
        self.loss_sums = [[0.0, 0.0, 0.0] for _ in MODALITIES]
        self.steps = 0
        self.started = time.perf_counter()


def tracker_values(row: dict) -> dict:
    """An interval row as flat tracker scalars ("perf/mfu", "loss_by_modality/spectrum", ...)."""
    out = {}
    for key, value in row.items():
        if key in ("step", "peak_source", "memory_kind"):
            continue
        if key == "memory_bytes_by_rank":
            out.update({f"memory_gb/rank{i}": b / 1e9 for i, b in enumerate(value)})
        elif isinstance(value, dict):
            out.update({f"{key}/{m}": v for m, v in value.items()})
        elif isinstance(value, (int, float)) and math.isfinite(value):  # mfu is None without a known peak
            out[f"perf/{key}"] = value
    return out
