"""Cosmic dawn's global history: X-ray heating and ionisation, Lyman-alpha background, and their shell kernels.

The mean IGM history from Z_MAX = 35 (21cmFAST's Z_HEAT_MAX) down to the lightcone's lowest
redshift, on a grid uniform in u = ln(1 + z), and the per-shell kernels from which `spin`
builds the fluctuating fields. It follows 21cmFAST's `spin_temperature` (Mesinger,
Furlanetto & Cen 2011, MNRAS 411, 955, sec. 2) in a simplified form:

- Sources: stars form at the rate rho_b f_* f_coll |dln f_PS/dt| (comoving), f_coll the global
  Sheth-Tormen (HMF = 1) or Press-Schechter fraction above M_min(ION_Tvir_MIN), with
  f_* = F_STAR = 0.05 (21cmFAST's F_STAR10 = -1.3, which its constant-efficiency model uses
  for X-ray and Lyman-alpha emission). The logarithmic slope is Press-Schechter's whatever
  HMF is, as in 21cmFAST 4.1.1's SpinTemperatureBox.c, which applies the extended-PS
  dfcoll/dz of each cell rescaled by (global ST f_coll) / (box-mean EPS f_coll); at the rare
  peaks of cosmic dawn this is ~1.4x the Sheth-Tormen slope. That rescaling leaves the cell's
  (1 + delta) out of the box mean, so a shell of sources smoothed on a filter of radius R emits
  `source_density_boost` times the global rate in 21cmFAST's box (~1.4 at the cell scale, ~1.05 at
  10 Mpc); each fine shell here is boosted as the fluctuating shell (`spin`) that holds it, and
  not beyond the box (its filtered field is flat there). It makes J_alpha and the X-ray heating of
  the box a few per cent larger at cosmic dawn (docs/benchmarks.md).
- X-rays: L(E) = A E^-X_RAY_SPEC_INDEX per unit SFR for NU_X_THRESH <= E <= 10 keV
  (21cmFAST's NU_X_MAX), normalised so that its integral from NU_X_THRESH to 2 keV is
  10^L_X erg/s per Msun/yr (21cmFAST v3+ convention). A photon emitted in a spherical shell
  at comoving distance R (retarded redshift z'' with d(z'') = d(z) + R) reaches the centre
  redshifted by (1+z)/(1+z'') and attenuated, tau integrated through the
  mean neutral IGM in between (HI and HeI photo-ionisation cross-sections of Verner et al.
  1996, ApJ 465, 487; He singly ionised with H). The photo-electron (E - E_threshold) heats,
  ionises and excites Ly-alpha as 21cmFAST's tables of Furlanetto & Stoever (2010, MNRAS 404,
  1869) give for its energy and x_e (`electron_weights`; shipped as xray_electron_table.npz,
  21cmFAST's x_int_tables: f_heat, n_Lya and n_ion = n_HI + n_HeI + n_HeII at 14 x_e and 258
  energies, interpolated linearly in both as 21cmFAST does); before, the energy-independent
  Shull & van Steenberg (1985) fits of Furlanetto, Oh & Briggs (2006, Phys. Rep. 433, 181; FOB06).
  The X-ray-excited Ly-alpha photons join J_alpha (21cmFAST's dxlya_dt,
  J = c n_HI Ndot_Lya / (4 pi H nu_alpha)): they couple, they do not heat (21cmFAST heats with
  the stars' continuum and injected photons only).
- Thermal history: dT/dt = -2HT + Compton (T_CMB - T) + 2 eps_X / (3 k_B n (1 + f_He + x_e))
  - T dx_e/dt / (1 + x_e) (the last: energy shared with newly freed electrons, 21cmFAST's dspec),
  written in u as dT/du = (2 + c) T - c T_CMB - q, solved as T = Phi (T_0/Phi_0 + int (c T_CMB + q)/Phi du)
  (Phi = exp int (2 + c) du), which is also the propagator of the heating fluctuations.
  The sources q enter half a 21cmFAST step late (`at_step_end`): 21cmFAST's explicit step heats
  with the rates at its lower redshift, ~10 % more T_K at the heating transition than the
  converged integral, and 21cmFAST as it runs is the reference.
  Starting point at Z_MAX: 21cmFAST's, from its recfast_LCDM.dat (init_first_Ts): x_e = 2.0537e-4,
  T_K = 25.635 K (before: 2e-4 and the adiabatic T_CMB0 (1+z)^2 / 136 = 26.0 K, which left our
  dark-ages gas ~0.4 K warmer). Recombinations: 21cmFAST's case-A alpha_A(T) fit times its
  CLUMPING_FACTOR = 2 (before: case B, no clumping, ~3x fewer), so the residual x_e and the
  Compton heating fall as 21cmFAST's.
- Lyman alpha: Lyman-series photons emitted at z'' reach the Ly-n resonance at z if
  (1+z'')/(1+z) < (1 - (n+1)^-2)/(1 - n^-2), and cascade to Ly-alpha with probability f_rec(n)
  (Pritchard & Furlanetto 2006, n <= 23); J_alpha sums the shells (Pritchard & Furlanetto 2007,
  MNRAS 376, 1680; Mesinger et al. 2011). The spectrum is 21cmFAST's Pop II one
  (`spectral_emissivity`, its stellar_spectra.dat from Barkana & Loeb 2005): a power law
  N0_n nu^alpha_n in each band between Ly-n and Ly-(n+1), band n holding POP2_NORM[n] x
  POP2_ION photons per stellar baryon (POP2_ION = 5000; 21cmFAST counts H and He atoms as one
  baryon each, (1 - 3 Y_He / 4) per nucleon). Two thirds of the photons lie between Ly-alpha
  and Ly-beta, the band that reaches Ly-alpha directly ("continuum") from farthest away; a flat
  spectrum (our earlier N_alpha = 9690 per nucleon) put more weight on the nearby higher bands and
  made the cosmic-dawn 21cm power ~1.5x 21cmFAST's (docs/benchmarks.md).
- Lyman-alpha heating (21cmFAST 4.1.1's USE_LYA_HEATING, on by default; Reis, Fialkov & Barkana
  2021, MNRAS 506, 5479): each Ly-alpha photon that redshifts through the line leaves an energy
  Delta E(T_K, T_S, tau_GP) in the gas, positive for "continuum" photons (emitted between
  Ly-alpha and Ly-beta, n = 2 above) and negative (cooling) for "injected" ones (cascades from
  n >= 3). 21cmFAST's `get_Ts_fast` (SpinTemperatureBox.c) heats by
  dT/dz = -(4 pi nu_alpha J / (c n_b (1 + z))) Delta E 2 / (3 k_B (1 + x_e)) for each part, with
  Delta E from `Energy_Lya_heating` (heating_helper_progs.c), a trilinear interpolation in log10
  of the Reis et al. table `Lyman_alpha_heating_table.dat`, at the previous step's T_K and T_S.
  We ship that table subsampled (lya_heating_table.npz: every 3rd T_K and T_S node from 1 K to
  1000 K, every 2nd tau_GP node from 10^3.4 to 10^7; interpolation differs from the full table by
  <= 1.4 % of its largest |Delta E|, 99 % of points within 7 % of its median |Delta E|), and
  evaluate it at the mean-density T_S of the global history (`spin` couplings); `spin` re-evaluates
  it per cell density and T_K from the stored t_s, tau_gp and continuum share (`History`).
- CMB heating (USE_CMB_HEATING, on by default): 21cmFAST's `get_Ts_fast` form, which it credits to
  Meiksin (2021): eps_CMB = (3/4) (T_CMB / T_21) A_10 f_H (h / lambda_21)^2 / m_p (1 + 2 T_K / T_21)
  erg/s per baryon, dT/dt = 2 eps_CMB / (3 k_B (1 + x_e)). As coded it is the 21cm photon's recoil
  energy times the line's rate, ~1e-9 K per Hubble time at z ~ 17: kept for fidelity, it moves
  nothing (the T_S-dependent heating of Venumadhav et al. 2018, PRD 98, 103513, ~K, is not what
  21cmFAST 4.1.1 computes).

The opacity is 21cmFAST's tauX (heating_helper_progs.c): along the path the HI filling factor
1 - zeta f_coll(z'') / (1 - x_e) (floor 1e-4; the analytic global f_coll at the emission
redshift, the mean x_e at the receiving step), the cross-section per H atom
(1 - x_e) (sigma_HI + f_He sigma_HeI) + x_e f_He sigma_HeII. Before, the filling factor was
1 - min(1, zeta f_coll) and x_e was left out of tau: late, with x_e ~ 0.3-0.5 (L_X = 42,
E_0 = 200 eV), the X-ray-ionised gas stayed too opaque and our x_e grew too slowly.
Simplifications against 21cmFAST: x_e (and with it f_heat, n_ion, n_Lya) is global, not per
cell; the Lyman-alpha heating per photon Delta E is the global history's (its fluctuations follow
those of J_alpha only, not of the cell's T_K, T_S and density); only H-H and e-H collisions couple.
The attenuation is 21cmFAST's: photons arrive only where tau < 1 (MFC11), here the smooth
step 1 / (1 + tau^8) instead of exp(-tau), which would heat ~1.2x less.
Check against 21cmFAST 4.1.1 coeval boxes before the Lyman-alpha / CMB heating and the Pop II
spectrum were added (const-zeta, USE_TS_FLUCT, linear density, 64 Mpc / 32^3, one seed; ours 3
seeds; the current comparison is docs/benchmarks.md), mean dT_b at z = 7/8-22: L_X = 40.5 trough -110 vs
-103 mK at z = 16 (max difference 13 mK at z = 15), L_X = 39.5 -175 vs -171 mK (z 14 vs
15; max 25 mK at z = 12), L_X = 41.5 -45 vs -42 mK at z = 18 (max 6.5 mK); our mean T_K
was 10-25 % below theirs once heating starts, before the source boost and the step above.
Units are cgs inside (cm, s, erg, K) and comoving Mpc for radii.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cosmofm.data_cards.mocks.sim21cm.cosmology import DELTA_C, Cosmology, cosmology, erfc
from cosmofm.data_cards.mocks.sim21cm.params import SimParams

Z_MAX = 35.0  # highest redshift of the model: sources and heating start here (21cmFAST's Z_HEAT_MAX)
K_B = 1.380649e-16  # erg / K
EV_ERG = 1.602176634e-12  # erg / eV
M_P = 1.67262192e-24  # g
M_E = 9.1093837e-28  # g
C_CM = 2.99792458e10  # cm / s
MPC_CM = 3.0856775814913673e24
MSUN_G = 1.98847e33
YR_S = 3.15576e7
SIGMA_T = 6.6524587e-25  # Thomson cross-section, cm^2
A_RAD = 7.5657e-15  # radiation constant, erg / cm^3 / K^4
T_CMB0 = 2.7255  # K
RHO_CRIT_CGS = 1.87834e-29  # critical density / h^2, g / cm^3
TAU_GP_COEF = 1.342881e-7  # Gunn-Peterson depth tau_GP = TAU_GP_COEF n_HI / H (n in cm^-3, H in 1/s), 21cmFAST's taugp
Y_HE = 0.245  # helium mass fraction (21cmFAST)
F_HE = Y_HE / (4 * (1 - Y_HE))  # n_He / n_H
F_STAR = 0.05  # star-formation efficiency, 10**F_STAR10 with 21cmFAST's default -1.3
POP2_ION = 5000.0  # 21cmFAST's POP2_ION: scales its Pop II Lyman-series spectrum (photons per stellar baryon)
# 21cmFAST 4.1.1's stellar_spectra.dat, Pop II columns: photons (/ POP2_ION) and spectral index in the band Ly-n .. Ly-(n+1), n = 2 .. 23
POP2_NORM = (1.49494, 0.393277, 0.160398, 0.0729365, 0.0349985, 0.0174907, 0.0102821, 0.00730747, 0.00544619, 0.00417057,
             0.00326463, 0.00260298, 0.00210843, 0.00173139, 0.00143814, 0.00118812, 0.000986257, 0.000828343, 0.0007029,
             0.0006019, 0.000519604, 0.000451832)
POP2_INDEX = (0.142018, -2.17044, 2.14591, -17.4677, -34.0605, -42.9493, -13.5722, 3.95519, 5.1087, 5.73644, 6.11457, 6.3601,
              6.52889, 6.65021, 0.00386785, -54.8366, -54.8176, -54.8015, -54.7877, -54.7758, -54.7655, -54.7564)
NU_ALPHA = 2.4661e15  # Ly-alpha frequency, Hz
E_BAND_MAX, E_X_MAX = 2000.0, 10000.0  # eV: top of the L_X band and of the emitted spectrum (21cmFAST)
X_E_INIT, T_K_INIT = 2.0537e-4, 25.635  # x_e and T_K (K) at Z_MAX = 35: 21cmFAST's starting point, its recfast_LCDM.dat (docstring)
# Ly-n -> Ly-alpha recycling fractions, n = 2 .. 23 (Pritchard & Furlanetto 2006, table 1)
F_REC = (1.0, 0.0, 0.2609, 0.3078, 0.3259, 0.3353, 0.3410, 0.3448, 0.3476, 0.3496, 0.3512, 0.3524, 0.3535, 0.3543,
         0.3550, 0.3556, 0.3561, 0.3565, 0.3569, 0.3572, 0.3575, 0.3578)
Z_STEP_FACTOR = 1.02  # 21cmFAST's ZPRIME_STEP_FACTOR: its spin-temperature steps, (1 + z) by this factor (`at_step_end`)
DZ_SOURCE = 0.05  # half-step of the finite difference d f_coll / dz of the sources (here and in `spin`)
N_U, N_R, N_E = 121, 120, 100  # grid sizes: ln(1+z) steps, radial shells, photon energies
H_P = 6.62607015e-27  # Planck's constant, erg s
A_10, T_21, LAMBDA_21 = 2.85e-15, 0.0682, 21.106114054160  # 21cm Einstein coefficient (1/s), h nu_21 / k_B (K), wavelength (cm); 21cmFAST's
LYA_TABLE = Path(__file__).with_name("lya_heating_table.npz")  # Reis et al. (2021) Delta E, subsampled from 21cmFAST (docstring)
ELECTRON_TABLE = Path(__file__).with_name("xray_electron_table.npz")  # Furlanetto & Stoever (2010) f_heat, n_Lya, n_ion (docstring)
CLUMPING_FACTOR = 2.0  # 21cmFAST's default: multiplies the case-A recombination rate of the X-ray ionised gas


def verner_sigma(energy_ev, species: str) -> np.ndarray:
    """Photo-ionisation cross-section in cm^2 of HI, HeI or HeII (Verner et al. 1996 analytic fits); 0 below threshold."""
    e_th, e0, s0, ya, p, yw, y0, y1 = {
        "HI": (13.6, 0.4298, 5.475e4, 32.88, 2.963, 0.0, 0.0, 0.0),
        "HeI": (24.59, 13.61, 949.2, 1.469, 3.188, 2.039, 0.4434, 2.136),
        "HeII": (54.42, 1.720, 1.369e4, 32.88, 2.963, 0.0, 0.0, 0.0),
    }[species]
    e = np.asarray(energy_ev, dtype=float)
    x = e / e0 - y0
    y = np.sqrt(x**2 + y1**2)
    f = ((x - 1) ** 2 + yw**2) * y ** (0.5 * p - 5.5) * (1 + np.sqrt(y / ya)) ** (-p)
    return np.where(e >= e_th, s0 * 1e-18 * f, 0.0)


def alpha_a(t_k) -> np.ndarray:
    """Case-A recombination coefficient of hydrogen, cm^3/s: 21cmFAST's `alpha_A` fit (thermochem.c), which its spin
    temperature step uses (times CLUMPING_FACTOR) for the X-ray ionised fraction."""
    lt = np.log(np.asarray(t_k, dtype=float) / 1.1604505e4)
    coef = (-28.6130338, -0.72411256, -2.02604473e-2, -2.38086188e-3, -3.21260521e-4, -1.42150291e-5, 4.98910892e-6,
            5.75561414e-7, -1.85676704e-8, -3.07113524e-9)
    return np.exp(np.polynomial.polynomial.polyval(lt, coef))


@functools.lru_cache(maxsize=1)
def _electron_table() -> tuple[np.ndarray, ...]:
    with np.load(ELECTRON_TABLE, allow_pickle=False) as t:
        return tuple(np.asarray(t[k], dtype=float) for k in ("x_e", "energy_ev", "f_heat", "n_lya", "n_ion"))


def electron_weights(energy_ev) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per absorbed X-ray photon of energy E (eV, (N,)), at each x_e node of 21cmFAST's electron tables ((X,) from
    `_electron_table`): (heat in erg, ionisations, Ly-alpha photons), each (X, N), per neutral H atom's cross-section,
    i.e. to multiply by the photon flux (cm^-2 s^-1 per unit E) and integrate over E.

    21cmFAST's integrand_in_nu_{heat,ion,lya}_integral (heating_helper_progs.c): HI and HeI absorb
    (sigma_HI + (n_He/n_H) sigma_HeI), the photo-electron of energy E - E_threshold deposits
    f_heat(E - E_th, x_e) of it as heat and makes n_ion secondary ionisations (+1 primary) and
    n_Lya Ly-alpha photons, all from the Furlanetto & Stoever (2010, MNRAS 404, 1869) tables
    (linear in energy, clamped at their ends: f_heat = 1, n = 0 below 10 eV). HeII absorption
    (x_e n_He sigma_HeII) is left out (the module docstring's simplification).
    """
    xs, e_tab, fh, nl, ni = _electron_table()
    e = np.asarray(energy_ev, dtype=float)
    heat, ion, lya = (np.zeros((len(xs), len(e))) for _ in range(3))
    for species, e_th, frac in (("HI", 13.6, 1.0), ("HeI", 24.59, F_HE)):
        sigma = frac * verner_sigma(e, species)
        e_el = e - e_th
        inside = e_el >= e_tab[0]
        e_cl = np.minimum(e_el, 0.999 * e_tab[-1])
        for k in range(len(xs)):
            f_k = np.where(inside, np.interp(e_cl, e_tab, fh[k]), 1.0)
            heat[k] += sigma * f_k * np.clip(e_el, 0.0, None) * EV_ERG
            ion[k] += sigma * (1 + np.where(inside, np.interp(e_cl, e_tab, ni[k]), 0.0))
            lya[k] += sigma * np.where(inside, np.interp(e_cl, e_tab, nl[k]), 0.0)
    return heat, ion, lya


