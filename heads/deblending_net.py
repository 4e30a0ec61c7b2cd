"""The deblending head's network, its losses and its peak finder (used by heads/deblending.py).

Dense head on the image tokens (one token per band per 8 x 8 patch):

1. `BandTokenGrid` gathers each sample's band tokens back to their (B, H/8, W/8) grid
   (the token order of `ImageTokenizer`: band-major, then rows, then columns) and
   combines the bands of each position by attention (a learned score per band token,
   softmax over the bands, valid tokens only): a band that is masked or empty weighs
   nothing, and the colour information stays in the projected features.
2. `PixelDecoder` upsamples the token grid x8 (three x2 stages) and fuses it with a
   full-resolution branch on the normalised input pixels (asinh of values / the
   tokenizer's scale, asinh of the pixel S/N, the mask): the skip connection that gives
   the decoder the sub-patch detail the 8 x 8 tokens average away. The padding the
   tokenizer added (to a multiple of 8) is cropped off at the end, so any stamp size works.
   Observing conditions (the PSF FWHM per band) join that branch as constant planes
   (`condition_planes`), and the refiner's input likewise.
3. Per-pixel outputs (`DenseOutputs`): a source-centre heatmap (CenterNet, Zhou et al.
   2019, arXiv:1904.07850: Gaussian targets at the true centres, penalty-reduced focal
   loss), a sub-pixel centre offset, a background logit per band, a per-band pixel
   embedding, and per-source fields read at each centre (an embedding, a per-band
   amplitude, a size).

Flux split (`split_logits`): the fraction of pixel p, band b given to source k is a
softmax over (sources + background) of
    logit_kb(p) = <u_b(p), v_k> / sqrt(E) + a_kb - |p - c_k| / s_k,
(u: pixel embedding, v, a, s: read at centre c_k). Per-band isolated images are
fraction x observed image, so the per-band fluxes of all sources and the background add
up to the image (the SExtractor isophotal / scarlet flux-conserving spirit): nothing is
created or lost, photometry is unbiased where the fractions are right, and the
background channel keeps the noise of empty sky out of the sources. The distance term
is the prior that a source's light falls off from its centre (an exponential profile in
log), so an untrained head already splits flux sensibly; the embeddings learn shapes,
colours and overlaps. Optionally (`refine_steps`) `SplitRefiner` then corrects each
source's logits in a window around it, seeing the light the first split gave it and its
neighbours. Why not a decoder per source (scarlet-like models): fractions of
an observed image need no flux calibration and cannot hallucinate flux.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

FOCAL_ALPHA, FOCAL_BETA = 2.0, 4.0  # CenterNet's focal-loss exponents
CORRECTION_MAX_LOG = 0.5  # flux corrections stay within exp(+-0.5) = x0.61 .. x1.65


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GELU())


class BandTokenGrid(nn.Module):
    """(n, T, D) image tokens of one group -> (n, C, H/8, W/8) features: the band tokens of
    each patch position projected and combined by attention over bands."""

    def __init__(self, in_size: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(in_size, channels)
        self.score = nn.Linear(in_size, 1)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        n, (b, gh, gw) = tokens.shape[0], grid
        t = tokens[:, : b * gh * gw].reshape(n, b, gh, gw, -1)  # (n, B, gh, gw, D): band-major token order
        ok = valid[:, : b * gh * gw].reshape(n, b, gh, gw, 1)
        score = self.score(t).masked_fill(~ok, -1e4)  # a masked band token weighs nothing
        w = score.softmax(dim=1) * ok.any(dim=1, keepdim=True)  # (n, B, gh, gw, 1); all-masked position -> 0
        feat = (w * self.proj(t)).sum(dim=1)  # (n, gh, gw, C)
        return feat.permute(0, 3, 1, 2)  # (n, C, gh, gw)


@dataclass
class DenseOutputs:
    """Per-pixel outputs of one group, cropped to (H, W)."""

    heat: torch.Tensor  # (n, H, W) heatmap logits
    offset: torch.Tensor  # (n, 2, H, W) sub-pixel centre offset (row, col)
    background: torch.Tensor  # (n, B, H, W) background logits
    pixel_embedding: torch.Tensor  # (n, B, E, H, W)
    source_embedding: torch.Tensor  # (n, E, H, W): read at a centre
    amplitude: torch.Tensor  # (n, B, H, W): read at a centre
    size: torch.Tensor  # (n, H, W) raw size, read at a centre (softplus -> pixels)
    correction: torch.Tensor | None = None  # (n, B, H, W) raw per-band flux correction, read at a centre


class PixelDecoder(nn.Module):
    """Token features (n, C, gh, gw) + normalised pixels (n, 2B + 1 + P, H8, W8) -> DenseOutputs;
    P = `condition_planes`, constant planes of the observing conditions (`condition_planes`)."""

    def __init__(self, channels: int, n_bands: int, embed_size: int, condition_planes: int = 0):
        super().__init__()
        c, f = channels, max(channels // 2, 16)
        self.n_bands, self.embed_size = n_bands, embed_size
        self.up = nn.ModuleList([_conv(c, c), _conv(c, f), _conv(f, f)])  # x2 each: 8x
        self.pixel = nn.Sequential(_conv(2 * n_bands + 1 + condition_planes, f), _conv(f, f))
        self.fuse = nn.Sequential(_conv(2 * f, f), _conv(f, f))
        self.out, self.correction = output_convs(f, n_bands, embed_size)

    def forward(self, tokens: torch.Tensor, pixels: torch.Tensor, shape: tuple[int, int]) -> DenseOutputs:
        x = tokens
        for stage in self.up:
            x = stage(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        x = self.fuse(torch.cat([x, self.pixel(pixels)], dim=1))
        return dense_outputs(x, self.out, self.correction, self.n_bands, self.embed_size, shape)


def output_convs(channels: int, n_bands: int, embed_size: int) -> tuple[nn.Conv2d, nn.Conv2d]:
    """The 1 x 1 convolutions from `channels` features to the packed per-pixel outputs
    (`dense_outputs`) and to the per-band outskirts correction, at their untrained priors."""
    out = nn.Conv2d(channels, 3 + n_bands * (2 + embed_size) + embed_size + 1, 1)
    correction = nn.Conv2d(channels, n_bands, 1)  # the outskirts' flux the fractions miss (`flux_correction`)
    with torch.no_grad():  # CenterNet's prior: the heatmap starts at p = 0.01 everywhere
        out.bias[0].fill_(-math.log(99.0))
        correction.weight.zero_()  # an untrained head measures plain fraction x image
        correction.bias.zero_()
    return out, correction


def dense_outputs(x: torch.Tensor, out: nn.Conv2d, correction: nn.Conv2d, n_bands: int, embed_size: int,
                  shape: tuple[int, int]) -> DenseOutputs:
    """Features x (n, C, H8, W8) -> `DenseOutputs` cropped to shape (H, W), through `output_convs`."""
    with torch.autocast(x.device.type, enabled=False):  # the per-pixel outputs in float32 under a bf16 autocast (no ties in the heatmap)
        x = x.float()
        # (n, K, H, W): the tokenizer's padding cropped off; contiguous, so that the fields sliced
        # from it below are too when the convolutions run in channels-last memory (`deblend_samples`)
        o = out(x)[:, :, : shape[0], : shape[1]].contiguous()
        corr = correction(x)[:, :, : shape[0], : shape[1]].contiguous()
    n, b, e, (h, w) = o.shape[0], n_bands, embed_size, shape
    i = 3
    background = o[:, i:i + b]
    i += b
    pixel_embedding = o[:, i:i + b * e].reshape(n, b, e, h, w)
    i += b * e
    source_embedding = o[:, i:i + e]
    i += e
    amplitude = o[:, i:i + b]
    return DenseOutputs(o[:, 0], o[:, 1:3], background, pixel_embedding, source_embedding, amplitude, o[:, i + b], corr)


def normalised_pixels(values: torch.Tensor, ivar: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(n, 2B + 1, H8, W8) decoder input, padded (masked) to a multiple of 8 like the tokens:
    asinh(values / scale), asinh(S/N / 3), mask."""
    h, w = values.shape[-2:]
    pad = (0, (-w) % 8, 0, (-h) % 8)
    mask = (ivar > 0).to(values.dtype)
    v = values * mask
    x = torch.cat([torch.asinh(v / scale.view(-1, 1, 1, 1)), torch.asinh(v * ivar.clamp(min=0).sqrt() / 3), mask.amax(1, keepdim=True)], 1)
    return F.pad(x, pad)


