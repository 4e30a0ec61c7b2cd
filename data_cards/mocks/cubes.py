"""Mock HI spectral cubes after the SKA Science Data Challenge 2 (Hartley et al. 2023).

Two products, both deterministic given the seed:

* `mock_cube(card, seed, index)`: a chunk of card.n_channels x card.spatial_size^2 around
  one HI galaxy (plus its neighbours), for the registry and the pretraining corpus; the
  truth rows travel in `meta` as JSON-safe dicts.
* `mock_survey_cube(card, n_channels, size, ...)`: a survey-like cube with a FITS WCS
  header and an SDC2-style truth catalogue (astropy Table with units);
  `write_survey_cube_fits` stores both in one FITS file.

The physics, per galaxy (all functions below are vectorised over galaxies):

* HI mass from the ALFALFA HI mass function, a Schechter function in log M with
  alpha = -1.25, log M* = 9.94, phi* = 4.5e-3 Mpc^-3 dex^-1 (Jones et al. 2018, H0 = 70).
* redshift from the observed frequency, z = nu_rest / nu - 1; sources are spread in
  redshift by the comoving volume dV/dz (no evolution of the mass function); distances
  from astropy's FlatLambdaCDM(H0=70, Om0=0.3), tabulated once.
* HI diameter from the mass-size relation log D_HI = 0.506 log M_HI - 3.293 (kpc, at
  1 Msun/pc^2; Wang et al. 2016) with 0.06 dex scatter; `hi_size` = D_HI / D_A in arcsec.
* surface density Sigma(r) ~ exp(-r/r_d) / (1 + R_mol exp(-1.6 r/r_d)): an exponential
  gas disk whose centre is depleted by H2 (Obreschkow et al. 2009). r_d is solved so that
  the disk holds M_HI and reaches 1 Msun/pc^2 at D_HI/2 (the Wang et al. definition).
* rotation curve v(r) = v_flat (1 - exp(-r/r_turn)); v_flat from the baryonic
  Tully-Fisher relation M_b = 47 v^4 (McGaugh 2012) with M_b = 1.33 M_HI / f_gas and a
  gas fraction falling with mass; isotropic velocity dispersion sigma_v = 10 km/s.
* random orientation: cos i uniform, position angle (of the receding half of the major
  axis, east of north) uniform in [0, 360).
* integrated flux S = M_HI (1+z) / (2.356e5 D_L^2) Jy km/s in observer-frame velocity
  (Meyer et al. 2017), i.e. S = M_HI / (49.7 D_L^2) Jy Hz (`line_flux_integral`).
* w20: the width at 20 % of the peak of the galaxy's intrinsic integrated spectrum
  (rest-frame km/s; the observed width in Hz is w20 * central_freq / c).

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

Continuum residuals (optional, `continuum_residual` > 0): point sources with a power-law
flux distribution and spectral index whose continuum was subtracted imperfectly: each
leaves `continuum_residual` x S(nu) x (a random quadratic in frequency), beam-shaped.
"""

from __future__ import annotations

import functools
import math
import os
import uuid
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.cosmology import FlatLambdaCDM
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.common import C_KMS, object_rng
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import CubeCard

# ---------------------------------------------------------------------------- constants

# ALFALFA HI mass function (Jones et al. 2018, MNRAS 477, 2), h70 units.
HIMF_ALPHA = -1.25
HIMF_LOG_MSTAR = 9.94  # log10 Msun
HIMF_PHI_STAR = 4.5e-3  # Mpc^-3 dex^-1
# HI mass-size relation (Wang et al. 2016, MNRAS 460, 2143): log D_HI[kpc] = a log M_HI + b.
SIZE_SLOPE, SIZE_INTERCEPT, SIZE_SCATTER_DEX = 0.506, -3.293, 0.06
SIGMA_V_KMS = 10.0  # HI velocity dispersion of the disk
HI_REST_HZ = 1420405751.768
BTFR_A = 47.0  # M_b = A v_flat^4 (Msun, km/s; McGaugh 2012)
COSMOLOGY = FlatLambdaCDM(H0=70.0, Om0=0.3)  # H0 = 70 matches the h70 units of phi*

# The SDC2 set-up that the card does not (yet) carry; see the module's report.
BAND_WIDTH_HZ = 200e6  # SDC2 band: 950-1150 MHz above the card's frequency_start
FIELD_RA, FIELD_DEC, FIELD_HALF_DEG = 0.0, -30.0, 2.24  # a 20 deg^2 field (SDC2-sized)
CHUNK_LOG_MHI_MIN = 9.5  # the galaxy a chunk is centred on
NEIGHBOUR_LOG_MHI_MIN = 9.0  # other galaxies in a chunk
# Mean overdensity of HI galaxies within a chunk's volume (~0.5 x 0.5 x 10 Mpc) around
# a galaxy: a crude stand-in for the HI correlation function (r0 ~ 3.5 Mpc).
NEIGHBOUR_OVERDENSITY = 10.0
CHUNK_CONTINUUM_RESIDUAL = 0.0  # continuum residual fraction in chunks (0 = none)
# Continuum sources: dN/dS ~ S^-1.7 from 50 uJy to 1 Jy at 1.4 GHz, 5000 per deg^2.
CONT_DENSITY_DEG2, CONT_SMIN_JY, CONT_SMAX_JY, CONT_SLOPE = 5000.0, 50e-6, 1.0, -1.7

