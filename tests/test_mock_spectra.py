"""Realism checks of the 13-class spectrum generator (lines, resolution, BPT, colours, S/N)."""

import numpy as np
import pytest

from cosmofm.data_cards.mocks.generators import mock_object, mock_samples
from cosmofm.data_cards.mocks.images import band_fluxes
from cosmofm.data_cards.mocks.spectra import CLASSES, NEBULAR, draw_object, kauffmann03, kewley01, rest_model


def _line_moments(obj, line, resolving_power):
    """Centre and sigma of one emission line, measured on the noiseless spectrum."""
    centre = NEBULAR[line] * (1 + obj.z)
    wave = np.linspace(centre - 40, centre + 40, 4001)
    flux = rest_model(obj, wave, resolving_power)
    side = np.abs(wave - centre) > 25
    line_flux = flux - np.polyval(np.polyfit(wave[side], flux[side], 1), wave)  # linear continuum from the sidebands
    core = np.abs(wave - centre) < 15
    w = np.clip(line_flux[core], 0, None)
    mean = np.sum(w * wave[core]) / w.sum()
    return mean, np.sqrt(np.sum(w * (wave[core] - mean) ** 2) / w.sum())


@pytest.mark.parametrize("resolving_power", [2000.0, 20000.0])
def test_line_position_and_width_follow_redshift_and_resolution(resolving_power):
    obj = draw_object(np.random.default_rng(4), "GALAXY_STARBURST")
    obj.params["gas_sigma_kms"] = 30.0
    mean, sigma = _line_moments(obj, "OIII_5008", resolving_power)  # isolated: 4960 is 48 A away
    centre = NEBULAR["OIII_5008"] * (1 + obj.z)
    expected = np.hypot(centre * 30.0 / 299792.458, centre / resolving_power / 2.3548)
    assert mean == pytest.approx(centre, abs=0.05)
    assert sigma == pytest.approx(expected, rel=0.05)


def test_bpt_positions_by_class():
    rng = np.random.default_rng(0)
    for cls in ("GALAXY_STARFORMING", "GALAXY_STARBURST", "GALAXY_AGN"):
        for _ in range(100):
            obj = draw_object(rng, cls)
            rest_model(obj, np.linspace(3500, 9000, 2000) * (1 + obj.z), 2000.0)
            x = np.log10(obj.lines["NII_6585"] / obj.lines["Halpha"])
            y = np.log10(obj.lines["OIII_5008"] / obj.lines["Hbeta"])
            if cls == "GALAXY_AGN":
                assert x > 0.47 or y > kewley01(x), (cls, x, y)
            else:
                assert x < 0.05 and y < kauffmann03(x), (cls, x, y)


def test_all_thirteen_classes_and_their_redshifts(cards):
    spectra = mock_samples(cards["sdss-like"], 260, seed=5)
    classes = {s.meta["labels"]["spectral_class"] for s in spectra}
    assert classes == set(CLASSES)
    z = {c: [s.meta["labels"]["redshift"] for s in spectra if s.meta["labels"]["spectral_class"] == c] for c in classes}
    assert max(abs(v) for v in z["STAR_G2"]) < 0.002  # radial velocities, not cosmology
    assert min(z["QSO_BROADLINE"]) > 0.3 and max(z["GALAXY_STARBURST"]) < 0.31


def test_spectra_signal_to_noise_matches_the_card(cards):
    card = cards["sdss-like"]
    snr = [np.median(np.abs(s.values) * np.sqrt(s.ivar)) for s in mock_samples(card, 60, seed=2)]
    assert np.median(snr) == pytest.approx(card.typical_snr, rel=0.35)
    masked = np.mean([np.mean(s.ivar == 0) for s in mock_samples(card, 20, seed=2)])
    assert 0 < masked < 0.01


def test_image_fluxes_match_the_spectrum_colours(cards):
    """Total stamp flux per band (a star: point source) equals the flux integrated from its spectrum."""
    card = cards["lsst-like"]
    for index in range(40):
        obj, norm = mock_object(7, index)
        if obj.cls.startswith("STAR"):
            break
    image = mock_samples(card, 1, seed=7, start=index)[0]
    expected = band_fluxes(card, obj, norm)  # through the real filter curves, as the stamps are
    measured = image.values.sum(axis=(1, 2))  # stamps are in nJy per pixel
    noise = np.array([b.sky_noise for b in card.bands]) * image.shape[1]  # sqrt(n_pixels) x sigma
    assert np.all(np.abs(measured - expected) < 0.03 * expected + 4 * noise)
    # colours, not just total flux: g-r and r-i agree to a few percent
    assert measured[1] / measured[2] == pytest.approx(expected[1] / expected[2], rel=0.05)


def test_parallel_generation_equals_serial(cards):
    from cosmofm.data_cards.mocks.generators import generate

    card = cards["sdss-like"]
    serial = list(generate(card, 6, seed=9, workers=1))
    parallel = list(generate(card, 6, seed=9, workers=2))
    assert [s.id for s in parallel] == [s.id for s in serial]
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a.values, b.values)
        np.testing.assert_array_equal(a.ivar, b.ivar)
