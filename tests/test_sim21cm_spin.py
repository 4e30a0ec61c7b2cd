"""Spin temperature, cosmic dawn and redshift-space distortions of the embedded 21cm model (issue 18).

Lightcones here are 64 Mpc wide in 4 Mpc cells (16^2 x ~900 slices for z = 5-30): the global
signal is a mean over 256 sightlines, binned in dz = 0.5, so seed scatter is a few mK.
"""

import numpy as np
import pytest

from cosmofm.data_cards import InputError
from cosmofm.data_cards.mocks.sim21cm import SimParams, coeval_box, cosmology, lightcone, power_spectrum, spin
from cosmofm.data_cards.mocks.sim21cm.density import gaussian_field, k_grid
from cosmofm.data_cards.mocks.sim21cm.heating import (
    NU_ALPHA, T_CMB0, Y_HE, cmb_heating_rate, history, hubble_rate_s, lya_heating_energy, lyman_series_emissivity,
    xray_optical_depth,
)
from cosmofm.data_cards.mocks.sim21cm.reionization import LIGHTCONE_Z, ionized_fraction
from cosmofm.data_cards.mocks.sim21cm.spin import box_history, spin_fields, spin_temperature, xray_ionised_fraction


def _global_signal(params, seed=0, z_min=LIGHTCONE_Z[0], z_max=LIGHTCONE_Z[1]):
    """(bin centres, mean dT_b in mK) of a 64 Mpc / 16^2 lightcone, binned in dz = 0.5."""
    lc = lightcone(params, 64.0, 16, z_min, z_max, seed=seed)
    centres = np.arange(z_min + 0.25, z_max, 0.5)
    tb = lc.mean_brightness
    return centres, np.array([tb[np.abs(lc.redshifts - c) <= 0.25].mean() for c in centres])


def _trough(params, seed=0):
    z, tb = _global_signal(params, seed)
    i = int(np.argmin(tb))
    return float(z[i]), float(tb[i]), z, tb


def test_spin_temperature_limits():
    t_k, t_cmb = np.array([5.0, 50.0, 500.0]), 40.0
    np.testing.assert_allclose(spin_temperature(t_k, t_cmb, 0.0, 0.0), t_cmb)  # no coupling: the CMB
    np.testing.assert_allclose(spin_temperature(t_k, t_cmb, 1e7, 0.0), t_k, rtol=1e-5)  # collisions: the gas
    np.testing.assert_allclose(spin_temperature(t_k, t_cmb, 0.0, 1e7), t_k, rtol=1e-5)  # Ly-alpha: the gas
    # in a box at z = 12 with default sources the Ly-alpha coupling is strong and T_S follows T_K
    cosmo, p = cosmology(SimParams()), SimParams()
    delta0 = gaussian_field(np.random.default_rng(0), (16, 16, 16), 4.0, cosmo.power, cell_average=True)
    z = np.full(16, 12.0)
    sf = spin_fields(delta0, 4.0, z, p, cosmo, cosmo.growth(12.0) * delta0)
    x = sf.x_alpha + sf.x_c
    assert x.min() > 10, x.min()
    t_cmb = T_CMB0 * 13
    assert np.all((sf.t_s - sf.t_k) * (sf.t_s - t_cmb) <= 1e-9)  # T_S lies between T_K and T_CMB
    assert np.median(np.abs(sf.t_s / sf.t_k - 1)) < 0.05 and np.median(np.abs(sf.t_s / t_cmb - 1)) > 0.3
    assert sf.t_k.std() > 0.05 * sf.t_k.mean()  # heating fluctuates with the sources around each cell


