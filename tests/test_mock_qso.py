"""Survey-grade QSO mocks (mocks/qso.py): the forest's mean transmission is Faucher-Giguere
et al. 2008's, DLAs have the damping wings of their column, LLS black out below 912 A, BALs
come at their rate and depth, Fe II and the Balmer continuum follow their parameters, and
every drawn parameter changes the spectrum."""

import numpy as np
import pytest

from cosmofm.data_cards import InputError
from cosmofm.data_cards.mocks import qso
from cosmofm.data_cards.mocks.spectra import BROAD, BROAD_EW, R_TOP_HAT, ObjectParams, _f_lambda_r, draw_object
from cosmofm.data_cards.mocks.survey import survey_model, survey_object

LYA = BROAD["Lyalpha"]


def _qso(seed: int, z: float, cls: str = "QSO_BROADLINE", **fixed) -> ObjectParams:
    rng = np.random.default_rng(seed)
    obj = draw_object(rng, cls)
    obj.z = z
    obj.params.update(qso.draw_qso_extras(rng, obj.params, z))
    obj.params.update(fixed)
    return obj


def test_forest_mean_transmission_follows_faucher_giguere_2008():
    """Mean flux over rest 1040-1190 A (between Ly beta and Ly alpha) of 40 noiseless sight
    lines, at two QSO redshifts: exp(-0.0018 (1 + z)^3.92) within 15 %; none redward of Ly alpha."""
    for z_qso in (2.4, 3.2):
        wave = np.geomspace(3000.0, 1400.0 * (1 + z_qso), 6000)
        forest = (wave / (1 + z_qso) > 1040.0) & (wave / (1 + z_qso) < 1190.0)
        red = wave / (1 + z_qso) > 1300.0
        mean, expected = [], []
        for seed in range(40):
            p = _qso(seed, z_qso).params
            trans = qso.hi_transmission(p, z_qso, wave, 2000.0)
            mean.append(trans[forest].mean())
            expected.append(np.exp(-0.0018 * (wave[forest] / LYA) ** 3.92).mean())
            assert np.all(trans[red] > 0.97)  # at most a DLA's red damping wing
            if p["dla_z"]:
                assert np.all(qso.hi_transmission({**p, "dla_z": [], "dla_log_nhi": []}, z_qso, wave, 2000.0)[red] > 0.999)
        assert np.mean(mean) == pytest.approx(np.mean(expected), rel=0.15), z_qso
        assert np.std(mean) > 0.01  # sight lines differ: discrete absorbers, not a smooth mean


def _transmission_of(z_qso, wave, dla=(), lls=()):
    p = {"forest_seed": 0.0, "forest_tau_eff": 0.0, "dla_z": [z for z, _ in dla], "dla_log_nhi": [n for _, n in dla],
         "lls_z": [z for z, _ in lls], "lls_log_nhi": [n for _, n in lls]}
    return qso.hi_transmission(p, z_qso, wave, 2000.0)


def test_dla_damping_wing_matches_its_column_density():
    """Black at the centre; rest EW = lambda^2 / c sqrt(N e^2 / (m_e c) f Gamma), the square-root
    part of the curve of growth, within 20 %; W ~ sqrt(N) between two columns within 10 %."""
    z_abs, wave = 2.5, np.geomspace(3700.0, 4900.0, 40000)
    e2_mc = 4.80320e-10**2 / (9.10938e-28 * 2.99792e10)
    ews = []
    for log_n in (20.5, 21.5):
        trans = _transmission_of(3.0, wave, dla=[(z_abs, log_n)])
        assert np.interp(LYA * (1 + z_abs), wave, trans) < 0.01
        ew = np.trapezoid(1 - trans, wave) / (1 + z_abs)
        damped = (LYA * 1e-8) ** 2 / 2.99792e10 * np.sqrt(10**log_n * e2_mc * 0.4164 * 6.265e8) * 1e8
        assert ew == pytest.approx(damped, rel=0.2), log_n
        ews.append(ew)
    assert ews[1] / ews[0] == pytest.approx(np.sqrt(10.0), rel=0.1)