_SIGMA_PER_FWHM = 1.0 / math.sqrt(8 * math.log(2))
_SIGMA1_MSUN_PC2 = 1.0  # surface density at the edge D_HI / 2
_ARCSEC_PER_RAD = 206264.80624709636
# Streams of object_rng for the chunks (other generators use 0..5).
_STREAM_GALAXIES, _STREAM_NOISE, _STREAM_CONTINUUM, _STREAM_PLACE = 20, 21, 22, 23
# Survey cubes: galaxies and placement from index 0, noise from index = channel.
_SURVEY_GALAXIES, _SURVEY_NOISE, _SURVEY_CONTINUUM, _SURVEY_PLACE = 30, 31, 32, 33

# SDC2 truth-catalogue columns (Hartley et al. 2023), then the extra columns the renderer
# needs to redraw a galaxy from its row.
TRUTH_UNITS = {
    "id": None,
    "ra": u.deg,
    "dec": u.deg,
    "hi_size": u.arcsec,  # major-axis HI diameter at 1 Msun/pc^2
    "line_flux_integral": u.Jy * u.Hz,
    "central_freq": u.Hz,
    "pa": u.deg,  # of the receding half of the major axis, east of north
    "i": u.deg,  # inclination, 0 = face-on
    "w20": u.km / u.s,  # rest-frame line width at 20 % of the peak
    "log_mhi": None,  # log10 M_HI / Msun
    "z": None,
    "v_flat": u.km / u.s,
    "r_turn": u.arcsec,  # turnover radius of the rotation curve
    "disk_scale": u.arcsec,  # r_d of the surface-density profile
    "mol_ratio": None,  # R_mol: central H2/HI ratio depleting the disk centre
    "sigma_v": u.km / u.s,
}
SDC2_COLUMNS = ("id", "ra", "dec", "hi_size", "line_flux_integral", "central_freq", "pa", "i", "w20")


# ---------------------------------------------------------------------------- cosmology


@functools.lru_cache(maxsize=4)
def _distance_table(z_max: float = 3.0, n: int = 3001):
    """z grid with D_L, D_A [Mpc] and dV/dz/dOmega [Mpc^3/sr]: interpolated, not re-integrated."""
    z = np.linspace(0.0, z_max, n)
    d_l = COSMOLOGY.luminosity_distance(z).to_value(u.Mpc)
    d_a = COSMOLOGY.angular_diameter_distance(z).to_value(u.Mpc)
    dv = COSMOLOGY.differential_comoving_volume(z).to_value(u.Mpc**3 / u.sr)
    return z, d_l, d_a, dv


def distances_mpc(z) -> tuple[np.ndarray, np.ndarray]:
    """(luminosity distance, angular-diameter distance) in Mpc at redshifts z."""
    zg, d_l, d_a, _ = _distance_table()
    z = np.asarray(z, dtype=np.float64)
    return np.interp(z, zg, d_l), np.interp(z, zg, d_a)


def _comoving_volume_mpc3(z_lo: float, z_hi: float, solid_angle_sr: float) -> float:
    zg, _, _, dv = _distance_table()
    grid = np.linspace(z_lo, z_hi, 257)
    return float(np.trapezoid(np.interp(grid, zg, dv), grid) * solid_angle_sr)


def _draw_redshifts(rng, n: int, z_lo: float, z_hi: float) -> np.ndarray:
    """n redshifts in [z_lo, z_hi] distributed as the comoving volume dV/dz."""
    zg, _, _, dv = _distance_table()
    grid = np.linspace(z_lo, z_hi, 513)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (np.interp(grid[1:], zg, dv) + np.interp(grid[:-1], zg, dv)))])
    return np.interp(rng.uniform(0, cdf[-1], n), cdf, grid)


# ---------------------------------------------------------------------------- population


def hi_mass_function(log_mhi) -> np.ndarray:
    """ALFALFA HI mass function phi(M) [Mpc^-3 dex^-1] at log10 M_HI/Msun (Schechter)."""
    x = 10.0 ** (np.asarray(log_mhi, dtype=np.float64) - HIMF_LOG_MSTAR)
    return np.log(10) * HIMF_PHI_STAR * x ** (HIMF_ALPHA + 1) * np.exp(-x)


@functools.lru_cache(maxsize=16)
def _himf_table(log_min: float, log_max: float) -> tuple[np.ndarray, np.ndarray]:
    grid = np.linspace(log_min, log_max, 4001)
    phi = hi_mass_function(grid)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (phi[1:] + phi[:-1]) * np.diff(grid))])
    return grid, cdf  # cdf[-1] = number density above log_min [Mpc^-3]


