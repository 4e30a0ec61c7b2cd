"""CPU fast path of the redshift network's inference (heads/redshift_net.py): its logits, to
float32 rounding, in a fraction of the reference's time on one core.

`RedshiftNet.forward` takes it for CPU tensors when no gradient is wanted and
`RedshiftNet.cpu_kernels` is on (`applies`); training, other devices and `reference=True`
take the readable path, which tests/test_redshift_net.py compares it with. What it changes:

- spectra in chunks of `CHUNK` (16): every intermediate of a chunk (bins, features, FFT
  buffers, ~2 MB) stays in a core's cache; over a whole batch of 256 these passes are
  memory-bound (the FFT buffers alone are ~24 MB);
- the rows' median of |f| by numpy's selection (`lower_nanmedian`, ~8x faster than torch's
  nanmedian on 16 rows of 1,152 bins);
- the dilated convolutions as 2-D convolutions of height 1 on channels-last tensors (as
  pretrain/cpu_kernels.py does for the spectrum stem), ~5x faster than conv1d for 3-8
  channels in oneDNN;
- the last, pointwise convolution folded into the rest-frame kernels' transforms: features
  f_c = (sum_d W_cd h_d + b_c) x valid and the FFT is linear, so the correlation with K_gc is
  sum_d h_d * (sum_c W_cd K_gc) + valid * (sum_c b_c K_gc): one more transform (the mask)
  and no pointwise layer; the folded transforms are cached with the kernels';
- the frequency products accumulated in place (one complex multiply-add per channel) and the
  two template groups combined by `logaddexp` straight from the inverse transform.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cosmofm.pretrain.cpu_kernels import applies

CHUNK = 16  # spectra per pass: a chunk's working set (~2 MB) stays in a core's L2 cache


def lower_nanmedian(v: torch.Tensor) -> torch.Tensor:
    """`redshift_net.row_nanmedian` by numpy's partition (NaN sorts last): (N, 1) lower median
    of each row's non-NaN values of a CPU float tensor (N, B), NaN for a row without any."""
    a = v.numpy()
    counts = a.shape[1] - np.isnan(a).sum(1)
    k = np.maximum(counts - 1, 0) // 2
    median = np.partition(a, np.unique(k), axis=1)[np.arange(len(a)), k]
    return torch.from_numpy(np.where(counts > 0, median, np.nan).astype(a.dtype))[:, None]


def folded_kernels(net) -> torch.Tensor:
    """(G, channels + 1, F) conj(rfft) of the rest-frame kernels with the last pointwise layer
    folded in: channel d < channels is sum_c W_cd K_gc (the hidden features'), the last is
    sum_c b_c K_gc (the mask's). Cached by the caller with the kernels' transforms."""
    last = net.features[-1]
    kf = net._kernels_fft()  # (G, C, F) conj(rfft(K))
    weight, bias = last.weight[:, :, 0].to(kf.dtype), last.bias.to(kf.dtype)  # (C, D), (C,)
    return torch.cat([torch.einsum("cd,gcf->gdf", weight, kf), torch.einsum("c,gcf->gf", bias, kf)[:, None]], 1)


def logits(net, flux: torch.Tensor, ivar: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """(N, n_z) logits of `net` (a RedshiftNet without its prior; the caller adds it) for checked
    flux, ivar (N, L) float32 CPU tensors (`redshift_net.checked_spectra`)."""
    from cosmofm.heads.redshift_net import binned

    cfg, n_fft = net.cfg, net.n_fft
    n, b, n_z = len(flux), cfg.n_bins, cfg.n_z
    kernels = net._folded_fft()  # (G, D + 1, F)
    groups, depth = kernels.shape[:2]
    out = flux.new_empty(n, n_z)
    buffer = flux.new_zeros(min(chunk, n), depth, n_fft)  # zero beyond bin B: the FFT's padding
    products = torch.empty(min(chunk, n), groups, n_fft // 2 + 1, dtype=kernels.dtype)
    hidden = list(net.features)[:-1]
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x, g, valid = binned(flux[start:start + m], ivar[start:start + m], cfg, lower_nanmedian)
        h = torch.stack([x, x * g, g], -1)  # (m, B, 3), channels last
        mask = valid[..., None].expand(m, b, hidden[0].out_channels).float()  # full size: a broadcast multiply is ~2x slower
        for layer in hidden:
            if isinstance(layer, nn.Conv1d):  # on (m, C, 1, B) channels-last views of the (m, B, C) memory
                y = F.conv2d(h.view(m, 1, b, -1).permute(0, 3, 1, 2), layer.weight[:, :, None], layer.bias,
                             padding=(0, layer.padding[0]), dilation=(1, layer.dilation[0]))
                h = y.permute(0, 2, 3, 1).reshape(m, b, -1)
            else:
                h = layer(h).mul_(mask)
        buffer[:m, :-1, :b] = h.transpose(1, 2)
        buffer[:m, -1, :b] = valid
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