def test_lyman_limit_system_blacks_out_below_912_angstrom():
    z_lls, wave = 2.8, np.geomspace(3000.0, 4000.0, 20000)
    trans = _transmission_of(3.2, wave, lls=[(z_lls, 18.0)])
    rest = wave / (1 + z_lls)
    assert np.all(trans[(rest > 850) & (rest < 905)] < 0.01)  # tau = 6.3 (lambda / 912)^3
    assert np.mean(trans[(rest > 940) & (rest < 1010)]) > 0.7  # above the edge only the Lyman series lines
    weak = _transmission_of(3.2, wave, lls=[(z_lls, 17.2)])  # tau_912 = 1
    assert np.interp(905.0 * (1 + z_lls), wave, weak) == pytest.approx(np.exp(-6.3e-18 * 10**17.2 * (905 / 911.76) ** 3), rel=0.03)


def test_absorber_statistics():
    """Absorbers lie between Z_ABS_MIN and the QSO; DLAs have N >= 2e20 and dN/dz ~ 0.2-0.3
    at z 2.2-3.5 (Prochaska et al. 2005); LLS are 10^17.2-10^20.3."""
    n_dla, lls = 0, []
    for seed in range(1500):
        p = _qso(seed, 3.5).params
        assert p["n_dla"] == len(p["dla_z"]) == len(p["dla_log_nhi"])
        assert all(qso.Z_ABS_MIN <= z < 3.5 for z in p["dla_z"] + p["lls_z"]), (seed, p["dla_z"], p["lls_z"])
        assert all(n >= np.log10(2e20) for n in p["dla_log_nhi"])
        n_dla += sum(z > 2.2 for z in p["dla_z"])
        lls += p["lls_log_nhi"]
        z, _, _ = qso.sightline(p, 3.5) if seed < 5 else (np.zeros(0), None, None)
        assert np.all(z < 3.5) and np.all(z >= qso.Z_ABS_MIN)
    assert 0.18 < n_dla / (1500 * 1.3) < 0.32
    assert 17.2 <= min(lls) and max(lls) < np.log10(2e20) and 1.0 < len(lls) / (1500 * 2.0) < 2.5


def test_bal_fraction_and_troughs_blueward_of_civ():
    draws = [_qso(seed, 2.0).params for seed in range(2000)]
    bal = np.array([p["bal"] for p in draws])
    assert 0.10 <= bal.mean() <= 0.15  # Gibson et al. 2009: ~13 %
    assert 0.005 <= np.mean([p["lobal"] for p in draws]) <= 0.03  # LoBALs ~1-2 %
    for p in (p for p in draws if p["bal"]):
        assert 3000 <= p["bal_v_min_kms"] and p["bal_v_max_kms"] <= 25000 and p["bal_v_max_kms"] - p["bal_v_min_kms"] >= 2000
        assert 0.3 <= p["bal_depth"] <= 0.9
    p = next(p for p in draws if p["bal"] and not p["lobal"])
    z = 2.0
    wave = np.geomspace(3600.0, 10400.0, 4608)
    with_bal = qso.qso_model(ObjectParams("QSO_BROADLINE", z, p), wave, 2000.0)
    without = qso.qso_model(ObjectParams("QSO_BROADLINE", z, {**p, "bal": 0.0}), wave, 2000.0)
    ratio, rest = with_bal / without, wave / (1 + z)
    v = 299792.458 * (1 - (rest / 1549.1) ** 2) / (1 + (rest / 1549.1) ** 2)  # outflow velocity from C IV
    trough = (v > 3000) & (v < 25000)
    assert ratio[trough].min() < 0.7 and ratio[trough].min() == pytest.approx(1 - p["bal_depth"], abs=0.01)
    assert p["bal_v_min_kms"] - 500 < v[np.argmin(np.where(trough, ratio, 2.0))] < p["bal_v_max_kms"] + 500
    assert np.all(ratio[rest > 1560] > 0.999)  # no trough redward of C IV (no Mg II trough: not a LoBAL)


REST = np.geomspace(1900.0, 6000.0, 60000)


def _emission(p):
    return qso.emission(p, REST, REST / 2000.0 / 2.3548)[0]


def _excess_ew(p, key, window, zero=0.0):
    """EW [A] of what parameter `key` adds over window (rest), against the power law."""
    cont = (REST / 3000.0) ** p["alpha_lambda"]
    sel = (REST > window[0]) & (REST < window[1])
    return np.trapezoid(((_emission(p) - _emission({**p, key: zero})) / cont)[sel], REST[sel])


