"""A redshift network equivariant to shifts in log wavelength: p(z) from learned rest-frame kernels.

On a grid uniform in log(lambda), a redshift is a shift: log lambda_obs = log lambda_rest +
log(1 + z). The network keeps that symmetry from input to output (issue 17):

1. normalise: pixels binned `bin_pixels` at a time (ivar-weighted means, as the scan bins 4),
   flux divided by a robust per-spectrum scale (median |f| of the usable bins), three
   per-bin channels (flux, flux x S/N weight, S/N weight; masked bins zero);
2. features: a few 1-D convolutions at stride 1 ('same' padding), each output multiplied by
   the mask: translation-equivariant features at full (binned) resolution;
3. correlation: each feature channel is cross-correlated with a learned rest-frame kernel
   spanning every rest wavelength the z range reaches, summed over channels into one
   score per z bin and template group; the groups are combined by log-sum-exp (a soft
   "best template", as the scan keeps the best class);
4. optionally a smooth learned prior over z (`prior_knots` > 0, piecewise linear); it
   breaks exact equivariance and is off by default.

A shift of the input by k bins (k x bin_pixels pixels) shifts the logits by k z bins, away
from the edges and without the prior. The logits are a softmax over fine bins of log(1+z)
(one binned pixel wide), trained by cross-entropy against Gaussian-smoothed one-hot targets:
the soft labels of Pasquet et al. 2019 (A&A 621, A26), and the classification-over-bins
redshift of Stivaktakis et al. 2019 (IEEE TNNLS). The correlation of a spectrum with
rest-frame templates at every shift is the classical cross-correlation redshift (Tonry &
Davis 1979, AJ 84, 1511; heads/redshift_scan.py), here with learned features and kernels.

Two correlation paths: `correlate_direct` (conv1d, the readable reference) and
`correlate_fft` (torch.fft, used by forward; tested against the reference). CPU inference
takes heads/redshift_net_cpu.py (`RedshiftNet.cpu_kernels`; the same logits, ~2x faster
per core than the FFT path; with bfloat16 convolutions where the CPU has them natively,
`RedshiftNet.cpu_bf16`), also tested against the reference.
Decoding (`decode`): the mean of p inside its peak, a 1-sigma error from the peak's width
(scaled on validation), and the CDF at the true z (PIT, `RedshiftNet.pit`). Training:
`train_redshift_net` (AdamW, best validation checkpoint, then `calibrate`: temperature and
error scale on validation). Checkpoints: safetensors + JSON.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cosmofm.data_cards.errors import InputError
from cosmofm.heads.metrics import redshift_error_scale, redshift_metrics
from cosmofm.heads.photoz_metrics import binned_cdf

CONFIG_NAME, WEIGHTS_NAME = "redshift_net.json", "redshift_net.safetensors"
FLUX_CLIP = 30.0  # normalised flux beyond +-this (cosmic rays, bad sky) is clipped


@dataclass
class RedshiftNetConfig:
    """The network's settings, JSON-serialisable (`to_dict` / `from_dict`).

    Args:
        log_lambda_start (`float`, log10 3600): log10(Angstrom) of the first input pixel.
        log_lambda_step (`float`, 1e-4): dex per input pixel (SDSS's loglam step).
        n_pixels (`int`, 4608): input pixels per spectrum (the sdss-like-survey card).
        bin_pixels (`int`, 4): input pixels per bin; one bin is one z bin (4e-4 dex, dz/(1+z) 9e-4).
        z_min, z_max (`float`, -0.005, 4.0): redshift range of the z bins.
        channels (`int`, 8): width of the convolutions.
        kernel_size (`int`, 5): their kernel, in bins (odd).
        n_layers (`int`, 3): convolutions (dilations 1, 2, 4, ...: receptive field grows fast).
        xcorr_channels (`int`, 8): feature maps correlated with rest-frame kernels (one FFT each).
        n_templates (`int`, 2): kernel groups combined by log-sum-exp (one inverse FFT each).
        target_sigma_bins (`float`, 1.0): width of the Gaussian soft targets, in z bins.
        prior_knots (`int`, 0): knots of the learned prior over z bins; 0 = none (exact equivariance).
        peak_half_width (`int`, 3): z bins either side of the peak that `decode` averages over.
        temperature (`float`, 1.0): logits are divided by it for p(z); fitted on validation.
        peak_offset_bins (`float`, 0.0): median (peak - true) position on validation, in z bins,
            subtracted by `decode` (the window mean of a skewed peak is biased); a constant in
            log(1+z), so the shift symmetry stays.
        error_scale (`float`, 1.0): factor on the peak's width that makes z_err match the scatter
            (`heads.metrics.redshift_error_scale`); fitted on validation.
        family_calibration (`dict`, {}): {family: {"temperature": t, "error_scale": s}} fitted per
            family (STAR, GALAXY, QSO: `heads.template_fit.class_family`) on validation when its
            classes are known; `decode` uses a family's values for rows given that family's class
            (in `cosmofm classify`, the predicted class), the global ones otherwise.
    """

    log_lambda_start: float = math.log10(3600.0)
    log_lambda_step: float = 1e-4
    n_pixels: int = 4608
    bin_pixels: int = 4
    z_min: float = -0.005
    z_max: float = 4.0
    channels: int = 8
    kernel_size: int = 5
    n_layers: int = 3
    xcorr_channels: int = 8
    n_templates: int = 2
    target_sigma_bins: float = 1.0
    prior_knots: int = 0
    peak_half_width: int = 3
    temperature: float = 1.0
    peak_offset_bins: float = 0.0
    error_scale: float = 1.0
    family_calibration: dict = field(default_factory=dict)
    type: str = "redshift-net"

    def __post_init__(self):
        if self.n_pixels % self.bin_pixels:
            raise InputError("n_pixels", f"{self.n_pixels} is not a multiple of bin_pixels {self.bin_pixels}", "choose bin_pixels dividing n_pixels")
        if self.kernel_size % 2 == 0 or not -1 < self.z_min < self.z_max:
            raise InputError("kernel_size/z_min/z_max", f"{self.kernel_size}, {self.z_min}, {self.z_max}", "an odd kernel and -1 < z_min < z_max")

    @property
    def bin_step(self) -> float:  # dex of log10(lambda) per bin = per z bin
        return self.bin_pixels * self.log_lambda_step

    @property
    def n_bins(self) -> int:
        return self.n_pixels // self.bin_pixels

    @property
    def shift_range(self) -> tuple[int, int]:
        """(lowest, highest) shift in bins; z bin m is log10(1 + z) = (lowest + m) x bin_step."""
        return (math.floor(math.log10(1 + self.z_min) / self.bin_step), math.ceil(math.log10(1 + self.z_max) / self.bin_step))

    @property
    def n_z(self) -> int:
        return self.shift_range[1] - self.shift_range[0] + 1

    @property
    def n_kernel(self) -> int:
        """Rest-frame kernel length in bins: every (observed bin, shift) pair lands inside it."""
        return self.n_bins + self.n_z - 1

    @property
    def rest_log_lambda_start(self) -> float:
        """log10(Angstrom) at the centre of rest-frame kernel bin 0 (observed bin 0 at the highest shift)."""
        return self.log_lambda_start + (self.bin_pixels - 1) / 2 * self.log_lambda_step - self.shift_range[1] * self.bin_step

    def z_edges(self) -> np.ndarray:
        return 10 ** ((self.shift_range[0] + np.arange(self.n_z + 1) - 0.5) * self.bin_step) - 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_card(cls, card, **fields) -> "RedshiftNetConfig":
        """The config on a log-sampled, single-window spectrum card's own pixel grid (its last
        pixels dropped to a multiple of bin_pixels); `fields` set the rest."""
        if card.sampling != "log" or card.windows:
            raise InputError(f"{card.name}.spectrum.sampling", "the redshift network needs one log-sampled window",
                             "use the redshift scan for this card (redshift: scan)")
        lo, hi = card.wavelength_min.to_value("Angstrom"), card.wavelength_max.to_value("Angstrom")
        bins = fields.get("bin_pixels", cls.bin_pixels)
        return cls(log_lambda_start=math.log10(lo), log_lambda_step=math.log10(hi / lo) / (card.n_pixels - 1),
                   n_pixels=card.n_pixels - card.n_pixels % bins, **fields)

    @classmethod
    def from_dict(cls, d: dict) -> "RedshiftNetConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError("config", f"unknown keys {sorted(unknown)}", f"use {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


def on_network_grid(wavelength, cfg: RedshiftNetConfig) -> bool:
    """Whether a spectrum's pixels `wavelength` [Angstrom] are the network's input grid: at least
    n_pixels of them, the first and the n_pixels-th on the grid's ends (to 1e-8 dex)."""
    if len(wavelength) < cfg.n_pixels:
        return False
    ends = np.log10(np.asarray(wavelength)[[0, cfg.n_pixels - 1]].astype(np.float64))
    grid_ends = cfg.log_lambda_start, cfg.log_lambda_start + (cfg.n_pixels - 1) * cfg.log_lambda_step
    return bool(np.all(np.abs(ends - grid_ends) < 1e-8))


