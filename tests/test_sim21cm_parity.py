"""The pieces of 21cmFAST 4.1.1's spin-temperature step that the embedded 21cm model follows (issue 18).

Each test checks one piece against 21cmFAST's own numbers or formulas (its C code, re-implemented
here in a few lines, or its shipped data files), not against our model's output.
"""

import math
from pathlib import Path

import numpy as np

from cosmofm.data_cards.mocks.sim21cm import SimParams, cosmology
from cosmofm.data_cards.mocks.sim21cm.cosmology import DELTA_C, erfc
from cosmofm.data_cards.mocks.sim21cm.heating import (
    CLUMPING_FACTOR, DZ_SOURCE, T_CMB0, Z_STEP_FACTOR, _electron_table, alpha_a, at_step_end, electron_weights,
    source_density_boost, verner_sigma, x_e_nodes,
)
from cosmofm.data_cards.mocks.sim21cm.spin import cmb_coupling, optically_thick, spin_temperature, wouthuysen_field_coupling


def _ts_21cmfast(t_k, t_rad, x_c, x_a, x_cmb):
    """21cmFAST 4.1.1's get_Ts_fast loop (SpinTemperatureBox.c), to 1e-10 instead of its 1e-3."""
    t_inv = 1 / t_k
    t_s, old = t_rad, 0.0
    while abs(t_s - old) / t_s > 1e-10:
        old = t_s
        xa = (1 - 0.0631789 * t_inv + 0.115995 * t_inv**2 - 0.401403 * t_inv / t_s + 0.336463 * t_inv**2 / t_s) * x_a
        t_s = (x_cmb + xa + x_c) / (x_cmb / t_rad + xa * (t_inv + 0.405535 * t_inv / t_s - 0.405535 * t_inv**2) + x_c * t_inv)
    return abs(t_s)


