"""Coordinate-aware tokenizers: one per modality, all producing tokens of one width.

Each tokenizer cuts a sample into patches along its data axes (1D wavelength spans,
2D sky patches per band, 3D sky x frequency or comoving blocks), embeds each patch's
normalised values together with its *physical* coordinates (log wavelength, band
wavelength, sky offset in arcsec, log frequency, comoving position, and the pixel
step along each axis), so spectra on different grids or resolutions, and images with
other bands or pixel scales, land in one token space without resampling.

Values are normalised per sample by their ivar-weighted RMS; ivar is scaled to match,
so a chi-square computed on normalised patches equals the one in physical units.

What is written here is the reference path: plain torch with no host round trips, the
same on CPU, CUDA or the `meta` device. On CPU tensors, `config.cpu_kernels` swaps a few
steps for faster equivalents kept in `cpu_kernels.py` (tested equal to these).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import AXES
from cosmofm.pretrain import cpu_kernels
from cosmofm.pretrain.configuration_cosmofm import CosmoFMConfig
from cosmofm.pretrain.data import ModalityBatch


@dataclass
class TokenGroup:
    """Tokens of one ModalityBatch."""

    modality: str
    rows: torch.Tensor  # (n,) rows in the whole batch
    content: torch.Tensor  # (n, T, D) embedding of the patch values
    position: torch.Tensor  # (n, T, D) embedding of the physical coordinates
    coords: torch.Tensor  # (n, T, C) physical coordinate features (see each tokenizer)
    patches: torch.Tensor  # (n, T, P) normalised values (reconstruction target)
    patch_ivar: torch.Tensor  # (n, T, P) normalised inverse variance
    valid: torch.Tensor  # (n, T) bool: token has at least one unmasked element
    scale: torch.Tensor  # (n,) normalisation: values / scale were embedded
    hidden: torch.Tensor | None = None  # (n, T) bool: hidden for masked modelling (content not embedded)


class FourierCoordinateEmbedding(nn.Module):
    """Embeds C scalar coordinates with sin/cos at log-spaced periods, then a linear map.

    `periods[c] = (shortest, longest)` in the coordinate's own unit: the range of
    scales at which the model should tell coordinate values apart. `cpu_kernels`: on CPU,
    embed a coordinate that repeats (over rows or tokens) once (`cpu_kernels.coordinate_embedding`).
    """

    def __init__(self, periods: list[tuple[float, float]], n_frequencies: int, hidden_size: int, cpu_kernels: bool = True):
        super().__init__()
        # Plain attributes, not buffers: they are fixed by the class, and transformers'
        # from_pretrained leaves non-persistent buffers uninitialised.
        self.periods, self.n_frequencies, self.cpu_kernels = list(periods), n_frequencies, cpu_kernels
        self.proj = nn.Linear(2 * n_frequencies * len(periods), hidden_size)

    def omegas(self, device: torch.device) -> torch.Tensor:
        """(C, K) float64 angular frequencies, made on `device`."""
        return torch.stack(
            [2 * math.pi / torch.logspace(math.log10(lo), math.log10(hi), self.n_frequencies, dtype=torch.float64, device=device) for lo, hi in self.periods]
        )

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        # coords (n, T, C) float64: phases in float64 so large coordinates keep precision
        omegas = self.omegas(coords.device)  # (C, K)
        if cpu_kernels.applies(self.cpu_kernels, coords):
            return cpu_kernels.coordinate_embedding(self.proj, coords, omegas)
        phase = coords.unsqueeze(-1) * omegas  # (n, T, C, K)
        feats = torch.cat([phase.sin(), phase.cos()], dim=-1).flatten(2)  # (n, T, C * 2K): per coordinate, its sines then cosines
        return self.proj(feats.to(self.proj.weight.dtype))  # (n, T, D)


class PatchTokenizer(nn.Module):
    """Shared N-D patching, normalisation and embedding; subclasses define coordinates."""

    modality: str = ""
    # (shortest, longest) period of each coordinate feature, subclass-defined; the last
    # feature of every modality is log10(normalisation scale) in the data card's unit.
    coord_periods: list[tuple[float, float]] = []

    def __init__(self, config: CosmoFMConfig, patch_shape: tuple[int, ...]):
        super().__init__()
        self.patch_shape = tuple(patch_shape)
        self.patch_size = math.prod(self.patch_shape)
        self.content = nn.Linear(2 * self.patch_size, config.hidden_size)  # [values, weight] per pixel
        self.weight_kind, self.weight_window = config.pixel_weight, config.pixel_weight_window
        self.cpu_kernels = config.cpu_kernels
        self.position = FourierCoordinateEmbedding(self.coord_periods, config.coord_frequencies, config.hidden_size, config.cpu_kernels)

    def axis_features(self, centre: dict[str, torch.Tensor], step: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per-token coordinate features (each (n, T) float64) from axis centres and steps."""
        raise NotImplementedError

    def pixel_weight(self, ivar: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The second input channel of every pixel, (n, *S): its mask (config pixel_weight "mask"),
        or ("ivar") its 1/sigma relative to the sample's median, clipped to [0, 3], so that a
        pixel on a bright sky line reads as noisy rather than as an emission line; or
        ("ivar_local", spectra only) its 1/sigma relative to the running median of the measured
        pixels within pixel_weight_window // 2 pixels of it, clipped the same way."""
        if self.weight_kind == "mask":
            return mask
        sigma_inv = ivar.clamp(min=0).sqrt().flatten(1)  # (n, L): 0 where masked (ivar = 0) already
        measured = sigma_inv.masked_fill(mask.flatten(1) == 0, float("nan"))
        median = measured.nanmedian(dim=1).values  # (n,) lower median of the measured pixels
        median = torch.nan_to_num(median, nan=1.0).clamp(min=1e-30)  # nothing measured: any scale will do
        if self.weight_kind == "ivar":
            return (sigma_inv / median[:, None]).clamp(max=3.0).view_as(mask)
        # "ivar_local": where the noise follows the source's counts, 1/sigma over a global median
        # is a noise-free copy of the continuum's shape, which a classifier learns to read (and
        # a reddened star's differs). A running median keeps what the weight is for (a sky line
        # or a bad column is narrower than the window, so it still reads as noisy) and drops
        # the smooth shape.
        if ivar.dim() != 2:
            raise InputError("pixel_weight", f"'ivar_local' is defined along a spectrum's wavelength axis; got a {self.modality} batch",
                             "use pixel_weight 'ivar' (or 'mask') for a backbone that also sees images, cubes or fields")
        fast = cpu_kernels.applies(self.cpu_kernels, measured)
        local = _running_nanmedian(measured, self.weight_window, cpu_kernels.nan_lower_median if fast else _nan_lower_median)  # (n, L)
        local = torch.where(torch.isnan(local), median[:, None], local).clamp(min=1e-30)  # a window with nothing measured
        return (sigma_inv / local).clamp(max=3.0).view_as(mask)

    def embed_content(self, patches: torch.Tensor, patch_mask: torch.Tensor, patch_weight: torch.Tensor) -> torch.Tensor:
        """(n, T, P) normalised values, the mask to apply to them and their pixel weights -> (n, T, hidden_size)."""
        return self.content(torch.cat([patches * patch_mask, patch_weight], dim=-1))

    def forward(self, batch: ModalityBatch, mask_ratio: float = 0.0, seeds: torch.Tensor | None = None) -> TokenGroup:
        """Tokens of `batch`; with mask_ratio > 0, that fraction of each sample's tokens
        (chosen by its seed, `seeds` (n,)) is hidden: their pixels are zeroed before
        embedding and `TokenGroup.hidden` marks them."""
        axes = AXES[self.modality]
        values, ivar = batch.values, batch.ivar  # (n, *S)
        n, shape = values.shape[0], values.shape[1:]
        if len(shape) != len(self.patch_shape):
            raise InputError("values", f"{self.modality} batch has shape {tuple(shape)}; expected {len(self.patch_shape)} axes {axes}", "collate Samples with collate_samples")
        # Pad every axis to a multiple of the patch size with masked (ivar = 0) elements.
        pad = [(-s) % p for s, p in zip(shape, self.patch_shape)]
        if any(pad):
            flat_pad = [x for p in reversed(pad) for x in (0, p)]
            values = nn.functional.pad(values, flat_pad)
            ivar = nn.functional.pad(ivar, flat_pad)
        mask = (ivar > 0).to(values.dtype)
        scale = sample_scale(values, mask)  # (n,)
        bshape = (n,) + (1,) * len(shape)
        values = values / scale.view(bshape)
        ivar = ivar * scale.view(bshape) ** 2

        patches = _patchify(values, self.patch_shape)  # (n, T, P)
        patch_ivar = _patchify(ivar, self.patch_shape)
        patch_mask = _patchify(mask, self.patch_shape)
        valid = patch_mask.sum(-1) > 0
        weight = _patchify(self.pixel_weight(ivar, mask), self.patch_shape)  # 0 where masked already
        hidden = None
        if mask_ratio > 0:
            hidden = token_mask(seeds, patches.shape[1], mask_ratio, valid)  # (n, T)
            shown = (~hidden).unsqueeze(-1).to(patch_mask.dtype)
            content = self.embed_content(patches, patch_mask * shown, weight * shown)
        else:
            content = self.embed_content(patches, patch_mask, weight)

        # Coordinates of patch centres and pixel steps per axis, broadcast to tokens.
        n_per_axis = [(s + p) // q for s, p, q in zip(shape, pad, self.patch_shape)]
        centre, step = {}, {}
        for i, axis in enumerate(axes):
            args = (batch.coords[axis], pad[i], n_per_axis[i], self.patch_shape[i])  # coordinates (n, L_i)
            if cpu_kernels.applies(self.cpu_kernels, args[0]):  # a grid shared by the batch: one row, broadcast
                centres, d = cpu_kernels.once_per_batch(_axis_centres_and_step, *args)
            else:
                centres, d = _axis_centres_and_step(*args)  # (n, T_i), (n,)
            view = [n] + [1] * len(axes)
            view[1 + i] = n_per_axis[i]
            centre[axis] = centres.view(view).expand(n, *n_per_axis).reshape(n, -1)
            step[axis] = d.view(n, 1).expand(n, centre[axis].shape[1])
        feats = self.axis_features(centre, step)
        log_scale = scale.double().clamp(min=1e-30).log10().view(n, 1).expand_as(feats[0])
        coords = torch.stack(feats + [log_scale], dim=-1)  # (n, T, C)
        return TokenGroup(
            modality=self.modality,
            rows=batch.rows,
            content=content,
            position=self.position(coords),
            coords=coords,
            patches=patches,
            patch_ivar=patch_ivar,
            valid=valid,
            scale=scale,
            hidden=hidden,
        )


def sample_scale(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(n, ...) values and their 0 / 1 mask -> (n,) each sample's rms over its unmasked
    elements (1 where it has none or they are all 0): the scale the tokenizer divides by,
    which `TokenGroup.scale` carries and the heads' pixel branches reuse."""
    count = mask.flatten(1).sum(1)
    rms = ((values**2 * mask).flatten(1).sum(1) / count.clamp(min=1)).sqrt()
    return torch.where((count > 0) & (rms > 0), rms, torch.ones_like(rms))


def token_mask(seeds: torch.Tensor, n_tokens: int, ratio: float, valid: torch.Tensor) -> torch.Tensor:
    """Hide round(ratio * T) tokens per sample, chosen by the sample's own seed.

    Seeding per sample (not from the global RNG) makes the mask independent of how the
    batch is split over processes and workers, so 1- and 2-process runs agree. The hidden
    tokens are those with the k smallest keys hash(seed, token index): integer arithmetic
    on the batch's device, the same on every device (no generator on the host).
    """
    k = max(1, round(ratio * n_tokens))
    seeds = seeds.long()
    state = _hash32(_hash32(seeds & _LOW32) ^ ((seeds >> 32) & _LOW32))  # (n,) the seed's 64 bits mixed into 32
    keys = _hash32(state[:, None] ^ torch.arange(n_tokens, device=seeds.device))  # (n, T)
    chosen = keys.argsort(dim=1, stable=True)[:, :k]
    hidden = torch.zeros(len(seeds), n_tokens, dtype=torch.bool, device=seeds.device).scatter_(1, chosen, True)
    return hidden & valid


_LOW32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective mix of 32-bit values held in int64 (Wellons' "lowbias32"), exact in int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for x in [0, 2**32), in halves so that no int64 product overflows."""
    return (((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c) & _LOW32


def _nan_lower_median(x: torch.Tensor) -> torch.Tensor:
    """(..., m) -> (...): the lower median of the non-NaN values along the last axis (NaN if none)."""
    return x.nanmedian(dim=-1).values


def _running_nanmedian(x: torch.Tensor, window: int, median: Callable[[torch.Tensor], torch.Tensor] = _nan_lower_median) -> torch.Tensor:
    """(n, L) -> (n, L): a running median of the non-NaN values over ~`window` pixels (NaN
    where there are none): the median of the medians of k consecutive blocks of
    window // 8 pixels (k odd, ~8), taken at block centres and interpolated linearly
    between them. A feature narrower than about half the window moves it by at most a
    block or two, as it would the exact running median. `median` takes the lower median
    of short rows (`cpu_kernels.nan_lower_median` is a faster one on a CPU)."""
    n, length = x.shape
    size = max(1, window // 8)
    k = (window // size) // 2 * 2 + 1  # blocks per window, odd: a centred window
    n_blocks = -(-length // size)
    blocks = nn.functional.pad(x, (0, n_blocks * size - length), value=float("nan")).view(n, n_blocks, size)
    block_median = median(blocks)  # (n, B) at pixels b * size + (size - 1) / 2
    padded = nn.functional.pad(block_median, (k // 2, k // 2), value=float("nan"))  # windows past the ends see fewer blocks
    centred = median(padded.unfold(1, k, 1))  # (n, B)
    u = (torch.arange(length, device=x.device, dtype=x.dtype) - (size - 1) / 2) / size  # pixel position in block units
    left = u.floor().clamp(0, n_blocks - 1).long()
    right, t = (left + 1).clamp(max=n_blocks - 1), (u - left).clamp(0, 1)
    return centred[:, left] * (1 - t) + centred[:, right] * t  # a NaN neighbour (nothing measured) gives NaN


def _patchify(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """(n, S0, S1, ...) -> (n, T, P) with T = prod(S_i / p_i) in C order of patch index."""
    n, shape = x.shape[0], x.shape[1:]
    split = [n]
    for s, p in zip(shape, patch):
        split += [s // p, p]
    x = x.reshape(split)
    d = len(shape)
    order = [0] + [1 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)]
    return x.permute(order).reshape(n, -1, math.prod(patch))


def _axis_centres_and_step(c: torch.Tensor, pad: int, n_tokens: int, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates c (n, L) of one axis, extended by `pad` elements -> the centres of its
    n_tokens patches (n, n_tokens) and its median pixel step (n,): robust to the gaps of
    multi-window spectrographs."""
    c = _extend(c, pad)
    step = c.diff(dim=1).abs().median(dim=1).values if c.shape[1] > 1 else torch.ones_like(c[:, 0])
    return c.reshape(len(c), n_tokens, patch).mean(-1), step


def _extend(c: torch.Tensor, k: int) -> torch.Tensor:
    """Extrapolate coordinates (n, L) linearly by k elements (for padding)."""
    if k == 0:
        return c
    d = c[:, -1:] - c[:, -2:-1] if c.shape[1] > 1 else torch.ones_like(c[:, -1:])
    return torch.cat([c, c[:, -1:] + d * torch.arange(1, k + 1, dtype=c.dtype, device=c.device)], dim=1)


class SpectrumTokenizer(PatchTokenizer):
    """1D spectra: features [log10 wavelength/A, log10 (pixel step/wavelength), log10 scale]."""

    modality = "spectrum"
    coord_periods = [(1e-3, 3.0), (0.01, 10.0), (0.1, 30.0)]

    def __init__(self, config: CosmoFMConfig):
        super().__init__(config, (config.spectrum_patch_size,))
        channels = config.spectrum_stem_channels
        self.stem = None
        if channels:
            # A linear map of a whole patch cannot tell a line's width, or the ratio of two
            # lines, wherever they fall in the patch; a small convolutional stem over the whole
            # spectrum, max- and mean-pooled over each patch, can, at any redshift (a shift on
            # a log-wavelength grid). Its receptive field, ~25 pixels, spans [NII] 6585 and
            # Halpha on BOSS-like grids. Full resolution (stride 1, the second convolution
            # dilated) classified best in our runs; a stride > 1 is ~2x faster per halving on
            # CPUs, where these convolutions are memory-bound. Pixels of tokens hidden for
            # masked modelling are zeroed before the stem (PatchTokenizer.forward), so their
            # content cannot leak into the neighbours.
            stride, k = config.spectrum_stem_stride, config.spectrum_stem_kernel
            if config.spectrum_patch_size % stride:
                raise ValueError(f"spectrum_patch_size {config.spectrum_patch_size} must be a multiple of spectrum_stem_stride {stride}")
            dilation = 2 if stride == 1 else 1
            self.stem = nn.Sequential(
                nn.Conv1d(2, channels, 2 * stride + 1 if stride > 1 else k, stride=stride, padding=stride if stride > 1 else k // 2), nn.GELU(),
                nn.Conv1d(channels, channels, k, padding=dilation * (k // 2), dilation=dilation), nn.GELU(),
            )
            self.content = nn.Linear(2 * self.patch_size + 2 * channels, config.hidden_size)

    def embed_content(self, patches, patch_mask, patch_weight):
        if self.stem is None:
            return super().embed_content(patches, patch_mask, patch_weight)
        if cpu_kernels.applies(self.cpu_kernels, patches):
            return cpu_kernels.spectrum_stem_content(self.stem, self.content, patches, patch_mask, patch_weight)
        n, t, p = patches.shape
        values = patches * patch_mask
        x = torch.stack([values, patch_weight], dim=1).view(n, 2, t * p)  # (n, 2, L): the stem runs over the whole spectrum
        local = self.stem(x).view(n, -1, t, p // self.stem[0].stride[0])  # (n, C, T, P / stride)
        pooled = torch.cat([local.amax(-1), local.mean(-1)], dim=1).transpose(1, 2)  # (n, T, 2C): max and mean over each patch
        return self.content(torch.cat([values, patch_weight, pooled], dim=-1))  # (n, T, D)

    def axis_features(self, centre, step):
        lam = centre["wavelength"]
        return [lam.log10(), (step["wavelength"] / lam).log10()]


class ImageTokenizer(PatchTokenizer):
    """Multi-band images, one band per token: [log10 band wavelength/A, dec, ra (arcsec),
    log10 pixel scale/arcsec, log10 scale]."""

    modality = "image"
    coord_periods = [(1e-3, 3.0), (0.05, 500.0), (0.05, 500.0), (0.01, 10.0), (0.1, 30.0)]

    def __init__(self, config: CosmoFMConfig):
        p = config.image_patch_size
        super().__init__(config, (1, p, p))

    def axis_features(self, centre, step):
        return [centre["band_wavelength"].log10(), centre["dec_offset"], centre["ra_offset"], step["ra_offset"].log10()]


class CubeTokenizer(PatchTokenizer):
    """Radio cubes: [log10 frequency/Hz, dec, ra (arcsec), log10 (channel width/frequency),
    log10 pixel scale/arcsec, log10 scale]."""

    modality = "cube"
    coord_periods = [(1e-4, 3.0), (0.5, 5000.0), (0.5, 5000.0), (0.01, 10.0), (0.01, 10.0), (0.1, 30.0)]

    def __init__(self, config: CosmoFMConfig):
        super().__init__(config, tuple(config.cube_patch_size))

    def axis_features(self, centre, step):
        nu = centre["frequency"]
        return [nu.log10(), centre["dec_offset"], centre["ra_offset"], (step["frequency"] / nu).log10(), step["ra_offset"].log10()]


class FieldTokenizer(PatchTokenizer):
    """Simulated fields / lightcones: [los distance, y, x (comoving Mpc), log10 cell/Mpc, log10 scale]."""

    modality = "field"
    coord_periods = [(1.0, 20000.0), (1.0, 5000.0), (1.0, 5000.0), (0.01, 10.0), (0.1, 30.0)]

    def __init__(self, config: CosmoFMConfig):
        super().__init__(config, tuple(config.field_patch_size))

    def axis_features(self, centre, step):
        return [centre["los_distance"], centre["y_comoving"], centre["x_comoving"], step["x_comoving"].log10()]


TOKENIZERS: dict[str, type[PatchTokenizer]] = {
    "spectrum": SpectrumTokenizer,
    "image": ImageTokenizer,
    "cube": CubeTokenizer,
    "field": FieldTokenizer,
}
