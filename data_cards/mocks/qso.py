"""Survey-grade QSO spectra (`mock_realism: survey` cards): the basic QSO of mocks/spectra.py
plus what real quasar spectra carry.

- Emission: the basic power law and broad / narrow lines (`spectra.qso_lines`; not
  `rest_model`, which multiplies in its own statistical forest), plus
  - Fe II: the optical blends as Gaussians at the multiplet wavelengths of Kovacevic,
    Popovic & Dimitrijevic 2010 (ApJS 189, 15: multiplets 27, 28, 37, 38, 42, 48, 49, 55),
    normalised by R_FeII = EW(Fe II 4434-4684) / EW(Hbeta) (Boroson & Green 1992, ApJS 80,
    109: 0.1-1.5; stronger in narrow-line objects, their eigenvector 1); the UV (2200-3090 A)
    pseudo-continuum as a smooth profile -- broad bumps at the main multiplet complexes of
    the Vestergaard & Wilkes 2001 (ApJS 134, 1) template (UV 2+3 near 2380 A, UV 1 near
    2610 A, UV 62/63 near 2750 A, UV 60/78 near 2950 A), not a line-by-line template -- with
    EW(Fe II UV) / EW(Mg II) of 1.5-5 (Dietrich et al. 2003, ApJ 596, 817). Both are
    broadened to the broad-line FWHM.
  - the Balmer continuum of Grandi 1982 (ApJ 255, 25): B_lambda(T_e = 15000 K)
    (1 - exp(-tau_BE (lambda / lambda_BE)^3)) below the edge at 3646 A, tau_BE ~ 1, F(edge)
    0.1-0.5 of the power law (Dietrich et al. 2003 fix 0.3), its edge smoothed by the broad-
    line width; and the high Balmer lines n = 6-50 (Case B ratios, Osterbrock & Ferland
    2006, ~n^-3 beyond H10) that merge into it: with the UV Fe II the "small blue bump".
- Broad absorption lines in 13 % of QSOs (Gibson et al. 2009, ApJ 692, 758; Hewett & Foltz
  2003, AJ 125, 1784): flat-bottomed troughs of depth 0.3-0.9 and width >= 2000 km/s at
  outflow velocities 3000-25000 km/s blueward of C IV, Si IV and N V; 12 % of them LoBALs
  (~1.5 % of QSOs) with Al III and Mg II troughs too.
- Intergalactic H I towards the QSO (absorbers at 1.5 < z_abs < z_QSO; lower ones fall blue
  of any optical grid), each a Voigt profile (Tepper-Garcia 2006, MNRAS 369, 2025) of the
  Lyman series in the absorber's frame plus its Lyman-continuum edge (sigma_912 (nu /
  nu_912)^-3):
  - the Lyman-alpha forest: f(N) ~ N^-1.5 over 10^12-10^17 cm^-2, b ~ U(20, 40) km/s,
    dN/dz ~ (1 + z)^2.92, normalised through the mean curve of growth so that the mean
    transmission is exp(-tau_eff), tau_eff = 0.0018 (1 + z)^3.92 (Faucher-Giguere et al.
    2008, ApJ 681, 831; with z-independent f(N) and b, tau_eff ~ (1 + z)^(gamma + 1) fixes
    gamma); Lyman alpha to epsilon;
  - Lyman-limit systems (10^17.2-10^20.3): dN/dz = 2.7 ((1 + z) / 4.7)^1.83 - l_DLA (Ribaudo
    et al. 2011's slope, Prochaska, O'Meara & Worseck 2010's 1.9 for tau >= 2 at z = 3.7,
    x 10^0.15 for tau >= 1 under N^-1.5); Lyman series to n = 31, so flux -> 0 below their
    912 A;
  - damped systems (N >= 2e20): l(X) = 0.065 per absorption distance, dN/dz = 0.2-0.25 at
    z = 2-3.5, f(N) ~ N^-2 steepening to N^-3.5 above 10^21.5 (the double power law of
    Prochaska, Herbert-Fort & Wolfe 2005, ApJ 635, 123).
  The forest's own absorbers are regenerated from `forest_seed`; LLS and DLAs (b = 30 km/s)
  are listed in the parameters and lower the forest's mean flux by a further ~2 %
  (tau_eff +5-8 %), as in real spectra. Absorbers above 10^16 get the Lyman series to n = 31.
  No proximity effect: the forest runs up to z_QSO.
The emission and BAL troughs are smooth on the line-spread function's scale, so they take
the LSF analytically (Gaussians in quadrature, as spectra.py); the H I transmission is
built on a fine ln(lambda) grid (6 km/s) and convolved with the LSF (stellar.broaden).
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.special import erf, erfc

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks import stellar
from cosmofm.data_cards.mocks.spectra import BROAD, BROAD_EW, C_KMS, ObjectParams, _gauss, qso_lines

BAL_FRACTION, LOBAL_SHARE = 0.13, 0.12  # of all QSOs; of BAL QSOs
BAL_IONS = {"NV": (1240.1, 0.8), "SiIV": (1396.8, 0.6), "CIV": (1549.1, 1.0)}  # centre [A], depth relative to C IV
LOBAL_IONS = {"AlIII": (1857.4, 0.6), "MgII": (2799.1, 0.7)}
Z_ABS_MIN = 1.5  # no absorber below: its Lyman alpha (3040 A) and edge fall blue of any optical grid
FOREST_LOG_N, FOREST_B = (12.0, 17.0), (20.0, 40.0)  # log10 cm^-2, km/s
LLS_LOG_N, DLA_LOG_N = (17.2, float(np.log10(2e20))), (float(np.log10(2e20)), 22.3)  # log10 cm^-2
FG08 = (0.0018, 3.92)  # tau_eff = A (1 + z)^slope, Faucher-Giguere et al. 2008
FINE_DLNL = 2e-5  # ln(lambda) step of the H I grid: 3 samples per b = 20 km/s
TAU_FLOOR = 1e-3  # H I profiles are evaluated where tau > this
SIGMA_912 = 6.30e-18  # cm^2, H I photoionisation cross-section at the Lyman edge
LYMAN_LIMIT = 911.7633  # A, vacuum

# Lyman series 1 -> n, n = 2..31: wavelength [A], oscillator strength, damping constant [s^-1]
_N = np.arange(2, 32)
LYMAN_WAVE = LYMAN_LIMIT / (1 - 1.0 / _N**2)
LYMAN_F = np.concatenate([[0.4164, 0.07912, 0.02900, 0.01394, 0.007799, 0.004814, 0.003183, 0.002216, 0.001605], 1.6 / _N[9:] ** 3])
LYMAN_GAMMA = np.concatenate([[6.265e8, 1.897e8, 8.127e7, 4.204e7], 2.450e7 * (6.0 / _N[4:]) ** 3])
FOREST_SERIES = 5  # Lyman alpha-epsilon for the forest; the whole list for LLS and DLAs

# Optical Fe II multiplets (air wavelengths [A] of Kovacevic et al. 2010) and relative weights
_FE_OPTICAL = {
    (27, 0.5): (4233.17, 4351.76, 4385.38, 4416.83), (28, 0.5): (4178.86, 4296.57, 4303.17),
    (37, 1.0): (4472.92, 4489.18, 4491.40, 4515.34, 4520.22, 4555.89, 4582.83, 4629.34),
    (38, 1.0): (4508.28, 4522.63, 4541.52, 4549.47, 4576.33, 4583.83, 4620.51),
    (42, 1.5): (4923.92, 5018.44, 5169.03), (48, 0.8): (5264.81, 5316.78, 5337.73, 5362.87),
    (49, 1.0): (5197.58, 5234.63, 5276.00, 5316.62, 5325.55, 5425.26), (55, 0.6): (5534.85,),
}
FE_OPT_WAVE = np.array([lam * 1.00028 for lams in _FE_OPTICAL.values() for lam in lams])  # to vacuum
FE_OPT_WEIGHT = np.array([w for (_, w), lams in _FE_OPTICAL.items() for _ in lams])
FE_OPT_WINDOW = (4434.0, 4684.0)
# UV pseudo-continuum: (centre [A], intrinsic sigma [A], weight) of smooth bumps shaped like VW01
FE_UV = np.array([(2255, 30, 0.3), (2330, 35, 0.7), (2395, 35, 0.9), (2480, 40, 0.5), (2545, 30, 0.5), (2615, 30, 1.0),
                  (2750, 40, 0.9), (2860, 40, 0.4), (2955, 45, 0.7), (3040, 30, 0.3)], dtype=float)
FE_UV_WINDOW = (2200.0, 3090.0)
# High Balmer lines n = 6..50 (vacuum), intensity / Hbeta: Case B to H10, then ~n^-3
BALMER_EDGE = 3647.05
_BN = np.arange(6, 51)
BALMER_WAVE = BALMER_EDGE / (1 - 4.0 / _BN**2)
BALMER_RATIO = np.concatenate([[0.259, 0.159, 0.105, 0.0731, 0.0530], 0.0530 * (10.0 / _BN[5:]) ** 3])


SURVEY_KEYS = ("feii_strength", "feii_uv_ratio", "balmer_continuum", "balmer_tau", "bal", "lobal", "bal_v_min_kms", "bal_v_max_kms",
               "bal_depth", "forest_seed", "forest_tau_eff", "n_dla", "dla_z", "dla_log_nhi", "lls_z", "lls_log_nhi")


def draw_qso_extras(rng: np.random.Generator, p: dict, z: float) -> dict:
    """Survey-only parameters of a QSO at redshift z whose basic ones `p` are drawn."""
    narrow = p["fwhm_kms"] < 3000  # the narrow-line class: population A of Sulentic et al. 2000, the strong Fe II emitters
    out = {"feii_strength": float(rng.uniform(0.4, 1.5) if narrow else rng.uniform(0.1, 1.0)),
           "feii_uv_ratio": float(rng.uniform(1.5, 5.0)), "balmer_continuum": float(rng.uniform(0.1, 0.5)),
           "balmer_tau": float(rng.uniform(0.5, 2.0))}
    bal = rng.random() < BAL_FRACTION
    width = rng.uniform(2000.0, 12000.0)
    centre = rng.uniform(3000.0 + width / 2, 25000.0 - width / 2)
    out.update(bal=float(bal), lobal=float(bal and rng.random() < LOBAL_SHARE), bal_v_min_kms=float(centre - width / 2) if bal else 0.0,
               bal_v_max_kms=float(centre + width / 2) if bal else 0.0, bal_depth=float(rng.uniform(0.3, 0.9)) if bal else 0.0)
    tau_eff = FG08[0] * (1 + _forest_z_ref(z)) ** FG08[1]
    out.update(forest_seed=float(rng.integers(2**31)), forest_tau_eff=float(tau_eff))
    dla_z = _poisson_redshifts(rng, _dla_rate, z)
    dla_n = np.interp(rng.random(dla_z.size), *_dla_log_n_cdf()[::-1])
    lls_z = _poisson_redshifts(rng, lambda zz: np.clip(2.7 * ((1 + zz) / 4.7) ** 1.83 - _dla_rate(zz), 0, None), z)
    lls_n = _power_law_log_n(rng.random(lls_z.size), *LLS_LOG_N)
    out.update(n_dla=float(dla_z.size), dla_z=[float(v) for v in dla_z], dla_log_nhi=[float(v) for v in dla_n],
               lls_z=[float(v) for v in lls_z], lls_log_nhi=[float(v) for v in lls_n])
    return out


def _forest_z_ref(z_qso):
    """Redshift of the middle of the QSO's forest (1120 A rest, between Ly beta and Ly alpha),
    where `forest_tau_eff` is set."""
    return (1 + z_qso) * 1120.0 / BROAD["Lyalpha"] - 1


def _dla_rate(z):
    """dN/dz of DLAs: l(X) = 0.065 times dX/dz = (1 + z)^2 / E(z) (flat, Omega_m = 0.31)."""
    return 0.065 * (1 + z) ** 2 / np.sqrt(0.31 * (1 + z) ** 3 + 0.69)


@functools.lru_cache(maxsize=1)
def _dla_log_n_cdf() -> tuple[np.ndarray, np.ndarray]:
    log_n = np.linspace(*DLA_LOG_N, 401)
    n = 10**log_n
    f = np.where(log_n < 21.5, n**-2.0, 10 ** (21.5 * 1.5) * n**-3.5)  # continuous at 10^21.5
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (f[1:] * n[1:] + f[:-1] * n[:-1]) * np.diff(log_n))])
    return log_n, cdf / cdf[-1]


def _power_law_log_n(u, lo, hi):
    """log10 N of uniform deviates u under f(N) ~ N^-1.5 on [10^lo, 10^hi] (inverse CDF)."""
    a, b = 10 ** (-0.5 * lo), 10 ** (-0.5 * hi)
    return -2.0 * np.log10(a - u * (a - b))


def _poisson_redshifts(rng, rate, z_max):
    """Redshifts of a Poisson process of density rate(z) [per unit z] on [Z_ABS_MIN, z_max]."""
    if z_max <= Z_ABS_MIN:
        return np.zeros(0)
    zz = np.linspace(Z_ABS_MIN, z_max, 64)
    r = rate(zz)
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (r[1:] + r[:-1]) * np.diff(zz))])
    return np.sort(np.interp(rng.random(rng.poisson(cum[-1])) * cum[-1], cum, zz))


# -------------------------------------------------------------------- emission


def emission(p: dict, rest: np.ndarray, lsf_rest: np.ndarray) -> tuple[np.ndarray, dict]:
    """(f_lambda, line fluxes) of the QSO's continuum and emission at rest wavelengths, LSF
    sigma lsf_rest [A] added in quadrature; the units of spectra.rest_model."""
    alpha, v_sig = p["alpha_lambda"], p["fwhm_kms"] / C_KMS / 2.3548

    def power_law(lam):
        return (lam / 3000.0) ** alpha

    def sigma(centres, v):
        return np.sqrt((centres * v) ** 2 + np.interp(centres, rest, lsf_rest) ** 2)

    flux, lines = qso_lines(p, rest, lsf_rest)  # the basic QSO's continuum, broad and narrow lines
    cont = power_law(rest)
    ew_hb = BROAD_EW["Hbeta"] * p["ew_scale"]
    # Fe II, in units of the local continuum: EW over each window is exact (erf of every Gaussian)
    for name, centres, intrinsic, weights, window, ew_target in (
        ("FeII_4434_4684", FE_OPT_WAVE, 0.0, FE_OPT_WEIGHT, FE_OPT_WINDOW, p["feii_strength"] * ew_hb),
        ("FeII_UV", FE_UV[:, 0], FE_UV[:, 1], FE_UV[:, 2], FE_UV_WINDOW, p["feii_uv_ratio"] * BROAD_EW["MgII"] * p["ew_scale"]),
    ):
        sig = np.sqrt(intrinsic**2 + sigma(centres, v_sig) ** 2)
        inside = 0.5 * (erf((window[1] - centres) / (np.sqrt(2) * sig)) - erf((window[0] - centres) / (np.sqrt(2) * sig)))
        amps = weights * ew_target / float(weights @ inside)  # EW of each Gaussian
        flux += cont * _gauss(rest, centres, sig, amps / (np.sqrt(2 * np.pi) * sig))
        lines[name] = float(ew_target * power_law(np.mean(window)))
    # Balmer continuum (Grandi 1982) and the high Balmer lines that merge into it at the edge
    t_e, tau_be = 15000.0, p["balmer_tau"]
    shape = stellar.planck(rest, t_e) * -np.expm1(-tau_be * (rest / BALMER_EDGE) ** 3)
    shape /= stellar.planck(BALMER_EDGE, t_e) * -np.expm1(-tau_be)
    edge_sig = float(sigma(np.array([BALMER_EDGE]), v_sig)[0])
    flux += p["balmer_continuum"] * power_law(BALMER_EDGE) * shape * 0.5 * erfc((rest - BALMER_EDGE) / (np.sqrt(2) * edge_sig))
    sig = sigma(BALMER_WAVE, v_sig)
    fluxes = BALMER_RATIO * ew_hb * power_law(BROAD["Hbeta"])
    flux += _gauss(rest, BALMER_WAVE, sig, fluxes / (np.sqrt(2 * np.pi) * sig))
    lines["Balmer_high"] = float(fluxes.sum())
    return flux, lines


def bal_transmission(p: dict, rest: np.ndarray) -> np.ndarray:
    """Transmission of the BAL troughs (1 where none) at rest wavelengths [A]."""
    trans = np.ones(rest.size)
    if not p.get("bal"):
        return trans
    v_lo, v_hi, depth = p["bal_v_min_kms"], p["bal_v_max_kms"], p["bal_depth"]
    soft = 250.0  # km/s: edges 4x the LSF sigma at R = 2000, which therefore changes nothing
    peak = 1.0 / (1 + np.exp(-(v_hi - v_lo) / (2 * soft))) ** 2
    ions = {**BAL_IONS, **(LOBAL_IONS if p.get("lobal") else {})}
    for lam0, rel in ions.values():
        ratio2 = (lam0 / rest) ** 2
        v = C_KMS * (ratio2 - 1) / (ratio2 + 1)  # relativistic outflow velocity seen at `rest`
        with np.errstate(over="ignore"):
            trough = 1.0 / ((1 + np.exp((v_lo - v) / soft)) * (1 + np.exp((v - v_hi) / soft))) / peak
        trans *= 1 - min(rel * depth, 0.95) * trough
    return trans


def qso_model(obj: ObjectParams, wave: np.ndarray, resolving_power: float) -> np.ndarray:
    """Noiseless observed-frame f_lambda of a QSO on `wave` (units of spectra.rest_model);
    fills obj.lines."""
    missing = sorted(set(SURVEY_KEYS) - set(obj.params))
    if missing:
        raise InputError(f"{obj.cls} params", f"lack the survey QSO parameters {missing}",
                         "add qso.draw_qso_extras(rng, params, z) to them (survey.draw_survey_extras does)")
    rest = wave / (1 + obj.z)
    flux, obj.lines = emission(obj.params, rest, rest / resolving_power / 2.3548)
    return flux * bal_transmission(obj.params, rest) * hi_transmission(obj.params, obj.z, wave, resolving_power)


# -------------------------------------------------------------------- intergalactic H I


def voigt_h(a, x):
    """Voigt-Hjerting function H(a, x) of Tepper-Garcia 2006 (accurate for a << 1)."""
    x2 = x * x
    h0 = np.exp(-x2)
    with np.errstate(divide="ignore", invalid="ignore"):
        wing = a / np.sqrt(np.pi) / x2 * (h0 * h0 * (4 * x2 * x2 + 7 * x2 + 4 + 1.5 / x2) - 1.5 / x2 - 1)
    return np.where(x2 > 1e-4, h0 - wing, h0)  # the correction is O(a) -> 0 at the core


def _tau_centre(log_n, b_kms, f, lam, gamma):
    """(tau at line centre, Voigt a) of column 10^log_n [cm^-2], Doppler b [km/s]."""
    return 1.497e-15 * 10**log_n * f * lam / b_kms, gamma * lam * 1e-13 / (4 * np.pi * b_kms)


@functools.lru_cache(maxsize=1)
def mean_forest_ew() -> float:
    """Mean rest-frame Lyman-alpha EW [A] of a forest absorber (f(N) ~ N^-1.5, b uniform):
    tau_eff = dN/dz <W> (1 + z) / lambda_alpha for Poisson-placed lines."""
    log_n = np.linspace(*FOREST_LOG_N, 201)
    x = np.sinh(np.linspace(-7, 7, 1401))[:, None, None]  # dense at the core, out to |x| = 550
    b = np.linspace(*FOREST_B, 9)[None, :, None]
    tau0, a = _tau_centre(log_n[None, None, :], b, LYMAN_F[0], LYMAN_WAVE[0], LYMAN_GAMMA[0])
    ew = np.trapezoid(-np.expm1(-tau0 * voigt_h(a, x)), x.ravel(), axis=0) * b[0] / C_KMS * LYMAN_WAVE[0]  # (b, N)
    weight = 10 ** (-0.5 * log_n)  # dN/dlog N ~ N^-0.5
    return float(np.trapezoid(ew.mean(axis=0) * weight, log_n) / np.trapezoid(weight, log_n))


def sightline(p: dict, z_qso: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z_abs, log10 N_HI, b [km/s]) of every H I absorber towards the QSO: the forest,
    regenerated from p["forest_seed"], then the listed LLS and DLAs."""
    rng = np.random.default_rng(int(p["forest_seed"]))
    slope = FG08[1]
    amp = p["forest_tau_eff"] / (1 + _forest_z_ref(z_qso)) ** slope * LYMAN_WAVE[0] / mean_forest_ew()  # dN/dz = amp (1 + z)^(slope - 1)
    lo, hi = (1 + Z_ABS_MIN) ** slope, (1 + max(z_qso, Z_ABS_MIN)) ** slope
    n = rng.poisson(amp / slope * (hi - lo))
    z = (lo + rng.random(n) * (hi - lo)) ** (1 / slope) - 1
    log_n = _power_law_log_n(rng.random(n), *FOREST_LOG_N)
    b = rng.uniform(*FOREST_B, n)
    systems = np.array(p["lls_z"] + p["dla_z"], dtype=float)
    sys_n = np.array(p["lls_log_nhi"] + p["dla_log_nhi"], dtype=float)
    sys_b = np.full(systems.size, 30.0)
    return np.concatenate([z, systems]), np.concatenate([log_n, sys_n]), np.concatenate([b, sys_b])