def hi_number_density(log_min: float, log_max: float = 12.0) -> float:
    """Galaxies per Mpc^3 with log_min <= log10 M_HI < log_max under the ALFALFA HIMF."""
    return float(_himf_table(float(log_min), float(log_max))[1][-1])


def sample_log_mhi(rng: np.random.Generator, n: int, log_min: float = 9.0, log_max: float = 12.0) -> np.ndarray:
    """n values of log10 M_HI/Msun drawn from the ALFALFA HIMF between log_min and log_max."""
    grid, cdf = _himf_table(float(log_min), float(log_max))
    return np.interp(rng.uniform(0, cdf[-1], n), cdf, grid)


def hi_diameter_kpc(log_mhi) -> np.ndarray:
    """Mean HI diameter [kpc] at 1 Msun/pc^2 for log10 M_HI (Wang et al. 2016)."""
    return 10.0 ** (SIZE_SLOPE * np.asarray(log_mhi, dtype=np.float64) + SIZE_INTERCEPT)


def v_flat_kms(log_mhi, log_gas_fraction_scatter=0.0) -> np.ndarray:
    """Flat rotation speed [km/s] from M_HI via the baryonic Tully-Fisher relation.

    M_b = 1.33 M_HI / f_gas (helium included), with log f_gas = -0.35 - 0.25 (log M_HI - 10)
    (gas-dominated dwarfs, f_gas ~ 0.25 at 1e11 Msun; HI-selected galaxies, Huang et al.
    2012) plus the given scatter [dex], capped at f_gas = 0.95; then v = (M_b / 47)^(1/4).
    """
    log_m = np.asarray(log_mhi, dtype=np.float64)
    log_fgas = np.minimum(-0.35 - 0.25 * (log_m - 10.0) + log_gas_fraction_scatter, np.log10(0.95))
    return (1.33 * 10.0 ** (log_m - log_fgas) / BTFR_A) ** 0.25


def line_flux_jyhz(log_mhi, z) -> np.ndarray:
    """Integrated HI line flux [Jy Hz] of M_HI at redshift z (Meyer et al. 2017, eq. 45-46)."""
    z = np.asarray(z, dtype=np.float64)
    d_l, _ = distances_mpc(z)
    s_jykms = 10.0 ** np.asarray(log_mhi, dtype=np.float64) * (1 + z) / (2.356e5 * d_l**2)  # observer-frame velocity
    nu_obs = HI_REST_HZ / (1 + z)
    return s_jykms * nu_obs / C_KMS


# Dimensionless disk profile, in t = r / r_d.
_T = np.linspace(0.0, 40.0, 2001)


def _profile(t, mol_ratio):
    return np.exp(-t) / (1.0 + mol_ratio * np.exp(-1.6 * t))


def _disk_scale_ratio(log_mhi: np.ndarray, d_hi_kpc: np.ndarray, mol_ratio: np.ndarray) -> np.ndarray:
    """x = R_HI / r_d such that the disk holds M_HI and Sigma(R_HI) = 1 Msun/pc^2.

    With Sigma = Sigma0 p(r/r_d): M = 2 pi r_d^2 Sigma0 N and Sigma0 p(x) = Sigma1, so
    M / (2 pi R_HI^2 Sigma1) = N / (x^2 p(x)) =: f(x). f has one minimum (x ~ 2 for a pure
    exponential, where the Wang et al. relation itself sits); the root on the concentrated
    (rising) side is taken, and the minimum when the target lies below it.
    """
    x = np.linspace(0.5, 12.0, 461)
    out = np.empty(len(log_mhi))
    for s in range(0, len(log_mhi), 2048):  # bounded memory for big catalogues
        sl = slice(s, s + 2048)
        rm = mol_ratio[sl, None]
        norm = np.trapezoid(_T * _profile(_T, rm), _T, axis=1)[:, None]  # N(R_mol)
        f = norm / (x**2 * _profile(x, rm))  # (n, len(x))
        target = 10.0 ** log_mhi[sl] / (2 * np.pi * (d_hi_kpc[sl] * 500.0) ** 2 * _SIGMA1_MSUN_PC2)
        m = np.argmin(f, axis=1)
        ok = (np.arange(len(x))[None] >= m[:, None]) & (f >= target[:, None])
        idx = np.where(ok.any(axis=1), np.argmax(ok, axis=1), len(x) - 1)
        out[sl] = x[np.maximum(idx, m)]
    return out


