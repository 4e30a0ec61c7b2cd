"""Rendering of HI disks into cubes, and the cubes' correlated noise (SDC2-like mocks).

The disk model and renderer behind cubes.py's galaxies (which re-exports this API):

Rendering: the disk is sampled on rings x azimuths in its own plane, projected on the
sky (pixel offsets) and in velocity (channel offsets), deposited cloud-in-cell into a
small stamp, and the stamp is convolved in Fourier space with the beam (spatially) and
the dispersion times the channel box (spectrally), dividing out the cloud-in-cell
kernel, so each voxel is the beam-convolved sky at the pixel centre averaged over the
channel, and the flux is conserved exactly. Values are Jy/beam: flux per pixel times the
beam area in pixels.

Noise: white Gaussian noise per channel convolved spatially with a Gaussian chosen so
that the noise autocorrelation *is* the beam (as for interferometric image noise,
whose covariance is the synthesised beam), normalised analytically (not by the sample
std) to the card's noise per channel. Channels are independent.
"""

from __future__ import annotations

import math

import astropy.units as u
import numpy as np

from cosmofm.data_cards.mocks.common import C_KMS
from cosmofm.data_cards.schema import CubeCard

_SIGMA_PER_FWHM = 1.0 / math.sqrt(8 * math.log(2))
# Dimensionless disk profile, in t = r / r_d.
_T = np.linspace(0.0, 40.0, 2001)


def _profile(t, mol_ratio):
    return np.exp(-t) / (1.0 + mol_ratio * np.exp(-1.6 * t))


# ---------------------------------------------------------------------------- disk model


def _rings(disk_scale: float, mol_ratio: float, n_rings: int):
    """Ring radii [units of disk_scale's] and mass weights (sum 1), out to 99.9 % of the mass."""
    mass = np.cumsum(_T * _profile(_T, mol_ratio))
    t_max = float(np.interp(0.999 * mass[-1], mass, _T))
    t = (np.arange(n_rings) + 0.5) * (t_max / n_rings)
    w = t * _profile(t, mol_ratio)
    return t * disk_scale, w / w.sum()


def _disk_points(disk_scale, mol_ratio, v_flat, r_turn, incl_deg, n_rings, n_phi):
    """Points of the disk: (sky offset along the major axis, along the minor axis) [arcsec],
    line-of-sight velocity [km/s] and weight (sum 1). phi = 0 is the receding side."""
    r, w = _rings(disk_scale, mol_ratio, n_rings)
    # Each ring's azimuths are shifted by a golden-ratio fraction so rings do not line up.
    offset = (np.arange(n_rings) * 0.6180339887) % 1.0
    phi = 2 * np.pi * (np.arange(n_phi)[None, :] + 0.5 + offset[:, None]) / n_phi  # (R, P)
    sin_i, cos_i = math.sin(math.radians(incl_deg)), math.cos(math.radians(incl_deg))
    v_r = v_flat * (1.0 - np.exp(-r / max(r_turn, 1e-12)))
    maj = r[:, None] * np.cos(phi)
    mnr = r[:, None] * np.sin(phi) * cos_i
    v_los = v_r[:, None] * sin_i * np.cos(phi)
    weight = np.broadcast_to(w[:, None] / n_phi, phi.shape)
    return maj.ravel(), mnr.ravel(), v_los.ravel(), weight.ravel()


def _w20(disk_scale, mol_ratio, v_flat, r_turn, incl_deg, sigma_v) -> float:
    """Width [km/s] at 20 % of the peak of the intrinsic integrated spectrum."""
    _, _, v, w = _disk_points(disk_scale, mol_ratio, v_flat, r_turn, incl_deg, 48, 256)
    step = 0.5  # km/s bins
    nk = int(5 * sigma_v / step)
    n_half = int(np.ceil(np.abs(v).max() / step)) + nk + 1
    spec = np.bincount(np.rint(v / step).astype(np.int64) + n_half, weights=w, minlength=2 * n_half + 1)
    k = np.arange(-nk, nk + 1) * step
    spec = np.convolve(spec, np.exp(-0.5 * (k / sigma_v) ** 2), mode="same")
    return _width_at(spec, (np.arange(spec.size) - n_half) * step, 0.2)


def _width_at(spec: np.ndarray, x: np.ndarray, level: float) -> float:
    """Distance between the outermost crossings of level * max(spec), interpolated linearly."""
    thresh = level * spec.max()
    above = np.nonzero(spec >= thresh)[0]
    lo, hi = above[0], above[-1]
    left = x[lo] if lo == 0 else np.interp(thresh, [spec[lo - 1], spec[lo]], [x[lo - 1], x[lo]])
    right = x[hi] if hi == len(x) - 1 else np.interp(thresh, [spec[hi + 1], spec[hi]], [x[hi + 1], x[hi]])
    return float(abs(right - left))