@functools.lru_cache(maxsize=1)
def _grid_weights() -> tuple[np.ndarray, ...]:
    """`electron_weights` on the history's energy grid times E dln E: (E, X) each, to contract with the flux per eV."""
    energy = np.geomspace(10.0, E_X_MAX, N_E)
    return tuple((w * energy * math.log(energy[1] / energy[0])).T for w in electron_weights(energy))


def x_e_nodes(x_e) -> tuple[np.ndarray, np.ndarray]:
    """Lower node and weight of x_e on the electron tables' x_e grid, linear in x_e and clamped as 21cmFAST's interp_fheat."""
    xs = _electron_table()[0]
    x = np.clip(np.asarray(x_e, dtype=float), 1.001 * xs[0], 0.999 * xs[-1])
    k = np.clip(np.searchsorted(xs, x, side="right") - 1, 0, len(xs) - 2)
    return k, (x - xs[k]) / (xs[k + 1] - xs[k])


@functools.lru_cache(maxsize=1)
def _lya_table() -> tuple[np.ndarray, ...]:
    with np.load(LYA_TABLE, allow_pickle=False) as t:
        return tuple(np.asarray(t[k], dtype=float) for k in ("log10_tk", "log10_ts", "log10_tau_gp", "e_continuum", "e_injected"))


