"""What an interferometer does to a 21cm lightcone: SKA-Low thermal noise and the foreground wedge.

Thermal noise, two models:

- `model="radiometer"` (default, numpy only): white Gaussian noise per voxel from the
  radiometer equation for an array that fills the uv plane at the voxel scale,
      sigma_T = lambda^2 / ((A_eff / T_sys)_array Omega_pix sqrt(dnu t_obs))
  (the filled-aperture estimate of Furlanetto, Oh & Briggs 2006, sec. 9), with
  Omega_pix = (cell / D_C(z))^2, dnu the channel width of one cell along the line of
  sight, and A_eff / T_sys of the array from the SKAO's SKA-Low station table
  (SKA-TEL-SKO-0000818 Rev. 2) times the number of stations. It has no uv coverage: no
  baseline-length cut-off, no uv weighting and no change of the signal, so it is the
  noise of an array that samples every uv cell of the grid evenly -- a per-voxel level,
  not an image. For AA4, 1000 h, 32 x 2 Mpc cells at z = 8 it gives 195 mK
  per voxel where tools21cm's uv-based cube has an rms of 37 mK (the uv plane
  there is only partly covered, and uncovered cells carry neither noise nor signal).
- `model="tools21cm"` (the `[sim21cm]` extra): tools21cm's SKA-Low noise (Giri et al.
  2020, JOSS 5, 2363): Earth-rotation uv tracks of the shipped SKA-Low station layout
  ("AA4", "AA*", ...), visibility noise from the SEFD, gridded and transformed per
  slice; the uv map is computed once per chunk of `chunk` slices at its central redshift.

Foreground wedge (`remove_wedge`): Fourier modes with k_par < m(z) k_perp + buffer are
set to zero, m(z) = sin(theta) D_C(z) E(z) / (D_H (1 + z)) (Liu, Parsons & Trott 2014,
PRD 90, 023018, with theta = 90 deg: the horizon wedge), per chunk of the
lightcone along the line of sight (each chunk treated as periodic). With
`primary_beam=D` the wedge reaches only the first null of a D-metre station's beam,
theta = 1.22 lambda / D at each chunk's frequency (the "optimistic" model of Pober et al.
2014, ApJ 782, 66, as 21cmSense writes it: horizon x sin(first null / 2)).

Angular resolution (`smooth_beam`): each slice is convolved with a Gaussian synthesised
beam of FWHM theta = lambda / B_max (lambda = 21 cm (1 + z)), i.e. FWHM_comoving =
theta D_C(z) -- the choice of tools21cm's `smooth_coeval` / `smooth_lightcone` (Giri et al.,
with B_max = 2 km for the SKA-Low core). Only the transverse plane is smoothed: the
frequency resolution is the cell itself (tools21cm also top-hats along frequency).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.sim21cm.cosmology import NU21_HZ, cosmology
from cosmofm.data_cards.mocks.sim21cm.density import k_grid
from cosmofm.data_cards.mocks.sim21cm.params import SimParams

C_M_S = 299792458.0


# A_eff / T_sys of one SKA-Low station in m^2/K against frequency in MHz, SKAO document
# SKA-TEL-SKO-0000818 Rev. 2 (the table tools21cm ships as SEFD_SKAO-TEL-0000818-V2_SKA1.txt).
SKA_LOW_STATION_AEFF_TSYS = (
    (50, 0.102), (60, 0.255), (70, 0.420), (80, 0.580), (90, 0.781), (100, 0.862), (110, 0.885), (120, 0.924),
    (130, 0.965), (140, 1.052), (150, 1.119), (160, 1.159), (170, 1.171), (180, 1.190), (190, 1.195), (200, 1.223),
    (210, 1.235), (220, 1.263), (230, 1.226), (240, 1.234), (250, 1.282), (260, 1.304), (270, 1.289), (280, 1.306),
    (290, 1.314), (300, 1.289), (310, 1.294), (320, 1.327), (330, 1.286), (340, 1.204), (350, 1.156),
)


@dataclass(frozen=True)
class Telescope:
    """A radio array for the noise models.

    Args:
        name: label.
        n_stations: stations used for imaging.
        aeff_tsys: per-station effective area over system temperature, ((MHz, m^2/K), ...),
            interpolated linearly in frequency (clamped at the ends).
        subarray: the tools21cm layout name for model="tools21cm" ("AA4", "AA*", "AA2", ...).
    """

    name: str = "SKA-Low AA4"
    n_stations: int = 512
    aeff_tsys: tuple = SKA_LOW_STATION_AEFF_TSYS
    subarray: str = "AA4"

    def sensitivity(self, frequency_hz) -> np.ndarray:
        """Array A_eff / T_sys in m^2/K."""
        table = np.asarray(self.aeff_tsys, dtype=float)
        return self.n_stations * np.interp(np.asarray(frequency_hz) / 1e6, table[:, 0], table[:, 1])


SKA_LOW = Telescope()

# Stations in each SKA-Low array assembly, as tools21cm 2.4 ships their layouts
# (input_data/skalow_<name>_layout.txt: AA0.5 4, AA1 16, AA2 68, AA* 307, AA4 512 rows),
# which match the SKAO's staged-delivery plan (AA* 307 stations, AA4 the full 512).
SKA_LOW_LAYOUTS = {"AA0.5": 4, "AA1": 16, "AA2": 68, "AA*": 307, "AA4": 512}
SKA_LOW_STATION_DIAMETER_M = 38.0  # an SKA-Low station's diameter (SKA-TEL-SKO-0000818)


def ska_low(layout: str = "AA4") -> Telescope:
    """The SKA-Low array assembly `layout` ("AA4", "AA*", ...): its station count and tools21cm name."""
    if layout not in SKA_LOW_LAYOUTS:
        raise InputError("layout", f"unknown SKA-Low layout {layout!r}", f"use one of {list(SKA_LOW_LAYOUTS)}")
    return Telescope(name=f"SKA-Low {layout}", n_stations=SKA_LOW_LAYOUTS[layout], subarray=layout)


def _slice_geometry(redshifts, cell: float, params: SimParams):
    cosmo = cosmology(params)
    z = np.asarray(redshifts, dtype=float)
    nu = NU21_HZ / (1 + z)
    d_c = cosmo.comoving_distance(z)
    dnu = NU21_HZ * cosmo.hubble_parameter(z) * 1e3 * cell / (C_M_S * (1 + z) ** 2)  # Hz per cell along the LOS
    return z, nu, d_c, dnu


def thermal_noise_sigma(redshifts, cell: float, hours: float = 1000.0, telescope: Telescope = SKA_LOW,
                        params: SimParams | None = None) -> np.ndarray:
    """Radiometer-equation noise per voxel (mK) for each slice redshift."""
    if hours <= 0:
        raise InputError("hours", f"must be positive, got {hours!r}", "give the total observing time in hours")
    z, nu, d_c, dnu = _slice_geometry(redshifts, cell, params or SimParams())
    lam = C_M_S / nu
    omega_pix = (cell / d_c) ** 2
    sigma_k = lam**2 / (telescope.sensitivity(nu) * omega_pix * np.sqrt(dnu * hours * 3600.0))
    return 1e3 * sigma_k


def thermal_noise(shape: tuple[int, int, int], redshifts, cell: float, seed: int = 0, hours: float = 1000.0,
                  telescope: Telescope = SKA_LOW, model: str = "radiometer", params: SimParams | None = None,
                  chunk: int | None = None, int_time: float = 100.0) -> np.ndarray:
    """A (D, H, W) noise cube in mK for slices at `redshifts` (D,), cells of `cell` Mpc; deterministic in seed.

    model: "radiometer" (white, numpy only) or "tools21cm" (uv-based, needs the [sim21cm] extra).
    chunk: slices per uv map for "tools21cm" (default H); int_time: seconds per visibility
    sample of the uv tracks (6 h per day), larger is faster.
    """
    d, h, w = shape
    z = np.asarray(redshifts, dtype=float)
    if z.shape != (d,):
        raise InputError("redshifts", f"need one redshift per slice ({d}), got shape {z.shape}", "pass the lightcone's redshifts")
    rng = np.random.default_rng([seed, 1420])
    if model == "radiometer":
        sigma = thermal_noise_sigma(z, cell, hours, telescope, params)
        return rng.standard_normal(shape) * sigma[:, None, None]
    if model != "tools21cm":
        raise InputError("model", f"unknown noise model {model!r}", "use 'radiometer' or 'tools21cm'")
    if h != w:
        raise InputError("shape", "tools21cm needs square slices", "use n_cells x n_cells slices")
    t2c = _tools21cm()
    box = cell * h
    chunk = chunk or h
    out = np.empty(shape)
    _, nu, _, dnu = _slice_geometry(z, cell, params or SimParams())
    for start in range(0, d, chunk):
        stop = min(d, start + chunk)
        uv, n_ant = _uv_map(h, round(float(np.mean(z[start:stop])), 3), box, telescope.subarray, float(int_time))
        for k in range(start, stop):
            jy = t2c.noise_map(h, z[k], dnu[k] / 1e6, obs_time=hours, subarray_type=telescope.subarray, boxsize=box,
                               int_time=int_time, uv_map=uv, N_ant=n_ant, verbose=False, seed=rng)
            out[k] = t2c.jansky_2_kelvin(jy, z[k], boxsize=box)  # tools21cm returns mK
    return out


def _tools21cm():
    try:
        import tools21cm
    except ImportError:
        raise InputError("model", "tools21cm is not installed", "pip install 'cosmofm[sim21cm]' or use model='radiometer'") from None
    return tools21cm


@functools.lru_cache(maxsize=32)
def _uv_map(ncells: int, z: float, box: float, subarray: str, int_time: float):
    t2c = _tools21cm()
    return t2c.get_uv_map(ncells, z, subarray_type=subarray, total_int_time=6.0, int_time=int_time, boxsize=box, verbose=False)


def beam_fwhm(redshifts, max_baseline: float, params: SimParams | None = None) -> np.ndarray:
    """Comoving FWHM (Mpc) of the synthesised beam lambda / B_max at each redshift; max_baseline in km."""
    if not max_baseline > 0:
        raise InputError("max_baseline", f"must be positive, got {max_baseline!r}", "give the longest baseline in km")
    z = np.asarray(redshifts, dtype=float)
    theta = C_M_S * (1 + z) / NU21_HZ / (max_baseline * 1e3)  # radians
    return theta * cosmology(params or SimParams()).comoving_distance(z)


def _cube(values, redshifts) -> tuple[np.ndarray, np.ndarray]:
    """(D, H, W) values and their (D,) slice redshifts as float arrays, or an InputError naming the bad one."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 3:
        raise InputError("values", f"needs (D, H, W), got shape {v.shape}", "pass a lightcone or coeval box")
    z = np.asarray(redshifts, dtype=float)
    if z.shape != (v.shape[0],):
        raise InputError("redshifts", f"need one redshift per slice ({v.shape[0]}), got shape {z.shape}", "pass the lightcone's redshifts")
    return v, z


