"""Spin temperature of the 21cm line per cell, and the line-of-sight velocity gradient of redshift-space distortions.

T_S follows from the three couplings of the hyperfine levels (Field 1958; Furlanetto, Oh &
Briggs 2006, Phys. Rep. 433, 181, FOB06, sec. 2), as 21cmFAST 4.1.1's `get_Ts_fast` computes it
(`spin_temperature`): the Hirata (2006, MNRAS 367, 259) fits for the Wouthuysen-Field coupling and the
colour temperature T_c (spin exchange pulls T_c from T_K towards T_S), and the CMB coupling
x_cmb = (1 - e^-tau_21) / tau_21:

    1 / T_S = (x_cmb / T_CMB + x_c / T_K + x~_alpha / T_c) / (x_cmb + x_c + x~_alpha)

- x_c, collisional coupling: (T_* / (A_10 T_CMB)) n_H (1 + delta) [(1 - x_e) k_HH(T_K) + x_e k_eH(T_K)],
  the rate coefficients from the Zygelman (2005) H-H and Furlanetto & Furlanetto (2007) e-H
  tables as FOB06 lists them, interpolated in log-log (clamped at the tables' ends).
- x_alpha, Wouthuysen-Field coupling: x_alpha = 16 pi^2 T_* e^2 f_alpha / (27 A_10 T_CMB m_e c)
  S_alpha J_alpha (FOB06 sec. 4, = 1.81e11 S_alpha J_alpha / (1 + z)) with 21cmFAST's
  S_alpha = 1 / (1 + 2.98394 xi + 1.53583 xi^2 + 3.85289 xi^3), xi = (1e-7 tau_GP)^1/3 T_K^-2/3
  (`wouthuysen_field_coupling`), then x~_alpha = x_alpha (1 - 0.0631789 / T_K + ...) in `spin_temperature`.
  Before, S_alpha was Chuzhoy & Shapiro's exp(-0.803 T_K^-2/3 (1e-6 tau_GP)^1/3), ~15 % larger at
  cosmic dawn, with T_c = T_K and x_cmb = 1 (docs/benchmarks.md).
- T_K and J_alpha: the means of `heating.history` plus fluctuations from shell-filtered
  emissivity, as 21cmFAST's `spin_temperature` builds them (Mesinger, Furlanetto & Cen 2011,
  sec. 2.3; Pritchard & Furlanetto 2007): the linear density delta_0 is smoothed with
  real-space top-hats of radii R_s = 0.62 cell x 1.5^s up to 0.62 L_box; in a cell whose
  smoothed density is delta_R, shell s emits at the shell's box-mean rate (the global one times
  `heating.source_density_boost`, as 21cmFAST's `calculate_sfrd_from_grid` normalises it) times
  F_s = (1 + delta_R) |df_coll/dz|(delta_R, z'') / <...>_box, f_coll the extended
  Press-Schechter conditional fraction at the shell's retarded redshift z'', so the box mean is
  the history's exactly. The heating of shell s at every earlier step is propagated to the slice's
  redshift with the temperature equation's propagator Phi (so is its Lyman-alpha heating, `heating`
  docstring: Delta E per photon from the global history, the cell's J_alpha excess), moved half a
  21cmFAST step later as the mean (`heating.at_step_end`), and its Lyman-alpha flux (stars and
  X-ray-excited) is taken at the slice's own redshift. Shells beyond
  0.62 L_box (X-rays out to ~Gpc, the Lyman-beta horizon) act on every cell alike.
- dT_b is 21cmFAST's optically thick form (`optically_thick`), ~4 % shallower than the thin one in
  the absorption trough (tau_21 ~ 0.1).

Simplifications against 21cmFAST, beyond those of `heating`: F_s is tabulated on N_DELTA
values of delta_R and interpolated; the per-cell history is that of the comoving position of
the cell (linear density, no displacement); x_e (X-ray pre-ionisation) is the global
one; the X-ray-excited J_alpha leaves out 21cmFAST's (1 + delta) of the absorbing cell;
x_cmb uses the same step's T_S (21cmFAST: the previous step's).

A cell's T_K follows 21cmFAST's per-cell evolution (get_Ts_fast, init_first_Ts) in its density dependence
(`_cell_spin`, `_add_cell_heating`; each step measured on 21cmFAST's own T_K boxes, docs/benchmarks.md):
- the starting gas at Z_MAX carries 21cmFAST's T_K (1 + cT_ad delta), cT_ad = 0.58 - 0.006 (z - 10) =
  C_AD_START = 0.43 (its cT_approx, the adiabatic index of the still Compton-coupled gas, Munoz 2023,
  arXiv:2302.08506), and is compressed by (1 + delta)^(2/3) from there (its dadia_dzp): that part of T_K,
  T_K_INIT Phi, is T_K_INIT Phi (1 + delta)^(2/3) (1 + C_AD_START delta_s) / (1 + delta_s)^(2/3), delta_s the
  linear density at Z_MAX. (1 + delta)^(2/3) from the start made d ln T_K / d delta 0.67 vs 21cmFAST's 0.50 at
  z = 25, and in the cold, strongly coupled gas of the trough T_S ~ T_K then cancels most of the (1 + delta)
  of dT_b: Delta^2_21 was ~half 21cmFAST's at z = 13-16;
- heat gained at z' is compressed only from then on, ((1 + delta(z)) / (1 + delta(z')))^(2/3), not by
  (1 + delta(z))^(2/3) as the starting gas (d ln T_K / d delta 1.09 vs 0.50 at z = 12.8 for L_X = 40.3);
- Lyman-alpha heating per baryon divides the cell's photons by its own baryons, Ndot_alpha / (N_b (1 + delta))
  (21cmFAST's eps_Lya_cont / eps_Lya_inj): dense cells gain less (it is most of the heating at L_X ~ 38);
- and each photon leaves the cell's own Delta E (`Energy_Lya_heating` at the cell's T_K, T_S and
  taugp(zp, delta, x_e), `_lya_per_cell_density`): the continuum photons' Delta E grows ~(1 + delta)^0.6 with
  tau_GP, so a void gains ~(1 + delta)^-0.4 per baryon, not (1 + delta)^-1, and the injected photons cool hotter
  gas more. With the mean's Delta E, corner0's (L_X = 38) voids ran 1.3 K hotter than 21cmFAST's at z = 9.9 (T_K
  fell with density there, 21cmFAST's rises) and Delta^2_21 was 1.5-1.7x 21cmFAST's; the cell's T_K in it comes
  from LYA_PER_CELL fixed-point passes over the table (passes 3 and 4 agree to 1e-3 K), T_S scaled with T_K.
The last three act on the mean history's heating (tabulated on N_DELTA values of delta_0). The shells'
fluctuating heating, whose rates grow ~e-fold per dz ~ 0.6, is taken as gained recently and not
compressed at all (with the (1 + delta(z))^(2/3) of the whole, lh5's T_K power at z = 12.8 ran
1.3-2.6x 21cmFAST's, rising with k; uncompressed 1.0-1.3x).

Redshift-space distortions: in linear theory the line-of-sight gradient of the peculiar
velocity is dv_r/dr / H = -f(z) D(z) F^-1[k_par^2 / k^2 delta_0(k)] (Kaiser 1987), and the
optically thin brightness temperature is divided by 1 + dv_r/dr / H clipped to +-MAX_DVDR =
0.2, as 21cmFAST does (Mao et al. 2012's "sub-cell" scheme is not used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cosmofm.data_cards.mocks.sim21cm.cosmology import DELTA_C, L_FACTOR, Cosmology, erfc
from cosmofm.data_cards.mocks.sim21cm.density import TophatSmoother, tophat_smoother
from cosmofm.data_cards.mocks.sim21cm.heating import (
    A_10, C_CM, DZ_SOURCE, H_P, K_B, LAMBDA_21, M_E, M_P, RHO_CRIT_CGS, T_CMB0, T_K_INIT, TAU_GP_COEF, Y_HE, Z_MAX, History,
    at_step_end, cumulative, history, hubble_rate_s, lya_heating_energy,
)
from cosmofm.data_cards.mocks.sim21cm.params import SimParams

T_STAR = 0.0681683  # hyperfine energy / k_B, K (A_10 from `heating`)
E_CHARGE, F_ALPHA = 4.80320e-10, 0.4162  # esu; Ly-alpha oscillator strength
XA_COEF = 16 * math.pi**2 * T_STAR * E_CHARGE**2 * F_ALPHA / (27 * A_10 * T_CMB0 * M_E * C_CM)  # x_alpha (1+z) / (S_alpha J_alpha)
TAU21_COEF = 3 * H_P * A_10 * C_CM * LAMBDA_21**2 / (32 * math.pi * K_B)  # tau_21 = TAU21_COEF n_HI / (T_S H), 21cmFAST's
MAX_DVDR = 0.2  # largest |dv_r/dr| / H (21cmFAST)
SHELL_RATIO = 1.5  # ratio of successive filter radii of the fluctuating shells
N_DELTA = 96  # tabulated smoothed densities per shell
C_AD_START = 0.58 - 0.006 * (Z_MAX - 10.0)  # 21cmFAST's cT_approx(Z_HEAT_MAX): the starting T_K (1 + c delta), docstring
LYA_PER_CELL = 3  # fixed-point passes of the Ly-alpha heating's per-cell Delta E (`_lya_per_cell_density`); 0: the mean's
CHUNK_CELLS = 1 << 16  # cells per block of the per-cell spin temperature (cache-sized arrays)
Z_LOW = 5.0  # the history is computed down to min(Z_LOW, lowest slice)
# Spin de-excitation rate coefficients (cm^3/s) against T_K (K) as FOB06 tabulates them:
# H-H (Zygelman 2005) and e-H (Furlanetto & Furlanetto 2007)
T_HH = (1, 2, 4, 6, 8, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 100, 200, 300, 500, 700, 1000, 2000, 3000, 5000, 7000, 10000)
K_HH = (1.38e-13, 1.43e-13, 2.71e-13, 6.60e-13, 1.47e-12, 2.88e-12, 9.10e-12, 1.78e-11, 2.73e-11, 3.67e-11, 5.38e-11,
        6.86e-11, 8.14e-11, 9.25e-11, 1.02e-10, 1.11e-10, 1.19e-10, 1.75e-10, 2.09e-10, 2.56e-10, 2.91e-10, 3.31e-10,
        4.27e-10, 4.97e-10, 6.03e-10, 6.87e-10, 7.87e-10)
T_EH = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 3000, 5000, 7000, 10000, 15000, 20000)
K_EH = (2.39e-10, 3.37e-10, 5.30e-10, 7.46e-10, 1.05e-9, 1.63e-9, 2.26e-9, 3.11e-9, 4.59e-9, 5.92e-9, 7.15e-9, 7.71e-9,
        8.17e-9, 8.32e-9, 8.37e-9, 8.29e-9, 8.11e-9)


def _loglog(log_t, table_t, table_k) -> np.ndarray:
    """k(T) interpolated in log-log at log_t = ln T, held at the table's ends."""
    return np.exp(np.interp(log_t, np.log(table_t), np.log(table_k)))


