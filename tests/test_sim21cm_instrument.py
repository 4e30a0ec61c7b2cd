"""The SKA-Low instrument block of a 21cm `FieldCard`: card fields, beam, thermal noise, wedge (issue 18).

A card's `instrument:` block (schema.FieldInstrument) makes `mock_field` return the field as
SKA-Low sees it (`fields.observe_field`: beam -> thermal noise -> wedge cut); a card
without one must give exactly what it gave before.
"""

import numpy as np
import pytest
import yaml

from cosmofm.data_cards import InputError, available_cards, load_card
from cosmofm.data_cards import schema
from cosmofm.data_cards.mocks import fields
from cosmofm.data_cards.mocks.common import object_rng
from cosmofm.data_cards.mocks.fields import FIDUCIAL, mock_field, noise_seed, observe_field
from cosmofm.data_cards.mocks.sim21cm import cosmology
from cosmofm.data_cards.mocks.sim21cm.observe import (
    SKA_LOW_LAYOUTS, beam_fwhm, primary_beam_theta_deg, ska_low, smooth_beam, thermal_noise_sigma, wedge_slope,
)
from cosmofm.data_cards.schema import FieldInstrument, card_from_dict

CELL = 2.0  # Mpc, the cells of the small test card


def _raw(**instrument):
    """The shipped ska-low-21cm card shrunk to 16^3 chunks over z = 7-8 (~0.5 s a lightcone)."""
    raw = load_card("ska-low-21cm").to_dict()
    raw["field"].update(box_size="32 Mpc", n_cells=16, los_cells=16, redshift_min=7.0, redshift_max=8.0,
                        parameters={"HII_EFF_FACTOR": [20.0, 40.0], "ION_Tvir_MIN": 4.7})
    raw["labels"] = [lab for lab in raw["labels"] if lab["name"] in ("HII_EFF_FACTOR", "xHI_mean", "redshift")]
    raw["field"]["instrument"].update(instrument)
    return raw


def _card(**instrument):
    return card_from_dict(_raw(**instrument))


def _clean(card):
    """The same card without its instrument: the simulated field plus noise_sigma white noise."""
    raw = card.to_dict()
    raw["field"].pop("instrument")
    return card_from_dict(raw)


def _chunk_z(sample):
    return cosmology(FIDUCIAL).redshift_at_distance(sample.coords["los_distance"])


def _wedge_mask(shape, z_mid, buffer, theta_deg=90.0):
    kz, ky, kx = (2 * np.pi * np.fft.fftfreq(n, CELL) for n in shape)
    k_par = np.abs(kz)[:, None, None]
    k_perp = np.sqrt(ky[None, :, None] ** 2 + kx[None, None, :] ** 2)
    inside = k_par < float(wedge_slope(z_mid, FIDUCIAL, theta_deg)) * k_perp + buffer
    inside.flat[0] = False
    return inside


def test_shipped_card_is_lightcone_21cm_observed():
    card, plain = load_card("ska-low-21cm"), load_card("lightcone-21cm")
    assert "ska-low-21cm" in available_cards()
    assert [lab.name for lab in card.labels] == [lab.name for lab in plain.labels]
    assert {k: v for k, v in card.to_dict()["field"].items() if k != "instrument"} == plain.to_dict()["field"]
    inst = card.instrument
    assert (inst.telescope, inst.layout, inst.noise_model, inst.wedge, inst.beam) == ("ska-low", "AA4", "radiometer", "horizon", "max-baseline")
    assert inst.integration_time.to_value("h") == 1000.0 and inst.max_baseline.to_value("km") == 2.0
    assert inst.wedge_buffer.to_value("1 / Mpc") == pytest.approx(0.1 * FIDUCIAL.hlittle, rel=1e-3)  # 0.1 h/Mpc
    assert ska_low("AA4").n_stations == 512 and ska_low("AA*").n_stations == 307