def spectra_on_grid(samples, cfg: RedshiftNetConfig) -> tuple[np.ndarray, np.ndarray]:
    """(flux, ivar) (N, n_pixels) float32 of spectrum Samples on the network's input grid: copied
    when a sample's pixels are that grid (`on_network_grid`; checked once per wavelength array,
    which a survey file's samples share), in one stacked copy when every sample's are (the
    card's mocks, a survey file's rows), else resampled in log wavelength
    (`heads.template_fit.resample_log`: a survey file's own grid; pixels it does not cover get
    ivar = 0). Flux behind ivar = 0 (after the float32 cast) is set to 0."""
    from cosmofm.heads.template_fit import resample_log

    samples, n = list(samples), cfg.n_pixels  # each read once
    flux, ivar = np.zeros((2, len(samples), n), np.float32)
    checked: dict[int, bool] = {}  # id of a wavelength array -> on the grid (the samples keep the arrays alive)
    for sample in samples:
        wave = sample.coords["wavelength"]
        if id(wave) not in checked:
            checked[id(wave)] = on_network_grid(wave, cfg)
    on_grid = [checked[id(s.coords["wavelength"])] for s in samples]
    if samples and all(on_grid):  # the common case: one stacked copy
        np.stack([s.values[:n] for s in samples], out=flux)
        np.stack([s.ivar[:n] for s in samples], out=ivar)
    else:
        grid = cfg.log_lambda_start + np.arange(n) * cfg.log_lambda_step
        for k, sample in enumerate(samples):
            if on_grid[k]:
                flux[k], ivar[k] = sample.values[:n], sample.ivar[:n]
            else:
                wave, f, w = (np.asarray(a, dtype=np.float64) for a in (sample.coords["wavelength"], sample.values, sample.ivar))
                flux[k], ivar[k] = resample_log(wave, np.nan_to_num(f), w, grid)
    np.copyto(flux, 0.0, where=~(ivar > 0))
    return flux, ivar