def draw_galaxies(rng: np.random.Generator, n: int, central_freq, card: CubeCard, log_mhi_min: float = 9.0) -> dict[str, np.ndarray]:
    """The physical parameters of n HI galaxies at the given observed central frequencies [Hz].

    Returns a dict of truth columns (TRUTH_UNITS, without id/ra/dec), one array each.
    """
    central_freq = np.broadcast_to(np.asarray(central_freq, dtype=np.float64), (n,)).copy()
    rest = card.rest_frequency.to_value(u.Hz)
    z = rest / central_freq - 1.0
    log_mhi = sample_log_mhi(rng, n, log_mhi_min)
    incl = np.degrees(np.arccos(rng.uniform(0.0, 1.0, n)))
    pa = rng.uniform(0.0, 360.0, n)
    d_hi = hi_diameter_kpc(log_mhi) * 10.0 ** rng.normal(0.0, SIZE_SCATTER_DEX, n)
    # central H2/HI ratio: ~2 at 1e10 Msun, larger in massive disks (Obreschkow et al. 2009 range)
    mol_ratio = 10.0 ** rng.normal(0.3 + 0.3 * (log_mhi - 10.0), 0.3)
    v_flat = v_flat_kms(log_mhi, rng.normal(0.0, 0.15, n))  # 0.15 dex gas-fraction scatter
    # the rotation curve turns over at ~0.15 R_HI at 1e10 Msun, later (relatively) in dwarfs
    _, d_a = distances_mpc(z)
    kpc_to_arcsec = _ARCSEC_PER_RAD / (d_a * 1e3)
    x = _disk_scale_ratio(log_mhi, d_hi, mol_ratio)
    r_hi = d_hi / 2.0
    r_turn = r_hi * np.clip(0.15 * 10.0 ** (-0.35 * (log_mhi - 10.0)), 0.05, 0.6)
    cols = {
        "hi_size": d_hi * kpc_to_arcsec,
        "line_flux_integral": line_flux_jyhz(log_mhi, z),
        "central_freq": central_freq,
        "pa": pa,
        "i": incl,
        "log_mhi": log_mhi,
        "z": z,
        "v_flat": v_flat,
        "r_turn": r_turn * kpc_to_arcsec,
        "disk_scale": r_hi / x * kpc_to_arcsec,
        "mol_ratio": mol_ratio,
        "sigma_v": np.full(n, SIGMA_V_KMS),
    }
    cols["w20"] = np.array([_w20(*_row_params(cols, k)) for k in range(n)]) if n else np.zeros(0)
    return cols


def _row_params(cols, k):
    return (cols["disk_scale"][k], cols["mol_ratio"][k], cols["v_flat"][k], cols["r_turn"][k], cols["i"][k], cols["sigma_v"][k])


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
    nf, ny, nx = canvas.shape
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
        return  # entirely outside the canvas
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

    # Add the overlap of stamp and canvas.
    src, dst = [], []
    for a in range(3):
        s0, s1 = max(0, -lo[a]), min(shape[a], canvas.shape[a] - lo[a])
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


def _add_noise(canvas: np.ndarray, card: CubeCard, rngs) -> None:
    """Add correlated noise plane by plane; rngs yields one Generator per block of planes."""
    nf, ny, nx = canvas.shape
    t, pad, shape, norm = _noise_filter(card, ny, nx)
    sigma = card.noise_per_channel / norm
    for planes, rng in rngs:
        white = rng.standard_normal((planes.stop - planes.start, *shape))
        field = np.fft.irfft2(np.fft.rfft2(white) * t, s=shape)
        canvas[planes] += sigma * field[:, pad : pad + ny, pad : pad + nx]


def _add_continuum(canvas: np.ndarray, freq: np.ndarray, card: CubeCard, rng, level: float, area_deg2: float) -> list[dict]:
    """Imperfectly subtracted continuum point sources; returns their parameters."""
    nf, ny, nx = canvas.shape
    n = rng.poisson(CONT_DENSITY_DEG2 * area_deg2)
    a = CONT_SLOPE + 1.0
    s14 = (CONT_SMIN_JY**a + rng.uniform(0, 1, n) * (CONT_SMAX_JY**a - CONT_SMIN_JY**a)) ** (1 / a)  # Jy at 1.4 GHz
    index = rng.normal(-0.7, 0.25, n)
    poly = rng.normal(0.0, 1.0, (n, 3))
    px, py = rng.uniform(-0.5, nx - 0.5, n), rng.uniform(-0.5, ny - 0.5, n)
    sb = _beam_sigma_pix(card)
    r = int(np.ceil(4 * sb))
    mid = card.frequency_start.to_value(u.Hz) + BAND_WIDTH_HZ / 2
    xf = (freq - mid) / BAND_WIDTH_HZ  # the fit residual is smooth across the whole band
    out = []
    for k in range(n):
        resid = level * s14[k] * (freq / 1.4e9) ** index[k] * (poly[k, 0] + poly[k, 1] * xf + poly[k, 2] * xf**2)  # Jy, (F,)
        y0, y1 = max(0, int(py[k]) - r), min(ny, int(py[k]) + r + 2)
        x0, x1 = max(0, int(px[k]) - r), min(nx, int(px[k]) + r + 2)
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.arange(y0, y1)[:, None], np.arange(x0, x1)[None, :]
        psf = np.exp(-0.5 * ((yy - py[k]) ** 2 + (xx - px[k]) ** 2) / sb**2)  # point source: peak Jy/beam = Jy
        canvas[:, y0:y1, x0:x1] += resid[:, None, None] * psf[None]
        out.append({"x": float(px[k]), "y": float(py[k]), "flux_1400": float(s14[k]), "spectral_index": float(index[k])})
    return out