def test_cell_temperature_follows_21cmfasts_density_dependence():
    """21cmFAST starts each cell at T_K (1 + cT_ad delta), cT_ad = 0.43 at z = 35, then compresses it by (1 + delta)^2/3,
    and compresses heat only after it is gained: d ln T_K / d delta is 2/3 + (0.43 - 2/3) D(35) / D(z) without
    sources, and well below 2/3 + the sources' bias once X-rays have heated the gas (21cmFAST: 0.30 at z = 9.9, lh5)."""
    def slope(params, z):
        cosmo = cosmology(params)
        delta0 = gaussian_field(np.random.default_rng(0), (16, 16, 16), 4.0, cosmo.power, cell_average=True)
        delta = cosmo.growth(z) * delta0
        t_k = spin_fields(delta0, 4.0, np.full(16, z), params, cosmo, delta).t_k
        return np.polyfit(delta.ravel(), np.log(t_k.ravel()), 1)[0], float(cosmo.growth(35.0) / cosmo.growth(z))

    for z in (30.0, 15.0):  # no sources: the starting gas alone (the old (1 + delta)^2/3 throughout gave 0.67)
        fitted, g = slope(SimParams(ION_Tvir_MIN=7.0), z)
        assert abs(fitted - (2 / 3 + (0.43 - 2 / 3) * g)) < 0.02, (z, fitted)
    fitted, _ = slope(SimParams(L_X=42.0), 9.0)  # hot gas: mostly heat gained late (before: 1.18)
    assert 0.3 < fitted < 0.8, fitted


def test_lyman_alpha_heating_takes_each_cells_delta_e(monkeypatch):
    """L_X = 38 (corner0), z = 9.9, Ly-alpha the main heating: 21cmFAST takes each photon's Delta E at the cell's tau_GP
    (proportional to 1 + delta) and T_K, so voids gain less per baryon than 1 / (1 + delta) and stay colder than the mean (21cmFAST,
    128 Mpc / 64^3: its voids' median T_K 0.95 of the box's); the mean's Delta E left them as warm as the mean."""
    p = SimParams(HII_EFF_FACTOR=10.0, ION_Tvir_MIN=4.0, L_X=38.0, NU_X_THRESH=200.0, OMm=0.2)
    cosmo = cosmology(p)
    delta0 = gaussian_field(np.random.default_rng(0), (16, 16, 16), 4.0, cosmo.power, cell_average=True)
    delta = cosmo.growth(9.9) * delta0

    def void_over_mean():
        t_k = spin_fields(delta0, 4.0, np.full(16, 9.9), p, cosmo, delta).t_k
        return float(t_k[delta < -0.2].mean() / t_k.mean())

    assert void_over_mean() < 0.94
    monkeypatch.setattr(spin, "LYA_PER_CELL", 0)
    assert void_over_mean() > 0.97


def test_spin_temperature_tends_to_the_cmb_without_sources():
    """No source (T_vir = 1e7 K): only collisions couple, and they fade as the gas thins."""
    lc = lightcone({"ION_Tvir_MIN": 7.0}, 64.0, 16, 10.0, 30.0, seed=1)
    ratio = [float(lc.spin_temp[np.argmin(np.abs(lc.redshifts - z))].mean() / (T_CMB0 * (1 + z))) for z in (29.0, 25.0, 20.0, 15.0, 11.0)]
    assert np.all(np.diff(ratio) > 0) and 0.85 < ratio[0] < 0.99 and ratio[-1] > 0.995, ratio
    assert np.abs(lc.mean_brightness[lc.redshifts < 15]).max() < 0.5  # mK: no signal without coupling
    # the gas itself cools adiabatically (with a little Compton heating): ~7 K at z = 17, as RECFAST gives
    hist = history(SimParams(ION_Tvir_MIN=7.0), 5.0)
    assert 6.0 < float(hist.at("t_k", 17.0)) < 8.0


def test_global_signal_has_an_absorption_trough_then_emission():
    z_trough, depth, z, tb = _trough({})
    assert 13.0 < z_trough < 20.0 and -250.0 < depth < -50.0, (z_trough, depth)
    assert tb[z < z_trough - 2].max() > 5.0  # heated gas: emission before reionisation ends
    assert abs(tb[0]) < 3.0  # z = 5.25: ionised
    assert abs(tb[-1]) < 10.0 and tb[-1] < 0  # z = 29.75: weak collisional absorption, no sources yet


def test_more_x_rays_make_the_trough_shallower_and_earlier():
    faint, bright = _trough({"L_X": 39.5}), _trough({"L_X": 41.5})
    fid = _trough({})
    assert faint[1] < fid[1] - 20 < bright[1] - 40, (faint[:2], fid[:2], bright[:2])  # depth, mK
    assert faint[0] < fid[0] <= bright[0] and bright[0] > faint[0] + 1.0, (faint[:2], fid[:2], bright[:2])  # redshift


