"""CPU fast path of the redshift network's inference (heads/redshift_net.py): its logits, to
float32 rounding (or to bfloat16's, below), in a fraction of the reference's time on one core.

`RedshiftNet.forward` takes it for CPU tensors when no gradient is wanted and
`RedshiftNet.cpu_kernels` is on (`takes_fast_path`); training, other devices and
`reference=True` take the readable path, which tests/test_redshift_net.py compares it with.
What it changes:

- binning and convolutions in blocks of `BLOCK` (256) spectra, the FFTs in chunks of `CHUNK`
  (16) of them: a chunk's FFT buffers (~2 MB) stay in a core's cache, while the convolutions
  pay per call (bfloat16 ones ~1.6x faster over 256 spectra than over 16);
- the binning in fewer passes (`binned_channels`: strided sums of the pixels, in-place
  arithmetic, the three channels written straight into the convolutions' input), the
  reference's `binned` where the flux behind zero weight needs cleaning;
- the rows' median of |f| by numpy's selection (`lower_nanmedian`);
- the dilated convolutions as 2-D convolutions of height 1 on channels-last tensors (as
  pretrain/cpu_kernels.py does for the spectrum stem), ~5x faster than conv1d for 3-8
  channels in oneDNN; on a CPU with native bfloat16 (AVX512-BF16 or AMX: `native_bf16`)
  in bfloat16 (`RedshiftNet.cpu_bf16`, default None = where native): oneDNN accumulates in
  float32, the GELUs and masks run on bfloat16 values, the FFTs and everything after them
  in float32 (1.14x faster than the float32 path on this VM's Xeon). Its logits differ from float32's by
  up to 0.26 on the bench's trained networks (0.8 % of a spectrum's logit range, ~41; the
  test asks for <= 1 % and the same argmax), the peak moving on 0.2-0.8 % of the bench's
  test spectra, the catastrophic fraction and NMAD the same but for one spectrum in 6,000
  (docs/benchmarks.md, "Redshift network");
- the masks after each layer applied to the masked bins only (an index, ~5 bins of a
  spectrum's 1,152) instead of a multiply over every feature;
- the last, pointwise convolution folded into the rest-frame kernels' transforms: features
  f_c = (sum_d W_cd h_d + b_c) x valid and the FFT is linear, so the correlation with K_gc is
  sum_d h_d * (sum_c W_cd K_gc) + valid * (sum_c b_c K_gc): one more transform (the mask)
  and no pointwise layer; the folded transforms are cached with the kernels';
- the frequency products accumulated in place (one complex multiply-add per channel) and the
  two template groups combined by `logaddexp` straight from the inverse transform.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cosmofm.pretrain.cpu_kernels import applies

CHUNK = 16  # spectra per FFT pass: a chunk's working set (~2 MB) stays in a core's L2 cache
BLOCK = 256  # spectra binned and convolved at once


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU runs oneDNN's bfloat16 convolutions natively (AVX512-BF16 or AMX
    tiles), read from torch's CPU feature checks; False where torch cannot tell."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()
                    and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
    except (AttributeError, RuntimeError):
        return False


def native_bf16_on(device) -> bool:
    """Whether `device` (a torch.device) computes bfloat16 natively: CUDA, or a CPU with
    AVX512-BF16 / AMX (`native_bf16`). Elsewhere autocast emulates bfloat16 at several times
    float32's cost, so the verbs' bf16 defaults follow this."""
    return device.type == "cuda" or (device.type == "cpu" and native_bf16())


def lower_nanmedian(v: torch.Tensor) -> torch.Tensor:
    """`redshift_net.row_nanmedian` by numpy's partition (NaN sorts last): (N, 1) lower median
    of each row's non-NaN values of a CPU float tensor (N, B), NaN for a row without any. One
    selection per group of rows sharing the median's rank (their count of values): one call
    selecting at all ranks costs ~4x one rank (256 survey mocks with ~5 masked bins each hold
    ~20 ranks; their binning took 9.2 ms with it, 8.0 ms so)."""
    a = v.numpy()
    counts = a.shape[1] - np.isnan(a).sum(1)
    k = np.maximum(counts - 1, 0) // 2
    median = np.empty(len(a), a.dtype)
    for rank in np.unique(k):
        rows = np.flatnonzero(k == rank)
        median[rows] = np.partition(a[rows], rank, axis=1)[:, rank]
    return torch.from_numpy(np.where(counts > 0, median, np.nan).astype(a.dtype))[:, None]


def folded_kernels(net) -> torch.Tensor:
    """(G, channels + 1, F) conj(rfft) of the rest-frame kernels with the last pointwise layer
    folded in: channel d < channels is sum_c W_cd K_gc (the hidden features'), the last is
    sum_c b_c K_gc (the mask's). Cached by the caller with the kernels' transforms."""
    last = net.features[-1]
    kf = net._kernels_fft()  # (G, C, F) conj(rfft(K))
    weight, bias = last.weight[:, :, 0].to(kf.dtype), last.bias.to(kf.dtype)  # (C, D), (C,)
    return torch.cat([torch.einsum("cd,gcf->gdf", weight, kf), torch.einsum("c,gcf->gf", bias, kf)[:, None]], 1)


def pixel_sums(v: torch.Tensor, p: int) -> torch.Tensor:
    """(N, L // p) sums of p adjacent pixels of v (N, L): p strided adds (2x faster than a sum
    over a (N, B, p) view)."""
    out = v[:, 0::p] + v[:, 1::p] if p > 1 else v.clone()
    for i in range(2, p):
        out += v[:, i::p]
    return out


def binned_channels(flux: torch.Tensor, ivar: torch.Tensor, cfg, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`redshift_net.binned` and `normalise`'s channels in fewer passes: (h (N, B, 3) of `dtype`,
    channels last: x, x g, g; valid (N, B)) of checked flux, ivar (N, L)."""
    from cosmofm.heads.redshift_net import FLUX_CLIP, all_finite, binned

    n, b = len(flux), cfg.n_bins
    h = torch.empty(n, b, 3, dtype=dtype)
    fi = flux * ivar
    if all_finite(fi):  # else NaN behind zero weight, to be cleaned (or refused) by the reference
        w = pixel_sums(ivar, cfg.bin_pixels)  # (N, B)
        valid = w > 0
        x = pixel_sums(fi, cfg.bin_pixels).div_(w.clamp(min=1e-30))  # 0 where w = 0: fi is 0 there
        scale = lower_nanmedian(torch.where(valid, x.abs(), torch.nan))  # (N, 1)
        scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
        x = x.div_(scale).clamp_(-FLUX_CLIP, FLUX_CLIP)
        g = w.sqrt_().mul_(scale)  # S/N
        g = g.div_(g + 1)
    else:
        x, g, valid = binned(flux, ivar, cfg, lower_nanmedian)
    h[..., 0], h[..., 2] = x, g
    if dtype == x.dtype:
        torch.mul(x, g, out=h[..., 1])
    else:
        h[..., 1] = x * g
    return h, valid


def hidden_features(layers: list[nn.Module], h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(N, B, C) features before the last, pointwise layer, zero on masked bins, in h's dtype:
    `layers` (conv, GELU, ...) on h (N, B, 3), channels last throughout."""
    n, b = valid.shape
    masked = (~valid).nonzero(as_tuple=True)  # (rows, bins): a few per spectrum
    for layer in layers:
        if isinstance(layer, nn.Conv1d):  # on (N, C, 1, B) channels-last views of the (N, B, C) memory
            y = F.conv2d(h.view(n, 1, b, -1).permute(0, 3, 1, 2), layer.weight[:, :, None].to(h.dtype), layer.bias.to(h.dtype),
                         padding=(0, layer.padding[0]), dilation=(1, layer.dilation[0]))
            h = y.permute(0, 2, 3, 1).reshape(n, b, -1)
        else:
            h = layer(h)
            h[masked] = 0.0  # as a multiply by the mask, on the masked bins only
    return h


def use_bf16(net) -> bool:
    """bfloat16 convolutions: `net.cpu_bf16` when set (True / False), else where native."""
    choice = getattr(net, "cpu_bf16", None)
    return native_bf16() if choice is None else bool(choice)


def logits(net, flux: torch.Tensor, ivar: torch.Tensor, chunk: int = CHUNK, block: int = BLOCK, bf16: bool | None = None) -> torch.Tensor:
    """(N, n_z) logits of `net` (a RedshiftNet without its prior; the caller adds it) for checked
    flux, ivar (N, L) float32 CPU tensors (`redshift_net.checked_spectra`). `bf16`: the
    convolutions in bfloat16 (None: `use_bf16`)."""
    cfg, n_fft = net.cfg, net.n_fft
    n, b, n_z = len(flux), cfg.n_bins, cfg.n_z
    dtype = torch.bfloat16 if (use_bf16(net) if bf16 is None else bf16) else torch.float32
    kernels = net._folded_fft()  # (G, D + 1, F)
    groups, depth = kernels.shape[:2]
    out = flux.new_empty(n, n_z)
    buffer = flux.new_zeros(min(chunk, n), depth, n_fft)  # zero beyond bin B: the FFT's padding
    products = torch.empty(min(chunk, n), groups, n_fft // 2 + 1, dtype=kernels.dtype)
    layers = list(net.features)[:-1]
    for first in range(0, n, block):
        h, valid = binned_channels(flux[first:first + block], ivar[first:first + block], cfg, dtype)
        h = hidden_features(layers, h, valid)  # (M, B, D)
        for c in range(0, len(h), chunk):
            m, start = min(chunk, len(h) - c), first + c
            buffer[:m, :-1, :b] = h[c:c + m].transpose(1, 2)
            buffer[:m, -1, :b] = valid[c:c + m]
            spec = torch.fft.rfft(buffer[:m])  # (m, D + 1, F)
            for k in range(groups):
                acc = products[:m, k]
                torch.mul(spec[:, 0], kernels[k, 0], out=acc)
                for d in range(1, depth):
                    acc.addcmul_(spec[:, d], kernels[k, d])
            r = torch.fft.irfft(products[:m], n_fft)  # logits m = r[(m - n_z + 1) mod n_fft] (`correlate_fft`)
            for cols, lags in ((slice(0, n_z - 1), slice(n_fft - n_z + 1, n_fft)), (slice(n_z - 1, n_z), slice(0, 1))):
                part = r[..., lags]
                if groups == 1:
                    out[start:start + m, cols] = part[:, 0]
                elif groups == 2:
                    torch.logaddexp(part[:, 0], part[:, 1], out=out[start:start + m, cols])
                else:
                    out[start:start + m, cols] = part.logsumexp(1)
    return out


def takes_fast_path(net, flux: torch.Tensor) -> bool:
    """The fast path applies: switched on, CPU tensors, no gradient wanted, and the architecture
    it assumes (the last feature layer pointwise)."""
    last = net.features[-1]
    return (applies(net.cpu_kernels, flux) and not torch.is_grad_enabled()
            and isinstance(last, nn.Conv1d) and last.kernel_size[0] == 1)