def spin_temperature(t_k, t_cmb, x_c, x_alpha, x_cmb=1.0) -> np.ndarray:
    """T_S (K) from the gas and CMB temperatures, the collisional coupling x_c and the Wouthuysen-Field x_alpha.

    21cmFAST 4.1.1's `get_Ts_fast`: the Hirata (2006, MNRAS 367, 259) fits, with x_alpha (from
    `wouthuysen_field_coupling`) scaled by (1 - 0.0631789/T_K + 0.115995/T_K^2 - 0.401403/(T_K T_S)
    + 0.336463/(T_K^2 T_S)) and the colour temperature 1/T_c = 1/T_K + 0.405535 (1/T_S - 1/T_K) / T_K
    (spin exchange), and the CMB's coupling x_cmb = (1 - e^-tau_21) / tau_21 (`cmb_coupling`):

        1 / T_S = (x_cmb / T_CMB + x_c / T_K + x~_alpha / T_c) / (x_cmb + x_c + x~_alpha)

    21cmFAST iterates this to 1e-3; it is a quadratic in 1 / T_S, solved here in closed form (its root
    that tends to the uncoupled 1 / T_S as x_alpha -> 0). Strong coupling of either kind gives T_K.
    """
    a = 1 / np.asarray(t_k, dtype=float)
    x_c, xa, x_cmb = np.asarray(x_c, dtype=float), np.asarray(x_alpha, dtype=float), np.asarray(x_cmb, dtype=float)
    a0 = 1 - 0.0631789 * a + 0.115995 * a * a  # x~_alpha = (a0 + a1 / T_S) x_alpha
    a1 = (0.336463 * a - 0.401403) * a
    b = a - 0.405535 * a * a  # 1 / T_c = b + c / T_S
    c = 0.405535 * a
    quad = xa * a1 * (1 - c)  # quad s^2 + lin s - const = 0, s = 1 / T_S
    lin = x_cmb + x_c + xa * (a0 * (1 - c) - a1 * b)
    const = x_cmb / np.asarray(t_cmb, dtype=float) + x_c * a + xa * a0 * b
    return np.abs(0.5 * (lin + np.sqrt(np.clip(lin * lin + 4 * quad * const, 0.0, None))) / const)