def smooth_beam(values: np.ndarray, redshifts, cell: float, max_baseline: float,
                params: SimParams | None = None) -> np.ndarray:
    """Each (H, W) slice convolved with the Gaussian beam of FWHM lambda / B_max (km) at its redshift.

    values: (D, H, W), line of sight on axis 0, cells of `cell` Mpc, slices periodic
    (the boxes are); the Fourier modes are multiplied by exp(-k_perp^2 s^2 / 2), s = FWHM / 2.3548.
    """
    v, z = _cube(values, redshifts)
    s = beam_fwhm(z, max_baseline, params) / (2 * np.sqrt(2 * np.log(2)))  # (D,) Gaussian sigma, Mpc
    _, ky, kx = k_grid((1, v.shape[1], v.shape[2]), cell, real=True)
    k_perp2 = ky**2 + kx**2  # (1, H, W//2+1)
    gain = np.exp(-0.5 * k_perp2 * s[:, None, None] ** 2)  # (D, H, W//2+1)
    return np.fft.irfft2(np.fft.rfft2(v) * gain, s=v.shape[1:])


def primary_beam_theta_deg(z, diameter: float = SKA_LOW_STATION_DIAMETER_M) -> np.ndarray:
    """Angle (deg) of the first null, 1.22 lambda / D, of a D-metre station's beam at redshift z."""
    lam = C_M_S * (1 + np.asarray(z, dtype=float)) / NU21_HZ
    return np.degrees(np.minimum(1.22 * lam / diameter, np.pi / 2))