def _nodes(grid: np.ndarray, x) -> tuple[np.ndarray, np.ndarray]:
    """Lower node index and weight of x on a uniform grid, clamped to its ends (no extrapolation, as 21cmFAST)."""
    x = np.clip(np.asarray(x, dtype=float), grid[0], grid[-1])
    i = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, len(grid) - 2)
    return i, (x - grid[i]) / (grid[i + 1] - grid[i])


def lya_heating_energy(t_k, t_s, tau_gp) -> tuple[np.ndarray, np.ndarray]:
    """(continuum, injected) energy in erg that one Ly-alpha photon leaves in the gas (Reis, Fialkov & Barkana 2021).

    21cmFAST's `Energy_Lya_heating` (flags 2 and 3): trilinear in log10 T_K, log10 T_S and
    log10 tau_GP on the (subsampled) table, clamped at its edges. Continuum photons heat,
    injected ones cool.
    """
    lt_k, lt_s, l_tau, e_c, e_i = _lya_table()
    (i, wi), (j, wj), (k, wk) = (_nodes(g, np.log10(v)) for g, v in ((lt_k, t_k), (lt_s, t_s), (l_tau, tau_gp)))
    out = []
    for table in (e_c, e_i):
        acc = 0.0
        for di, fi in ((0, 1 - wi), (1, wi)):
            for dj, fj in ((0, 1 - wj), (1, wj)):
                for dk, fk in ((0, 1 - wk), (1, wk)):
                    acc = acc + fi * fj * fk * table[i + di, j + dj, k + dk]
        out.append(np.asarray(acc))
    return out[0], out[1]