def test_x_ray_threshold_changes_the_heating_fluctuations():
    """Soft X-rays (low E_0) are absorbed near their sources: patchier heating, more 21cm power at cosmic dawn."""
    lcs = {e0: lightcone({"NU_X_THRESH": e0}, 64.0, 16, 13.0, 16.0, seed=3) for e0 in (200.0, 1500.0)}
    p = {}
    for e0, lc in lcs.items():
        chunk = lc.brightness_temp[np.abs(lc.redshifts - 14.0) < 0.4][:16]
        p[e0] = power_spectrum(chunk, 4.0, 5, dimensionless=True)[1]
        ts = lc.spin_temp[np.abs(lc.redshifts - 14.0) < 0.4]
        p[e0, "ts"] = ts.std() / ts.mean()
    assert np.all(p[200.0] > 2 * p[1500.0]), (p[200.0], p[1500.0])
    assert p[200.0, "ts"] > 2 * p[1500.0, "ts"]
    # at fixed soft-band luminosity a harder threshold heats less: the gas at z = 14 is colder
    hist = {e0: history(SimParams(NU_X_THRESH=e0), 5.0) for e0 in (200.0, 1500.0)}
    assert float(hist[1500.0].at("t_k", 14.0)) < float(hist[200.0].at("t_k", 14.0))


def _los_and_perp_power(field, cell):
    kz, ky, kx = k_grid(field.shape, cell, real=False)
    k = np.sqrt(kz**2 + ky**2 + kx**2)
    mu = np.abs(kz) / np.where(k > 0, k, 1.0)
    power = np.abs(np.fft.fftn(field - field.mean())) ** 2
    large = (k > 0) & (k < 0.3)
    return power[large & (mu > 0.8)].sum(), power[large & (mu < 0.2)].sum()


def test_redshift_space_distortions_boost_the_line_of_sight_power():
    """Kaiser (1987): where dT_b traces 1 + delta, modes along the line of sight grow by ~(1 + f mu^2)^2.

    Saturated T_S: exactly that. With the spin temperature at z = 18 (Ly-alpha coupling, little heating) dense regions
    absorb more and the boost is ~2; at z = 14-16 heating makes them absorb less (a negative 21cm bias) and RSD
    lowers the line-of-sight power instead, as in 21cmFAST -- not tested here.
    """
    for spin, lo, hi in ((False, 2.8, 4.2), (True, 1.5, 4.0)):
        real = coeval_box({}, 18.0, 128.0, 32, seed=2, spin=spin, rsd=False).brightness_temp.astype(np.float64)
        red = coeval_box({}, 18.0, 128.0, 32, seed=2, spin=spin, rsd=True).brightness_temp.astype(np.float64)
        (los_r, perp_r), (los_s, perp_s) = _los_and_perp_power(real, 4.0), _los_and_perp_power(red, 4.0)
        assert lo < los_s / los_r < hi, (spin, los_s / los_r)
        assert abs(perp_s / perp_r - 1) < 0.1, (spin, perp_s / perp_r)  # transverse modes: no velocity along them
    # lightcones have RSD by default, and the flag turns it off (each slice's mean removed: the evolving
    # global signal would dominate the line-of-sight modes)
    on, off = (lightcone({}, 64.0, 16, 18.0, 21.0, seed=4, rsd=rsd).brightness_temp.astype(np.float64) for rsd in (True, False))
    on, off = (f - f.mean(axis=(1, 2), keepdims=True) for f in (on, off))
    assert _los_and_perp_power(on, 4.0)[0] > 1.5 * _los_and_perp_power(off, 4.0)[0]


def test_bad_x_ray_parameters_are_input_errors():
    for bad, field in (({"L_X": -1.0}, "L_X"), ({"L_X": 3e40}, "L_X"), ({"NU_X_THRESH": 0.0}, "NU_X_THRESH"),
                       ({"NU_X_THRESH": -200.0}, "NU_X_THRESH"), ({"NU_X_THRESH": 2500.0}, "NU_X_THRESH"),
                       ({"X_RAY_SPEC_INDEX": 7.0}, "X_RAY_SPEC_INDEX"), ({"X_RAY_SPEC_INDEX": float("nan")}, "X_RAY_SPEC_INDEX")):
        with pytest.raises(InputError, match=rf"parameters\.{field}"):
            lightcone(bad, 64.0, 16, 10.0, 12.0)
    with pytest.raises(InputError, match=r"^z: redshift 36.0 is above the model's range \(35\)"):
        lightcone({}, 64.0, 16, 20.0, 36.0)  # beyond Z_MAX = 35, where the heating history starts