# ---------------------------------------------------------------------------- WCS


def _wcs_keys(card: CubeCard, n_channels: int, ny: int, nx: int, ra: float, dec: float, frequency_start: float) -> dict:
    """The WCS, beam and unit keywords of a cube as a plain (JSON-safe) dict."""
    scale = card.pixel_scale.to_value(u.deg)
    beam = card.beam_fwhm.to_value(u.deg)
    return {
        "NAXIS": 3, "NAXIS1": int(nx), "NAXIS2": int(ny), "NAXIS3": int(n_channels), "WCSAXES": 3,
        "CTYPE1": "RA---SIN", "CTYPE2": "DEC--SIN", "CTYPE3": "FREQ",
        "CUNIT1": "deg", "CUNIT2": "deg", "CUNIT3": "Hz",
        "CRPIX1": (nx + 1) / 2.0, "CRPIX2": (ny + 1) / 2.0, "CRPIX3": 1.0,  # 1-based: the centre pixel
        "CRVAL1": float(ra) % 360.0, "CRVAL2": float(dec), "CRVAL3": float(frequency_start),
        "CDELT1": -scale, "CDELT2": scale, "CDELT3": card.channel_width.to_value(u.Hz),
        "RESTFRQ": card.rest_frequency.to_value(u.Hz), "SPECSYS": "BARYCENT", "RADESYS": "ICRS", "EQUINOX": 2000.0,
        "BUNIT": "Jy/beam", "BTYPE": "Intensity", "BMAJ": beam, "BMIN": beam, "BPA": 0.0,
    }


def survey_header(card: CubeCard, n_channels: int, ny: int, nx: int, ra: float, dec: float, frequency_start: float) -> fits.Header:
    """A FITS header for a (n_channels, ny, nx) cube: RA---SIN / DEC--SIN / FREQ centred on (ra, dec) [deg].

    frequency_start is the centre of channel 0 [Hz]; pixel and channel steps, beam and rest
    frequency come from the card. RA decreases with pixel x (CDELT1 < 0), as on the sky.
    """
    h = fits.Header()
    for key, value in _wcs_keys(card, n_channels, ny, nx, ra, dec, frequency_start).items():
        h[key] = value
    h["TELESCOP"] = "SKA-MID (mock)"
    h["ORIGIN"] = "cosmofm"
    h["CARD"] = (card.name, "cosmofm data card")
    return h


def _pixel_to_world(keys: dict, x, y) -> tuple[np.ndarray, np.ndarray]:
    """RA, Dec [deg] of 0-based pixel positions under the celestial WCS in `keys`."""
    w = WCS(naxis=2)  # built directly: parsing a Header costs ~10x more per chunk
    w.wcs.ctype = [keys["CTYPE1"], keys["CTYPE2"]]
    w.wcs.cunit = [keys["CUNIT1"], keys["CUNIT2"]]
    w.wcs.crpix = [keys["CRPIX1"], keys["CRPIX2"]]
    w.wcs.crval = [keys["CRVAL1"], keys["CRVAL2"]]
    w.wcs.cdelt = [keys["CDELT1"], keys["CDELT2"]]
    w.wcs.radesys = keys["RADESYS"]
    ra, dec = w.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
    return np.asarray(ra) % 360.0, np.asarray(dec)


def _truth_table(cols: dict[str, np.ndarray]) -> Table:
    t = Table()
    for name, unit in TRUTH_UNITS.items():
        t[name] = cols[name] if unit is None else u.Quantity(cols[name], unit)
    t["id"] = np.asarray(cols["id"], dtype=np.int64)
    return t


def _json_row(cols: dict[str, np.ndarray], k: int) -> dict:
    return {name: (int(cols[name][k]) if name == "id" else float(cols[name][k])) for name in TRUTH_UNITS}


# ---------------------------------------------------------------------------- checks


def _check_card(card: CubeCard) -> None:
    if not isinstance(card, CubeCard):
        raise InputError("card", f"is a {type(card).__name__}, not a CubeCard", "pass a cube card, e.g. load_card('ska-hi-like')")
    for name in ("pixel_scale", "beam_fwhm", "frequency_start", "channel_width", "rest_frequency"):
        q = getattr(card, name)
        if q is None or not np.isfinite(q.value) or q.value <= 0:
            raise InputError(f"{card.name}.cube.{name}", f"must be positive, got {q}", f"give a positive {name} in the card")
    if not (card.noise_per_channel is not None and card.noise_per_channel >= 0):
        raise InputError(f"{card.name}.cube.noise_per_channel", f"must be >= 0, got {card.noise_per_channel}", "give the noise per channel in Jy/beam")