def cmb_heating_rate(z, t_k) -> np.ndarray:
    """CMB heating of the gas, erg/s per baryon: 21cmFAST 4.1.1's eps_CMB in `get_Ts_fast` (Meiksin 2021), module docstring."""
    t_cmb = T_CMB0 * (1 + np.asarray(z, dtype=float))
    return 0.75 * (t_cmb / T_21) * A_10 / (1 + F_HE) * (H_P / LAMBDA_21) ** 2 / M_P * (1 + 2 * np.asarray(t_k) / T_21)


def lya_heating_coef(z, x_e, n_h0: float) -> np.ndarray:
    """K per unit ln(1+z) per (J_alpha x Delta E): 4 pi nu_alpha / (c n_b) 2 / (3 k_B (1 + x_e)), n_b = n_H + n_He proper (21cmFAST)."""
    n_b = n_h0 * (1 + F_HE) * (1 + np.asarray(z, dtype=float)) ** 3
    return 4 * math.pi * NU_ALPHA / (C_CM * n_b) * 2 / (3 * K_B * (1 + np.asarray(x_e)))


def mean_spin_temperature(z, t_k, x_e, j_alpha, n_h0: float, hub) -> np.ndarray:
    """T_S (K) of gas at the mean density, for the Ly-alpha heating's Delta E (couplings of `spin`)."""
    from cosmofm.data_cards.mocks.sim21cm import spin  # spin builds on this module: imported here, not at the top

    n_h = n_h0 * (1 + np.asarray(z, dtype=float)) ** 3
    t_cmb = T_CMB0 * (1 + np.asarray(z, dtype=float))
    tau_gp = TAU_GP_COEF * n_h * (1 - x_e) / hub
    x_a = spin.wouthuysen_field_coupling(j_alpha, z, t_k, tau_gp)
    x_c = spin.collisional_coupling(t_k, n_h, x_e, t_cmb)
    t_s = spin.spin_temperature(t_k, t_cmb, x_c, x_a)
    return spin.spin_temperature(t_k, t_cmb, x_c, x_a, spin.cmb_coupling(t_s, n_h * (1 - x_e), hub))