def test_cmb_heating_is_21cmfasts_recoil_rate():
    """21cmFAST 4.1.1's eps_CMB (get_Ts_fast, after Meiksin 2021) at z = 17, T_K = 7 K, from its constants by hand."""
    h_p, lam, m_p, a10, t21, y_he = 6.62607015e-27, 21.106114054160, 1.67262192369e-24, 2.85e-15, 0.0682, 0.245
    h_frac = (1 - y_he) / (1 - 0.75 * y_he)
    expected = 0.75 * (T_CMB0 * 18 / t21) * a10 * h_frac * (h_p / lam) ** 2 / m_p * (1 + 2 * 7.0 / t21)
    assert cmb_heating_rate(17.0, 7.0) == pytest.approx(expected, rel=1e-3)
    assert cmb_heating_rate(17.0, 7.0) == pytest.approx(1.73e-41, rel=0.01)  # erg/s per baryon
    # as coded it is negligible: < 1e-6 K over a Hubble time (module docstring of heating)
    kelvin_per_hubble_time = 2 * cmb_heating_rate(17.0, 7.0) / (3 * 1.380649e-16) / hubble_rate_s(cosmology(SimParams()), 17.0)
    assert 0 < kelvin_per_hubble_time < 1e-6


def test_lyman_alpha_heating_energy_is_the_reis_table():
    """Delta E per photon: 21cmFAST's table values at a node, its trilinear interpolation off the nodes, the signs."""
    # a node of the shipped table (T_K = 10^0.84, T_S = 10^0.96, tau_GP = 10^6.52): 21cmFAST's
    # Lyman_alpha_heating_table.dat holds 5.889855e-16 and -1.007314e-17 erg there
    e_c, e_i = lya_heating_energy(10**0.84, 10**0.96, 10**6.52)
    assert e_c == pytest.approx(5.889855e-16, rel=1e-6) and e_i == pytest.approx(-1.007314e-17, rel=1e-6)
    # off the nodes: the full table's trilinear interpolation, 4.4074e-16 / -5.9133e-17 erg, within 3 %
    e_c, e_i = lya_heating_energy(7.0, 10.0, 2e6)
    assert e_c == pytest.approx(4.4074e-16, rel=0.03) and e_i == pytest.approx(-5.9133e-17, rel=0.03)
    # continuum photons heat, injected ones cool, and more so as the gas warms (Reis et al. 2021, fig. 1)
    c_cold, i_cold = lya_heating_energy(5.0, 5.0, 1e6)
    c_warm, i_warm = lya_heating_energy(100.0, 100.0, 1e6)
    assert c_cold > c_warm > 0 > i_cold > i_warm


def test_lyman_alpha_heating_warms_weakly_x_ray_heated_gas_as_21cmfast():
    """L_X = 38 (corner0 of the bench): the gas' minimum temperature and rewarming follow 21cmFAST's T_K once Ly-alpha heats."""
    p = SimParams(HII_EFF_FACTOR=10.0, ION_Tvir_MIN=4.0, L_X=38.0, NU_X_THRESH=200.0, OMm=0.2)
    hist = box_history(p, 2.0, 128.0, [5.0])
    assert hist.at("q_lya", 13.0) > 1.0 and abs(hist.at("q_cmb", 13.0)) < 1e-6  # K per unit ln(1+z)
    # 21cmFAST 4.1.1 (docs/bench/validate_21cm.json, corner0 seed 1): mean T_K of the neutral gas
    for z, t_21cmfast in ((15.1, 5.32), (12.8, 4.62), (10.8, 5.64), (9.0, 8.69)):
        assert float(hist.at("t_k", z)) == pytest.approx(t_21cmfast, rel=0.18), (z, float(hist.at("t_k", z)))