def _positive_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InputError(where, f"must be a positive integer, got {value!r}", "give a whole number of pixels or channels > 0")
    return int(value)


# ---------------------------------------------------------------------------- products


def mock_cube(card: CubeCard, seed: int, index: int) -> Sample:
    """A chunk (card.n_channels, card.spatial_size, card.spatial_size) around an HI galaxy.

    The galaxy (log M_HI >= CHUNK_LOG_MHI_MIN, redshift by comoving volume within the SDC2
    band) sits within a quarter chunk of the centre; neighbours (log M_HI >=
    NEIGHBOUR_LOG_MHI_MIN) are Poisson with NEIGHBOUR_OVERDENSITY x the HIMF density.
    Coordinates: frequency [Hz], dec_offset and ra_offset [arcsec] from the chunk centre
    (ra_offset falls with pixel index, as RA on the sky). meta["labels"] are the centred
    galaxy's; meta["truth"] lists every galaxy's SDC2 truth row (the first is the
    centred one; ra/dec from meta["wcs"], the chunk's FITS WCS keys).
    """
    _check_card(card)
    nf, n = card.n_channels, card.spatial_size
    nf = _positive_int(nf, f"{card.name}.cube.n_channels")
    n = _positive_int(n, f"{card.name}.cube.spatial_size")
    rng = object_rng(seed, index, _STREAM_GALAXIES)
    place = object_rng(seed, index, _STREAM_PLACE)
    dnu = card.channel_width.to_value(u.Hz)
    f_start = card.frequency_start.to_value(u.Hz)
    rest = card.rest_frequency.to_value(u.Hz)
    band_channels = max(int(BAND_WIDTH_HZ // dnu), nf)
    f_end = f_start + (band_channels - 1) * dnu
    if f_end >= rest:
        raise InputError(f"{card.name}.cube.frequency_start", f"the band reaches {f_end:.6g} Hz, above the rest frequency {rest:.6g} Hz", "start the band below the rest frequency (z > 0)")

    # The centred galaxy's frequency, then a chunk on the card's channel grid around it.
    z = _draw_redshifts(place, 1, rest / f_end - 1, rest / f_start - 1)[0]
    nu_c = rest / (1 + z)
    k0 = int(round((nu_c - f_start) / dnu)) - nf // 2 + int(place.integers(-(nf // 4), nf // 4 + 1))
    k0 = int(np.clip(k0, 0, band_channels - nf))
    freq = f_start + (k0 + np.arange(nf)) * dnu
    cos_dec = math.cos(math.radians(FIELD_DEC))
    ra0 = FIELD_RA + place.uniform(-FIELD_HALF_DEG, FIELD_HALF_DEG) / cos_dec
    dec0 = FIELD_DEC + place.uniform(-FIELD_HALF_DEG, FIELD_HALF_DEG)
    keys = _wcs_keys(card, nf, n, n, ra0, dec0, freq[0])

    # Neighbours: uniform in the chunk's volume (small enough to ignore dV/dz changes).
    scale_deg = card.pixel_scale.to_value(u.deg)
    solid_angle = (n * scale_deg * math.pi / 180) ** 2
    z_lo, z_hi = rest / (freq[-1] + dnu / 2) - 1, rest / (freq[0] - dnu / 2) - 1
    volume = _comoving_volume_mpc3(z_lo, z_hi, solid_angle)
    n_nb = int(place.poisson(NEIGHBOUR_OVERDENSITY * hi_number_density(NEIGHBOUR_LOG_MHI_MIN) * volume))
    centre = (n - 1) / 2
    px = np.concatenate([[centre + place.uniform(-n / 4, n / 4)], place.uniform(-0.5, n - 0.5, n_nb)])
    py = np.concatenate([[centre + place.uniform(-n / 4, n / 4)], place.uniform(-0.5, n - 0.5, n_nb)])
    nus = np.concatenate([[nu_c], freq[0] - dnu / 2 + place.uniform(0, nf * dnu, n_nb)])

    cols = draw_galaxies(rng, 1, nus[:1], card, CHUNK_LOG_MHI_MIN)
    if n_nb:
        more = draw_galaxies(rng, n_nb, nus[1:], card, NEIGHBOUR_LOG_MHI_MIN)
        cols = {k: np.concatenate([cols[k], more[k]]) for k in cols}
    cols["id"] = np.arange(1 + n_nb)
    cols["ra"], cols["dec"] = _pixel_to_world(keys, px, py)

    canvas = np.zeros((nf, n, n))
    for k in range(1 + n_nb):
        render_galaxy(canvas, freq[0], card, px[k], py[k], {name: cols[name][k] for name in cols})
    _add_noise(canvas, card, [(slice(0, nf), object_rng(seed, index, _STREAM_NOISE))])
    if CHUNK_CONTINUUM_RESIDUAL > 0:
        _add_continuum(canvas, freq, card, object_rng(seed, index, _STREAM_CONTINUUM), CHUNK_CONTINUUM_RESIDUAL, n * n * scale_deg**2)

    truth = [_json_row(cols, k) for k in range(1 + n_nb)]
    main = truth[0]
    labels = {
        "hi_flux": main["line_flux_integral"],  # Jy Hz
        "log_mhi": main["log_mhi"],
        "redshift": main["z"],
        "w20": main["w20"],
        "hi_size": main["hi_size"],
        "inclination": main["i"],
        "pa": main["pa"],
        "n_sources": 1 + n_nb,
    }
    scale = card.pixel_scale.to_value(u.arcsec)
    offsets = (np.arange(n) - centre) * scale
    sigma = card.noise_per_channel
    ivar = np.full(canvas.shape, 1 / sigma**2 if sigma > 0 else 1.0, dtype=np.float32)
    return Sample(
        "cube", canvas, ivar, {"frequency": freq, "dec_offset": offsets, "ra_offset": -offsets},
        {"card": card.name, "id": f"{card.name}-{seed}-{index}", "labels": labels, "truth": truth,
         "wcs": keys},
    )


def mock_survey_cube(
    card: CubeCard,
    n_channels: int,
    size: int | tuple[int, int],
    n_sources: int | None = None,
    density: float | None = None,
    seed: int = 0,
    *,
    log_mhi_min: float = 9.0,
    frequency_start: float | None = None,
    ra: float = FIELD_RA,
    dec: float = FIELD_DEC,
    noise: bool = True,
    continuum_residual: float = 0.0,
    as_sample: bool = True,
):
    """A survey-like HI cube, its FITS header and its SDC2-style truth catalogue.

    Args:
        card: a CubeCard (pixel scale, beam, channel width, noise per channel, rest frequency).
        n_channels: channels of the cube.
        size: pixels on a side (int) or (ny, nx).
        n_sources: exactly this many galaxies; or
        density: galaxies per square degree (Poisson); with neither, the physical number:
            Poisson with mean n(M_HI >= 10^log_mhi_min) from the HIMF x the comoving volume.
        seed: everything is deterministic given the seed (noise per channel from its own
            stream, so a cube's noise does not depend on how it is blocked).
        log_mhi_min: lower HI mass limit [log10 Msun] of the galaxies drawn.
        frequency_start: centre of channel 0 [Hz]; default the card's frequency_start.
        ra, dec: centre of the cube [deg] (default: an SDC2-like field at Dec -30).
        noise: add correlated noise at the card's noise_per_channel (False: noiseless).
        continuum_residual: fraction of each continuum source's flux left after
            continuum subtraction (0 = none; 1e-3 to 1e-2 are realistic).
        as_sample: return a Sample (values + constant ivar); False returns the float32
            numpy cube (F, H, W) and saves the memory of the ivar array.

    Returns:
        (cube, header, truth): Sample or ndarray in Jy/beam; astropy.io.fits.Header with
        the WCS (RA---SIN, DEC--SIN, FREQ), BUNIT, BMAJ/BMIN/BPA and RESTFRQ; truth Table
        with the SDC2 columns (id, ra, dec, hi_size, line_flux_integral, central_freq, pa,
        i, w20) in units, then the model columns of TRUTH_UNITS.
    """
    _check_card(card)
    nf = _positive_int(n_channels, "n_channels")
    ny, nx = (size, size) if not isinstance(size, (tuple, list)) else tuple(size)
    ny, nx = _positive_int(ny, "size"), _positive_int(nx, "size")
    if n_sources is not None and density is not None:
        raise InputError("n_sources", "given together with density", "give either n_sources or density (or neither for the HIMF's number)")
    if n_sources is not None and (isinstance(n_sources, bool) or not isinstance(n_sources, (int, np.integer)) or n_sources < 0):
        raise InputError("n_sources", f"must be an integer >= 0, got {n_sources!r}", "give a number of galaxies")
    if density is not None and not (np.isfinite(density) and density >= 0):
        raise InputError("density", f"must be >= 0 galaxies per deg^2, got {density!r}", "give a surface density in deg^-2")
    if not (np.isfinite(continuum_residual) and continuum_residual >= 0):
        raise InputError("continuum_residual", f"must be >= 0, got {continuum_residual!r}", "give a residual fraction such as 1e-3 (0 = off)")
    dnu = card.channel_width.to_value(u.Hz)
    rest = card.rest_frequency.to_value(u.Hz)
    f0 = card.frequency_start.to_value(u.Hz) if frequency_start is None else float(frequency_start)
    freq = f0 + np.arange(nf) * dnu
    if not (f0 > 0 and freq[-1] + dnu / 2 < rest):
        raise InputError("frequency_start", f"the cube spans {f0:.6g}-{freq[-1]:.6g} Hz; it must lie between 0 and the rest frequency {rest:.6g} Hz", "choose frequencies of redshifted HI (z > 0)")

    header = survey_header(card, nf, ny, nx, ra, dec, f0)
    rng = object_rng(seed, 0, _SURVEY_GALAXIES)
    place = object_rng(seed, 0, _SURVEY_PLACE)
    scale_deg = card.pixel_scale.to_value(u.deg)
    area_deg2 = ny * nx * scale_deg**2
    z_lo, z_hi = rest / (freq[-1] + dnu / 2) - 1, rest / (freq[0] - dnu / 2) - 1
    if n_sources is None:
        mean = density * area_deg2 if density is not None else (
            hi_number_density(log_mhi_min) * _comoving_volume_mpc3(z_lo, z_hi, area_deg2 * (math.pi / 180) ** 2))
        n_sources = int(place.poisson(mean))
    n_src = int(n_sources)
    px = place.uniform(-0.5, nx - 0.5, n_src)
    py = place.uniform(-0.5, ny - 0.5, n_src)
    nus = rest / (1 + _draw_redshifts(place, n_src, z_lo, z_hi))
    cols = draw_galaxies(rng, n_src, nus, card, log_mhi_min)
    cols["id"] = np.arange(n_src)
    cols["ra"], cols["dec"] = _pixel_to_world(header, px, py)

    cube = np.zeros((nf, ny, nx), dtype=np.float32)
    # Render in blocks of channels (~32 MB of float64) to bound memory; each galaxy goes to
    # the blocks its line touches.
    block = max(1, min(nf, int(2**22 // (ny * nx))))
    chan = (nus - f0) / dnu
    half = (cols["v_flat"] / C_KMS * nus / dnu) + 6 * cols["sigma_v"] / C_KMS * nus / dnu + 4
    for b0 in range(0, nf, block):
        b1 = min(nf, b0 + block)
        canvas = np.zeros((b1 - b0, ny, nx))
        for k in np.nonzero((chan + half >= b0) & (chan - half < b1))[0]:
            render_galaxy(canvas, freq[b0], card, px[k], py[k], {name: cols[name][k] for name in cols})
        cube[b0:b1] = canvas
    if noise and card.noise_per_channel > 0:
        # One generator per channel: deterministic whatever the blocking.
        planes = [(slice(c, c + 1), object_rng(seed, c, _SURVEY_NOISE)) for c in range(nf)]
        for b0 in range(0, nf, block):
            sub = cube[b0 : b0 + block].astype(np.float64)
            _add_noise(sub, card, [(slice(p.start - b0, p.stop - b0), g) for p, g in planes[b0 : b0 + block]])
            cube[b0 : b0 + block] = sub
    if continuum_residual > 0:
        sub = np.zeros((nf, ny, nx))
        _add_continuum(sub, freq, card, object_rng(seed, 0, _SURVEY_CONTINUUM), continuum_residual, area_deg2)
        cube += sub.astype(np.float32)
    header["NSOURCES"] = (n_src, "HI galaxies in the truth catalogue")
    truth = _truth_table(cols)
    truth.meta["card"] = card.name
    if not as_sample:
        return cube, header, truth
    scale = card.pixel_scale.to_value(u.arcsec)
    sigma = card.noise_per_channel
    sample = Sample(
        "cube", cube, np.full(cube.shape, 1 / sigma**2 if sigma > 0 else 1.0, dtype=np.float32),
        {"frequency": freq, "dec_offset": (np.arange(ny) - (ny - 1) / 2) * scale, "ra_offset": -(np.arange(nx) - (nx - 1) / 2) * scale},
        {"card": card.name, "id": f"{card.name}-survey-{seed}", "labels": {"n_sources": n_src}, "wcs": _wcs_keys(card, nf, ny, nx, ra, dec, f0)},
    )
    return sample, header, truth


def write_survey_cube_fits(path: str | os.PathLike, cube, header: fits.Header, truth: Table) -> Path:
    """Write a survey cube (Sample or (F, H, W) array) with its WCS header, and the truth
    catalogue as a BinTable extension named TRUTH, to `path` atomically; returns the path.

    Usage: `write_survey_cube_fits("sdc2_like.fits", *mock_survey_cube(card, 256, 128))`.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(str(path), f"folder {path.parent} does not exist", "create the folder first")
    values = cube.values if isinstance(cube, Sample) else np.asarray(cube, dtype=np.float32)
    expected = (header.get("NAXIS3"), header.get("NAXIS2"), header.get("NAXIS1"))
    if values.shape != expected:
        raise InputError(str(path), f"cube shape {values.shape} does not match the header's (NAXIS3, NAXIS2, NAXIS1) = {expected}", "pass the header made with this cube")
    primary = fits.PrimaryHDU(data=np.ascontiguousarray(values, dtype=np.float32), header=header.copy())
    table = fits.table_to_hdu(truth)
    table.name = "TRUTH"
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        fits.HDUList([primary, table]).writeto(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
