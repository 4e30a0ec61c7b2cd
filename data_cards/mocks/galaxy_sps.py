"""Galaxy continua as parametric stellar populations of several ages and metallicities.

With no population-synthesis grid installable here (see mocks/stellar.py), a simple
stellar population (SSP) of age t and [Fe/H] is the light-weighted sum of the stellar
models of mocks/stellar.py at the phases that make its optical light (Renzini & Buzzoni
1986; Maraston 2005, MNRAS 362, 799): main-sequence turn-off stars, whose temperature
falls with age (Teff_TO ~ 5800 K (t / 10 Gyr)^-0.18, hotter at low metallicity); red
giants (log g 2.5, hotter when metal-poor) whose share of the light at 5500 A grows to
~45 % in old populations; lower main-sequence K dwarfs (~6 %) and, in old metal-rich
populations, M giants (~3 %, the TiO of ellipticals in the red). A galaxy is a sum of
SSPs weighted by their light at 5500 A. Massive quiescent galaxies are alpha-enhanced,
[alpha/Fe] = 0.28 log10(sigma) - 0.42 (Thomas et al. 2005, ApJ 621, 673), and their
light mixes dwarfs and giants, so that beside a K giant of the same colour they show
stronger Mg b and Na D, turn-off Balmer lines and lines broadened by a velocity
dispersion of 50-350 km/s.

Dust follows Calzetti et al. 2000 with the stellar continuum seeing 0.44 of the gas's
reddening (their E_s(B-V) = 0.44 E_g(B-V)). Quiescent galaxies carry weak LINER-like
emission (EW(Halpha) < 3 A, [NII]/Halpha > 0.6: "retired" galaxies lit by old stars,
Cid Fernandes et al. 2011, MNRAS 413, 1687) half of the time, and a fifth of the
star-forming ones are composites, between Kauffmann et al. 2003 and Kewley et al. 2001
in the [NII] BPT diagram but below the line SDSS uses to call a galaxy AGN (Brinchmann et
al. 2004), so their STARFORMING label is the one SDSS would give; the other galaxies keep
the BPT-consistent lines of mocks/spectra.py, which define their labels.
"""

from __future__ import annotations

import numpy as np

from cosmofm.data_cards.mocks import stellar
from cosmofm.data_cards.mocks.spectra import kauffmann03, kewley01
from cosmofm.data_cards.mocks.stellar import C_KMS, StarParams


def ssp_components(age_gyr: float, feh: float, alpha_fe: float) -> list[tuple[float, StarParams]]:
    """(light fraction at 5500 A, star) of the phases of an SSP; fractions sum to 1."""
    t_to = float(np.clip(5800.0 * (age_gyr / 10.0) ** -0.18 * 10 ** (-0.03 * feh), 5300.0, 35000.0))
    giant_teff = float(np.clip(4600.0 - 250.0 * feh, 4200.0, 5200.0))
    f_giant = 0.45 * age_gyr / (age_gyr + 0.8)
    f_mgiant = 0.04 * age_gyr / (age_gyr + 3.0) if feh > -0.7 else 0.0
    f_dwarf = 0.06 * age_gyr / (age_gyr + 0.3)
    comps = [
        (1.0 - f_giant - f_mgiant - f_dwarf, StarParams(t_to, 4.1 if age_gyr > 0.5 else 4.0, feh, alpha_fe, 10.0)),
        (f_giant, StarParams(giant_teff, 2.5, feh, alpha_fe, 5.0)),
        (f_dwarf, StarParams(4300.0, 4.6, feh, alpha_fe, 5.0)),
    ]
    if f_mgiant > 0:
        comps.append((f_mgiant, StarParams(3700.0, 1.2, feh, alpha_fe, 5.0)))
    return comps


def population_fine(ln_wave: np.ndarray, ssps: list[tuple[float, float]], feh: float, alpha_fe: float) -> np.ndarray:
    """Unbroadened f_lambda (~1 at 5500 A) of a sum of SSPs [(light fraction, age [Gyr])]."""
    flux = np.zeros(ln_wave.size)
    for weight, age in ssps:
        for frac, star in ssp_components(age, feh, alpha_fe):
            flux += weight * frac * stellar.stellar_fine(ln_wave, star)
    return flux


