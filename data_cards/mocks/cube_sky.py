"""Survey realism for the HI survey cubes of cube_survey.py: clustered positions, the
primary-beam noise pattern and flagged (RFI) channels (issue 21; set-up after SKA SDC2,
Hartley et al. 2023, whose cube has all three).

* Clustering (`Clustering`): a Thomas (Neyman-Scott) process in comoving space. A
  fraction `field_fraction` of the galaxies is uniform (Poisson); the others each pick a
  parent ("group") uniformly among Poisson(n / members) parents placed like the field
  galaxies (uniform on the sky, redshift by dV/dz), and sit at a Gaussian offset of
  `radius_mpc` comoving per axis: on the sky radius / D_M(z) [rad], along the line of
  sight dz = radius H(z) / c plus the redshift-space spread of a line-of-sight velocity
  dispersion, dz = (1 + z) sigma_v / c (the "finger of god"). Members therefore overlap in
  projection *and* in frequency. Boundaries are periodic (offsets wrap around the cube's
  pixels and band), which keeps the count and the mean density exact. The defaults (6
  members, 0.5 Mpc, 150 km/s, 40 % field) are a stand-in for loose groups of HI-rich
  galaxies (HI galaxies cluster weakly, r0 ~ 3.5 Mpc/h: Meyer et al. 2007, Papastergis
  et al. 2013), not a fit to a correlation function.
* Primary beam (`PrimaryBeam`): the cube is primary-beam corrected, so the sky is not
  attenuated but the noise rises as 1 / PB. PB is a Gaussian of FWHM = k lambda / D (k =
  `fwhm_factor`, 1.13 for a tapered dish; Airy: 1.03) at each channel's frequency, so
  the pattern narrows with frequency. One pointing at the cube centre, or a hexagonal
  mosaic of pointings `mosaic_spacing_deg` apart (one at the centre), combined with
  inverse-variance weights: sigma(x, nu) = sigma_c sqrt(W(centre, nu) / W(x, nu)) with
  W = sum_i PB_i^2, so the cube centre has the card's noise sigma_c. PB (or sqrt(W)) is
  floored at `floor`. Flat-sky offsets from the centre pixel (fine for a few degrees).
  The pattern is fully described by header keywords (PBTYPE, PBDISH, PBFWHMK, PBSPACE,
  PBFLOOR, NOISE) and rebuilt by `survey_noise(header, channels)`.
* Flagged channels: RFI-blanked channels hold NaN (as in SDC2, where RFI flagging left
  blank channels). A fraction is turned into runs of Geometric(1/6) channels (mean 6) at
  random places; explicit channel lists are taken as given. Listed in the header
  (NFLAG, FLAGCHAN as ranges "a-b,c") and in truth.meta["FLAGCHAN"]; `flagged_channels`
  reads either back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.common import C_KMS
from cosmofm.data_cards.mocks.cubes import COSMOLOGY, _draw_redshifts, distances_mpc

_FOUR_LN2 = 4.0 * math.log(2.0)


# ---------------------------------------------------------------------------- clustering


@dataclass
class Clustering:
    """Thomas-process clustering of survey galaxies (see the module docstring)."""

    members: float = 6.0  # mean galaxies per group
    radius_mpc: float = 0.5  # comoving Gaussian sigma of a group, per axis [Mpc]
    velocity_dispersion_kms: float = 150.0  # line-of-sight velocity dispersion in a group [km/s]
    field_fraction: float = 0.4  # fraction of galaxies outside groups (uniform)

    def __post_init__(self):
        for name, low in (("members", 1.0), ("radius_mpc", 0.0), ("velocity_dispersion_kms", 0.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < low:
                raise InputError(f"clustering.{name}", f"must be a number >= {low:g}, got {v!r}", f"give {name} >= {low:g}")
        f = self.field_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            raise InputError("clustering.field_fraction", f"must be in [0, 1], got {f!r}", "give the fraction of unclustered galaxies")


def clustered_positions(rng: np.random.Generator, n: int, nx: int, ny: int, scale_deg: float, rest_hz: float,
                        band: tuple[float, float], cfg: Clustering):
    """Pixel x, y, observed frequency [Hz] and group id (-1 = field) of n galaxies.

    band = (lowest, highest) frequency edge [Hz] of the cube; periodic boundaries.
    """
    f_lo, f_hi = band
    z_lo, z_hi = rest_hz / f_hi - 1.0, rest_hz / f_lo - 1.0
    group = np.full(n, -1, dtype=np.int64)
    in_group = rng.uniform(0.0, 1.0, n) >= cfg.field_fraction
    n_cl = int(in_group.sum())
    px, py = rng.uniform(-0.5, nx - 0.5, n), rng.uniform(-0.5, ny - 0.5, n)
    z = _draw_redshifts(rng, n, z_lo, z_hi)
    if n_cl:
        n_par = max(1, int(rng.poisson(n_cl / cfg.members)))
        ppx, ppy = rng.uniform(-0.5, nx - 0.5, n_par), rng.uniform(-0.5, ny - 0.5, n_par)
        pz = _draw_redshifts(rng, n_par, z_lo, z_hi)
        k = rng.integers(0, n_par, n_cl)
        group[in_group] = k
        _, d_a = distances_mpc(pz[k])
        d_m = (1.0 + pz[k]) * d_a  # comoving transverse distance [Mpc]
        sky_pix = np.degrees(cfg.radius_mpc / d_m) / scale_deg  # group sigma in pixels
        hz = COSMOLOGY.H(pz[k]).value  # km/s/Mpc
        dz = rng.normal(0.0, 1.0, n_cl) * cfg.radius_mpc * hz / C_KMS + rng.normal(0.0, 1.0, n_cl) * (1.0 + pz[k]) * cfg.velocity_dispersion_kms / C_KMS
        px[in_group] = ppx[k] + rng.normal(0.0, 1.0, n_cl) * sky_pix
        py[in_group] = ppy[k] + rng.normal(0.0, 1.0, n_cl) * sky_pix
        z[in_group] = pz[k] + dz
    nu = rest_hz / (1.0 + z)
    px = (px + 0.5) % nx - 0.5
    py = (py + 0.5) % ny - 0.5
    nu = f_lo + (nu - f_lo) % (f_hi - f_lo)
    return px, py, nu, group


# ---------------------------------------------------------------------------- primary beam


@dataclass
class PrimaryBeam:
    """Primary-beam noise pattern of a corrected cube (see the module docstring)."""

    dish_diameter_m: float = 15.0  # SKA-MID dish
    fwhm_factor: float = 1.13  # FWHM = fwhm_factor x lambda / D
    mosaic_spacing_deg: float = 0.0  # 0: one pointing at the cube centre; > 0: hexagonal mosaic
    floor: float = 0.1  # PB (or sqrt of the mosaic weight) is floored here

    def __post_init__(self):
        for name in ("dish_diameter_m", "fwhm_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
                raise InputError(f"primary_beam.{name}", f"must be a positive number, got {v!r}", f"give a positive {name}")
        s = self.mosaic_spacing_deg
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not np.isfinite(s) or s < 0:
            raise InputError("primary_beam.mosaic_spacing_deg", f"must be >= 0, got {s!r}", "give 0 (one pointing) or a spacing in degrees")
        if isinstance(self.floor, bool) or not isinstance(self.floor, (int, float)) or not 0 < self.floor <= 1:
            raise InputError("primary_beam.floor", f"must be in (0, 1], got {self.floor!r}", "give a floor such as 0.1")

    def header_keys(self) -> dict:
        return {
            "PBTYPE": ("GAUSSIAN", "sigma = NOISE sqrt(W(centre)/W), W=sum PB^2"),
            "PBDISH": (float(self.dish_diameter_m), "[m] dish diameter D"),
            "PBFWHMK": (float(self.fwhm_factor), "PB FWHM = PBFWHMK x lambda / D"),
            "PBSPACE": (float(self.mosaic_spacing_deg), "[deg] hex mosaic spacing (0: one pointing)"),
            "PBFLOOR": (float(self.floor), "floor of PB (sqrt W)"),
        }


def _pointings(spacing_deg: float, half_x_deg: float, half_y_deg: float) -> np.ndarray:
    """(P, 2) flat-sky offsets [deg] of a hexagonal mosaic with one pointing at (0, 0)."""
    if spacing_deg <= 0:
        return np.zeros((1, 2))
    row = spacing_deg * math.sqrt(3.0) / 2.0
    nj = int(math.ceil((half_y_deg + spacing_deg) / row))
    ni = int(math.ceil((half_x_deg + spacing_deg) / spacing_deg)) + 1
    pts = [(i * spacing_deg + (j % 2) * spacing_deg / 2.0, j * row) for j in range(-nj, nj + 1) for i in range(-ni, ni + 1)]
    pts = np.array(pts)
    keep = (np.abs(pts[:, 0]) <= half_x_deg + spacing_deg) & (np.abs(pts[:, 1]) <= half_y_deg + spacing_deg)
    return pts[keep]


def noise_scale(header, channels) -> np.ndarray:
    """(len(channels), NAXIS2, NAXIS1) noise in units of the cube centre's, from the
    PB keywords of a survey-cube header (ones when it has none)."""
    ch = np.atleast_1d(np.asarray(channels, dtype=np.float64))
    nx, ny = int(header["NAXIS1"]), int(header["NAXIS2"])
    if header.get("PBTYPE") is None:
        return np.ones((len(ch), ny, nx))
    scale = abs(float(header["CDELT2"]))
    dx = (np.arange(nx) - (nx - 1) / 2.0) * scale  # deg
    dy = (np.arange(ny) - (ny - 1) / 2.0) * scale
    pts = _pointings(float(header["PBSPACE"]), nx * scale / 2.0, ny * scale / 2.0)  # (P, 2)
    ddx2 = (dx[None, :] - pts[:, :1]) ** 2  # (P, W)
    ddy2 = (dy[None, :] - pts[:, 1:]) ** 2  # (P, H)
    r2c = np.sum(pts**2, axis=1)  # (P,) of the cube centre
    freq = float(header["CRVAL3"]) + (ch + 1.0 - float(header["CRPIX3"])) * float(header["CDELT3"])
    fwhm = np.degrees(float(header["PBFWHMK"]) * C_KMS * 1e3 / (freq * float(header["PBDISH"])))  # deg
    floor2 = float(header["PBFLOOR"]) ** 2
    out = np.empty((len(ch), ny, nx))
    for k, f in enumerate(fwhm):
        a = 2.0 * _FOUR_LN2 / f**2  # PB^2 = exp(-a r^2), separable in x and y
        w = np.exp(-a * ddy2).T @ np.exp(-a * ddx2)  # (H, W) = sum over pointings
        wc = float(np.exp(-a * r2c).sum())
        out[k] = np.sqrt(wc / np.maximum(w, floor2))
    return out


def survey_noise(header, channels=None) -> np.ndarray:
    """sigma [Jy/beam], float32 (len(channels), NAXIS2, NAXIS1), of a survey cube from its
    header (keyword NOISE = the card's noise at the cube centre, PB* = the pattern);
    channels default to all; flagged channels get NaN."""
    if "NOISE" not in header:
        raise InputError("header", "has no NOISE keyword", "give the header of a cube made by mock_survey_cube")
    ch = np.arange(int(header["NAXIS3"])) if channels is None else np.atleast_1d(np.asarray(channels))
    out = (float(header["NOISE"]) * noise_scale(header, ch)).astype(np.float32)
    flagged = np.isin(ch, flagged_channels(header))
    out[flagged] = np.nan
    return out


# ---------------------------------------------------------------------------- flagged channels


def flag_channels(rng: np.random.Generator, nf: int, flagged) -> np.ndarray:
    """Sorted unique channel indices to blank: a fraction in [0, 1) -> RFI runs; a sequence
    of ints -> those channels."""
    if flagged is None:
        return np.zeros(0, dtype=np.int64)
    if isinstance(flagged, (float, int, np.floating, np.integer)) and not isinstance(flagged, bool):
        frac = float(flagged)
        if not (np.isfinite(frac) and 0.0 <= frac < 1.0):
            raise InputError("flagged_channels", f"a fraction must be in [0, 1), got {flagged!r}", "give e.g. 0.05, or a list of channel indices")
        target = int(round(frac * nf))
        mask = np.zeros(nf, dtype=bool)
        while mask.sum() < target:
            start = int(rng.integers(0, nf))
            run = np.arange(start, min(nf, start + int(rng.geometric(1 / 6.0))))  # a run of mean 6 channels
            new = run[~mask[run]]
            mask[new[: target - int(mask.sum())]] = True  # the last run is cut to hit the fraction exactly
        return np.nonzero(mask)[0].astype(np.int64)
    try:
        ch = np.asarray(list(flagged))
    except TypeError:
        raise InputError("flagged_channels", f"must be a fraction or a list of channel indices, got {flagged!r}", "give e.g. 0.05 or [10, 11, 12]") from None
    if ch.size and (ch.dtype.kind not in "iu" or ch.min() < 0 or ch.max() >= nf):
        raise InputError("flagged_channels", f"must be integer channel indices in [0, {nf}), got {flagged!r}", "give channels of this cube")
    return np.unique(ch.astype(np.int64))


def channel_ranges(ch) -> str:
    """'3-5,9,20-31' for channels [3, 4, 5, 9, 20, ..., 31] (sorted unique ints)."""
    ch = np.asarray(ch, dtype=np.int64)
    if ch.size == 0:
        return ""
    breaks = np.nonzero(np.diff(ch) != 1)[0]
    starts, ends = np.concatenate([[ch[0]], ch[breaks + 1]]), np.concatenate([ch[breaks], [ch[-1]]])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in zip(starts, ends))


def flagged_channels(header) -> np.ndarray:
    """The flagged (NaN) channel indices listed in a survey-cube header's FLAGCHAN (or a
    truth table's meta, which carries the same key)."""
    text = str(header.get("FLAGCHAN", "") or "")
    out = []
    for part in filter(None, text.split(",")):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return np.asarray(out, dtype=np.int64)


def flag_header_keys(ch) -> dict:
    return {"NFLAG": (int(len(ch)), "flagged (NaN) channels"), "FLAGCHAN": channel_ranges(ch)}  # no comment: a long value continues (CONTINUE cards)

