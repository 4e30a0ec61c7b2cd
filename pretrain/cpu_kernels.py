"""CPU fast paths of the tokenizers: the same results as the reference path, faster on a CPU.

The tokenizers (`tokenizers.py`) read as plain torch, with no host round trips, so they run
unchanged on CUDA and on the `meta` device. The classify path runs on CPUs, on survey
files (a few hundred spectra on one shared wavelength grid per batch), and there two of
its steps pay for a rewrite; each lives here, next to the reason:

- `spectrum_stem_content`: the spectrum stem's Conv1d layers as 2-D convolutions of
  height 1 on a channels-last tensor, so that oneDNN takes its channels-last kernels,
  with channels-last pooling and the content map split into blocks instead of a
  concatenation (stem + content map of 256 BOSS-like spectra, one thread: 1.6x faster
  at stride 1, the spectra-small shape; 1.1x at stride 8, spectra-fast);
- `once_per_batch` and `coordinate_embedding`: a coordinate shared by every row (a
  survey file's grid) or by every token (a sample's scale) is processed once and
  broadcast, which needs a look at the values (a host sync, free on a CPU); ~20 % of the
  spectra-fast tokenizer.

- `nan_lower_median`: the short-row medians of the "ivar_local" pixel weight's running
  median, by a sorting network instead of torch.nanmedian, which pays ~1 us per row
  (~20x faster on rows of ~10 values; 64 spectra of 4,608 pixels: 9.9 ms against 24 ms).

A numpy selection for the global pixel-weight median used to sit here too; with torch 2.13
its nanmedian was faster, so the reference is used there (measure before adding one).

They are taken when `config.cpu_kernels` is on and the tensors are on the CPU (`applies`);
every other device, and `torch.compile`, gets the reference. tests/test_device_agnostic.py
checks each against the reference (outputs and gradients, to float32 rounding).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from cosmofm.pretrain.data import rows_equal


def applies(enabled: bool, x: torch.Tensor) -> bool:
    """Whether to take a CPU fast path for `x`: switched on (config.cpu_kernels), x on the
    CPU, and not being traced by torch.compile (these kernels read values on the host)."""
    return enabled and x.device.type == "cpu" and not torch.compiler.is_compiling()


def spectrum_stem_content(stem: nn.Sequential, content: nn.Linear, patches: torch.Tensor, patch_mask: torch.Tensor,
                          patch_weight: torch.Tensor) -> torch.Tensor:
    """SpectrumTokenizer.embed_content with its stem: (n, T, P) values, mask and pixel
    weights -> (n, T, hidden_size), channels last throughout."""
    n, t, p = patches.shape
    # The two inputs interleaved pixel by pixel, (n, T, P, 2): channels last for the stem,
    # and one matrix product for the linear map of each patch's pixels.
    pixels = torch.empty(n, t, p, 2, dtype=patches.dtype, device=patches.device)
    if patches.requires_grad:  # out= does not differentiate
        pixels[..., 0] = patches * patch_mask
    else:
        torch.mul(patches, patch_mask, out=pixels[..., 0])  # masked as they are interleaved: one pass
    pixels[..., 1] = patch_weight
    x = pixels.view(n, 1, t * p, 2).permute(0, 3, 1, 2)  # (n, 2, 1, T*P), channels last in memory
    for layer in stem:
        if isinstance(layer, nn.Conv1d):
            x = F.conv2d(x, layer.weight.unsqueeze(2), layer.bias, stride=(1, layer.stride[0]),
                         padding=(0, layer.padding[0]), dilation=(1, layer.dilation[0]))
        else:  # elementwise: applied to the (n, 1, T*P, C) view, which is contiguous. On the
            # channels-last (n, C, 1, T*P) tensor itself, torch's GELU takes a ~2x slower path.
            x = layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    # max- and mean-pooled over each patch's positions: oneDNN's channels-last pooling
    window = (1, p // stem[0].stride[0])
    pooled = torch.cat([F.max_pool2d(x, window), F.avg_pool2d(x, window)], dim=1)[:, :, 0].transpose(1, 2)  # (n, T, 2C)
    # content(cat([values, weights, pooled])) as a sum over the blocks of its weight (its
    # pixel columns put in the interleaved order): the same map without copying every
    # pixel into a concatenation first.
    w = content.weight
    w_pixels = w[:, : 2 * p].view(-1, 2, p).transpose(1, 2).reshape(-1, 2 * p)
    return F.linear(pixels.view(n, t, 2 * p), w_pixels, content.bias) + F.linear(pooled, w[:, 2 * p :])


def once_per_batch(fn: Callable[..., tuple[torch.Tensor, ...]], c: torch.Tensor, *args) -> tuple[torch.Tensor, ...]:
    """fn(c, *args) for coordinates c (n, L) whose outputs have one row per row of c; when
    every row of c is the first (a survey file's grid), computed on that row and expanded."""
    if len(c) > 1 and rows_equal(c):
        return tuple(out.expand(len(c), *out.shape[1:]) for out in fn(c[:1], *args))
    return fn(c, *args)


def coordinate_embedding(proj: nn.Linear, coords: torch.Tensor, omegas: torch.Tensor) -> torch.Tensor:
    """FourierCoordinateEmbedding.forward: coords (n, T, C) float64, omegas (C, K) ->
    (n, T, hidden_size), proj(features) as a sum over the coordinates of their blocks of its
    weight, each coordinate embedded once where it repeats: a grid shared by every row (a
    survey file's wavelengths) or a value shared by every token (the sample's scale)."""
    width = 2 * omegas.shape[1]
    out = proj.bias
    for c in range(coords.shape[-1]):
        x = coords[..., c]
        if len(x) > 1 and rows_equal(x):
            x = x[:1]
        elif x.shape[1] > 1 and bool((x == x[:, :1]).all()):
            x = x[:, :1]
        phase = x.unsqueeze(-1) * omegas[c]  # (n or 1, T or 1, K)
        feats = torch.cat([phase.sin(), phase.cos()], dim=-1).to(proj.weight.dtype)
        out = out + F.linear(feats, proj.weight[:, c * width : (c + 1) * width])
    return out.expand(*coords.shape[:2], -1)


def nan_lower_median(x: torch.Tensor) -> torch.Tensor:
    """(..., m) -> (...): the lower median of the non-NaN values along the last axis (NaN if none).
    The m values are sorted by an odd-even transposition network (m rounds of elementwise
    min / max over all rows at once, NaN read as +inf so it sorts last): for the short rows
    here ~20x faster on CPU than torch.sort or torch.nanmedian, which pay ~1 us per row."""
    count = (~torch.isnan(x)).sum(-1, keepdim=True)
    values = list(torch.where(torch.isnan(x), float("inf"), x).unbind(-1))
    m = len(values)
    for round_ in range(m):
        for i in range(round_ % 2, m - 1, 2):
            values[i], values[i + 1] = torch.minimum(values[i], values[i + 1]), torch.maximum(values[i], values[i + 1])
    lower = torch.stack(values, dim=-1).gather(-1, (count - 1).clamp(min=0) // 2).squeeze(-1)
    return torch.where(count.squeeze(-1) > 0, lower, float("nan"))