def test_instrument_fields_parse_with_units(tmp_path):
    card = _card(integration_time="2 d", max_baseline="2500 m", wedge_buffer="0.1 / Mpc", layout="AA*")
    inst = card.instrument
    assert inst.integration_time.unit == "h" and inst.integration_time.value == pytest.approx(48.0)
    assert inst.max_baseline.unit == "km" and inst.max_baseline.value == pytest.approx(2.5)
    assert inst.wedge_buffer.to_value("1 / Mpc") == pytest.approx(0.1)
    # YAML round trip, and a block built in Python is validated the same way
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(card.to_dict()))
    assert load_card(path).to_dict() == card.to_dict()
    raw = _raw()
    raw["field"]["instrument"] = FieldInstrument(layout="AA2")
    assert card_from_dict(raw).instrument.layout == "AA2"
    # a card without the block reads exactly as before the block existed
    assert "instrument" not in load_card("lightcone-21cm").to_dict()["field"]
    assert load_card("lightcone-21cm").instrument is None


@pytest.mark.parametrize("field, value, words", [
    ("integration_time", "-5 h", "must be positive"),
    ("integration_time", "5 Mpc", "cannot be converted"),
    ("layout", "AA5", "not allowed"),
    ("wedge", "cone", "not allowed"),
    ("noise_model", "gaussian", "not allowed"),
    ("max_baseline", 2, "has no unit"),
    ("wedge_buffer", "-0.1 / Mpc", ">= 0"),
    ("wedge_chunk", 2.5, "whole number"),
    ("colour", "red", "unknown field"),
])
def test_bad_instrument_values_name_the_field(field, value, words):
    with pytest.raises(InputError) as e:
        _card(**{field: value})
    assert f"ska-low-21cm.field.instrument.{field}" in str(e.value) and words in str(e.value)


def test_instrument_only_for_brightness_in_mk():
    raw = _raw()
    raw["field"].update(quantity="overdensity", unit="", parameters={"OMm": 0.31})
    with pytest.raises(InputError, match="ska-low-21cm.field.instrument"):
        card_from_dict(raw)
    raw = _raw()
    raw["field"]["unit"] = "K"
    with pytest.raises(InputError, match="ska-low-21cm.field.unit"):
        card_from_dict(raw)


def test_ivar_is_the_radiometer_sigma_of_the_chunk_slices():
    for layout in ("AA4", "AA*"):
        card = _card(layout=layout, integration_time="500 h", wedge="none")
        s = mock_field(card, 1, 4)
        z = _chunk_z(s)
        sigma = thermal_noise_sigma(z, CELL, 500.0, ska_low(layout), FIDUCIAL)
        assert 150 < sigma.mean() < 1000  # mK per 2 Mpc voxel at z ~ 7.5, AA4 / AA*, 500 h
        np.testing.assert_allclose(s.ivar, np.broadcast_to(1 / sigma[:, None, None] ** 2, s.shape), rtol=1e-6)
    # fewer stations: noisier by 512 / 307
    sigma_aa4 = thermal_noise_sigma(z, CELL, 500.0, ska_low("AA4"), FIDUCIAL)
    np.testing.assert_allclose(sigma / sigma_aa4, 512 / 307)
    # ...and that sigma is the noise actually added (no beam, no wedge, no signal)
    quiet = _card(beam="none", wedge="none")
    zs = np.linspace(7.0, 7.5, 32)
    seen, ivar = observe_field(quiet, np.zeros((32, 16, 16)), zs, seed=5)
    np.testing.assert_allclose(seen.std(axis=(1, 2)), ivar[:, 0, 0] ** -0.5, rtol=0.2)
    assert seen.std() / np.mean(ivar[:, 0, 0] ** -0.5) == pytest.approx(1.0, abs=0.05)


def test_observed_chunk_has_no_power_inside_the_wedge():
    card = _card()
    buffer = card.instrument.wedge_buffer.to_value("1 / Mpc")
    for index in (2, 3):  # two chunks of one lightcone, each its own wedge box
        seen = mock_field(card, 0, index)
        clean = mock_field(_clean(card), 0, index)
        inside = _wedge_mask(seen.shape, np.mean(_chunk_z(seen)), buffer)
        assert 0.5 < inside.mean() < 0.99  # the horizon wedge at z ~ 7.5 (slope ~3.5) holds most modes of a 16^3 box
        f_seen, f_clean = np.abs(np.fft.fftn(seen.values)) ** 2, np.abs(np.fft.fftn(clean.values)) ** 2
        assert f_seen[inside].sum() < 1e-12 * f_seen.sum()  # zero up to Sample's float32 rounding
        assert f_clean[inside].sum() > 0.3 * f_clean[~inside].sum()
    # the primary-beam wedge (first null of a 38 m station, ~3.5 deg at z = 7.5) is much narrower
    theta = float(primary_beam_theta_deg(7.5))
    assert 3.0 < theta < 4.0
    narrow = mock_field(_card(wedge="primary-beam"), 0, 2)
    between = _wedge_mask(narrow.shape, np.mean(_chunk_z(narrow)), buffer) & ~_wedge_mask(narrow.shape, np.mean(_chunk_z(narrow)), buffer, theta)
    f_narrow = np.abs(np.fft.fftn(narrow.values)) ** 2
    assert between.mean() > 0.4 and f_narrow[between].sum() > 0.5 * f_narrow.sum()