def hi_transmission(p: dict, z_qso: float, wave: np.ndarray, resolving_power: float) -> np.ndarray:
    """exp(-tau) of the intergalactic H I on observed `wave` [A], through the LSF."""
    z, log_n, b = sightline(p, z_qso)
    series = np.where(log_n < 16.0, FOREST_SERIES, LYMAN_WAVE.size)
    ab = np.repeat(np.arange(z.size), series)  # one row per (absorber, transition)
    tr = np.arange(ab.size) - np.repeat(np.cumsum(series) - series, series)
    tau0, a = _tau_centre(log_n[ab], b[ab], LYMAN_F[tr], LYMAN_WAVE[tr], LYMAN_GAMMA[tr])
    half_x = np.sqrt(np.maximum(np.log(np.maximum(tau0 / TAU_FLOOR, 1.0)), tau0 * a / (np.sqrt(np.pi) * TAU_FLOOR))) + 0.5
    centre = np.log(LYMAN_WAVE[tr] * (1 + z[ab]))
    half = half_x * b[ab] / C_KMS  # in ln(lambda)
    ln_wave = np.log(wave)
    keep = (centre + half > ln_wave[0]) & (centre - half < ln_wave[-1])
    edges = np.log(LYMAN_LIMIT * (1 + z))
    top = max(float(np.max(centre[keep] + half[keep], initial=-np.inf)), float(np.max(edges, initial=-np.inf)))
    if top < ln_wave[0]:
        return np.ones(wave.size)
    sigma = stellar.lsf_sigma_lnl(resolving_power)
    grid = np.arange(ln_wave[0] - 8 * sigma, min(top, ln_wave[-1]) + 8 * sigma, FINE_DLNL)
    damped = tau0 * a / np.sqrt(np.pi) > TAU_FLOOR  # lines whose Lorentzian wings reach above the floor
    tau = np.zeros(grid.size)
    for sel, voigt in ((keep & damped, True), (keep & ~damped, False)):
        tau += _line_tau(grid, centre[sel], b[ab][sel], tau0[sel], a[sel], np.ceil(half[sel] / FINE_DLNL).astype(int), voigt)
    # Lyman continuum: tau(lambda) = sigma_912 (lambda / lambda_edge)^3 N, summed over the edges redward of lambda
    at = np.minimum(np.searchsorted(grid, edges), grid.size)
    per_edge = np.bincount(at, weights=10**log_n * np.exp(-3 * edges), minlength=grid.size + 1)
    tau += SIGMA_912 * np.exp(3 * grid) * np.cumsum(per_edge[::-1])[::-1][1:]  # edges above pixel i: at > i
    smooth = stellar.broaden(np.exp(-tau), FINE_DLNL, sigma)
    return np.interp(ln_wave, grid, np.clip(smooth, 0.0, 1.0), right=1.0)  # clip: FFT ringing of ~1e-15


def _line_tau(grid, ln_centre, b, tau0, a, half_pix, voigt: bool) -> np.ndarray:
    """Sum of Voigt (or, for lines with negligible wings, Doppler) optical depths on a uniform
    ln(lambda) grid, line k on its own window of +-half_pix[k] pixels (ragged: low-N lines
    need a few pixels, DLAs all)."""
    start = np.searchsorted(grid, ln_centre) - half_pix
    lo = np.clip(start, 0, grid.size)
    hi = np.clip(start + 2 * half_pix + 1, 0, grid.size)
    counts = np.maximum(hi - lo, 0)
    line = np.repeat(np.arange(counts.size), counts)
    pix = np.arange(line.size) - np.repeat(np.cumsum(counts) - counts, counts) + lo[line]
    x = (grid[pix] - ln_centre[line]) * C_KMS / b[line]
    profile = voigt_h(a[line], x) if voigt else np.exp(-x * x)
    return np.bincount(pix, weights=tau0[line] * profile, minlength=grid.size)
