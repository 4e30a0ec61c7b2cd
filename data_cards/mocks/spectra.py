"""Physically parametrised mock spectra for the 13 classes of Zhong et al. 2023 (GaSNet-II).

The generator has three parts:
- `draw_object(rng)`: a class, a redshift uniform over that class's range (`Z_RANGE`) and
  the physical parameters (effective temperature and radial velocity for stars; young-
  population fraction, velocity dispersion, dust and emission-line strengths with
  BPT-consistent ratios for galaxies; continuum slope and broad-line widths for QSOs).
- `mock_object(seed, index)`: the object a survey with 16.5 <= r <= 20.5 sees. Galaxies
  and QSOs get their redshift and absolute magnitude jointly from their class's
  luminosity function inside that window (mocks/luminosity.py: Herbel et al. 2017 red /
  blue Schechter functions, Palanque-Delabrouille et al. 2016 for QSOs), with the exact
  K-correction of their own SED and Planck18 distances, so brightness carries its real,
  weak redshift information; the class's range bounds the redshift (the BPT classes need
  Halpha inside an optical spectrograph). Stars keep r uniform in the window.
- `rest_model` / `observe`: the noiseless spectrum on any wavelength grid (galaxy
  continua from the empirical CWW E and Im SEDs shipped with GalSim, mixed by the young
  fraction, with absorption lines, dust and nebular lines on top), then the
  instrument of a data card: Gaussian line-spread function from the resolving power
  (added in quadrature to every Gaussian feature, which is exact for Gaussians),
  throughput, sky continuum and OH lines, Poisson + read noise, flux-calibration
  wiggles, bad pixels; ivar and a mask.

Line-ratio recipes: the star-forming / AGN boundaries are Kauffmann et al. 2003
(MNRAS 346, 1055) and Kewley et al. 2001 (ApJ 556, 121); Case-B Halpha/Hbeta = 2.86;
dust attenuation follows Calzetti et al. 2000 (ApJ 533, 682). Wavelengths are vacuum.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from cosmofm.data_cards.mocks.common import C_ANGSTROM_S, distance_tables, filter_weights, object_rng
from cosmofm.data_cards.mocks.luminosity import CLASS_LF, SURVEY_WINDOW, draw_in_window
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import SpectrumCard

C_KMS = 299792.458
R_BAND = 6231.0  # Angstrom: objects are normalised to an r-band AB magnitude here
R_TOP_HAT = (R_BAND * 0.93, R_BAND * 1.07)  # Angstrom: the r magnitude is the mean f_lambda over this top hat

CLASSES = (
    "STAR_A0", "STAR_F5", "STAR_F9", "STAR_G2", "STAR_K1", "STAR_K3", "STAR_K5",
    "QSO", "QSO_BROADLINE",
    "GALAXY", "GALAXY_STARFORMING", "GALAXY_STARBURST", "GALAXY_AGN",
)
# Redshift range of each extragalactic class [z_min, z_max]: the BPT classes need Halpha
# (and [NII]) inside an optical spectrograph, hence z < 0.3-0.4.
Z_RANGE = {
    "QSO": (0.3, 3.5), "QSO_BROADLINE": (0.3, 3.5), "GALAXY": (0.05, 0.8), "GALAXY_STARFORMING": (0.01, 0.4),
    "GALAXY_STARBURST": (0.01, 0.3), "GALAXY_AGN": (0.01, 0.4),
}
STAR_TEFF = {"STAR_A0": 9600, "STAR_F5": 6500, "STAR_F9": 6100, "STAR_G2": 5800, "STAR_K1": 5200, "STAR_K3": 4800, "STAR_K5": 4400}

# Vacuum rest wavelengths [Angstrom].
NEBULAR = {
    "OII_3727": 3727.1, "OII_3730": 3729.9, "Hdelta": 4102.9, "Hgamma": 4341.7, "Hbeta": 4862.7,
    "OIII_4960": 4960.3, "OIII_5008": 5008.2, "NII_6550": 6549.9, "Halpha": 6564.6, "NII_6585": 6585.3,
    "SII_6718": 6718.3, "SII_6733": 6732.7,
}
BROAD = {"Lyalpha": 1215.7, "NV": 1240.1, "SiIV": 1397.6, "CIV": 1549.1, "CIII": 1908.7, "MgII": 2799.1, "Hgamma": 4341.7, "Hbeta": 4862.7, "Halpha": 6564.6}
BROAD_EW = {"Lyalpha": 80, "NV": 12, "SiIV": 8, "CIV": 35, "CIII": 20, "MgII": 35, "Hgamma": 10, "Hbeta": 45, "Halpha": 170}  # rest EW [A]
QSO_NARROW = {"OII": 3728.5, "NeIII": 3870.9, "Hbeta_n": 4862.7, "OIII_4960": 4960.3, "OIII_5008": 5008.2, "Halpha_n": 6564.6, "NII_6585": 6585.3}
QSO_NARROW_EW = {"OII": 3, "NeIII": 1.5, "Hbeta_n": 2, "OIII_4960": 5, "OIII_5008": 15, "Halpha_n": 6, "NII_6585": 3}  # rest EW [A]
STELLAR = {  # (centre [A], sigma [A]) of absorption features
    "H_epsilon": (3971.2, 3.0), "H_delta": (4102.9, 3.0), "H_gamma": (4341.7, 3.0), "H_beta": (4862.7, 3.0), "H_alpha": (6564.6, 3.0),
    "CaK": (3934.8, 3.0), "CaH": (3969.6, 3.0), "Gband": (4305.0, 8.0), "Mgb": (5176.7, 6.0), "NaD": (5895.6, 4.0),
    "TiO_6158": (6158.0, 40.0), "TiO_7054": (7054.0, 45.0), "TiO_7589": (7589.0, 50.0),
}


def kauffmann03(log_n2ha):
    """Upper envelope of star-forming galaxies in the [NII] BPT diagram."""
    return 0.61 / (log_n2ha - 0.05) + 1.3


def kewley01(log_n2ha):
    """Maximum-starburst line in the [NII] BPT diagram."""
    return 0.61 / (log_n2ha - 0.47) + 1.19


@dataclass
class ObjectParams:
    cls: str
    z: float
    params: dict = field(default_factory=dict)
    lines: dict = field(default_factory=dict)  # emission-line fluxes, units of the continuum at 5500 A x A
    mags: dict = field(default_factory=dict)  # AB magnitudes from mock_object: "r" (R_TOP_HAT), absolute ones ("M_B", ...)


def draw_object(rng: np.random.Generator, cls: str | None = None) -> ObjectParams:
    cls = cls or CLASSES[rng.integers(len(CLASSES))]
    if cls.startswith("STAR"):
        rv = rng.normal(0, 40)
        return ObjectParams(cls, rv / C_KMS, {"teff": STAR_TEFF[cls] + rng.normal(0, 80), "rv_kms": rv})
    if cls.startswith("QSO"):
        broad = cls == "QSO_BROADLINE"
        return ObjectParams(cls, float(rng.uniform(*Z_RANGE[cls])), {
            "alpha_lambda": rng.normal(-1.5, 0.3),
            "fwhm_kms": rng.uniform(3500, 9000) if broad else rng.uniform(1200, 2400),
            "ew_scale": rng.uniform(0.8, 1.6) if broad else rng.uniform(0.3, 0.7),
            "narrow_fwhm_kms": rng.uniform(350, 700),
            "narrow_scale": rng.uniform(0.3, 1.5),
        })
    # galaxies: (young fraction, velocity dispersion, A_V, Halpha EW)
    young, sigma_v, a_v, ew = {
        "GALAXY": ((0.0, 0.05), (150, 300), (0.0, 0.3), (0.0, 0.5)),
        "GALAXY_STARFORMING": ((0.15, 0.45), (50, 120), (0.2, 1.0), (8, 45)),
        "GALAXY_STARBURST": ((0.55, 0.9), (40, 100), (0.4, 1.5), (70, 300)),
        "GALAXY_AGN": ((0.05, 0.3), (100, 250), (0.2, 1.0), (8, 60)),
    }[cls]
    p = {
        "young_fraction": rng.uniform(*young), "sigma_kms": rng.uniform(*sigma_v), "A_V": rng.uniform(*a_v),
        "halpha_ew": rng.uniform(*ew), "gas_sigma_kms": rng.uniform(40, 90),
    }
    if cls == "GALAXY_AGN":  # Seyfert region, above Kewley et al. 2001
        x = rng.uniform(-0.25, 0.25)
        y = rng.uniform(kewley01(x) + 0.15, kewley01(x) + 0.6) if x < 0.3 else rng.uniform(0.5, 1.1)
    elif cls == "GALAXY":
        x, y = rng.uniform(-0.6, 0.0), rng.uniform(-0.5, 0.3)
    else:  # star-forming and starburst: below Kauffmann et al. 2003; starbursts more ionised, lower metallicity
        x = rng.uniform(-1.2, -0.7) if cls == "GALAXY_STARBURST" else rng.uniform(-0.9, -0.4)
        y = kauffmann03(x) - rng.uniform(0.1, 0.35) - (0.0 if cls == "GALAXY_STARBURST" else rng.uniform(0.1, 0.35))
    p["log_n2ha"], p["log_o3hb"] = float(x), float(y)
    return ObjectParams(cls, float(rng.uniform(*Z_RANGE[cls])), p)


def _gauss(wave, centres, sigmas, amps):
    """Sum of Gaussians on a sorted grid, each evaluated only within 6 sigma (speed).

    All lines at once: line k covers pixels lo_k + (0..W-1) of a (lines, W) block, W the
    widest window, and the block is summed into the grid with bincount. (A Python loop
    over the lines cost ~5 us a line: a quarter of a spectrum's time, with ~140 sky lines.)
    """
    lo = np.searchsorted(wave, centres - 6 * sigmas)
    hi = np.searchsorted(wave, centres + 6 * sigmas)
    width = int((hi - lo).max(initial=0))
    if width == 0:
        return np.zeros(wave.shape)
    pix = lo[:, None] + np.arange(width)  # (L, W)
    inside = pix < hi[:, None]
    pix = np.minimum(pix, wave.size - 1)
    x = (wave[pix] - centres[:, None]) / sigmas[:, None]
    values = np.where(inside, amps[:, None] * np.exp(-0.5 * x * x), 0.0)
    return np.bincount(pix.ravel(), weights=values.ravel(), minlength=wave.size)


def _planck(lam, teff):
    return 1.0 / (lam**5 * np.expm1(1.4388e8 / (lam * teff)))


@functools.lru_cache(maxsize=None)
def _cww_table(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(wavelength [A], f_lambda normalised at 5500 A) of a CWW SED shipped with GalSim."""
    import galsim

    path = Path(galsim.meta_data.share_dir) / "SEDs" / f"CWW_{kind}_ext.sed"
    wave, flux = np.loadtxt(path, unpack=True)
    # The Im SED carries coarse (~40 A) nebular emission; our lines are added separately
    # at the right width, so bridge the table across them.
    near_line = np.zeros(wave.size, dtype=bool)
    for lam in NEBULAR.values():
        near_line |= np.abs(wave - lam) < 60
    flux = np.where(near_line, np.interp(wave, wave[~near_line], flux[~near_line]), flux)
    return wave, flux / np.interp(5500.0, wave, flux)


def _cww(kind: str, rest: np.ndarray) -> np.ndarray:
    wave, flux = _cww_table(kind)
    return np.interp(rest, wave, flux)


def calzetti(lam_rest):
    """Calzetti et al. 2000 k(lambda) (R_V = 4.05), lambda in Angstrom."""
    x = lam_rest / 1e4
    k = np.where(x < 0.63, 2.659 * (-2.156 + 1.509 / x - 0.198 / x**2 + 0.011 / x**3) + 4.05, 2.659 * (-1.857 + 1.040 / x) + 4.05)
    return np.clip(k, 0, None)


def _absorption(rest, teff, sigma_kms, lsf_rest):
    """Multiplicative stellar absorption for a population of temperature teff."""
    balmer = 0.55 * np.exp(-(((teff - 9500) / 2500) ** 2)) + 0.08
    metal = np.clip((8000 - teff) / 4000, 0, 1)
    depth = {
        "H_epsilon": balmer, "H_delta": balmer, "H_gamma": balmer, "H_beta": balmer, "H_alpha": 0.8 * balmer,
        "CaK": 0.1 + 0.6 * metal, "CaH": 0.1 + 0.5 * metal, "Gband": 0.3 * np.clip((6500 - teff) / 2000, 0, 1),
        "Mgb": 0.08 + 0.35 * metal, "NaD": 0.05 + 0.4 * np.clip((6500 - teff) / 2500, 0, 1),
        "TiO_6158": 0.35 * np.clip((4800 - teff) / 600, 0, 1), "TiO_7054": 0.4 * np.clip((4800 - teff) / 600, 0, 1),
        "TiO_7589": 0.3 * np.clip((4800 - teff) / 600, 0, 1),
    }
    names = list(STELLAR)
    centres = np.array([STELLAR[k][0] for k in names])
    widths = np.array([STELLAR[k][1] for k in names]) * (1 + 2.5 * (balmer > 0.4) * np.array([k.startswith("H_") for k in names]))
    sig = np.sqrt(widths**2 + (centres * sigma_kms / C_KMS) ** 2 + np.interp(centres, rest, lsf_rest) ** 2)
    return 1 - np.clip(_gauss(rest, centres, sig, np.array([depth[k] for k in names])), 0, 0.95)


def rest_model(obj: ObjectParams, wave: np.ndarray, resolving_power: float) -> np.ndarray:
    """Noiseless observed-frame f_lambda (arbitrary units, ~1 at 5500 A rest) on `wave`.

    Also fills `obj.lines` with the emission-line fluxes (same units x A) for BPT checks.
    """
    z = obj.z
    rest = wave / (1 + z)
    lsf_rest = rest / resolving_power / 2.3548  # LSF sigma in the rest frame
    p = obj.params
    if obj.cls.startswith("STAR"):
        flux = _planck(rest, p["teff"]) / _planck(5500.0, p["teff"])
        return flux * _absorption(rest, p["teff"], 10.0, lsf_rest)
    if obj.cls.startswith("QSO"):
        flux, obj.lines = qso_lines(p, rest, lsf_rest)
        forest = rest < BROAD["Lyalpha"]
        if forest.any():  # Lyman-alpha forest: mean transmission from Faucher-Giguere et al. 2008
            tau_eff = 0.0018 * (wave[forest] / BROAD["Lyalpha"]) ** 3.92
            rng = np.random.default_rng(int(z * 1e6))
            flux[forest] *= np.exp(-tau_eff * rng.exponential(1.0, forest.sum()))
        return flux
    # Continua from real empirical SEDs (Coleman, Wu & Weedman 1980, as shipped by GalSim):
    # E for the old population (its 4000 A break included), Im for the young one; their
    # ~40 A sampling carries no narrow lines, so the Balmer and metal absorption of each
    # population is added at the galaxy's velocity dispersion.
    old = _cww("E", rest) * _absorption(rest, 4600.0, p["sigma_kms"], lsf_rest)
    young = _cww("Im", rest) * _absorption(rest, 15000.0, p["sigma_kms"], lsf_rest)
    cont = (1 - p["young_fraction"]) * old + p["young_fraction"] * young
    dust = 10 ** (-0.4 * p["A_V"] * calzetti(rest) / 4.05)
    emission, obj.lines = nebular_emission(p, rest, cont, lsf_rest)
    return (cont + emission) * dust


def qso_lines(p: dict, rest: np.ndarray, lsf_rest: np.ndarray) -> tuple[np.ndarray, dict]:
    """(f_lambda, line fluxes) of a QSO's power-law continuum (~1 at 3000 A) with its broad
    lines and narrow-line region at rest wavelengths, LSF sigma lsf_rest [A] added in
    quadrature; line fluxes in the continuum's units x A, narrow ones prefixed "narrow_"."""
    cont = (rest / 3000.0) ** p["alpha_lambda"]
    names = list(BROAD)
    centres = np.array([BROAD[k] for k in names])
    sig = np.sqrt((centres * p["fwhm_kms"] / C_KMS / 2.3548) ** 2 + np.interp(centres, rest, lsf_rest) ** 2)
    ew = np.array([BROAD_EW[k] for k in names]) * p["ew_scale"]
    cont_at = (centres / 3000.0) ** p["alpha_lambda"]
    amps = ew * cont_at / (np.sqrt(2 * np.pi) * sig)
    lines = {k: float(e * c) for k, e, c in zip(names, ew, cont_at)}
    flux = cont + _gauss(rest, centres, sig, amps)
    # narrow-line region: [OII], [NeIII], narrow Balmer, [OIII], [NII] at ~500 km/s FWHM
    n_names = list(QSO_NARROW_EW)
    n_centres = np.array([QSO_NARROW[k] for k in n_names])
    n_sig = np.sqrt((n_centres * p["narrow_fwhm_kms"] / C_KMS / 2.3548) ** 2 + np.interp(n_centres, rest, lsf_rest) ** 2)
    n_ew = np.array([QSO_NARROW_EW[k] for k in n_names]) * p["narrow_scale"]
    n_cont = (n_centres / 3000.0) ** p["alpha_lambda"]
    flux = flux + _gauss(rest, n_centres, n_sig, n_ew * n_cont / (np.sqrt(2 * np.pi) * n_sig))
    lines.update({f"narrow_{k}": float(e * c) for k, e, c in zip(n_names, n_ew, n_cont)})
    return flux, lines


def nebular_emission(p: dict, rest: np.ndarray, cont: np.ndarray, lsf_rest: np.ndarray) -> tuple[np.ndarray, dict]:
    """(emission f_lambda on `rest`, line fluxes) of a galaxy's nebular lines, before dust:
    fluxes from the Halpha equivalent width over `cont` and the BPT ratios of `p`."""
    cont_ha = float(np.interp(NEBULAR["Halpha"], rest, cont)) if rest[0] < NEBULAR["Halpha"] < rest[-1] else 1.0
    f_ha = p["halpha_ew"] * cont_ha
    f_hb = f_ha / 2.86
    f_n2 = f_ha * 10 ** p["log_n2ha"]
    f_o3 = f_hb * 10 ** p["log_o3hb"]
    fluxes = {
        "Halpha": f_ha, "Hbeta": f_hb, "Hgamma": f_hb * 0.47, "Hdelta": f_hb * 0.26, "NII_6585": f_n2, "NII_6550": f_n2 / 3.05,
        "OIII_5008": f_o3, "OIII_4960": f_o3 / 2.98, "OII_3727": 1.2 * f_hb * 10 ** (0.3 - p["log_n2ha"] * 0.5),
        "OII_3730": 1.5 * f_hb * 10 ** (0.3 - p["log_n2ha"] * 0.5), "SII_6718": 0.2 * f_ha, "SII_6733": 0.15 * f_ha,
    }
    names = list(NEBULAR)
    centres = np.array([NEBULAR[k] for k in names])
    sig = np.sqrt((centres * p["gas_sigma_kms"] / C_KMS) ** 2 + np.interp(centres, rest, lsf_rest) ** 2)
    amps = np.array([fluxes[k] for k in names]) / (np.sqrt(2 * np.pi) * sig)
    return _gauss(rest, centres, sig, amps), {k: float(v) for k, v in fluxes.items()}


# A fixed list of the strongest night-sky lines [A, vacuum] and relative strengths
# (OI 5577/6300/6364, NaD, and OH Meinel bands in the red).
_SKY_LINES = np.array([5578.9, 5891.6, 5897.6, 6302.0, 6365.5] + list(np.arange(6830.0, 10400.0, 27.5)))
_SKY_AMPS = np.concatenate([[6.0, 1.0, 1.0, 3.0, 1.0], 1.0 + 2.0 * np.abs(np.sin(np.arange(len(_SKY_LINES) - 5) * 1.7))])


def observe(obj: ObjectParams, wave: np.ndarray, resolving_power: float, snr: float, rng: np.random.Generator):
    """Add the instrument to `obj`: returns (flux, ivar, noiseless flux, and_mask)."""
    model = rest_model(obj, wave, resolving_power)
    # throughput: smooth, peaking near 6000 A and falling at both ends of an optical spectrograph
    throughput = np.exp(-0.5 * ((np.log(wave) - np.log(6000.0)) / 0.35) ** 2)
    lsf = wave / resolving_power / 2.3548
    sky = 0.3 + _gauss(wave, _SKY_LINES, np.interp(_SKY_LINES, wave, lsf), _SKY_AMPS * 2.0)
    # scale the object so that the median per-pixel S/N matches the card's typical S/N
    target = snr * rng.lognormal(0.0, 0.4)
    read = 1.0
    obj_counts = np.clip(model, 0, None) * throughput
    med = np.median(obj_counts)
    # solve median(counts) / sqrt(median(counts) + sky + read^2) = target for the scale
    sky_c = np.median(sky * throughput)
    scale = (target**2 + np.sqrt(target**4 + 4 * target**2 * (sky_c + read**2))) / (2 * med) if med > 0 else 1.0
    obj_counts *= scale
    sky_counts = sky * throughput * 1.0
    var_counts = obj_counts + sky_counts + read**2
    counts = obj_counts + rng.normal(0.0, 1.0, wave.size) * np.sqrt(var_counts)
    # flux calibration: divide by throughput, with a few-percent low-order error
    t = (wave - wave.mean()) / np.ptp(wave)
    calib = 1 + rng.normal(0, 0.02) * t + rng.normal(0, 0.015) * (3 * t**2 - 0.25)
    flux = counts / throughput * calib / scale
    sigma = np.sqrt(var_counts) / throughput * calib / scale
    ivar = 1.0 / sigma**2
    and_mask = np.zeros(wave.size, dtype=np.int32)
    bad = rng.random(wave.size) < 0.002
    and_mask[bad] |= 1  # cosmic ray / bad column
    ivar[bad] = 0.0
    return flux, ivar, model, and_mask


def wavelength_grid(card: SpectrumCard) -> np.ndarray:
    """The card's pixel centres in Angstrom (vacuum); multi-window cards get their
    n_pixels shared between windows in proportion to each window's extent."""
    edges = [(lo.to_value("Angstrom"), hi.to_value("Angstrom")) for lo, hi in card.wavelength_windows]
    log = card.sampling == "log"
    extent = np.array([np.log(hi / lo) if log else hi - lo for lo, hi in edges])
    counts = np.floor(card.n_pixels * extent / extent.sum()).astype(int)
    counts[-1] += card.n_pixels - counts.sum()
    parts = [np.geomspace(lo, hi, k) if log else np.linspace(lo, hi, k) for (lo, hi), k in zip(edges, counts)]
    return np.concatenate(parts)


def mock_spectrum(card: SpectrumCard, seed: int, index: int) -> Sample:
    """A spectrum of object (seed, index) through the card's spectrograph (mock_spectra.observe);
    cards with `mock_realism: survey` get mocks/survey.py's stars, galaxies and instrument."""
    if card.mock_realism != "basic":
        from cosmofm.data_cards.mocks.survey import mock_spectrum_survey

        return mock_spectrum_survey(card, seed, index)
    obj, norm = mock_object(seed, index)
    wave = wavelength_grid(card)
    flux, ivar, _, and_mask = observe(obj, wave, card.resolving_power, card.typical_snr, object_rng(seed, index, 4))
    truth = {"params": {k: float(v) for k, v in obj.params.items()}, "line_fluxes": {k: v * norm for k, v in obj.lines.items()},
             "mags": {k: float(v) for k, v in obj.mags.items()}}
    return Sample(
        "spectrum", flux * norm, ivar / norm**2, {"wavelength": wave},
        {
            "card": card.name, "id": f"{card.name}-{seed}-{index}", "pair_id": f"obj-{seed}-{index}",
            "labels": {"spectral_class": obj.cls, "redshift": obj.z}, "and_mask_bits": int(np.bitwise_or.reduce(and_mask)), "truth": truth,
        },
    )


def mock_object(seed: int, index: int) -> tuple[ObjectParams, float]:
    """Object (seed, index): its class, physics, redshift and magnitudes (`obj.mags`), and
    the factor that turns its model spectrum into f_lambda [1e-17 erg/s/cm^2/A] for its
    r-band AB magnitude, 16.5 <= r <= 20.5.

    Galaxies and QSOs are placed by their luminosity function (`_place_in_window`, own
    random stream 2); stars keep r uniform in the window. Spectra and images of the same
    (seed, index) call this, so they show one object.
    """
    rng = object_rng(seed, index, 0)
    obj = draw_object(rng)
    if obj.cls in CLASS_LF:
        return obj, _place_in_window(obj, object_rng(seed, index, 2))
    r_mag = rng.uniform(*SURVEY_WINDOW)
    obj.mags = {"r": float(r_mag)}
    ref = np.linspace(*R_TOP_HAT, 400)
    return obj, _f_lambda_r(r_mag) / max(float(np.mean(rest_model(obj, ref, 2000.0))), 1e-30)


def _f_lambda_r(r_mag: float) -> float:
    """f_lambda [1e-17 erg/s/cm^2/A] at R_BAND of a flat-f_nu source of AB magnitude r_mag."""
    return 3631e-23 * 10 ** (-0.4 * r_mag) * C_ANGSTROM_S / R_BAND**2 * 1e17


_REST_R = 500.0  # resolving power of the rest-frame SED magnitudes are computed from
_REST_DLOGLAM = 1e-3  # its step in ln(lambda): >= 1 sample per line sigma at R = 500, so line fluxes integrate exactly


def _abs_bands(cls: str) -> tuple[tuple[str, str, float], ...]:
    """(name, speclite filter, redshift the band is K-corrected to) of the class's absolute
    magnitudes: its luminosity function's, and rest-frame SDSS r for galaxy sizes."""
    lf = CLASS_LF[cls]
    return ((lf.key, lf.band, lf.band_z),) + ((("M_r", "sdss2010-r", 0.0),) if cls.startswith("GALAXY") else ())


@functools.lru_cache(maxsize=None)
def _rest_grid(cls: str) -> np.ndarray:
    """Rest wavelengths [A] covering the r top hat at every redshift of the class and the
    bands of its absolute magnitudes."""
    z_lo, z_hi = Z_RANGE[cls]
    lo, hi = R_TOP_HAT[0] / (1 + z_hi), R_TOP_HAT[1] / (1 + z_lo)
    for _, band, band_z in _abs_bands(cls):
        wave, _ = filter_weights((band,))
        lo, hi = min(lo, wave[0] / (1 + band_z)), max(hi, wave[-1] / (1 + band_z))
    return np.exp(np.arange(np.log(lo) - _REST_DLOGLAM, np.log(hi) + 2 * _REST_DLOGLAM, _REST_DLOGLAM))


@functools.lru_cache(maxsize=None)
def _z_grid(cls: str) -> np.ndarray:
    return np.linspace(*Z_RANGE[cls], 161)


def magnitude_model(obj: ObjectParams) -> tuple[Callable, Callable]:
    """(top_hat, k_correction) of a galaxy or QSO at any redshift z, from its rest-frame SED
    S(x) (`rest_model` at z = 0) on the class's rest grid:

    - top_hat(z): the mean f_lambda of rest_model(obj at z) over R_TOP_HAT, in units of S
      (at redshift z, rest_model(obj, lambda) = S(lambda / (1 + z)));
    - k_correction(z, name): m_r - M_name - DM(z), exactly: an absolute magnitude in band Q
      K-corrected to z_Q is M = -2.5 log10(<f_nu,obs(lambda (1 + z) / (1 + z_Q))>_Q / 3631 Jy)
      - DM(z) + 2.5 log10((1 + z) / (1 + z_Q)), so m_r - M - DM(z) = -2.5 log10(top_hat(z)
      R_BAND^2 / ((1 + z)(1 + z_Q) <S(x) x^2>_Q)) with x = lambda / (1 + z_Q). `name` is one
      of `_abs_bands(obj.cls)`.
    """
    x = _rest_grid(obj.cls)
    s = rest_model(ObjectParams(obj.cls, 0.0, obj.params), x, _REST_R)
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (s[1:] + s[:-1]) * np.diff(x))])
    a, b = R_TOP_HAT

    def top_hat(z):
        return (1 + z) * (np.interp(b / (1 + z), x, cum) - np.interp(a / (1 + z), x, cum)) / (b - a)

    def band_flux(band: str, band_z: float) -> float:  # <S(x) x^2>_Q, x = lambda / (1 + z_Q)
        wave, weights = filter_weights((band,))
        rest = wave / (1 + band_z)
        return float(weights[0] @ (np.interp(rest, x, s) * rest**2))

    bands = {name: (band_flux(band, band_z), band_z) for name, band, band_z in _abs_bands(obj.cls)}

    def k_correction(z, name):
        flux, band_z = bands[name]
        return -2.5 * np.log10(top_hat(z) * R_BAND**2 / ((1 + z) * (1 + band_z) * flux))

    return top_hat, k_correction


