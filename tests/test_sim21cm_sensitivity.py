"""Labels only for parameters that act (issue 18): inert parameters refused, drawn ones measured.

Cards here are small (32 Mpc, 16^3 chunks, z = 7-9, or z = 12-20 for cosmic dawn): a check is
4 lightcones of 16^2 x ~110 (~450) slices per drawn parameter.
"""

import numpy as np
import pytest

from cosmofm.data_cards import InputError, load_card
from cosmofm.data_cards.mocks import fields as mock_fields
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.data_cards.mocks.sim21cm import sensitivity
from cosmofm.data_cards.mocks.sim21cm.params import BRIGHTNESS_READS, MODEL_READS, XRAY_READS, inert_reason
from cosmofm.data_cards.schema import card_from_dict


def _card(name="lightcone-21cm", field=None, **parameters):
    raw = load_card(name).to_dict()
    if name == "lightcone-21cm":
        raw["field"].update(box_size="32 Mpc", n_cells=16, los_cells=16, redshift_min=7.0, redshift_max=9.0)
        for name in ("L_X", "NU_X_THRESH", "M_WDM"):  # the shipped card (z 5-30) draws them too; here only what a test names
            raw["field"]["parameters"].pop(name, None)
        raw["field"]["parameters"]["OMm"] = 0.30964  # drawn on the shipped card; fixed here (tests/test_sim21cm_cosmology.py draws it)
    raw["field"].update(field or {})
    raw["field"]["parameters"].update(parameters)
    return card_from_dict(raw)


COSMIC_DAWN = {"redshift_min": 12.0, "redshift_max": 20.0}  # the absorption trough and the onset of heating


def _no_compute(*args, **kwargs):
    raise AssertionError("simulated before refusing the card")


def test_drawing_an_inert_parameter_is_refused_before_any_compute(monkeypatch):
    monkeypatch.setattr(mock_fields, "lightcone_at_redshifts", _no_compute)
    monkeypatch.setattr(mock_fields, "coeval_box", _no_compute)
    monkeypatch.setattr(sensitivity, "_simulate", _no_compute)
    mock_fields._CACHE.clear()
    # the density field is neither ionised nor heated: reionisation and X-ray parameters drawn for it act on nothing
    for name, prior in (("L_X", [38.0, 42.0]), ("NU_X_THRESH", [200.0, 1000.0]), ("HII_EFF_FACTOR", [10.0, 100.0])):
        with pytest.raises(InputError, match=rf"parameters\.{name}: changes nothing .*neither ionised nor heated.* fix it to a number or drop it"):
            mock_samples(_card("density-field", **{name: prior}), 1)
        density_lightcone = _card(field={"quantity": "overdensity"}, **{"HII_EFF_FACTOR": 30.0, "ION_Tvir_MIN": 4.7, name: prior})
        with pytest.raises(InputError, match=rf"parameters\.{name}"):
            sensitivity.check_sensitivity(density_lightcone)
    # the 21cm brightness temperature reads the X-ray parameters through the spin temperature: drawing them is allowed
    fixed, priors = mock_fields.card_priors(_card(L_X=[38.0, 42.0], NU_X_THRESH=[200.0, 1000.0], X_RAY_SPEC_INDEX=[0.5, 1.5]))
    assert {"L_X", "NU_X_THRESH", "X_RAY_SPEC_INDEX"} <= set(priors)
    # the single list: what the model reads
    assert set(XRAY_READS) <= set(BRIGHTNESS_READS) and not set(XRAY_READS) & set(MODEL_READS["overdensity"])
    assert set(MODEL_READS["overdensity"]) < set(BRIGHTNESS_READS)
    assert inert_reason("Omega_m") is None and inert_reason("L_X") is None and inert_reason("L_X", "overdensity") is not None