def cmb_coupling(t_s, n_hi, hub) -> np.ndarray:
    """x_cmb = (1 - e^-tau_21) / tau_21 for spin temperature t_s (K), neutral hydrogen n_hi (proper cm^-3), H in 1/s (21cmFAST's xCMB)."""
    tau21 = TAU21_COEF * np.asarray(n_hi) / (np.asarray(t_s) * np.asarray(hub))
    return -np.expm1(-tau21) / np.maximum(tau21, 1e-30)


def collisional_coupling(t_k, n_h, x_e, t_cmb) -> np.ndarray:
    """x_c for hydrogen density n_h (proper cm^-3), ionised fraction x_e, temperatures in K."""
    lt = np.log(np.asarray(t_k, dtype=float))
    return T_STAR / (A_10 * np.asarray(t_cmb)) * n_h * ((1 - x_e) * _loglog(lt, T_HH, K_HH) + x_e * _loglog(lt, T_EH, K_EH))


def wouthuysen_field_coupling(j_alpha, z, t_k, tau_gp) -> np.ndarray:
    """x_alpha for Ly-alpha intensity j_alpha (photons / cm^2 / s / Hz / sr) at redshift z, before `spin_temperature`'s
    T_K / T_S factor: 21cmFAST's xa_tilde_fast_arg, S_alpha = 1 / (1 + 2.98394 xi + 1.53583 xi^2 + 3.85289 xi^3),
    xi = (1e-7 tau_GP)^1/3 T_K^-2/3 (the Hirata 2006 fit as 21cmFAST 4.1.1 codes it)."""
    cbrt_t = np.cbrt(np.asarray(t_k, dtype=float))
    xi = np.cbrt(1e-7 * np.asarray(tau_gp)) / (cbrt_t * cbrt_t)
    s_alpha = 1 / (1 + xi * (2.98394 + xi * (1.53583 + 3.85289 * xi)))
    return XA_COEF / (1 + np.asarray(z)) * s_alpha * j_alpha