def all_finite(x: torch.Tensor) -> bool:
    """Whether every value of x is finite: its sum is (one cheap pass; NaN and inf propagate),
    or, when the sum is not (also when finite values overflow it), the elementwise test."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def checked_spectra(flux, ivar, cfg: RedshiftNetConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """flux and ivar (N, L) as float32 tensors, checked: shapes on the config's grid, ivar finite
    and >= 0 (InputError naming the field otherwise)."""
    flux, ivar = torch.as_tensor(flux, dtype=torch.float32), torch.as_tensor(ivar, dtype=torch.float32)
    if flux.ndim != 2 or ivar.shape != flux.shape or flux.shape[1] != cfg.n_pixels:
        raise InputError("flux/ivar", f"shapes {tuple(flux.shape)} and {tuple(ivar.shape)}",
                         f"give (N, {cfg.n_pixels}) arrays on the grid log10(lambda) = {cfg.log_lambda_start:.5f} + {cfg.log_lambda_step} i")
    if not all_finite(ivar) or (len(ivar) and float(ivar.min()) < 0):
        raise InputError("ivar", "holds NaN, infinite or negative values", "set ivar = 0 for masked pixels")
    return flux, ivar


def row_nanmedian(v: torch.Tensor) -> torch.Tensor:
    """(N, 1) lower median of each row's non-NaN values (NaN if none)."""
    return v.nanmedian(1, keepdim=True).values