def wedge_slope(z, params: SimParams | None = None, theta_deg: float = 90.0) -> np.ndarray:
    """Slope m of the foreground wedge k_par = m k_perp at redshift z (horizon wedge for theta = 90 deg)."""
    p = params or SimParams()
    cosmo = cosmology(p)
    z = np.asarray(z, dtype=float)
    e = cosmo.hubble_parameter(z) / (100 * p.hlittle)
    return np.sin(np.radians(theta_deg)) * cosmo.comoving_distance(z) * e / (cosmo.hubble_distance * (1 + z))


def wedge_mask(shape: tuple[int, int, int], z: float, cell: float, params: SimParams | None = None, buffer: float = 0.0,
               theta_deg: float = 90.0, primary_beam: float | None = None) -> np.ndarray:
    """(D, H, W) bool, True for the fftn modes of a periodic box at redshift z inside the wedge k_par < m(z) k_perp + buffer.

    The k = 0 mode is never inside. primary_beam: a station diameter in m; the wedge then
    reaches the beam's first null at z (`primary_beam_theta_deg`) instead of theta_deg.
    """
    kz, ky, kx = k_grid(shape, cell, real=False)
    theta = theta_deg if primary_beam is None else float(primary_beam_theta_deg(z, primary_beam))
    inside = np.abs(kz) < float(wedge_slope(z, params, theta)) * np.sqrt(ky**2 + kx**2) + buffer
    inside.flat[0] = False
    return inside


