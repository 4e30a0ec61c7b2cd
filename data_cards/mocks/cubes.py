"""Mock HI spectral cubes after the SKA Science Data Challenge 2 (Hartley et al. 2023).

This module holds the physics and `mock_cube(card, seed, index)`: a chunk of
card.n_channels x card.spatial_size^2 around one HI galaxy (plus its neighbours), for the
registry and the pretraining corpus, deterministic given the seed; the truth rows travel
in `meta` as JSON-safe dicts. Survey-like cubes (`mock_survey_cube`, `survey_header`,
`write_survey_cube_fits`, `write_large_survey_cube`) live in cube_survey.py and are
re-exported from here.

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
  (rest-frame km/s; the observed width in Hz is w20 * central_freq / c). The chunks'
  truth rows and labels keep this; survey truth tables carry SDC2's observer-frame w20 =
  (1 + z) x this and name this one w20_rest (cube_survey.py).
"""

from __future__ import annotations

import functools
import math

import astropy.units as u
import numpy as np
from astropy.cosmology import FlatLambdaCDM
from astropy.wcs import WCS

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.common import C_KMS, object_rng
from cosmofm.data_cards.mocks.cube_render import _T, _add_noise, _profile, _w20, beam_area_pixels, render_galaxy  # noqa: F401 (re-exported)
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

_SIGMA1_MSUN_PC2 = 1.0  # surface density at the edge D_HI / 2
_ARCSEC_PER_RAD = 206264.80624709636
# Streams of object_rng for the chunks (other generators use 0..5).
_STREAM_GALAXIES, _STREAM_NOISE, _STREAM_CONTINUUM, _STREAM_PLACE = 20, 21, 22, 23

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
        from cosmofm.data_cards.mocks.cube_survey import _add_continuum  # survey module imports this one

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


# ---------------------------------------------------------------------------- survey API
# The survey cubes live in cube_survey.py (which imports the physics above); they are
# re-exported here lazily (PEP 562), so `from cosmofm.data_cards.mocks.cubes import
# mock_survey_cube` keeps working without an import cycle.
_SURVEY_API = ("mock_survey_cube", "survey_header", "write_survey_cube_fits", "write_large_survey_cube")


def __getattr__(name):
    if name in _SURVEY_API:
        from cosmofm.data_cards.mocks import cube_survey

        return getattr(cube_survey, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
