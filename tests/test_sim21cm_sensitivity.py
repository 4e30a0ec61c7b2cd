"""Labels only for parameters that act (issue 18): inert parameters refused, drawn ones measured.

Cards here are small (32 Mpc, 16^3 chunks, z = 7-9): a check is 8 lightcones of 16^2 x ~110 slices.
"""

import numpy as np
import pytest

from cosmofm.data_cards import InputError, load_card
from cosmofm.data_cards.mocks import fields as mock_fields
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.data_cards.mocks.sim21cm import sensitivity
from cosmofm.data_cards.mocks.sim21cm.params import BRIGHTNESS_READS, MODEL_READS, inert_reason
from cosmofm.data_cards.schema import card_from_dict


def _card(name="lightcone-21cm", **parameters):
    raw = load_card(name).to_dict()
    if name == "lightcone-21cm":
        raw["field"].update(box_size="32 Mpc", n_cells=16, los_cells=16, redshift_max=9.0)
    raw["field"]["parameters"].update(parameters)
    return card_from_dict(raw)


def _no_compute(*args, **kwargs):
    raise AssertionError("simulated before refusing the card")


def test_drawing_an_inert_parameter_is_refused_before_any_compute(monkeypatch):
    monkeypatch.setattr(mock_fields, "lightcone_at_redshifts", _no_compute)
    monkeypatch.setattr(mock_fields, "coeval_box", _no_compute)
    monkeypatch.setattr(sensitivity, "_simulate", _no_compute)
    mock_fields._CACHE.clear()
    for name in ("L_X", "NU_X_THRESH"):
        card = _card(**{name: [38.0, 42.0] if name == "L_X" else [200.0, 1000.0]})
        with pytest.raises(InputError, match=rf"parameters\.{name}: changes nothing .*spin temperature.* fix it to a number or drop it"):
            mock_samples(card, 1)
        with pytest.raises(InputError, match=rf"parameters\.{name}"):
            sensitivity.check_sensitivity(card)
    # the density field is not ionised: a reionisation parameter drawn for it acts on nothing
    with pytest.raises(InputError, match=r"parameters\.HII_EFF_FACTOR: changes nothing"):
        mock_samples(_card("density-field", HII_EFF_FACTOR=[10.0, 100.0]), 1)
    # the single list: what the model reads; the X-ray parameters wait for a spin temperature
    assert "L_X" not in BRIGHTNESS_READS and "NU_X_THRESH" not in BRIGHTNESS_READS
    assert set(MODEL_READS["overdensity"]) < set(BRIGHTNESS_READS)
    assert inert_reason("Omega_m") is None and inert_reason("L_X") is not None


def test_fixed_inert_parameter_is_accepted_and_not_a_label():
    mock_fields._CACHE.clear()
    with_lx = mock_samples(_card(L_X=40.0, NU_X_THRESH=500.0), 2, seed=3)
    without = mock_samples(_card(), 2, seed=3)
    for a, b in zip(with_lx, without):
        labels = a.meta["labels"]
        assert "L_X" not in labels and "NU_X_THRESH" not in labels
        assert {"HII_EFF_FACTOR", "ION_Tvir_MIN", "R_BUBBLE_MAX", "OMm", "xHI_mean", "redshift"} <= set(labels)
        assert labels == b.meta["labels"]
        np.testing.assert_array_equal(a.values, b.values)  # fixed L_X indeed changes nothing


def test_acting_parameters_are_well_above_the_threshold():
    info = {}
    ratios = sensitivity.check_sensitivity(_card(), details=info)
    assert set(ratios) == {"HII_EFF_FACTOR", "ION_Tvir_MIN"}
    for name, ratio in ratios.items():
        assert ratio > 3 * sensitivity.THRESHOLD, (name, ratio, info)
        # each moves the global signal and the power spectrum, not only one of them
        assert min(info["per_summary"][name].values()) > sensitivity.THRESHOLD, (name, info)
    assert info["n_lightcones"] == 8


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