def test_beam_is_lambda_over_baseline_and_smooths_by_the_gaussian():
    fwhm = float(beam_fwhm(8.0, 2.0, FIDUCIAL))
    theta = 0.21106114 * 9.0 / 2000.0  # rad: 21 cm (1 + z) / 2 km
    assert fwhm == pytest.approx(theta * float(cosmology(FIDUCIAL).comoving_distance(8.0)))
    assert 8.0 < fwhm < 9.5  # Mpc
    # a point source smoothed is a Gaussian of that FWHM (per slice, growing with z)
    n, cell = 64, 0.5
    point = np.zeros((2, n, n))
    point[:, n // 2, n // 2] = 1.0
    z = np.array([8.0, 10.0])
    image = smooth_beam(point, z, cell, 2.0, FIDUCIAL)
    for i in range(2):
        row = image[i, n // 2]
        above = np.flatnonzero(row >= row.max() / 2)
        measured = (above[-1] - above[0] + 1) * cell  # within a cell of the FWHM
        assert abs(measured - beam_fwhm(z[i], 2.0, FIDUCIAL)) <= cell
    assert image[0].sum() == pytest.approx(1.0)  # flux kept
    # white noise: the power at each k_perp drops by the Gaussian's exp(-k^2 sigma^2)
    rng = np.random.default_rng(0)
    white = rng.standard_normal((1, 32, 32))
    smooth = smooth_beam(white, [8.0], CELL, 2.0, FIDUCIAL)
    k = 2 * np.pi * np.fft.fftfreq(32, CELL)
    k_perp = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    ratio = np.abs(np.fft.fft2(smooth[0])) ** 2 / np.abs(np.fft.fft2(white[0])) ** 2
    expected = np.exp(-(k_perp * fwhm / (2 * np.sqrt(2 * np.log(2)))) ** 2)
    high = (k_perp > 0.5) & (expected > 1e-12)  # below, float64 round-off of the FFT dominates
    assert expected[high].max() < 0.2
    np.testing.assert_allclose(ratio[high], expected[high], rtol=1e-6)


def test_beam_matches_tools21cm_smoothing_scale():
    t2c = pytest.importorskip("tools21cm")
    for z in (6.0, 8.0, 12.0):
        theirs = (1 + z) * 21e-5 / 2.0 * t2c.cosmo.z_to_cdist(z)  # smooth_coeval's FWHM, Mpc
        assert beam_fwhm(z, 2.0, FIDUCIAL) == pytest.approx(theirs, rel=0.02)


def test_observation_is_deterministic_in_seed_and_index():
    card = _card()
    first = mock_field(card, 3, 5)
    fields._CACHE.clear()
    again = mock_field(card, 3, 5)
    np.testing.assert_array_equal(first.values, again.values)
    np.testing.assert_array_equal(first.ivar, again.ivar)
    other = mock_field(card, 4, 5)
    assert not np.allclose(first.values, other.values)
    # a chunk is cut from one observation of its whole lightcone, seeded per (seed, realisation)
    n_los, per = fields._layout(card)
    r, j = divmod(5, per)
    values, _, z, *_ = fields._realisation(card, 3, r, n_los)
    offset = int(object_rng(3, r, 6).integers(0, n_los - per * card.los_cells + 1))
    whole, _ = observe_field(card, values, z, noise_seed(3, r), start=offset)
    np.testing.assert_array_equal(first.values, whole[offset + j * 16:offset + (j + 1) * 16].astype(np.float32))


def test_coeval_boxes_are_observed_too():
    raw = _raw()
    raw["field"]["lightcone"] = False
    card = card_from_dict(raw)
    s = mock_field(card, 0, 1)
    sigma = thermal_noise_sigma(np.full(16, 7.0), CELL, 1000.0, ska_low("AA4"), FIDUCIAL)
    kept = 1 - np.mean(_wedge_mask(s.shape, 7.0, card.instrument.wedge_buffer.to_value("1 / Mpc")))
    np.testing.assert_allclose(s.ivar, 1 / (kept * sigma[0] ** 2), rtol=1e-5)
    f = np.abs(np.fft.fftn(s.values)) ** 2
    inside = _wedge_mask(s.shape, 7.0, card.instrument.wedge_buffer.to_value("1 / Mpc"))
    assert f[inside].sum() < 1e-12 * f.sum() and f[~inside].sum() > 0
    np.testing.assert_array_equal(s.values, mock_field(card, 0, 1).values)


def test_card_without_instrument_is_unchanged():
    card = _clean(_card())
    s = mock_field(card, 2, 3)
    n_los, per = fields._layout(card)
    r, j = divmod(3, per)
    values, *_ = fields._realisation(card, 2, r, n_los)
    offset = int(object_rng(2, r, 6).integers(0, n_los - per * card.los_cells + 1))
    chunk = values[offset + j * 16:offset + (j + 1) * 16]
    noisy = chunk + object_rng(2, 3, 4).normal(0.0, card.noise_sigma, chunk.shape)
    np.testing.assert_array_equal(s.values, noisy.astype(np.float32))  # Sample stores float32
    assert s.ivar.dtype == np.float32 and np.all(s.ivar == np.float32(1 / card.noise_sigma**2))
    # noise_model "none" keeps noise_sigma's white noise (so ivar stays finite), beam and wedge off: signal + noise only
    plain = _card(noise_model="none", beam="none", wedge="none")
    quiet = mock_field(plain, 2, 3)
    assert np.all(quiet.ivar == np.float32(1 / plain.noise_sigma**2))
    assert np.std(quiet.values - chunk) == pytest.approx(plain.noise_sigma, rel=0.05)


def test_tools21cm_noise_sets_the_empirical_ivar():
    pytest.importorskip("tools21cm")
    card = _card(noise_model="tools21cm", beam="none", wedge="none")
    zs = np.linspace(7.0, 7.3, 16)
    seen, ivar = observe_field(card, np.zeros((16, 16, 16)), zs, seed=2)
    np.testing.assert_allclose(ivar[:, 0, 0], 1 / seen.std(axis=(1, 2)) ** 2, rtol=1e-5)
    assert 5.0 < seen.std() < 200.0  # mK: the uv-gridded AA4 cube is quieter per voxel than the radiometer's


def test_layouts_match_tools21cm_station_counts():
    assert set(schema.SKA_LOW_LAYOUTS) == set(SKA_LOW_LAYOUTS)  # the card's choices are the layouts observe knows
    t2c = pytest.importorskip("tools21cm")
    for name, n in SKA_LOW_LAYOUTS.items():
        assert t2c.radio_telescope_layout.get_SKA_Low_layout(name, unit="enu", verbose=False).shape[0] == n


def test_ivar_after_the_wedge_cut_is_the_variance_of_the_filtered_noise():
    """The cut keeps a few % of the modes: ivar follows the noise left in the data, slice by slice."""
    card = _card(beam="none")
    zs = np.linspace(6.0, 9.0, 64)  # four wedge chunks of 16 slices, sigma rising 2x across them
    noise = np.stack([observe_field(card, np.zeros((64, 16, 16)), zs, seed=s)[0] for s in range(12)])
    _, ivar = observe_field(card, np.zeros((64, 16, 16)), zs, seed=0)
    sigma = thermal_noise_sigma(zs, CELL, 1000.0, ska_low("AA4"), FIDUCIAL)
    measured = noise.var(axis=(0, 2, 3))
    assert np.all(measured < 0.2 * sigma**2)  # the cut removes most of the noise...
    for part in (slice(0, 16), slice(16, 32), slice(32, 48), slice(48, 64)):  # ...and ivar says how much, per chunk
        assert np.mean(measured[part]) * np.mean(ivar[part, 0, 0]) == pytest.approx(1.0, abs=0.08)