def condition_planes(condition: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n, P) per-sample conditions (e.g. log PSF FWHM over the training card's, per band) ->
    (n, P, H, W) constant planes of `like`'s (n, C, H, W) size, dtype and device: how the
    decoder and the refiner are told the conditions (a plane per number, as CoordConv gives
    coordinates), so that every convolution can mix them with the pixels."""
    n, _, h, w = like.shape
    return condition.to(like.dtype)[:, :, None, None].expand(n, condition.shape[1], h, w)


def read_at(field: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Bilinear values of field (n, C, H, W) at centres (n, K, 2) [row, col] pixels -> (n, K, C)."""
    h, w = field.shape[-2:]
    if centres.shape[1] == 0:
        return field.new_zeros(field.shape[0], 0, field.shape[1])
    c = torch.nan_to_num(centres, nan=0.0)
    grid = torch.stack([c[..., 1] / max(w - 1, 1) * 2 - 1, c[..., 0] / max(h - 1, 1) * 2 - 1], dim=-1)  # x = col, y = row
    out = F.grid_sample(field, grid.unsqueeze(1).to(field.dtype), mode="bilinear", padding_mode="border", align_corners=True)
    return out[:, :, 0].transpose(1, 2)  # (n, K, C)


def split_logits(dense: DenseOutputs, centres: torch.Tensor, present: torch.Tensor, min_size: float) -> torch.Tensor:
    """(n, K + 1, B, H, W) logits of the flux split: sources 0..K-1 (absent ones -inf),
    background last; their softmax over the first axis gives the fractions, which sum to 1.
    centres (n, K, 2), present (n, K)."""
    n, b, e, h, w = dense.pixel_embedding.shape
    v = read_at(dense.source_embedding, centres)  # (n, K, E)
    amp = read_at(dense.amplitude, centres)  # (n, K, B)
    size = F.softplus(read_at(dense.size.unsqueeze(1), centres)[..., 0]) + min_size  # (n, K) pixels
    rows = torch.arange(h, device=centres.device, dtype=v.dtype).view(1, 1, h, 1)
    cols = torch.arange(w, device=centres.device, dtype=v.dtype).view(1, 1, 1, w)
    c = torch.nan_to_num(centres, nan=-1e4).to(v.dtype)
    dist = torch.sqrt((rows - c[..., 0, None, None]) ** 2 + (cols - c[..., 1, None, None]) ** 2 + 1e-6)  # (n, K, H, W)
    # sim / sqrt(E) + amp - dist / size, in place on the einsum's (n, K, B, H, W) output (its backward does not need it)
    logits = torch.einsum("nbehw,nke->nkbhw", dense.pixel_embedding, v).div_(math.sqrt(e))
    logits.add_(amp[..., None, None]).sub_((dist / size[..., None, None]).unsqueeze(2))
    logits.masked_fill_(~present[:, :, None, None, None], float("-inf"))
    return torch.cat([logits, dense.background.unsqueeze(1)], dim=1)


class SplitRefiner(nn.Module):
    """One step of per-source refinement of the flux split: a small CNN looks at a
    `window` x `window` crop around each source's centre and adds a correction to that
    source's split logits there.

    Why: the first split (`split_logits`) scores every pixel against a source by one dot
    product of embeddings the decoder computed before it knew which centres would be asked
    for, plus a radial prior. Most of the flux error left is in pairs closer than 1 PSF
    FWHM (`deblend_quality`'s error_sources): there the split must be judged against the
    light it gives each member, as scarlet's iterations do. So the refiner sees, per
    source and band, the image (asinh of values / scale), the light the current split
    gives the source and the light it gives the other sources, the source's log fraction,
    and the pixel's offset from the centre (and, with `condition_planes`, the observing
    conditions as constant planes); the background's logits stay as they are.
    Its last layer starts at zero, so an untrained refiner leaves the split unchanged."""

    def __init__(self, n_bands: int, channels: int = 24, window: int = 32, dilations: Sequence[int] = (1, 2, 4, 1),
                 condition_planes: int = 0):
        super().__init__()
        self.window = window
        c = channels
        # per band: image, own light, others' light, log fraction; inside, offsets; the conditions
        inputs = [4 * n_bands + 3 + condition_planes] + [c] * (len(dilations) - 1)
        # 3 x 3 convolutions with these dilations: the receptive field is 1 + 2 * sum(dilations) pixels
        self.body = nn.Sequential(*(nn.Sequential(nn.Conv2d(cin, c, 3, padding=d, dilation=d), nn.GELU())
                                    for cin, d in zip(inputs, dilations)))
        self.out = nn.Conv2d(c, n_bands, 1)
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, logits: torch.Tensor, image: torch.Tensor, centres: torch.Tensor, present: torch.Tensor,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        """logits (n, K + 1, B, H, W) -> refined logits of the same shape; image (n, B, H, W) the
        normalised pixels (`normalised_pixels`' first B channels: asinh(values / scale), masked
        pixels 0), centres (n, K, 2), present (n, K); condition (n, P) with `condition_planes` P."""
        n, k1, b, h, w = logits.shape
        k, win, half = k1 - 1, self.window, self.window // 2
        if k == 0 or not present.any():
            return logits
        sample, slot = present.nonzero(as_tuple=True)  # the m present sources
        c = torch.nan_to_num(centres.float(), nan=0.0)[sample, slot]  # (m, 2)
        ar = torch.arange(win, device=logits.device)
        rows = c[:, 0:1].round() - half + ar  # (m, win) image rows of each crop, may leave the image
        cols = c[:, 1:2].round() - half + ar
        inside = (((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]).flatten(1)  # (m, win^2)
        idx = (rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]).long().flatten(1)
        inside = inside.unsqueeze(1).to(logits.dtype)  # (m, 1, win^2): pixels outside the image are zeros
        band = torch.arange(b, device=logits.device)[None, :, None]
        # each crop pixel's place in a flattened (n, B, H, W) tensor, and in the (n, K + 1, B, H, W) logits
        at = (sample[:, None, None] * b + band) * (h * w) + idx[:, None, :]  # (m, B, win^2)
        own_at = ((sample * k1 + slot)[:, None, None] * b + band) * (h * w) + idx[:, None, :]

        def crop(x: torch.Tensor, where: torch.Tensor = at) -> torch.Tensor:  # the crops' pixels, read in place: (m, B, win^2)
            return torch.take(x, where) * inside

        fr = logits.softmax(dim=1)
        image = crop(image)
        own = crop(fr, own_at)
        rest = crop(fr[:, :k].sum(1)) - own  # the other sources' fractions (the background's excluded)
        offsets = torch.stack([((rows - c[:, 0:1]) / half)[:, :, None].expand(-1, -1, win),
                               ((cols - c[:, 1:2]) / half)[:, None, :].expand(-1, win, -1)], 1).flatten(-2)
        x = torch.cat([image, own * image, rest * image, torch.log(own + 1e-3), inside, offsets], dim=1)
        x = x.view(x.shape[0], x.shape[1], win, win)
        if condition is not None:
            x = torch.cat([x, condition_planes(condition[sample], x)], dim=1)
        delta = self.out(self.body(x)).flatten(-2) * inside  # (m, B, win^2)
        refined = logits.clone(memory_format=torch.contiguous_format)  # the background's and absent sources' stay
        refined.view(-1).index_add_(0, own_at.flatten(), delta.flatten())  # outside pixels add 0
        return refined


def find_peaks(heat: torch.Tensor, offset: torch.Tensor, threshold: float, max_sources: int, window: int = 3):
    """Detection: local maxima of sigmoid(heat) (n, H, W) above `threshold` in a `window`
    neighbourhood (max-pool NMS), the `max_sources` highest per sample, refined by the
    offset. Returns centres (n, S, 2) NaN-padded, scores (n, S) (0 where absent), present (n, S)."""
    p = torch.sigmoid(heat)
    peak = (p == F.max_pool2d(p.unsqueeze(1), window, 1, window // 2)[:, 0]) & (p > threshold)
    n, h, w = p.shape
    score = torch.where(peak, p, torch.zeros_like(p)).flatten(1)
    k = min(max_sources, h * w)
    top, idx = score.topk(k, dim=1)  # (n, k)
    present = top > 0
    r, c = (idx // w), (idx % w)
    off = offset.flatten(2).gather(2, idx.unsqueeze(1).expand(n, 2, k))  # (n, 2, k)
    centres = torch.stack([r + off[:, 0], c + off[:, 1]], dim=-1).to(p.dtype)
    centres = torch.where(present.unsqueeze(-1), centres, torch.full_like(centres, float("nan")))
    return centres, torch.where(present, top, torch.zeros_like(top)), present


def heatmap_targets(centres: torch.Tensor, shape: tuple[int, int], sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, H, W) CenterNet targets: max over sources of a Gaussian of `sigma` pixels at each
    centre, exactly 1 at each centre's nearest pixel; and (n, H, W) bool of those pixels."""
    n, k, _ = centres.shape
    h, w = shape
    rows = torch.arange(h, device=centres.device, dtype=torch.float32).view(1, 1, h, 1)
    cols = torch.arange(w, device=centres.device, dtype=torch.float32).view(1, 1, 1, w)
    ok = torch.isfinite(centres).all(-1)  # (n, K)
    c = torch.nan_to_num(centres.float(), nan=-1e4)
    g = torch.exp(-((rows - c[..., 0, None, None]) ** 2 + (cols - c[..., 1, None, None]) ** 2) / (2 * sigma**2))
    target = (g * ok[..., None, None]).amax(dim=1) if k else torch.zeros(n, h, w, device=centres.device)
    pos = torch.zeros(n, h * w, dtype=torch.bool, device=centres.device)
    r = c[..., 0].round().clamp(0, h - 1).long()
    cc = c[..., 1].round().clamp(0, w - 1).long()
    inside = ok & (c[..., 0] > -0.5) & (c[..., 0] < h - 0.5) & (c[..., 1] > -0.5) & (c[..., 1] < w - 0.5)
    flat = (r * w + cc).masked_fill(~inside, 0)
    pos.scatter_(1, flat, inside)
    pos = pos.view(n, h, w)
    return torch.where(pos, torch.ones_like(target), target), pos


def focal_loss(heat: torch.Tensor, target: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss of heat logits against Gaussian targets, per positive."""
    p = torch.sigmoid(heat.float()).clamp(1e-4, 1 - 1e-4)
    pos_term = ((1 - p) ** FOCAL_ALPHA * torch.log(p))[pos].sum()
    neg_term = ((1 - target) ** FOCAL_BETA * p**FOCAL_ALPHA * torch.log(1 - p))[~pos].sum()
    return -(pos_term + neg_term) / pos.sum().clamp(min=1)


def offset_loss(offset: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """L1 of the predicted sub-pixel offset at each true centre's nearest pixel."""
    h, w = offset.shape[-2:]
    ok = torch.isfinite(centres).all(-1)
    c = torch.nan_to_num(centres.float(), nan=0.0)
    r, cc = c[..., 0].round().clamp(0, h - 1), c[..., 1].round().clamp(0, w - 1)
    idx = (r * w + cc).long()  # (n, K)
    got = offset.flatten(2).gather(2, idx.unsqueeze(1).expand(-1, 2, -1))  # (n, 2, K)
    want = torch.stack([c[..., 0] - r, c[..., 1] - cc], dim=1)
    return ((got - want).abs().sum(1) * ok).sum() / ok.sum().clamp(min=1)


def fraction_loss(fractions: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy of fractions (n, K + 1, B, H, W) against target fractions of the same
    shape, weighted per pixel and band by weight (n, B, H, W) (normalised)."""
    ce = -(target * torch.log(fractions.clamp(min=1e-6))).sum(1)  # (n, B, H, W)
    return (ce * weight).sum() / weight.sum().clamp(min=1e-6)


def fraction_flux_loss(fractions: torch.Tensor, target: torch.Tensor, image: torch.Tensor, true_flux: torch.Tensor,
                       err: torch.Tensor) -> torch.Tensor:
    """Mean over true sources and bands of sum_p |f_k(p) - t_k(p)| I(p) / (F_k + 2 sigma_k):
    the L1 fraction error of each source weighted by the (noiseless) image I (n, B, H, W),
    relative to its true flux F_k (n, K, B) (finite F > 0; sigma_k its flux error, so faint
    sources do not dominate). fractions, target: (n, K, B, H, W), the sources only.

    Why: it bounds the source's relative flux error |sum_p (f_k - t_k) I| / F_k, the MAPE the
    benchmark scores, pixel by pixel. The soft cross-entropy of `fraction_loss` barely sees
    a faint source taking 1-2 % of a bright neighbour's pixels (-log 0.98 ~ 0.02 for the
    neighbour), which is most of that faint source's flux error."""
    ok = torch.isfinite(true_flux) & (true_flux > 0)
    t = torch.nan_to_num(true_flux, nan=1.0).clamp(min=1e-30)
    dev = ((fractions - target).abs() * image.clamp(min=0).unsqueeze(1)).sum((-2, -1))  # (n, K, B)
    return (dev / (t + 2 * err.detach()) * ok).sum() / ok.sum().clamp(min=1)


def source_fluxes(fractions: torch.Tensor, values: torch.Tensor, ivar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-band fluxes (n, K + 1, B) of fraction x image (masked pixels count 0) and their
    propagated pixel-noise errors sqrt(sum fraction^2 / ivar)."""
    good = ivar > 0
    v = torch.where(good, values, torch.zeros_like(values)).unsqueeze(1)
    var = torch.where(good, 1 / ivar.clamp(min=1e-30), torch.zeros_like(ivar)).unsqueeze(1)
    flux = (fractions * v).sum((-2, -1))
    err = torch.sqrt((fractions**2 * var).sum((-2, -1)))
    return flux, err


def flux_correction(dense: DenseOutputs, centres: torch.Tensor, max_log: float = CORRECTION_MAX_LOG) -> torch.Tensor:
    """(n, K, B) multiplicative per-band flux corrections exp(max_log tanh(c)), c read at each
    centre: 1 for an untrained head (c = 0), at most exp(+-max_log).

    Why: fraction x image is unbiased only where a source's fraction is 1 over all of its
    light, but from noisy pixels the fractions cannot tell a source's faint outskirts from
    sky, so part of the outskirts' flux goes to the background (measured after 200 steps:
    background share 10-20 % in pixels 0.01-0.3 sigma above the sky). Summing the whole
    image instead would be unbiased but adds every sky pixel's noise.
    The correction is the missing outskirts' share, regressed from the features at the
    centre (which see the source's size, profile and S/N) by the flux loss against the
    true flux, as an aperture correction is from a PSF / profile model. That loss applies
    the fractions to the *noiseless* blend (the `noiseless` target): on the noisy image r a
    multiplicative c fitted to the truth t shrinks towards t E[r] / E[r^2] < t / E[r]
    (regression dilution; measured: c ~ 0.86 after 200 steps, fluxes biased low)."""
    return torch.exp(max_log * torch.tanh(read_at(dense.correction, centres)))


def flux_loss(flux: torch.Tensor, err: torch.Tensor, true_flux: torch.Tensor) -> torch.Tensor:
    """Huber of the relative flux error (f - t) / (t + 2 sigma_f) over the true sources
    (finite t > 0); the noise term keeps faint sources from dominating."""
    ok = torch.isfinite(true_flux) & (true_flux > 0)
    t = torch.nan_to_num(true_flux, nan=1.0).clamp(min=1e-30)
    rel = (flux - t) / (t + 2 * err.detach())
    return (F.huber_loss(rel, torch.zeros_like(rel), reduction="none", delta=0.2) * ok).sum() / ok.sum().clamp(min=1)


def group_grid(shape: tuple[int, ...], patch: int) -> tuple[int, int, int]:
    """(B, H/p, W/p) token grid of image stamps of shape (B, H, W) (padded up to the patch p)."""
    b, h, w = shape
    return b, -(-h // patch), -(-w // patch)


__all__ = [
    "BandTokenGrid", "CORRECTION_MAX_LOG", "DenseOutputs", "condition_planes", "PixelDecoder", "find_peaks", "flux_correction", "flux_loss", "focal_loss", "fraction_flux_loss", "fraction_loss",
    "group_grid", "heatmap_targets", "normalised_pixels", "offset_loss", "read_at", "source_fluxes",
    "split_logits", "SplitRefiner",
]