def test_xray_optical_depth_sees_the_pre_ionised_gas_as_21cmfast_taux():
    """Filling factor 1 - zeta f_coll / (1 - x_e), floor 1e-4, cross-section (1 - x_e) sigma + x_e sigma_HeII (tauX)."""
    column, sig, he2 = np.full(4, 1e20), np.full((4, 3), 1e-20), np.full((4, 3), 3e-21)
    q = np.array([0.0, 0.2, 0.5, 0.9])

    def expected(neutral, cross):
        dtau = (column * neutral)[:, None] * cross
        return np.cumsum(dtau, axis=0) - 0.5 * dtau  # to each shell's centre

    np.testing.assert_allclose(xray_optical_depth(column, q, 0.0, sig, he2), expected(1 - q, sig))  # x_e = 0: 1 - zeta f_coll
    # x_e = 0.4: the shell with zeta f_coll = 0.9 >= 1 - x_e is ionised (the floor), the others thinner
    tau = xray_optical_depth(column, q, 0.4, sig, he2)
    np.testing.assert_allclose(tau, expected(np.array([1.0, 1 - 0.2 / 0.6, 1 - 0.5 / 0.6, 1e-4]), 0.6 * sig + 0.4 * he2))
    assert tau[-1, 0] < 0.7 * xray_optical_depth(column, q, 0.0, sig, he2)[-1, 0]


def test_x_ray_pre_ionisation_lowers_the_barrier_and_the_neutral_fraction():
    """zeta f_coll >= 1 - x_e and x_HI = 1 - x_HII - x_e (21cmFAST's IonisationBox.c); spin=False keeps x_e = 0."""
    p, cell, n = SimParams(L_X=41.5), 4.0, 16
    cosmo = cosmology(p)
    delta0 = gaussian_field(np.random.default_rng(5), (n, n, n), cell, cosmo.power, cell_average=True)
    z = np.full(n, 8.0)
    x_e = xray_ionised_fraction(p, cell, n * cell, z)
    assert 0.05 < x_e[0] < 0.5, x_e[0]  # strong X-rays pre-ionise the neutral IGM by z = 8
    bare = ionized_fraction(delta0, cell, z, p, cosmo)
    pre = ionized_fraction(delta0, cell, z, p, cosmo, x_e=x_e)
    assert np.all(pre >= bare) and np.mean(pre == 1.0) > np.mean(bare == 1.0)  # more cells cross the lower barrier
    never = bare < 1.0
    np.testing.assert_allclose(pre[(pre < 1.0) & never], np.minimum(bare + x_e[0], 1.0)[(pre < 1.0) & never], rtol=1e-12)
    np.testing.assert_array_equal(ionized_fraction(delta0, cell, z, p, cosmo, x_e=np.zeros(n)), bare)
    saturated = coeval_box(p, 8.0, n * cell, n, seed=5, density0=delta0)
    np.testing.assert_allclose(saturated.x_HI, (1 - bare).astype(np.float32))
    with_spin = coeval_box(p, 8.0, n * cell, n, seed=5, density0=delta0, spin=True)
    np.testing.assert_allclose(with_spin.x_HI, (1 - pre).astype(np.float32))


def test_lyman_series_spectrum_is_21cmfasts_pop_ii():
    """Photons per stellar nucleon in each band Ly-n .. Ly-(n+1): 21cmFAST's stellar_spectra.dat x POP2_ION = 5000 x (1 - 3 Y / 4)."""
    per_nucleon = 5000 * (1 - 0.75 * Y_HE)
    for n, photons in ((2, 1.49494), (3, 0.393277), (4, 0.160398)):
        nu_n, nu_next = (1 - n**-2.0) / 0.75, (1 - (n + 1.0) ** -2) / 0.75
        stretch = np.linspace(1.0, nu_next / nu_n, 20001)[:-1]
        eps = lyman_series_emissivity(stretch)[:, n - 2]  # photons / Hz at the emitted nu = nu_n x stretch (units of Ly-alpha)
        integral = np.trapezoid(eps, stretch * nu_n * NU_ALPHA)
        assert integral == pytest.approx(photons * per_nucleon, rel=2e-3), n
    assert lyman_series_emissivity(np.array([1.2]))[0, 0] == 0.0  # beyond Ly-beta a photon no longer reaches Ly-alpha directly