def binned(flux: torch.Tensor, ivar: torch.Tensor, cfg: RedshiftNetConfig, median=row_nanmedian) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, g, valid) (N, B) of checked flux and ivar (`checked_spectra`): the normalised binned
    flux, its S/N weight and whether the bin holds any weight (`normalise`). `median`: how the
    rows' lower median of |f| is taken (`row_nanmedian`, or the CPU path's)."""
    fi = flux * ivar
    if not all_finite(fi):  # NaN behind zero weight stays out
        f = torch.where(ivar > 0, flux, 0.0)
        if not all_finite(f):
            raise InputError("flux", "NaN or infinite where ivar > 0", "set ivar = 0 where the flux is not finite")
        fi = f * ivar
    n, b = len(flux), cfg.n_bins
    w_bin = ivar.view(n, b, cfg.bin_pixels).sum(-1)  # (N, B)
    valid = w_bin > 0
    f_bin = torch.where(valid, fi.view(n, b, cfg.bin_pixels).sum(-1) / w_bin.clamp(min=1e-30), 0.0)
    scale = median(torch.where(valid, f_bin.abs(), torch.nan))  # (N, 1)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    x = (f_bin / scale).clamp(-FLUX_CLIP, FLUX_CLIP)
    snr = w_bin.sqrt() * scale
    return x, snr / (1 + snr), valid


def normalise(flux: torch.Tensor, ivar: torch.Tensor, cfg: RedshiftNetConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(channels (N, 3, B), valid (N, 1, B)) of flux and ivar (N, L) on the config's grid.

    Binning: ivar-weighted means of bin_pixels pixels. Scale: median |f| of the usable bins (a
    robust per-spectrum scale, unchanged by a shift). Channels: f / scale, that times g, and
    g = s / (1 + s) with s = sqrt(ivar) x scale the S/N of a typical pixel: the network sees how
    far to trust each bin, as a chi-square does, in a bounded form."""
    x, g, valid = binned(*checked_spectra(flux, ivar, cfg), cfg)
    return torch.stack([x, x * g, g], 1), valid[:, None].float()