def test_fixed_inert_parameter_is_accepted_and_not_a_label():
    mock_fields._CACHE.clear()
    with_lx = mock_samples(_card("density-field", L_X=40.0, HII_EFF_FACTOR=50.0), 2, seed=3)
    without = mock_samples(_card("density-field"), 2, seed=3)
    for a, b in zip(with_lx, without):
        labels = a.meta["labels"]
        assert "L_X" not in labels and "HII_EFF_FACTOR" not in labels and {"OMm", "SIGMA_8"} <= set(labels)
        assert labels == b.meta["labels"]
        np.testing.assert_array_equal(a.values, b.values)  # fixed inert parameters indeed change nothing
    # on the 21cm card a fixed L_X acts, so it is a label (of a constant)
    chunk = mock_samples(_card(L_X=40.0, NU_X_THRESH=500.0), 1, seed=3)[0]
    assert chunk.meta["labels"]["L_X"] == 40.0 and chunk.meta["labels"]["NU_X_THRESH"] == 500.0


def test_acting_parameters_are_well_above_the_threshold():
    info = {}
    ratios = sensitivity.check_sensitivity(_card(), details=info)
    assert set(ratios) == {"HII_EFF_FACTOR", "ION_Tvir_MIN"}
    for name, ratio in ratios.items():
        assert ratio > 3 * sensitivity.THRESHOLD, (name, ratio, info)
        # each moves the global signal and the power spectrum, not only one of them
        assert min(info["per_summary"][name].values()) > sensitivity.THRESHOLD, (name, info)
    assert info["n_lightcones"] == 8


def test_x_ray_parameters_act_at_cosmic_dawn():
    """The absorption trough moves with L_X and E_0; the spectral index, at E_0 ~ 850 eV, barely acts and is refused."""
    info = {}
    card = _card(field=COSMIC_DAWN, HII_EFF_FACTOR=30.0, ION_Tvir_MIN=4.7, L_X=[38.0, 42.0], NU_X_THRESH=[200.0, 1500.0])
    ratios = sensitivity.check_sensitivity(card, details=info)
    assert ratios["L_X"] > 3 * sensitivity.THRESHOLD, (ratios, info)
    assert min(info["per_summary"]["L_X"].values()) > sensitivity.THRESHOLD, info  # global signal and power spectrum
    assert ratios["NU_X_THRESH"] > 1.5 * sensitivity.THRESHOLD, (ratios, info)
    # with L_X fixed in the E_0-2 keV band, a harder or softer spectrum at E_0 = 850 eV trades soft photons for a
    # 2-10 keV tail and the heating barely changes (T_K within ~3 %): the check measures it and refuses it as a label
    with pytest.raises(InputError, match=r"parameters\.X_RAY_SPEC_INDEX: moving it across \[0.5, 1.5\]"):
        sensitivity.check_sensitivity(_card(field=COSMIC_DAWN, NU_X_THRESH=850.0, X_RAY_SPEC_INDEX=[0.5, 1.5]))


def test_a_parameter_forced_inert_is_refused(monkeypatch):
    real = sensitivity._simulate

    def ignores_zeta(params, *args):
        return real(params.replace(HII_EFF_FACTOR=30.0), *args)

    monkeypatch.setattr(sensitivity, "_simulate", ignores_zeta)
    card = _card()
    ratios = sensitivity.check_sensitivity(card, raise_below=False)
    assert ratios["HII_EFF_FACTOR"] == 0.0  # same seeds at both ends: an ignored parameter gives exactly nothing
    assert ratios["ION_Tvir_MIN"] > sensitivity.THRESHOLD
    with pytest.raises(InputError, match=r"parameters\.HII_EFF_FACTOR: moving it across \[10.0, 100.0\]"):
        sensitivity.check_sensitivity(card)


def test_effect_ratio_against_the_seed_scatter():
    rng = np.random.default_rng(0)
    runs = [rng.normal(0.0, 1.0, 200) for _ in range(3)]
    assert sensitivity.effect_ratio(runs, runs) == 0.0
    shifted = [r + 5.0 for r in runs]  # a shift of 5 against a unit scatter
    assert sensitivity.effect_ratio(runs, shifted) == pytest.approx(5.0, rel=0.2)
    assert sensitivity.effect_ratio(runs, [r + 0.3 for r in runs]) < sensitivity.THRESHOLD
    with pytest.raises(InputError, match="seeds"):
        sensitivity.effect_ratio(runs[:1], runs[:1])
    with pytest.raises(InputError, match="seeds"):
        sensitivity.check_sensitivity(_card(), seeds=(0,))