def test_spin_temperature_is_21cmfasts_fixed_point():
    rng = np.random.default_rng(18)
    n = 400
    t_k = 10 ** rng.uniform(0.2, 3.5, n)
    t_rad = T_CMB0 * (1 + rng.uniform(5, 34, n))
    x_c, x_a, x_cmb = 10 ** rng.uniform(-4, 1, n), 10 ** rng.uniform(-4, 3, n), rng.uniform(0.85, 1.0, n)
    ours = spin_temperature(t_k, t_rad, x_c, x_a, x_cmb)
    theirs = np.array([_ts_21cmfast(*v) for v in zip(t_k, t_rad, x_c, x_a, x_cmb)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-8)
    # cold gas, moderate coupling: the colour-temperature correction pulls T_S above the uncorrected Field formula
    plain = (1 + 1.0) / (1 / 50.0 + 1.0 / 5.0)
    assert spin_temperature(5.0, 50.0, 0.0, 1.0) > 1.01 * plain


def test_wouthuysen_field_coupling_is_21cmfasts():
    """x_alpha = 1.66e11 / (1 + z) S_alpha J_alpha with 21cmFAST's S_alpha(xi) (its xa_tilde_fast_arg)."""
    z, t_k, tau_gp, j = 17.0, 8.0, 3e6, 1e-11
    xi = (1e-7 * tau_gp) ** (1 / 3) * t_k ** (-2 / 3)
    s_alpha = 1 / (1 + 2.98394 * xi + 1.53583 * xi**2 + 3.85289 * xi**3)
    # 21cmFAST's prefactor (set_zp_consts), from its constants
    c, e, m_e, nu, eps0 = 2.99792458e10, 4.803204712570263e-10, 9.1093837015e-28, 2.46606727e15, 8.8541878128e-12
    gamma = 0.4162 * (nu * e / (c / 10)) ** 2 / (6 * (m_e / 1000) * (c / 100) ** 3 * eps0)
    prefactor = 8 * math.pi * (1215.67e-8) ** 2 * gamma * 0.0682 / (9 * 2.85e-15 * T_CMB0 * (1 + z))
    np.testing.assert_allclose(wouthuysen_field_coupling(j, z, t_k, tau_gp), prefactor * s_alpha * j, rtol=1e-3)


def test_brightness_temperature_is_optically_thick():
    t_s, z = np.full((1, 1, 2), [5.0, 500.0]), np.array([14.0])
    thin = np.full((1, 1, 2), 30.0)  # mK, saturated limit
    tau = 30.0 * 15 / (1000 * t_s)
    np.testing.assert_allclose(optically_thick(thin, t_s, z), (1 - np.exp(-tau)) * 1000 * (t_s - T_CMB0 * 15) / 15)
    # in the trough (T_S = 5 K) the thick form is ~4.4 % shallower than thin x (1 - T_CMB / T_S)
    ratio = optically_thick(thin, t_s, z)[0, 0, 0] / (30.0 * (1 - T_CMB0 * 15 / 5.0))
    assert 0.95 < ratio < 0.96, ratio
    # the CMB coupling (1 - e^-tau21) / tau21 tends to 1 for thin gas and drops for cold dense gas
    assert cmb_coupling(1e6, 1e-3, 1e-16) > 0.9999 and cmb_coupling(5.0, 1e-3, 1e-16) < 0.99


def test_electron_tables_are_21cmfasts():
    """The shipped Furlanetto & Stoever (2010) tables are 21cmFAST's x_int_tables (f_heat, n_Lya, n_ion totals)."""
    import py21cmfast

    base = Path(py21cmfast.__file__).parent / "_data" / "x_int_tables"
    xs, energy, f_heat, n_lya, n_ion = _electron_table()
    for k, name in ((3, "log_xi_-3.0.dat"), (12, "xi_0.990.dat")):
        t = np.loadtxt(base / name, skiprows=3)
        np.testing.assert_allclose(energy, t[:, 0])
        np.testing.assert_allclose(f_heat[k], t[:, 2], rtol=1e-6)
        np.testing.assert_allclose(n_lya[k], t[:, 4], rtol=1e-6)
        np.testing.assert_allclose(n_ion[k], t[:, 5] + t[:, 6] + t[:, 7], rtol=1e-5, atol=1e-6)
    # a 1 keV photon absorbed by HI at x_e = 1e-3: the electron (986.4 eV) heats with f_heat ~0.185 (table)
    e = np.array([1000.0])
    heat, ion, lya = electron_weights(e)
    f = heat[3, 0] / (verner_sigma(e, "HI")[0] * 986.4 * 1.602176634e-12 + 0.0806 * verner_sigma(e, "HeI")[0] * 975.41 * 1.602176634e-12)
    assert 0.18 < f < 0.19, f
    k, w = x_e_nodes([1e-3, 1e-5, 0.9995])
    np.testing.assert_array_equal(k, [3, 0, 12])
    np.testing.assert_allclose(w, [0.0, 0.001 / (2.318e-4 / 1e-4 - 1), (0.999 * 0.999 - 0.99) / 0.009], atol=1e-6)  # clamped as 21cmFAST


def test_recombination_is_21cmfasts_case_a_with_clumping():
    assert CLUMPING_FACTOR == 2.0
    np.testing.assert_allclose(alpha_a(1e4), 4.18e-13, rtol=0.01)  # case A at 10^4 K (Osterbrock)
    for t in (30.0, 100.0, 1000.0):  # Hui & Gnedin (1997) case-A fit, within 5 %
        lam = 2 * 157807.0 / t
        np.testing.assert_allclose(alpha_a(t), 1.269e-13 * lam**1.503 / (1 + (lam / 0.522) ** 0.47) ** 1.923, rtol=0.05)


def test_source_density_boost_matches_a_gaussian_box():
    """<(1 + delta_R) df_coll/dz> / <df_coll/dz> over Gaussian cells = the analytic (Stein) form, and 1 without variance."""
    p = SimParams(ION_Tvir_MIN=4.7)
    cosmo = cosmology(p)
    z, radius = 16.0, 1.5
    s2 = float(cosmo.sigma2_radius(radius))
    delta0 = np.random.default_rng(0).normal(0.0, math.sqrt(s2), 2_000_000)
    dfc = 0.0
    for sign in (-1, 1):
        zz = z + sign * DZ_SOURCE
        v = float(cosmo.sigma2_mass(cosmo.min_source_mass(zz, p.ION_Tvir_MIN))) - s2
        dfc = dfc - sign * erfc((DELTA_C / float(cosmo.growth(zz)) - delta0) / math.sqrt(2 * v))
    monte_carlo = np.mean((1 + float(cosmo.growth(z)) * delta0) * dfc) / np.mean(dfc)
    boost = float(source_density_boost(cosmo, p.ION_Tvir_MIN, z, s2))
    assert boost > 1.2, boost  # the cell scale at cosmic dawn: sources sit in dense cells
    np.testing.assert_allclose(boost, monte_carlo, rtol=0.01)
    assert float(source_density_boost(cosmo, p.ION_Tvir_MIN, z, 0.0)) == 1.0


def test_heating_follows_21cmfasts_step():
    """A rate growing e-fold per 0.05 in ln(1+z), moved half of 21cmFAST's step (ln 1.02 / 2) to lower z."""
    du = 0.005
    u = np.arange(40) * du
    rate = np.exp(u / 0.05)
    moved = at_step_end(rate, du)
    np.testing.assert_allclose(moved[:-4], np.exp((u[:-4] + 0.5 * math.log(Z_STEP_FACTOR)) / 0.05), rtol=2e-3)
    assert moved[-1] == rate[-1]