def shells(cell: float, box_len: float) -> tuple[np.ndarray, np.ndarray]:
    """(edges, radii) of the fluctuating shells in Mpc: radii 0.62 cell x 1.5^s up to 0.62 L_box, edges from 0."""
    r0, r_max = L_FACTOR * cell, L_FACTOR * box_len
    n = max(1, int(math.floor(math.log(max(r_max / r0, 1.0)) / math.log(SHELL_RATIO) + 1e-9)) + 1)
    radii = r0 * SHELL_RATIO ** np.arange(n)
    edges = np.concatenate([[0.0], radii * math.sqrt(SHELL_RATIO)])
    return edges, radii


def box_history(params: SimParams, cell: float, box_len: float, redshifts) -> History:
    """The (cached) global history with the fluctuating shells of a box of cell / box_len Mpc, down to its lowest redshift."""
    edges, radii = shells(cell, box_len)
    return history(params, min(Z_LOW, math.floor(float(np.min(redshifts)))), tuple(edges), tuple(radii))


def xray_ionised_fraction(params: SimParams, cell: float, box_len: float, redshifts) -> np.ndarray:
    """(D,) mean X-ray (and residual) ionised fraction x_e of the neutral IGM at each slice's redshift (global, as ours is)."""
    z = np.asarray(redshifts, dtype=float)
    return box_history(params, cell, box_len, z).at("x_e", z)


@dataclass
class SpinFields:
    """Per-cell (D, H, W) spin temperature and what sets it, at each slice's redshift; x_e (D,) is the mean."""

    t_s: np.ndarray
    t_k: np.ndarray
    x_alpha: np.ndarray
    x_c: np.ndarray
    x_e: np.ndarray
    history: History