# ---------------------------------------------------------------------------- rendering


def _fast_len(n: int) -> int:
    """Smallest 2,3,5-smooth integer >= n (cheap FFT sizes)."""
    m = max(int(n), 1)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def _beam_sigma_pix(card: CubeCard) -> float:
    return card.beam_fwhm.to_value(u.arcsec) * _SIGMA_PER_FWHM / card.pixel_scale.to_value(u.arcsec)


def beam_area_pixels(card: CubeCard) -> float:
    """Area of the card's Gaussian beam in pixels: 2 pi sigma^2 = 1.1331 FWHM^2 / pixel^2."""
    return 2 * np.pi * _beam_sigma_pix(card) ** 2


def render_galaxy(canvas: np.ndarray, freq0: float, card: CubeCard, px: float, py: float, row: dict) -> None:
    """Add one galaxy to `canvas` (F, H, W) in Jy/beam, in place.

    freq0 is the frequency [Hz] of canvas channel 0 (channels step by the card's
    channel_width); (px, py) the 0-based pixel position of the galaxy's centre along
    (RA, Dec) axes; `row` holds the truth columns (central_freq, line_flux_integral, pa,
    i, v_flat, r_turn, disk_scale, mol_ratio, sigma_v) as plain numbers. RA pixels run
    east to west (CDELT1 < 0). Parts outside the canvas are cut.
    """
    stamp = galaxy_stamp(canvas.shape, freq0, card, px, py, row)
    if stamp is not None:
        paste_stamp(canvas, *stamp)


def galaxy_stamp(cube_shape, freq0: float, card: CubeCard, px: float, py: float, row: dict):
    """(lo, stamp) of one galaxy for a cube of `cube_shape` (F, H, W) whose channel 0 is at freq0
    [Hz] (as `render_galaxy`): lo = (channel, y, x) of the stamp's corner in the cube, stamp
    float64 Jy/beam; None when it lies wholly outside the cube. A stamp depends only on the
    cube's frame, so one cube written in blocks of channels gets the same values.
    """
    nf, ny, nx = cube_shape
    dnu = card.channel_width.to_value(u.Hz)
    scale = card.pixel_scale.to_value(u.arcsec)
    sb = _beam_sigma_pix(card)
    nu_c = float(row["central_freq"])
    sigma_v = float(row["sigma_v"])
    sf = nu_c * sigma_v / C_KMS / dnu  # dispersion in channels
    incl = float(row["i"])
    v_sin_i = float(row["v_flat"]) * math.sin(math.radians(incl))
    r_max_pix = 6.0 * float(row["disk_scale"]) / scale  # sampling density only, not a cut
    n_rings = int(np.clip(np.ceil(2 * r_max_pix), 6, 96))
    n_phi = int(np.clip(max(np.ceil(4 * np.pi * r_max_pix), np.ceil(2 * np.pi * v_sin_i / (0.5 * sigma_v))), 16, 512))
    n_phi += (-n_phi) % 8
    maj, mnr, v, w = _disk_points(float(row["disk_scale"]), float(row["mol_ratio"]), float(row["v_flat"]), float(row["r_turn"]), incl, n_rings, n_phi)
    pa = math.radians(float(row["pa"]))
    east = maj * math.sin(pa) + mnr * math.cos(pa)
    north = maj * math.cos(pa) - mnr * math.sin(pa)
    x = px - east / scale  # RA grows to the east, i.e. to lower pixel x
    y = py + north / scale
    c = (nu_c / (1.0 + v / C_KMS) - freq0) / dnu  # fractional channel index

    # Stamp: the points plus room for the kernels (5 sigma), FFT-friendly sizes.
    pad_s, pad_f = int(np.ceil(5 * sb)) + 2, int(np.ceil(5 * sf)) + 2
    lo = np.array([np.floor(c.min()) - pad_f, np.floor(y.min()) - pad_s, np.floor(x.min()) - pad_s], dtype=np.int64)
    hi = np.array([np.ceil(c.max()) + pad_f, np.ceil(y.max()) + pad_s, np.ceil(x.max()) + pad_s], dtype=np.int64)
    if hi[0] < 0 or lo[0] >= nf or hi[1] < 0 or lo[1] >= ny or hi[2] < 0 or lo[2] >= nx:
        return None  # entirely outside the cube
    shape = tuple(_fast_len(int(h - l) + 1) for l, h in zip(lo, hi))

    # Cloud-in-cell deposit of flux [Jy Hz] (8 neighbours per point).
    fc, fy, fx = c - lo[0], y - lo[1], x - lo[2]
    ic, iy, ix = np.floor(fc).astype(np.int64), np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
    dc, dy, dx = fc - ic, fy - iy, fx - ix
    flux = w * float(row["line_flux_integral"])
    stamp = np.zeros(int(np.prod(shape)))
    for oc, wc in ((0, 1 - dc), (1, dc)):
        for oy, wy in ((0, 1 - dy), (1, dy)):
            for ox, wx in ((0, 1 - dx), (1, dx)):
                idx = ((ic + oc) * shape[1] + (iy + oy)) * shape[2] + (ix + ox)
                stamp += np.bincount(idx, weights=flux * wc * wy * wx, minlength=stamp.size)
    stamp = stamp.reshape(shape)

    # Kernels in Fourier space: beam / CIC^2 spatially (pixels sample the beam-convolved
    # sky), dispersion x channel box / CIC spectrally (channels average over their width).
    kf = np.fft.fftfreq(shape[0])[:, None, None]
    ky = np.fft.fftfreq(shape[1])[None, :, None]
    kx = np.fft.rfftfreq(shape[2])[None, None, :]
    spec = np.exp(-2 * np.pi**2 * sf**2 * kf**2) / np.sinc(kf)
    spat = np.exp(-2 * np.pi**2 * sb**2 * (ky**2 + kx**2)) / (np.sinc(ky) * np.sinc(kx)) ** 2
    stamp = np.fft.irfftn(np.fft.rfftn(stamp) * (spec * spat), s=shape, axes=(0, 1, 2))
    stamp *= beam_area_pixels(card) / dnu  # Jy Hz per voxel -> Jy per pixel -> Jy/beam

    return lo, stamp