def correlate_direct(features: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Reference path: scores (N, G, n_z) = sum_c sum_j features[n, c, j] kernels[g, c, j - m + n_z - 1].

    features (N, C, B), kernels (G, C, K) with K = B + n_z - 1. conv1d slides each spectrum's
    features (as weights, one group per spectrum) along the kernels; output index d = n_z - 1 - m."""
    n, c, b = features.shape
    g, _, k = kernels.shape
    out = F.conv1d(kernels.reshape(1, g * c, k).repeat(1, n, 1).reshape(1, n * g * c, k),
                   features.repeat_interleave(g, 0), groups=n * g)  # (1, N * G, n_z)
    return out.reshape(n, g, -1).flip(-1)


def fft_length(n: int) -> int:
    """Smallest 2^a 3^b >= n: lengths the FFT runs fast on."""
    return min(2**a * 3**b for a in range(int(math.log2(n)) + 2) for b in range(int(math.log(n, 3)) + 2) if 2**a * 3**b >= n)


def correlate_fft(features: torch.Tensor, kernels_fft_conj: torch.Tensor, n_fft: int, n_z: int) -> torch.Tensor:
    """`correlate_direct` by FFT, given conj(rfft(kernels, n_fft)) (G, C, F): one transform per channel,
    the products summed over channels in the frequency domain, one inverse per template group.
    r[d] = sum_j f[j] k[j + d] never wraps since n_fft >= K = (B - 1) + (n_z - 1) + 1."""
    spec = torch.fft.rfft(features, n_fft)  # (N, C, F)
    # a product and a sum per group: as fast as a batched complex matmul over F for few groups, no copies
    prod = torch.stack([(spec * k).sum(1) for k in kernels_fft_conj], 1)  # (N, G, F)
    # irfft(F conj(K)) is r reversed: r'[e] = r[-e mod n_fft], so logits m = r[n_z - 1 - m] = r'[m - n_z + 1]
    out = torch.fft.irfft(prod, n_fft)
    return torch.cat([out[..., n_fft - n_z + 1:], out[..., :1]], -1)  # (N, G, n_z)


@dataclass
class RedshiftNetOutput:
    logits: torch.Tensor  # (N, n_z) over the z bins, before the temperature
    loss: torch.Tensor | None = None  # cross-entropy against the soft targets, when z is given


@dataclass
class RedshiftPrediction:
    z: np.ndarray  # (N,) mean of p(z) inside its peak
    z_err: np.ndarray  # (N,) 1-sigma: the peak's width x error_scale
    probs: np.ndarray | None  # (N, n_z) p over the z bins (`RedshiftNetConfig.z_edges`); None when not asked for


class RedshiftNet(nn.Module):
    """Spectra (flux, ivar (N, L)) -> logits over z bins; shift-equivariant without the prior (module docstring)."""

    def __init__(self, cfg: RedshiftNetConfig):
        super().__init__()
        self.cfg = cfg
        layers, width = [], 3
        for i in range(cfg.n_layers):
            dilation = 2**i
            layers += [nn.Conv1d(width, cfg.channels, cfg.kernel_size, padding=dilation * (cfg.kernel_size // 2), dilation=dilation), nn.GELU()]
            width = cfg.channels
        layers.append(nn.Conv1d(width, cfg.xcorr_channels, 1))
        self.features = nn.Sequential(*layers)
        # std such that a correlation over ~B x C terms of O(1) features gives O(1) scores
        self.kernels = nn.Parameter(torch.randn(cfg.n_templates, cfg.xcorr_channels, cfg.n_kernel) / math.sqrt(cfg.n_bins * cfg.xcorr_channels))
        self.prior = nn.Parameter(torch.zeros(cfg.prior_knots)) if cfg.prior_knots > 0 else None
        self.n_fft = fft_length(cfg.n_kernel)
        self.cpu_kernels = True  # CPU inference through heads/redshift_net_cpu.py (`forward`)

    def _cached(self, name: str, tensors: tuple[torch.Tensor, ...], compute) -> torch.Tensor:
        """compute() kept while `tensors` are unchanged (their storage and version counters)."""
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        cache = self.__dict__.setdefault("_fft_cache", {})
        if cache.get(name, (None,))[0] != key:
            with torch.no_grad():
                cache[name] = (key, compute())
        return cache[name][1]

    def _kernels_fft(self) -> torch.Tensor:
        """Conjugated rfft of the kernels (G, C, F); cached while they are unchanged (their version counter) and no gradient is wanted."""
        if torch.is_grad_enabled() and self.kernels.requires_grad:
            return torch.fft.rfft(self.kernels, self.n_fft).conj()
        return self._cached("kernels", (self.kernels,), lambda: torch.fft.rfft(self.kernels, self.n_fft).conj_physical())

    def _folded_fft(self) -> torch.Tensor:
        """The kernels' transforms with the last pointwise layer folded in (redshift_net_cpu.folded_kernels), cached."""
        from cosmofm.heads.redshift_net_cpu import folded_kernels

        last = self.features[-1]
        return self._cached("folded", (self.kernels, last.weight, last.bias), lambda: folded_kernels(self))

    def feature_maps(self, flux, ivar, reference: bool = False) -> torch.Tensor:
        """(N, xcorr_channels, B) features, zero on masked bins (so they add nothing to a correlation).
        `reference`: plain conv1d for every layer (the fast path replaces the pointwise one by a matmul)."""
        x, valid = normalise(flux, ivar, self.cfg)
        for layer in self.features:
            if not isinstance(layer, nn.Conv1d):
                x = layer(x)
                continue
            if layer.kernel_size[0] == 1 and not reference:  # speed: conv1d's 1x1 path is ~10x slower on CPU
                x = torch.baddbmm(layer.bias[None, :, None], layer.weight[None, :, :, 0].expand(len(x), -1, -1), x)
            else:
                x = layer(x)
            # masked after every layer: a masked bin is the same as a bin beyond the grid's edge
            # (zero padding), so a shift that keeps every usable bin on the grid is exact
            x = x * valid
        return x

    def scores(self, features: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """(N, n_z) logits from features: per-group correlations, log-sum-exp over groups, + prior."""
        per_group = (correlate_direct(features, self.kernels) if reference
                     else correlate_fft(features, self._kernels_fft(), self.n_fft, self.cfg.n_z))  # (N, G, n_z)
        return self._with_prior(per_group[:, 0] if per_group.shape[1] == 1 else per_group.logsumexp(1))

    def _with_prior(self, logits: torch.Tensor) -> torch.Tensor:
        if self.prior is None:
            return logits
        return logits + F.interpolate(self.prior[None, None], size=self.cfg.n_z, mode="linear", align_corners=True)[0, 0]

    def forward(self, flux, ivar, z=None, reference: bool = False) -> RedshiftNetOutput:
        """Logits (and the loss against z). `reference`: the readable path (conv1d correlation);
        else the FFT, and for CPU inference the fast path of heads/redshift_net_cpu.py
        (`cpu_kernels`, on by default; the same logits to float32 rounding, or to bfloat16's
        where the CPU runs it natively: set `cpu_bf16 = False` for float32 throughout)."""
        from cosmofm.heads import redshift_net_cpu

        flux, ivar = checked_spectra(flux, ivar, self.cfg)
        if not reference and redshift_net_cpu.takes_fast_path(self, flux):
            logits = self._with_prior(redshift_net_cpu.logits(self, flux, ivar))
        else:
            logits = self.scores(self.feature_maps(flux, ivar, reference), reference)
        loss = None if z is None else -(soft_targets(z, self.cfg).to(logits.device) * logits.log_softmax(-1)).sum(-1).mean()
        return RedshiftNetOutput(logits, loss)

    @torch.inference_mode()
    def batched_logits(self, flux, ivar, batch_size: int = 512) -> torch.Tensor:
        return torch.cat([self(flux[i:i + batch_size], ivar[i:i + batch_size]).logits for i in range(0, len(flux), batch_size)])

    def predict(self, flux, ivar, batch_size: int = 512, classes=None, probs: bool = True) -> RedshiftPrediction:
        """z, z_err and p(z) of spectra, batch by batch, calibrated (`decode`; `classes`: each
        spectrum's class or family, for the per-family calibration; without `probs` no p(z))."""
        return RedshiftPrediction(*decode(self.batched_logits(flux, ivar, batch_size), self.cfg, classes, probs))

    def pit(self, pred: RedshiftPrediction, z_true) -> np.ndarray:
        """CDF of each p(z) at its true redshift (uniform on [0, 1] when calibrated): p's bins away
        from the peak (`binned_cdf`), and the peak's mass as a Gaussian N(z, z_err). Bins of 9e-4
        in dz/(1+z) cannot show a peak ~0.2 bins wide; a binned CDF alone piles PITs up at 0.5."""
        z_true = np.asarray(z_true, dtype=np.float64)
        peak = np.abs(np.arange(self.cfg.n_z) - pred.probs.argmax(1)[:, None]) <= self.cfg.peak_half_width
        mass = np.where(peak, pred.probs, 0).sum(1)
        away = binned_cdf(np.where(peak, 0, pred.probs) + 1e-300, self.cfg.z_edges(), z_true) * (1 - mass)
        return away + mass * torch.special.ndtr(torch.as_tensor((z_true - pred.z) / pred.z_err)).numpy()


def soft_targets(z, cfg: RedshiftNetConfig) -> torch.Tensor:
    """(N, n_z) Gaussians of width target_sigma_bins centred on each true log10(1+z), normalised."""
    z = torch.as_tensor(z, dtype=torch.float64)
    position = torch.log10(1 + z) / cfg.bin_step - cfg.shift_range[0]  # fractional z bin
    d = (torch.arange(cfg.n_z, dtype=torch.float64) - position[:, None]) / cfg.target_sigma_bins
    t = torch.exp(-0.5 * d**2)
    return (t / t.sum(1, keepdim=True).clamp(min=1e-300)).float()


def calibration_values(cfg: RedshiftNetConfig, key: str, classes=None) -> float | torch.Tensor:
    """cfg's `key` ("temperature" or "error_scale"): the global value, or per row (N,) float64 the
    value fitted for each class's family (`family_calibration`; the global one for a family
    without its own)."""
    from cosmofm.heads.template_fit import class_family

    base = getattr(cfg, key)
    if classes is None or not cfg.family_calibration:
        return base
    return torch.tensor([cfg.family_calibration.get(class_family(str(c)), {}).get(key, base) for c in classes], dtype=torch.float64)


def decode(logits: torch.Tensor, cfg: RedshiftNetConfig, classes=None, probs: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(z, z_err, probs) from logits (N, n_z). The peak: the mean bin of p (raw logits) within
    peak_half_width bins of its maximum (on validation mocks 7 % lower NMAD than a parabola
    through log p); z_err: p's standard deviation there x error_scale (soft targets make the
    peak about target_sigma_bins wide, wider than the scatter); probs: softmax(logits / temperature),
    or None without `probs` (z and z_err read only the peak's window: a catalogue skips the
    float64 softmax over every bin). `classes` (N,): the per-family temperature and error scale
    (`calibration_values`)."""
    logits = logits.detach().cpu()
    i = logits.argmax(1)
    window = (i[:, None] + torch.arange(-cfg.peak_half_width, cfg.peak_half_width + 1)).clamp(0, cfg.n_z - 1)  # (N, W)
    p = (logits.gather(1, window).double() - logits.gather(1, i[:, None]).double()).exp()  # (N, W), 1 at the peak
    p = p / p.sum(1, keepdim=True)
    position = (p * window).sum(1) - cfg.peak_offset_bins
    sigma = ((p * (window - position[:, None]) ** 2).sum(1)).sqrt() * calibration_values(cfg, "error_scale", classes)  # in bins
    log1pz = (cfg.shift_range[0] + position) * cfg.bin_step
    z = 10**log1pz - 1
    z_err = (1 + z) * math.log(10) * cfg.bin_step * sigma
    if not probs:
        return z.numpy(), z_err.numpy(), None
    temperature = calibration_values(cfg, "temperature", classes)
    scaled = logits.double() / (temperature if isinstance(temperature, float) else temperature[:, None])
    return z.numpy(), z_err.numpy(), scaled.softmax(-1).numpy()


def save_redshift_net(model: RedshiftNet, directory) -> Path:
    """Config JSON + safetensors weights in `directory` (no pickle), each written atomically."""
    from safetensors.torch import save

    from cosmofm.pretrain.manifest import atomic_write_bytes, atomic_write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / CONFIG_NAME, model.cfg.to_dict())
    atomic_write_bytes(directory / WEIGHTS_NAME, save({k: v.detach().contiguous() for k, v in model.state_dict().items()}))
    return directory


def load_redshift_net(directory) -> RedshiftNet:
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise InputError("directory", f"{directory} lacks {CONFIG_NAME} or {WEIGHTS_NAME}", "give a directory written by save_redshift_net")
    model = RedshiftNet(RedshiftNetConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text())))
    model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
    return model.eval()


def calibrate(model: RedshiftNet, val_arrays: dict, min_family: int = 50) -> RedshiftNet:
    """Fit on validation spectra: the temperature (tails of p(z); Guo et al. 2017's temperature
    scaling, by grid search, against targets 0.5 bins wide), the peak offset and the error scale;
    with the spectra's classes (val_arrays["cls"]) also the temperature and error scale of each
    family with >= `min_family` spectra (`family_calibration`: one scale left QSOs over-confident)."""
    from cosmofm.heads.template_fit import class_family

    logits = model.batched_logits(val_arrays["flux"], val_arrays["ivar"])
    targets = soft_targets(val_arrays["z"], RedshiftNetConfig(**{**model.cfg.to_dict(), "target_sigma_bins": 0.5}))
    z_true = np.asarray(val_arrays["z"], dtype=np.float64)

    def temperature(rows: np.ndarray) -> float:
        t, lg = targets[torch.from_numpy(rows)], logits[torch.from_numpy(rows)]
        grid = np.geomspace(0.25, 4.0, 41)
        return float(grid[np.argmin([float(-(t * (lg / temp).log_softmax(-1)).sum(-1).mean()) for temp in grid])])

    every = np.ones(len(z_true), bool)
    model.cfg.temperature = temperature(every)
    model.cfg.error_scale, model.cfg.peak_offset_bins, model.cfg.family_calibration = 1.0, 0.0, {}
    z, _, _ = decode(logits, model.cfg)
    model.cfg.peak_offset_bins = float(np.median((np.log10(1 + z) - np.log10(1 + z_true)) / model.cfg.bin_step))
    z, z_err, _ = decode(logits, model.cfg)
    model.cfg.error_scale = redshift_error_scale(z_true, z, z_err)  # z_err at scale 1 here
    if "cls" in val_arrays:
        families = np.array([class_family(str(c)) for c in val_arrays["cls"]])
        for family in sorted(set(families)):
            rows = families == family
            if rows.sum() >= min_family:
                model.cfg.family_calibration[family] = {"temperature": temperature(rows),
                                                        "error_scale": redshift_error_scale(z_true[rows], z[rows], z_err[rows])}
    return model


def train_redshift_net(train_arrays: dict, val_arrays: dict, cfg: RedshiftNetConfig, steps: int, seed: int = 0,
                       batch_size: int = 64, lr: float = 3e-3, weight_decay: float = 1e-4, eval_every: int = 250,
                       checkpoint_dir=None, log=print) -> tuple[RedshiftNet, list[dict]]:
    """AdamW with a one-cycle schedule on {"flux", "ivar", "z"} arrays; the state of best validation
    catastrophic fraction (then NMAD) is kept, `calibrate`d on the validation set and saved to
    checkpoint_dir. Returns (model in eval mode, history of validation records)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = RedshiftNetConfig.from_dict(cfg.to_dict())  # a copy: the fitted temperature stays the model's
    model = RedshiftNet(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    flux, ivar, z = (np.asarray(train_arrays[k]) for k in ("flux", "ivar", "z"))
    history, best, t0, running = [], None, time.perf_counter(), []
    for step in range(1, steps + 1):
        model.train()
        idx = rng.integers(0, len(flux), batch_size)
        loss = model(flux[idx], ivar[idx], z[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        running.append(float(loss.detach()))
        if step % eval_every == 0 or step == steps:
            z_val, _, _ = decode(model.eval().batched_logits(val_arrays["flux"], val_arrays["ivar"]), cfg)
            record = {"step": step, "seconds": time.perf_counter() - t0, "train_loss": float(np.mean(running)),
                      **redshift_metrics(np.asarray(val_arrays["z"]), z_val)}
            running = []
            history.append(record)
            log(json.dumps(record))
            key = (record["redshift_catastrophic_fraction"], record["redshift_nmad"])
            if best is None or key < best[0]:
                best = (key, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[1])
    calibrate(model.eval(), val_arrays)
    if checkpoint_dir is not None:
        save_redshift_net(model, checkpoint_dir)
    return model, history