def draw_population(rng: np.random.Generator, cls: str, p: dict) -> dict:
    """Star-formation history, metallicity and emission changes of a galaxy of class `cls`
    whose basic parameters `p` (mocks/spectra.draw_object) are already drawn; the young
    fraction of `p` becomes the light share of the young SSPs."""
    yf, sigma = p["young_fraction"], p["sigma_kms"]
    alpha = float(np.clip(0.28 * np.log10(sigma) - 0.42, 0.0, 0.35))
    if cls == "GALAXY":
        ages = [(1 - yf, rng.uniform(5.0, 12.0)), (yf, rng.uniform(0.5, 2.0))]
        feh = rng.uniform(-0.15, 0.3)
    elif cls == "GALAXY_AGN":
        ages = [(1 - yf, rng.uniform(4.0, 11.0)), (yf, rng.uniform(0.3, 1.5))]
        feh = rng.uniform(-0.15, 0.25)
    elif cls == "GALAXY_STARFORMING":
        ages = [(0.6 * yf, rng.uniform(0.005, 0.05)), (0.4 * yf, rng.uniform(0.1, 0.5)),
                (0.35 * (1 - yf), rng.uniform(1.0, 3.0)), (0.65 * (1 - yf), rng.uniform(5.0, 10.0))]
        feh, alpha = rng.uniform(-0.4, 0.1), 0.0
    else:  # starburst: a burst of a few Myr to 100 Myr on an older disc
        ages = [(0.7 * yf, rng.uniform(0.003, 0.03)), (0.3 * yf, rng.uniform(0.05, 0.3)), (1 - yf, rng.uniform(2.0, 10.0))]
        feh, alpha = rng.uniform(-0.8, -0.2), 0.0
    out = {"ssp_weights": [float(w) for w, _ in ages], "ssp_ages_gyr": [float(a) for _, a in ages],
           "feh": float(feh), "alpha_fe": float(alpha)}
    if cls == "GALAXY" and rng.random() < 0.5:  # retired galaxy with LINER-like lines
        out.update(halpha_ew=float(rng.uniform(0.3, 3.0)), log_n2ha=float(rng.uniform(-0.2, 0.3)),
                   log_o3hb=float(rng.uniform(-0.3, 0.3)), gas_sigma_kms=float(rng.uniform(100, 250)), bpt_region="liner")
    if cls == "GALAXY_STARFORMING" and rng.random() < 0.2:  # composite: star formation plus a weak AGN
        x = rng.uniform(-0.45, -0.1)
        lo = max(kauffmann03(x), -0.7) + 0.05
        hi = min(kewley01(x), brinchmann04(x)) - 0.05
        out.update(log_n2ha=float(x), log_o3hb=float(rng.uniform(lo, hi)), bpt_region="composite")
    return out


def brinchmann04(log_n2ha):
    """SDSS's star-forming / AGN subclass line (Brinchmann et al. 2004, MNRAS 351, 1151, as the
    SDSS pipeline applies it, Bolton et al. 2012): composites below it are STARFORMING there."""
    return 0.7 - 1.2 * (log_n2ha + 0.4)


def galaxy_continuum(rest: np.ndarray, p: dict, resolving_power: float) -> np.ndarray:
    """Stellar continuum (~1 at 5500 A, before dust) of a galaxy at rest wavelengths `rest`,
    broadened by its velocity dispersion p["sigma_kms"] and the line-spread function."""
    sigma = float(np.hypot(p["sigma_kms"] / C_KMS, stellar.lsf_sigma_lnl(resolving_power)))
    ln = stellar.fine_grid(float(rest.min()), float(rest.max()), sigma)
    fine = population_fine(ln, list(zip(p["ssp_weights"], p["ssp_ages_gyr"])), p["feh"], p["alpha_fe"])
    return np.interp(np.log(rest), ln, stellar.broaden(fine, ln[1] - ln[0], sigma))