def spin_fields(delta0: np.ndarray, cell: float, redshifts, params: SimParams, cosmo: Cosmology, density: np.ndarray,
                box_len: float | None = None, smoother=None) -> SpinFields:
    """T_S of a (D, H, W) box whose slice i is at redshifts[i].

    Args:
        delta0: linear overdensity at z = 0 (periodic box; axis 0 the line of sight).
        cell: comoving cell size, Mpc.
        redshifts: (D,) slice redshifts, <= Z_MAX.
        density: (D, H, W) overdensity at each slice's redshift (linear or lognormal).
        box_len: transverse box size that limits the fluctuating shells (default W x cell).
        smoother: `density.tophat_smoother(delta0, cell)` when the caller has one (its forward FFT is shared).
    """
    z = np.asarray(redshifts, dtype=float)
    shape = delta0.shape
    box_len = box_len or shape[-1] * cell
    hist = box_history(params, cell, box_len, z)
    radii = shells(cell, box_len)[1]
    du = hist.u[0] - hist.u[1]
    gpos = np.clip((hist.u[0] - np.log1p(z)) / du, 0.0, len(hist.u) - 1.000001)
    g0 = gpos.astype(int)
    gw = (gpos - g0)[:, None]

    def at_slices(table):  # (G, N) -> (D, N), linear in ln(1+z)
        return (1 - gw) * table[g0] + gw * table[g0 + 1]

    d_tk, d_ja = np.zeros(shape), np.zeros(shape)
    z_pm = np.stack([hist.z_source - DZ_SOURCE, hist.z_source + DZ_SOURCE])  # (2, G, S): d f_coll / dz by differences
    sigma2_min = cosmo.sigma2_mass(cosmo.min_source_mass(z_pm, params.ION_Tvir_MIN))  # (2, G, S)
    barrier = DELTA_C / cosmo.growth(z_pm)  # (2, G, S)
    growth_src = cosmo.growth(hist.z_source)  # (G, S)
    smooth = smoother or tophat_smoother(delta0, cell)
    slice_base = (np.arange(shape[0]) * N_DELTA)[:, None, None]
    # Per shell two passes over the box in cache-sized blocks of slices (each cell's table position is cheap
    # to recompute, ~10 numpy operations on a block instead of as many 400 MB temporaries at paper size):
    # first the box histogram of delta_R that normalises F_s, then each cell's interpolated tables.
    rows = max(1, CHUNK_CELLS // max(1, int(np.prod(shape[1:]))))
    blocks = [slice(i, i + rows) for i in range(0, shape[0], rows)]
    buffer = np.empty(shape)  # every shell's smoothed field, reused (`density.TophatSmoother`)
    for s, radius in enumerate(radii):
        field = delta0 if s == 0 else smooth(radius, out=buffer)
        lo, hi = float(field.min()), float(field.max())
        step = max(hi - lo, 1e-12) / (N_DELTA - 1)
        counts = np.zeros(N_DELTA)
        for sl in blocks:
            j0, w = _table_position(field[sl], lo, step)
            counts += np.bincount(j0.ravel(), 1 - w.ravel(), N_DELTA) + np.bincount(j0.ravel() + 1, w.ravel(), N_DELTA)
        grid = lo + step * np.arange(N_DELTA)
        s2 = sigma2_min[:, :, s] - cosmo.sigma2_radius(radius)  # (2, G)
        ok = np.all(s2 > 0, axis=0)
        f_pm = erfc((barrier[:, :, s, None] - grid) / np.sqrt(2 * np.where(s2 > 0, s2, 1.0))[:, :, None])  # (2, G, N_DELTA)
        fc = np.clip(f_pm[0] - f_pm[1], 0.0, None) * np.clip(1 + growth_src[:, s, None] * grid, 0.0, None)  # (1 + delta) df/dz
        mean = fc @ counts / counts.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            excess = np.where((ok & (mean > 0))[:, None], fc / mean[:, None], 1.0) - 1  # F_s - 1
        # X-ray and Ly-alpha heating of the shell's excess emission, K per unit u
        rate = at_step_end((hist.heat_coef[:, None] * hist.heat_shell[:, s, None] + hist.lya_heat_shell[:, s, None]) * excess, du)
        d_heat = hist.phi[:, None] * cumulative(rate / hist.phi[:, None], du)
        d_alpha = hist.alpha_shell[:, s, None] * excess
        tables = [(at_slices(table).ravel(), out) for table, out in ((d_heat, d_tk), (d_alpha, d_ja))]  # (D * N_DELTA,)
        for sl in blocks:
            j0, w = _table_position(field[sl], lo, step)
            flat = slice_base[sl] + j0
            for table, out in tables:
                out[sl] += (1 - w) * table[flat] + w * table[flat + 1]
    d_mean = np.zeros(shape)  # the mean heating's dependence on the cell's own density (`_add_cell_heating`)
    _add_cell_heating(d_mean, delta0, hist, cosmo, at_slices, du, slice_base, blocks)
    x_e = hist.at("x_e", z)
    n_h = (1 - Y_HE) * params.OMb * RHO_CRIT_CGS * params.hlittle**2 / M_P * (1 + z) ** 3  # (D,) at the mean density
    per_slice = {"t_k": hist.at("t_k", z), "j_alpha": hist.at("j_alpha", z), "x_e": x_e, "n_h": n_h, "z": z,
                 "t_cmb": T_CMB0 * (1 + z), "hub": hubble_rate_s(cosmo, z), "t_start": T_K_INIT * hist.at("phi", z)}
    growth_start = float(cosmo.growth(Z_MAX))
    out = [np.empty(shape) for _ in range(4)]
    # the per-cell couplings, a few slices at a time: ~40 numpy passes each, on cache-sized blocks
    rows = max(1, CHUNK_CELLS // max(1, int(np.prod(shape[1:]))))
    density = np.asarray(density, dtype=float)
    for i in range(0, shape[0], rows):
        sl = slice(i, i + rows)
        cells = _cell_spin(d_mean[sl], d_tk[sl], d_ja[sl], density[sl], growth_start * delta0[sl],
                           **{k: v[sl, None, None] for k, v in per_slice.items()})
        for o, v in zip(out, cells):
            o[sl] = v
    return SpinFields(out[0], out[1], out[2], out[3], x_e, hist)


def _add_cell_heating(d_mean, delta0, hist: History, cosmo: Cosmology, at_slices, du: float, slice_base, blocks) -> None:
    """Add to d_mean (before `_cell_spin`'s (1 + delta)^2/3) how the mean history's heating acts on a cell of linear
    density D(z') delta_0, as 21cmFAST's get_Ts_fast evolves each cell's T_K (module docstring):
    - heat gained at z' is compressed adiabatically only from then on, by ((1 + delta(z)) / (1 + delta(z')))^2/3
      (its dadia_dzp acts on the cell's whole T_K at every step), not by (1 + delta(z))^2/3 as the starting gas;
    - Lyman-alpha heating per baryon is the cell's photons over its own baryons, Ndot_alpha / (N_b (1 + delta))
      (its eps_Lya_cont, eps_Lya_inj), so it is divided by 1 + delta(z').
    The history's heating increments (X-rays, Compton, CMB, species; Ly-alpha apart) are re-summed with these
    weights on N_DELTA values of delta_0 and interpolated per cell; d_mean gets the difference from the mean's."""
    lo, hi = float(delta0.min()), float(delta0.max())
    step = max(hi - lo, 1e-12) / (N_DELTA - 1)
    grid = lo + step * np.arange(N_DELTA)
    one_plus = np.clip(1 + cosmo.growth(hist.z)[:, None] * grid, 0.05, None)  # (G, N_DELTA)
    compress = np.cbrt(one_plus) ** 2
    heated = hist.t_k / hist.phi - T_K_INIT  # cumulative(source / phi): the mean's heating, `heating._history`
    lya = cumulative(at_step_end(hist.q_lya, du) / hist.phi, du)
    inc_other = np.diff(heated)[:, None] - np.diff(lya)[:, None]
    mid_one_plus, mid_compress = (0.5 * (a[1:] + a[:-1]) for a in (one_plus, compress))  # at the trapezoid's mid-steps

    def cell_heating(inc_lya):  # (G, N_DELTA) the cell's heating less the mean's, over phi
        summed = np.cumsum((inc_other + inc_lya / mid_one_plus) / mid_compress, axis=0)
        return np.concatenate([np.zeros((1, N_DELTA)), summed]) - heated[:, None]

    cell = cell_heating(np.diff(lya)[:, None])
    if LYA_PER_CELL:  # Delta E per photon at the cell's own tau_GP and T_K (fixed point: its T_K depends on it)
        start_excess = _start_excess(cosmo.growth(Z_MAX) * grid)
        for _ in range(LYA_PER_CELL):
            t_k = np.clip((hist.t_k[:, None] + hist.phi[:, None] * (cell + T_K_INIT * start_excess)) * compress, 1.0, None)
            q_cell = _lya_per_cell_density(hist, one_plus, t_k)
            cell = cell_heating(np.diff(cumulative(at_step_end(q_cell, du) / hist.phi[:, None], du), axis=0))
    table = at_slices(hist.phi[:, None] * cell).ravel()  # (D * N_DELTA,)
    for sl in blocks:
        j0, w = _table_position(delta0[sl], lo, step)
        flat = slice_base[sl] + j0
        d_mean[sl] += (1 - w) * table[flat] + w * table[flat + 1]


def _lya_per_cell_density(hist: History, one_plus: np.ndarray, t_k: np.ndarray) -> np.ndarray:
    """(G, N_DELTA) Lyman-alpha heating, K per unit u before the division by its baryons, of gas of density
    1 + delta (one_plus) and temperature t_k (G, N_DELTA): 21cmFAST's get_Ts_fast takes Delta E
    (`Energy_Lya_heating`) at the cell's T_K, T_S and taugp(zp, delta, x_e), (1 + delta) times the mean's tau_GP;
    the history's continuum and injected heating are scaled by the ratio of the cell's Delta E to the mean's.
    T_S is the mean's times t_k / T_K (the gas is coupled wherever Ly-alpha heats it)."""
    t_s = hist.t_s[:, None] * t_k / hist.t_k[:, None]  # T_S follows T_K in the coupled gas
    e_c, e_i = lya_heating_energy(t_k, t_s, hist.tau_gp[:, None] * one_plus)
    mean_c, mean_i = lya_heating_energy(hist.t_k, hist.t_s, hist.tau_gp)
    with np.errstate(divide="ignore", invalid="ignore"):
        r_c = np.where(mean_c[:, None] != 0, e_c / mean_c[:, None], 1.0)
        r_i = np.where(mean_i[:, None] != 0, e_i / mean_i[:, None], 1.0)
    q_cont = hist.q_lya_cont[:, None]
    return q_cont * r_c + (hist.q_lya[:, None] - q_cont) * r_i


def _start_excess(delta_start) -> np.ndarray:
    """21cmFAST's initial T_K fluctuation at Z_MAX, (1 + C_AD_START delta_s) / (1 + delta_s)^2/3 - 1, before the
    (1 + delta)^2/3 every cell's starting gas gets (module docstring)."""
    start = np.clip(1 + delta_start, 0.05, None)
    return (1 + C_AD_START * delta_start) / np.cbrt(start) ** 2 - 1


def _table_position(values: np.ndarray, lo: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Cloud-in-cell on the N_DELTA-point grid lo + step * j of smoothed densities: (lower node j0, weight of j0 + 1)."""
    pos = (values - lo) / step
    j0 = np.clip(pos.astype(int), 0, N_DELTA - 2)
    return j0, pos - j0


def _cell_spin(d_mean, d_tk, d_ja, density, delta_start, t_k, j_alpha, x_e, n_h, z, t_cmb, hub, t_start) -> tuple[np.ndarray, ...]:
    """(T_S, T_K, x_alpha, x_c) of a block of cells from the slices' means (D, 1, 1) and the cells' fluctuations:
    d_mean the mean heating's density dependence (compressed with the mean), d_tk the shells' excess heating (not
    compressed: gained recently), delta_start the cells' linear density at Z_MAX, t_start what is left of the mean
    starting T_K (module docstring)."""
    one_plus = np.clip(1 + density, 0.05, None)
    cbrt = np.cbrt(one_plus)
    adiabatic = cbrt * cbrt  # (1 + delta)^2/3
    t_k = np.clip((t_k + d_mean + t_start * _start_excess(delta_start)) * adiabatic + d_tk, 1.0, None)
    j_alpha = np.clip(j_alpha + d_ja, 0.0, None)
    n_cell = n_h * one_plus
    tau_gp = (TAU_GP_COEF * (1 - x_e) / hub) * n_cell
    x_alpha = wouthuysen_field_coupling(j_alpha, z, t_k, tau_gp)
    x_c = collisional_coupling(t_k, n_cell, x_e, t_cmb)
    t_s = spin_temperature(t_k, t_cmb, x_c, x_alpha)
    # the CMB's coupling from the 21cm optical depth at that T_S (21cmFAST: at the mean density, its previous step's T_S)
    x_cmb = cmb_coupling(t_s, n_h * (1 - x_e), hub)
    return spin_temperature(t_k, t_cmb, x_c, x_alpha, x_cmb), t_k, x_alpha, x_c


def velocity_gradient(delta0: np.ndarray, cell: float, redshifts, cosmo: Cosmology, smoother=None) -> np.ndarray:
    """(D, H, W) line-of-sight velocity gradient dv_r/dr / H in linear theory (axis 0 the line of sight), unclipped.

    smoother: a `density.TophatSmoother` of delta0 when the caller has one (its forward FFT is shared).
    """
    z = np.asarray(redshifts, dtype=float)
    if not isinstance(smoother, TophatSmoother):
        smoother = TophatSmoother(delta0, cell)
    kz, ky, kx = smoother.k_axes  # mu^2 = k_par^2 / k^2 is even in every wavenumber: the quarter grid holds it
    k2 = kz**2 + ky**2 + kx**2
    k2.flat[0] = 1.0
    mu2_delta = smoother.apply(kz**2 / k2)
    return -(cosmo.growth_rate(z) * cosmo.growth(z))[:, None, None] * mu2_delta


def rsd_factor(dvdr: np.ndarray) -> np.ndarray:
    """1 / (1 + dv_r/dr / H), the gradient clipped to +-MAX_DVDR as in 21cmFAST."""
    return 1 / (1 + np.clip(dvdr, -MAX_DVDR, MAX_DVDR))


def brightness_prefactor(z, params: SimParams) -> np.ndarray:
    """dT_b of fully neutral gas at mean density, mK (saturated spin temperature)."""
    h2 = params.hlittle**2
    return 27.0 * (params.OMb * h2 / 0.023) * np.sqrt(0.15 / (params.OMm * h2) * (1 + np.asarray(z, dtype=float)) / 10)


def optically_thick(tb_saturated: np.ndarray, t_s: np.ndarray, z) -> np.ndarray:
    """dT_b (mK) = (1 - e^-tau) (T_S - T_CMB) / (1 + z), tau = tb_saturated (1 + z) / T_S, from the saturated-limit
    dT_b (mK, D, H, W) and T_S (K), z (D,): 21cmFAST's BrightnessTemperatureBox.c. To first order in tau (~0.1 in the
    absorption trough, where this is ~5 % shallower) it is tb_saturated (1 - T_CMB / T_S)."""
    zz = np.asarray(z, dtype=float)[:, None, None]
    tau = tb_saturated * (1 + zz) / (1000.0 * t_s)
    return -np.expm1(-tau) * 1000.0 * (t_s - T_CMB0 * (1 + zz)) / (1 + zz)


def brightness_temperature(delta0: np.ndarray, delta: np.ndarray, x_hi: np.ndarray, z: np.ndarray, params: SimParams, cosmo: Cosmology,
                           cell: float, box_len: float, spin: bool, rsd: bool, smoother=None) -> tuple[np.ndarray, np.ndarray | None]:
    """(dT_b in mK, T_S in K or None when saturated) of a box with slice redshifts z (`reionization` docstring, point 3).

    x_hi is the neutral fraction with the X-ray ionised fraction x_e already taken out (1 - x_HII - x_e,
    as 21cmFAST's neutral_fraction), so it is not applied again here. smoother: `density.tophat_smoother(delta0,
    cell)` when the caller has one (one forward FFT of delta0 for the excursion set, the shells and the velocities).
    """
    tb = brightness_prefactor(z, params)[:, None, None] * x_hi * np.clip(1 + delta, 0, None)
    t_s = None
    if spin:
        t_s = spin_fields(delta0, cell, z, params, cosmo, delta, box_len, smoother).t_s
        tb = optically_thick(tb, t_s, z)
    if rsd:
        tb = tb * rsd_factor(velocity_gradient(delta0, cell, z, cosmo, smoother))
    return tb, t_s


__all__ = [
    "MAX_DVDR", "SpinFields", "box_history", "brightness_prefactor", "brightness_temperature", "cmb_coupling", "collisional_coupling",
    "optically_thick", "rsd_factor",
    "shells", "spin_fields", "spin_temperature", "velocity_gradient", "wouthuysen_field_coupling", "xray_ionised_fraction",
]