def test_feii_and_balmer_continuum_follow_their_parameters():
    """R_FeII = EW(Fe II 4434-4684) / EW(Hbeta) and EW(Fe II 2200-3090) / EW(Mg II) are the drawn
    values (Boroson & Green 1992; Vestergaard & Wilkes 2001); doubling feii_strength doubles the
    optical blend; the Balmer continuum sits below 3646 A."""
    p = _qso(3, 1.0).params
    assert 0.1 <= p["feii_strength"] <= 1.5
    ew_hb, ew_mg = BROAD_EW["Hbeta"] * p["ew_scale"], BROAD_EW["MgII"] * p["ew_scale"]
    ew = _excess_ew(p, "feii_strength", qso.FE_OPT_WINDOW)
    assert ew == pytest.approx(p["feii_strength"] * ew_hb, rel=0.02)
    doubled = {**p, "feii_strength": 2 * p["feii_strength"]}
    assert _excess_ew(doubled, "feii_strength", qso.FE_OPT_WINDOW) == pytest.approx(2 * ew, rel=1e-6)
    assert _excess_ew(p, "feii_uv_ratio", qso.FE_UV_WINDOW) == pytest.approx(p["feii_uv_ratio"] * ew_mg, rel=0.02)
    # Balmer continuum: F(edge) = balmer_continuum x the power law there (half of it at the smoothed edge)
    bc = _emission(p) - _emission({**p, "balmer_continuum": 0.0})
    edge_cont = (qso.BALMER_EDGE / 3000.0) ** p["alpha_lambda"]
    assert np.interp(qso.BALMER_EDGE, REST, bc) == pytest.approx(0.5 * p["balmer_continuum"] * edge_cont, rel=0.05)
    assert bc[(REST > 3000) & (REST < 3500)].min() > 0.2 * p["balmer_continuum"] * edge_cont
    assert np.all(np.abs(bc[REST > 4200]) < 1e-3 * edge_cont)


@pytest.mark.parametrize("key, z", [("feii_strength", 0.5), ("balmer_continuum", 0.5), ("balmer_tau", 0.5), ("feii_uv_ratio", 1.0),
                                    ("bal_depth", 3.3), ("bal_v_min_kms", 3.3), ("forest_tau_eff", 3.3), ("forest_seed", 3.3),
                                    ("dla_log_nhi", 3.3), ("lls_log_nhi", 3.3)])
def test_every_drawn_parameter_changes_the_spectrum(key, z):
    """At a redshift that puts its feature on the sdss-like grid, each parameter changes the model."""
    p = _qso(5, z, bal=1.0, bal_v_min_kms=5000.0, bal_v_max_kms=9000.0, bal_depth=0.5, dla_z=[z - 0.4], dla_log_nhi=[20.6],
             lls_z=[z - 0.2], lls_log_nhi=[17.8]).params
    wave = np.geomspace(3600.0, 10400.0, 4608)
    value = p[key]
    changed = [v + 0.5 for v in value] if isinstance(value, list) else value + 1.0 if key == "forest_seed" else 1.5 * value
    base = qso.qso_model(ObjectParams("QSO", z, p), wave, 2000.0)
    other = qso.qso_model(ObjectParams("QSO", z, {**p, key: changed}), wave, 2000.0)
    assert np.max(np.abs(other - base) / np.maximum(base, 1e-3 * base.max())) > 0.01, key


def test_survey_qsos_keep_their_magnitude_and_record_their_physics():
    """Survey QSOs (sdss-like-survey objects) carry the new parameters, and their model on the
    r top hat, times the normalisation, is the f_lambda of their r magnitude."""
    seen = 0
    for index in range(80):
        obj, norm = survey_object(11, index)
        if not obj.cls.startswith("QSO"):
            continue
        seen += 1
        assert {"feii_strength", "balmer_continuum", "bal", "n_dla", "dla_log_nhi", "forest_tau_eff"} <= set(obj.params)
        top_hat = survey_model(obj, np.linspace(*R_TOP_HAT, 400), 2000.0)
        assert np.mean(top_hat) * norm == pytest.approx(_f_lambda_r(obj.mags["r"]), rel=1e-9)
        full = survey_model(obj, np.geomspace(3600.0, 10400.0, 4608), 2000.0)
        assert np.all(np.isfinite(full)) and np.all(full >= 0)
    assert seen >= 8


def test_drawn_keys_and_missing_parameters_named():
    assert set(_qso(0, 2.0).params) >= set(qso.SURVEY_KEYS)
    assert set(qso.draw_qso_extras(np.random.default_rng(0), _qso(0, 2.0).params, 2.0)) == set(qso.SURVEY_KEYS)
    basic = draw_object(np.random.default_rng(0), "QSO")
    with pytest.raises(InputError, match="draw_qso_extras"):
        qso.qso_model(basic, np.geomspace(3600.0, 10400.0, 100), 2000.0)