@dataclass
class History:
    """The mean IGM and the per-shell kernels on a grid z[0] = Z_MAX > ... > z[-1] (uniform in ln(1+z)).

    Attributes:
        z, u: (G,) redshift and ln(1 + z).
        t_k: (G,) mean kinetic temperature of the neutral IGM, K.
        x_e: (G,) its ionised fraction (X-rays + residual).
        j_alpha: (G,) mean Ly-alpha intensity (stars and X-ray excitation), photons / cm^2 / s / Hz / sr.
        q_hii: (G,) analytic UV-ionised volume fraction min(1, zeta f_coll).
        phi: (G,) propagator exp(int (2 + c) du) of the temperature equation.
        heat_coef: (G,) K per unit u per (erg/s of X-ray heat per neutral H atom).
        shell_radii: (S,) radius (Mpc) of each fluctuating shell's top-hat filter.
        heat_shell, alpha_shell: (G, S) X-ray heat per neutral H (erg/s, the photo-electrons' f_heat share)
            and J_alpha (stars and X-rays) contributed by each fluctuating shell at its box-mean
            emissivity (with `source_density_boost`); shells beyond the
            last act on every cell alike and are only in the means.
        z_source: (G, S) retarded redshift of each shell.
        q_lya, q_cmb: (G,) Lyman-alpha (continuum + injected) and CMB heating of the mean gas, K per unit u.
        lya_heat_shell: (G, S) Lyman-alpha heating (K per unit u) from each fluctuating shell's J_alpha
            at the mean emissivity, with the global Delta E.
        q_lya_cont: (G,) the continuum photons' part of q_lya (the rest, injected photons, cools).
        t_s, tau_gp: (G,) T_S (K) and Gunn-Peterson depth of the mean gas that set its Delta E per photon.
    """

    z: np.ndarray
    u: np.ndarray
    t_k: np.ndarray
    x_e: np.ndarray
    j_alpha: np.ndarray
    q_hii: np.ndarray
    phi: np.ndarray
    heat_coef: np.ndarray
    shell_radii: np.ndarray
    heat_shell: np.ndarray
    alpha_shell: np.ndarray
    z_source: np.ndarray
    q_lya: np.ndarray
    q_cmb: np.ndarray
    lya_heat_shell: np.ndarray
    q_lya_cont: np.ndarray
    t_s: np.ndarray
    tau_gp: np.ndarray

    def at(self, name: str, z) -> np.ndarray:
        """A (G,) attribute interpolated linearly in ln(1+z) to redshifts z."""
        return np.interp(np.log1p(np.asarray(z, dtype=float)), self.u[::-1], getattr(self, name)[::-1])