def paste_stamp(canvas: np.ndarray, lo, stamp: np.ndarray, channel_offset: int = 0) -> None:
    """Add the overlap of a `galaxy_stamp` and `canvas`, in place; canvas channel 0 is cube
    channel `channel_offset` (a block of channels of a larger cube)."""
    lo = (lo[0] - channel_offset, lo[1], lo[2])
    src, dst = [], []
    for a in range(3):
        s0, s1 = max(0, -lo[a]), min(stamp.shape[a], canvas.shape[a] - lo[a])
        if s1 <= s0:
            return
        src.append(slice(int(s0), int(s1)))
        dst.append(slice(int(lo[a] + s0), int(lo[a] + s1)))
    canvas[tuple(dst)] += stamp[tuple(src)]


# ---------------------------------------------------------------------------- noise, continuum


def _noise_filter(card: CubeCard, ny: int, nx: int) -> tuple[np.ndarray, int, tuple[int, int], float]:
    """rfft2 transfer function, padding, padded plane shape and the 1-sigma normalisation.

    The kernel has sigma_beam / sqrt(2), so kernel (x) kernel = the beam: the noise
    autocorrelation is the beam's shape.
    """
    sk = _beam_sigma_pix(card) / math.sqrt(2)
    pad = int(np.ceil(4 * sk)) + 1
    py, px = _fast_len(ny + 2 * pad), _fast_len(nx + 2 * pad)
    ky, kx = np.fft.fftfreq(py)[:, None], np.fft.fftfreq(px)[None, :]
    power = np.exp(-4 * np.pi**2 * sk**2 * (ky**2 + kx**2))  # |T|^2 on the full grid
    t = np.exp(-2 * np.pi**2 * sk**2 * (ky**2 + np.fft.rfftfreq(px)[None, :] ** 2))
    return t, pad, (py, px), float(np.sqrt(power.mean()))  # Parseval: variance = mean |T|^2 for unit white noise


def _add_noise(canvas: np.ndarray, card: CubeCard, rngs, scale=None) -> None:
    """Add correlated noise plane by plane; rngs yields one Generator per block of planes.

    scale: None, or a function of the planes' slice giving the noise in units of the
    card's, broadcastable to (planes, H, W) (a primary-beam pattern).
    """
    nf, ny, nx = canvas.shape
    t, pad, shape, norm = _noise_filter(card, ny, nx)
    sigma = card.noise_per_channel / norm
    for planes, rng in rngs:
        white = rng.standard_normal((planes.stop - planes.start, *shape))
        field = np.fft.irfft2(np.fft.rfft2(white) * t, s=shape)
        noise = sigma * field[:, pad : pad + ny, pad : pad + nx]
        canvas[planes] += noise if scale is None else noise * scale(planes)