def _wedge_chunks(redshifts: np.ndarray, chunk: int):
    for start in range(0, len(redshifts), chunk):
        yield slice(start, start + chunk), float(np.mean(redshifts[start:start + chunk]))


def remove_wedge(values: np.ndarray, redshifts, cell: float, params: SimParams | None = None, chunk: int | None = None,
                 buffer: float = 0.0, theta_deg: float = 90.0, primary_beam: float | None = None) -> np.ndarray:
    """Zero the Fourier modes inside the foreground wedge, k_par < m(z) k_perp + buffer (1/Mpc).

    values: (D, H, W) with the line of sight on axis 0; redshifts: (D,). The wedge is
    removed chunk by chunk along the line of sight (chunk slices each, default H), with
    the slope at each chunk's mean redshift (`wedge_mask`).
    """
    v, z = _cube(values, redshifts)
    out = np.empty_like(v)
    for part, z_mid in _wedge_chunks(z, chunk or v.shape[1]):
        inside = wedge_mask(v[part].shape, z_mid, cell, params, buffer, theta_deg, primary_beam)
        out[part] = np.fft.ifftn(np.where(inside, 0.0, np.fft.fftn(v[part]))).real
    return out


def wedge_noise_variance(sigma: np.ndarray, redshifts, shape: tuple[int, int], cell: float, params: SimParams | None = None,
                         chunk: int | None = None, buffer: float = 0.0, theta_deg: float = 90.0,
                         primary_beam: float | None = None) -> np.ndarray:
    """(D,) per-voxel variance of white noise of per-slice rms `sigma` after `remove_wedge` with the same arguments.

    The wedge cut projects out the modes inside the wedge: a projector P keeping a fraction f
    of a chunk's modes leaves noise of variance sum_i P_ji^2 sigma_i^2 in slice j, which for
    white noise is f times the chunk's mean sigma^2 (sum_i P_ji^2 = P_jj = f, spread across the
    chunk because the wedge removes the low k_par). shape: (H, W) of a slice.
    """
    sigma = np.asarray(sigma, dtype=float)
    z = np.asarray(redshifts, dtype=float)
    out = np.empty(len(z))
    for part, z_mid in _wedge_chunks(z, chunk or shape[0]):
        kept = 1.0 - float(np.mean(wedge_mask((len(z[part]), *shape), z_mid, cell, params, buffer, theta_deg, primary_beam)))
        out[part] = kept * np.mean(sigma[part] ** 2)
    return out