def source_density_boost(cosmo: Cosmology, log10_tvir: float, z_src, sigma2_filter) -> np.ndarray:
    """<(1 + delta_R) df_coll/dz> / <df_coll/dz> over a box of cells smoothed on a filter of variance sigma2_filter
    (z = 0 units), at source redshifts z_src (broadcast): how much more a shell of sources emits in 21cmFAST's box
    than the global rate, 1 where sigma2_filter = 0.

    21cmFAST's `calculate_sfrd_from_grid` (SpinTemperatureBox.c, const-zeta sources) makes each cell's SFR
    (1 + delta_R) df_coll/dz (extended Press-Schechter) and normalises it by the box mean of f_coll alone
    (without the 1 + delta), so the box-mean emissivity of a shell of filter radius R exceeds the global one
    by this factor: ~1.4 at the cell scale, ~1.05 at 10 Mpc at cosmic dawn (dense regions host more of the
    rare sources). For a Gaussian delta_R,0 of variance s^2 (Stein's lemma) <delta_0 f> = s^2 <f'>, and
    <f> = erfc(B / sqrt(2 V)), <f'> = sqrt(2 / pi) exp(-B^2 / 2V) / sqrt(V), B = delta_c / D, V = sigma^2(M_min),
    with d/dz by differences DZ_SOURCE apart, as in `spin`.
    """
    z = np.asarray(z_src, dtype=float)
    s2 = np.broadcast_to(np.asarray(sigma2_filter, dtype=float), z.shape)
    out = np.ones(z.shape)
    v_pm, f_pm, g_pm = [], [], []
    for sign in (-1, 1):  # f_coll at z - dz is the larger
        zz = z + sign * DZ_SOURCE
        v = cosmo.sigma2_mass(cosmo.min_source_mass(zz, log10_tvir))
        b = DELTA_C / cosmo.growth(zz)
        v_pm.append(v)
        f_pm.append(erfc(b / np.sqrt(2 * v)))
        g_pm.append(math.sqrt(2 / math.pi) * np.exp(-b * b / (2 * v)) / np.sqrt(v))
    df, dg = f_pm[0] - f_pm[1], g_pm[0] - g_pm[1]
    ok = (s2 > 0) & (v_pm[0] > s2) & (v_pm[1] > s2) & (df > 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        boost = 1 + cosmo.growth(z) * s2 * dg / df
    out[ok] = np.clip(boost[ok], 1.0, None)
    return out


def hubble_rate_s(cosmo: Cosmology, z) -> np.ndarray:
    """H(z) in 1/s."""
    return cosmo.hubble_parameter(z) * 1e5 / MPC_CM  # 1/s


def x_ray_norm(params: SimParams) -> float:
    """A in L(E) = A E^-alpha (erg/s/eV per Msun/yr) so that int_{E_0}^{2 keV} L dE = 10^L_X."""
    a, e0 = params.X_RAY_SPEC_INDEX, params.NU_X_THRESH
    band = math.log(E_BAND_MAX / e0) if abs(a - 1) < 1e-6 else (E_BAND_MAX ** (1 - a) - e0 ** (1 - a)) / (1 - a)
    return 10.0**params.L_X / band


def lyman_series_emissivity(stretch: np.ndarray) -> np.ndarray:
    """(..., n) photons / Hz per stellar nucleon emitted at the frequency that redshifts into Ly-n (n = 2 .. 23)
    after a stretch (1+z'')/(1+z); 0 beyond Ly-(n+1) (21cmFAST's `spectral_emissivity`, module docstring)."""
    n = np.arange(2, 2 + len(POP2_NORM))
    nu_n = (1 - n**-2.0) / 0.75  # Ly-n in units of Ly-alpha
    nu_next = (1 - (n + 1.0) ** -2) / 0.75
    a = np.asarray(POP2_INDEX)
    n0 = np.asarray(POP2_NORM) * POP2_ION * (a + 1) / (nu_next ** (a + 1) - nu_n ** (a + 1))  # per unit nu / nu_alpha
    nu = nu_n * np.asarray(stretch)[..., None]
    per_baryon = np.where(nu < nu_next, n0 * nu**a / NU_ALPHA, 0.0)
    return per_baryon * (1 - 0.75 * Y_HE)  # 21cmFAST's baryons (H and He atoms) per nucleon


def history(params: SimParams, z_low: float, shell_edges=(0.0,), shell_radii=()) -> History:
    """The (cached) history down to z_low; fluctuating shell s spans shell_edges[s:s+2] (Mpc, from 0), filter radius shell_radii[s]."""
    if len(shell_edges) != len(shell_radii) + 1 or shell_edges[0] != 0:
        raise ValueError("need shell_edges = (0, e_1, ..., e_S) and S shell_radii")
    key = tuple(round(float(e), 9) for e in shell_edges), tuple(round(float(r), 9) for r in shell_radii)
    return _history(params, round(float(z_low), 6), *key)


def xray_optical_depth(column, q_src, x_e: float, sigma_h, sigma_he2) -> np.ndarray:
    """(R, E) X-ray optical depth from the receiver out to each shell's centre, 21cmFAST's tauX (heating_helper_progs.c).

    column: (R,) H atoms per cm^2 in each shell; q_src: (R,) zeta f_coll at its retarded redshift; x_e: the mean
    X-ray ionised fraction at the receiver; sigma_h, sigma_he2: (R, E) sigma_HI + f_He sigma_HeI and f_He sigma_HeII
    per H atom. The HI filling factor is 1 - zeta f_coll / (1 - x_e), floored at 1e-4 (21cmFAST's post-reionisation
    floor), the cross-section (1 - x_e) sigma_h + x_e sigma_he2.
    """
    q_src = np.asarray(q_src, dtype=float)
    neutral = np.where(q_src > 1e-20, np.maximum(1 - q_src / max(1 - x_e, 1e-6), 1e-4), 1.0)
    dtau = (np.asarray(column) * neutral)[:, None] * ((1 - x_e) * np.asarray(sigma_h) + x_e * np.asarray(sigma_he2))
    return np.cumsum(dtau, axis=0) - 0.5 * dtau


@functools.lru_cache(maxsize=8)
def _history(p: SimParams, z_low: float, shell_edges: tuple[float, ...], shell_radii: tuple[float, ...]) -> History:
    cosmo = cosmology(p)
    h2 = p.hlittle**2
    n_h0 = (1 - Y_HE) * p.OMb * RHO_CRIT_CGS * h2 / M_P  # hydrogen atoms per comoving cm^3
    u = np.linspace(math.log1p(Z_MAX), math.log1p(z_low), N_U)
    z = np.expm1(u)
    du = u[0] - u[1]
    # star formation (comoving): |df_coll/dz| on a fine table
    zt = np.linspace(max(0.0, z_low - 0.5), Z_MAX + 0.5, 600)
    fcoll = cosmo.fcoll_global(zt, p.ION_Tvir_MIN, "ST" if p.HMF == 1 else "PS")
    f_ps = np.maximum(cosmo.fcoll_global(zt, p.ION_Tvir_MIN, "PS"), 1e-300)
    dlnf_dz = np.clip(-np.gradient(np.log(f_ps), zt), 0.0, None)  # the (E)PS slope, as 21cmFAST normalises it
    rate = fcoll * dlnf_dz * (1 + zt) * hubble_rate_s(cosmo, zt)  # "df_coll/dt", 1/s
    rho_b = p.OMb * RHO_CRIT_CGS * h2  # g / comoving cm^3
    sfrd_msun = F_STAR * rho_b / MSUN_G * YR_S * rate  # Msun / yr / cm^3
    sfrd_baryon = F_STAR * rho_b / M_P * rate  # stellar baryons / s / cm^3
    # radial shells (comoving Mpc) and their retarded redshifts
    d = cosmo.comoving_distance(z)
    r_far = float(cosmo.comoving_distance(Z_MAX) - d[-1]) + 1.0
    r_edge = np.concatenate([[0.0], np.geomspace(0.05, r_far, N_R)])
    r_mid, dr = 0.5 * (r_edge[1:] + r_edge[:-1]), np.diff(r_edge)
    zs = cosmo.redshift_at_distance(d[:, None] + r_mid[None, :])  # (G, R)
    live = zs <= Z_MAX
    # the box's denser-than-average source regions (`source_density_boost`): each fine shell smoothed as the
    # fluctuating shell that holds it, none beyond the box
    edges, radii_f = np.asarray(shell_edges), np.asarray(shell_radii, dtype=float)
    holder = np.searchsorted(edges, r_mid, side="right") - 1
    s2_fine = np.where(holder < len(radii_f), cosmo.sigma2_radius(radii_f[np.minimum(holder, len(radii_f) - 1)])
                       if len(radii_f) else 0.0, 0.0)
    boost = source_density_boost(cosmo, p.ION_Tvir_MIN, zs, s2_fine[None, :])
    sfr = np.where(live, np.interp(zs, zt, sfrd_msun), 0.0) * boost
    sfr_b = np.where(live, np.interp(zs, zt, sfrd_baryon), 0.0) * boost
    q_src = p.HII_EFF_FACTOR * np.interp(zs, zt, fcoll)  # zeta f_coll at each shell's retarded redshift, (G, R)
    # X-rays: observed energies E at the centre, emitted at E (1+z'')/(1+z)
    energy = np.geomspace(10.0, E_X_MAX, N_E)
    dln_e = math.log(energy[1] / energy[0])
    stretch = (1 + zs) / (1 + z[:, None])  # (G, R)
    e_src = energy[None, None, :] * stretch[:, :, None]  # (G, R, E)
    lne_tab = np.linspace(math.log(5.0), math.log(1e6), 2000)
    e_tab = np.exp(lne_tab)
    sig_tab = np.log(verner_sigma(e_tab, "HI") + F_HE * verner_sigma(e_tab, "HeI") + 1e-60)
    sigma_src = np.exp(np.interp(np.log(e_src), lne_tab, sig_tab))  # per H atom: HI and HeI
    sigma_he2 = np.exp(np.interp(np.log(e_src), lne_tab, np.log(F_HE * verner_sigma(e_tab, "HeII") + 1e-60)))
    column = n_h0 * (1 + zs) ** 2 * dr * MPC_CM  # H atoms per cm^2 in each shell, (G, R)
    window = np.clip(np.log(e_src / p.NU_X_THRESH) / dln_e + 0.5, 0.0, 1.0) * (e_src <= E_X_MAX)  # soft E_0 edge
    photons = x_ray_norm(p) * e_src ** (-p.X_RAY_SPEC_INDEX - 1) / EV_ERG * window  # photons/s/eV per Msun/yr
    # flux per observed eV: dR (1+z)^3/(1+z'') n(E'') dE''/dE = dR (1+z)^2 n(E'')
    flux = ((1 + z[:, None]) ** 2 * dr * MPC_CM * sfr)[:, :, None] * photons  # before attenuation, (G, R, E)
    # per x_e node of the electron tables: heat (erg/s), ionisations and Ly-alpha photons (/s) per neutral H, (G, R, X),
    # row g filled by `attenuate` at that step's x_e
    weights = _grid_weights()
    heat_x, ion_x, lya_x = (np.empty((N_U, N_R, w.shape[1])) for w in weights)

    def attenuate(g: int, xe: float) -> None:
        """Row g of the X-ray tables at the mean x_e of step g; photons arrive where tau < 1 (MFC11), softened as
        1 / (1 + tau^8) so heating is smooth in the parameters."""
        row = flux[g] / (1 + xray_optical_depth(column[g], q_src[g], xe, sigma_src[g], sigma_he2[g]) ** 8)
        for table, w in zip((heat_x, ion_x, lya_x), weights):
            table[g] = row @ w
    # Lyman series: shell contributions to J_alpha at the mean emissivity
    reached = np.asarray(F_REC)[None, None, :] * lyman_series_emissivity(stretch)  # (G, R, n) photons / Hz per nucleon
    per_recycled = (1 + z[:, None]) ** 2 / (4 * np.pi) * dr * MPC_CM * sfr_b
    alpha_cont = per_recycled * reached[:, :, 0]  # n = 2: continuum photons redshifting straight into Ly-alpha
    alpha = per_recycled * reached.sum(axis=2)
    alpha_inj = alpha - alpha_cont  # n >= 3: injected by cascades
    # the mean IGM, stepping down in u
    hub = hubble_rate_s(cosmo, z)
    t_cmb = T_CMB0 * (1 + z)
    q_hii = np.clip(p.HII_EFF_FACTOR * np.interp(z, zt, fcoll), 0.0, 1.0)
    # X-ray-excited Ly-alpha (21cmFAST's dxlya_dt): J = c n_HI (photons per neutral H per s) / (4 pi H nu_alpha)
    lya_x_coef = C_CM * n_h0 * (1 + z) ** 3 / (4 * np.pi * hubble_rate_s(cosmo, z) * NU_ALPHA)  # times (1 - x_e)
    j_star, j_cont, j_inj = alpha.sum(axis=1), alpha_cont.sum(axis=1), alpha_inj.sum(axis=1)
    x_e, t_k, e_cont, e_inj, j_alpha = np.empty(N_U), np.empty(N_U), np.zeros(N_U), np.zeros(N_U), np.empty(N_U)
    t_s_mean, tau_gp_mean = np.empty(N_U), np.empty(N_U)
    x_e[0], t_k[0] = X_E_INIT, T_K_INIT
    compton = 8 * SIGMA_T * A_RAD * t_cmb**4 / (3 * M_E * C_CM) / hub  # per unit u, times x_e / (1 + f_He + x_e)
    for g in range(N_U - 1):
        xe, tk = x_e[g], t_k[g]
        n_h = n_h0 * (1 + z[g]) ** 3
        attenuate(g, xe)
        k, w = x_e_nodes(xe)
        totals = (table[g].sum(axis=0) for table in (heat_x, ion_x, lya_x))  # (X,) over the shells
        heat_g, ion_g, lya_g = ((1 - w) * t[k] + w * t[k + 1] for t in totals)
        j_alpha[g] = j_star[g] + lya_x_coef[g] * (1 - xe) * lya_g
        # X-ray ionisation, and case-A recombination with 21cmFAST's clumping factor (its get_Ts_fast)
        ion = (1 - xe) * ion_g - CLUMPING_FACTOR * alpha_a(tk) * xe**2 * n_h
        x_e[g + 1] = min(max(xe + du * ion / hub[g], 0.0), 1.0)
        c = compton[g] * xe / (1 + F_HE + xe)
        q = 2 * (1 - xe) * heat_g / (3 * K_B * (1 + F_HE + xe) * hub[g])
        # Ly-alpha heating per photon at this step's T_K and mean-density T_S (21cmFAST: the previous step's)
        t_s = mean_spin_temperature(z[g], tk, xe, j_alpha[g], n_h0, hub[g])
        tau_gp = TAU_GP_COEF * n_h * (1 - xe) / hub[g]
        e_cont[g], e_inj[g] = lya_heating_energy(tk, t_s, tau_gp)
        t_s_mean[g], tau_gp_mean[g] = t_s, tau_gp
        q += lya_heating_coef(z[g], xe, n_h0) * (j_cont[g] * e_cont[g] + j_inj[g] * e_inj[g])
        q += 2 * cmb_heating_rate(z[g], tk) / (3 * K_B * (1 + xe) * hub[g])
        # the energy shared with the newly freed electrons (21cmFAST's dspec_dzp)
        q -= (x_e[g + 1] - xe) / du * tk / (1 + xe)
        t_k[g + 1] = tk - du * ((2 + c) * tk - c * t_cmb[g] - q)
    attenuate(N_U - 1, x_e[-1])
    e_cont[-1], e_inj[-1] = e_cont[-2], e_inj[-2]
    t_s_mean[-1], tau_gp_mean[-1] = t_s_mean[-2], tau_gp_mean[-2]
    kk, ww = x_e_nodes(x_e)
    rows = np.arange(N_U)
    heat, lya_xr = ((1 - ww)[:, None] * t[rows, :, kk] + ww[:, None] * t[rows, :, kk + 1] for t in (heat_x, lya_x))  # (G, R)
    alpha = alpha + (lya_x_coef * (1 - x_e))[:, None] * lya_xr  # stars' and X-rays' J_alpha per shell
    j_alpha = alpha.sum(axis=1)
    q_spec = np.concatenate([-(x_e[1:] - x_e[:-1]) / du * t_k[:-1] / (1 + x_e[:-1]), [0.0]])  # with the Euler T_K
    c = compton * x_e / (1 + F_HE + x_e)
    ln_phi = -np.concatenate([[0.0], np.cumsum(0.5 * du * ((2 + c[1:]) + (2 + c[:-1])))])
    phi = np.exp(ln_phi)
    heat_coef = 2 * (1 - x_e) / (3 * K_B * (1 + F_HE + x_e) * hub)
    lya_coef = lya_heating_coef(z, x_e, n_h0)
    q_lya_cont = lya_coef * j_cont * e_cont
    q_lya = q_lya_cont + lya_coef * j_inj * e_inj
    q_cmb = 2 * cmb_heating_rate(z, t_k) / (3 * K_B * (1 + x_e) * hub)  # with the Euler T_K; ~1e-9 K, docstring
    source = at_step_end(c * t_cmb + heat_coef * heat.sum(axis=1) + q_lya + q_cmb + q_spec, du)
    t_k = phi * (t_k[0] + cumulative((source / phi)[:, None], du)[:, 0])
    # fluctuating shells: fine shells grouped between the filter edges
    edges = np.asarray(shell_edges)
    which = np.searchsorted(edges, r_mid, side="right") - 1  # -1 never (edges[0] = 0); >= S: beyond
    n_s = len(edges) - 1
    heat_s = np.stack([heat[:, which == s].sum(axis=1) for s in range(n_s)], axis=1) if n_s else np.zeros((N_U, 0))
    alpha_s = np.stack([alpha[:, which == s].sum(axis=1) for s in range(n_s)], axis=1) if n_s else np.zeros((N_U, 0))
    lya_mix = alpha_cont * e_cont[:, None] + alpha_inj * e_inj[:, None]  # (G, R) J_alpha x Delta E
    lya_s = np.stack([lya_mix[:, which == s].sum(axis=1) for s in range(n_s)], axis=1) if n_s else np.zeros((N_U, 0))
    radii = np.asarray(shell_radii, dtype=float)
    z_src = cosmo.redshift_at_distance(d[:, None] + radii[None, :])
    return History(z, u, t_k, x_e, j_alpha, q_hii, phi, heat_coef, radii, heat_s, alpha_s, z_src, q_lya, q_cmb,
                   lya_coef[:, None] * lya_s, q_lya_cont, t_s_mean, tau_gp_mean)


def at_step_end(rate: np.ndarray, du: float) -> np.ndarray:
    """A heating rate (G, ...) on the history's grid (rows du apart in ln(1+z), decreasing z) moved half a 21cmFAST
    step to lower redshift, ln(Z_STEP_FACTOR) / 2, linear between rows and held at the last.

    21cmFAST 4.1.1 advances T_K by an explicit step (get_Ts_fast: Tk += (heating rates at the step's LOWER
    redshift) x dz, steps (1 + z) x 1.02), which to first order is the exact integral of the rate
    moved half a step later. At the heating transition the rates grow ~e-fold per dz ~ 0.6, so its T_K
    runs ~10 % above the converged one (measured: L_X = 40.9, E_0 = 530 eV, 64 Mpc / 32^3, mean T_K
    31.2 K with steps of 1.02 vs 29.7 K with 1.01 at z = 15, 1364 vs 1296 K at z = 10); the reference is
    21cmFAST as it runs, so our heating follows its step (docs/benchmarks.md).
    """
    shift = 0.5 * math.log(Z_STEP_FACTOR) / du
    pos = np.minimum(np.arange(len(rate)) + shift, len(rate) - 1.0)
    i = np.minimum(pos.astype(int), len(rate) - 2)
    w = (pos - i).reshape((-1,) + (1,) * (rate.ndim - 1))
    return (1 - w) * rate[i] + w * rate[i + 1]


def cumulative(rate: np.ndarray, du: float) -> np.ndarray:
    """Trapezoid integral along axis 0 (from the first row), rows du apart: (G, ...) -> (G, ...)."""
    steps = 0.5 * du * (rate[1:] + rate[:-1])
    return np.concatenate([np.zeros_like(rate[:1]), np.cumsum(steps, axis=0)])