def _place_in_window(obj: ObjectParams, rng: np.random.Generator) -> float:
    """Draw the redshift and absolute magnitude of a galaxy or QSO from its class's
    luminosity function among the objects with r in SURVEY_WINDOW (`luminosity.
    draw_in_window`, K-corrections from `magnitude_model`); sets obj.z and obj.mags and
    returns the spectrum's normalisation."""
    top_hat, k_correction = magnitude_model(obj)
    lf = CLASS_LF[obj.cls]
    obj.z, _, r_mag = draw_in_window(lf, _z_grid(obj.cls), lambda z: k_correction(z, lf.key), rng)
    t = distance_tables()
    dm = float(np.interp(obj.z, t.z, t.distmod))
    obj.mags = {"r": r_mag, **{name: float(r_mag - dm - k_correction(obj.z, name)) for name, _, _ in _abs_bands(obj.cls)}}
    return _f_lambda_r(r_mag) / float(top_hat(obj.z))


def band_fluxes_njy(obj: ObjectParams, norm: float, band_wavelengths: np.ndarray) -> np.ndarray:
    """Band fluxes [nJy] of an object from its noiseless spectrum.

    Bands are approximated as top hats of +-10 % around the effective wavelength.
    """
    wave = np.linspace(band_wavelengths.min() * 0.85, band_wavelengths.max() * 1.15, 4000)
    f_lambda = rest_model(obj, wave, 2000.0) * norm * 1e-17  # erg/s/cm^2/A
    f_nu_njy = f_lambda * wave**2 / C_ANGSTROM_S * 1e23 * 1e9
    return np.array([f_nu_njy[np.abs(wave / lam - 1) < 0.1].mean() for lam in band_wavelengths])
