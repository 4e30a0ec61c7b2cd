"""The survey-realism spectrum mocks (`mock_realism: survey`, mocks/survey.py and its parts):
the default generator untouched, stellar physics in the right direction, galaxies unlike K
giants, out-of-set objects never labelled as one of the 13 classes, bad options named."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from cosmofm.data_cards import InputError, load_card
from cosmofm.data_cards.mocks import galaxy_sps, stellar
from cosmofm.data_cards.mocks.out_of_set import OOS_CLASSES, generate_out_of_set, mock_out_of_set
from cosmofm.data_cards.mocks.spectra import CLASSES, ObjectParams, mock_spectrum, wavelength_grid
from cosmofm.data_cards.mocks.stellar import StarParams
from cosmofm.data_cards.mocks.survey import survey_model

# sha256 (first 20 hex) of values, ivar (float64 bytes) and meta (JSON) of mock_spectrum(card, 11, index) for the
# first object of each class, computed with the generator as it was before the survey option existed (commit
# 117deb6): the default output must stay bit-identical. numpy's exp/log are reproducible on one platform; a new
# numpy or CPU could change the last bits -- then recompute these on the commit above, not on the new code.
DEFAULT_HASHES = [
    ("sdss-like", 0, "STAR_F5", "1077f570c4eff3403dce"), ("sdss-like", 1, "STAR_K5", "66956b5bf26984fe3ebe"),
    ("sdss-like", 2, "STAR_G2", "c4c6c2eef04181e471d1"), ("sdss-like", 3, "GALAXY_STARFORMING", "bb44ed41994dbb5a0f03"),
    ("sdss-like", 4, "STAR_K3", "fcc7010d24b25ac9f541"), ("sdss-like", 5, "QSO", "58f6b36b2edb1fa2e87b"),
    ("sdss-like", 6, "STAR_F9", "c3c18fc97e8fb2b9787f"), ("sdss-like", 7, "STAR_K1", "564ee2a75b67263a7043"),
    ("sdss-like", 9, "QSO_BROADLINE", "72343cefd1842b608ab9"), ("sdss-like", 12, "STAR_A0", "fa6d516578dfff013af5"),
    ("sdss-like", 21, "GALAXY_STARBURST", "c52dfe3a06a36e739c5f"), ("sdss-like", 23, "GALAXY_AGN", "35d59a604d26e86e7ef2"),
    ("sdss-like", 40, "GALAXY", "391d1874372af86c3a8c"),
    ("desi-like", 0, "STAR_F5", "f7cf4327d83a88161835"), ("desi-like", 3, "GALAXY_STARFORMING", "90467b05d24dcf4a3005"),
    ("desi-like", 5, "QSO", "93240f7c60a64e1fc938"), ("desi-like", 12, "STAR_A0", "82a35c3fcdb39421209e"),
    ("desi-like", 23, "GALAXY_AGN", "f9af761504b0b209e55b"), ("desi-like", 40, "GALAXY", "5756c6a48998866e8918"),
]


def _digest(sample) -> str:
    payload = np.ascontiguousarray(sample.values, dtype="<f8").tobytes() + np.ascontiguousarray(sample.ivar, dtype="<f8").tobytes()
    payload += json.dumps(sample.meta, sort_keys=True, default=float).encode()
    return hashlib.sha256(payload).hexdigest()[:20]


def test_default_generator_is_bit_identical():
    cards = {name: load_card(name) for name in ("sdss-like", "desi-like")}
    assert all(c.mock_realism == "basic" for c in cards.values())
    for name, index, cls, digest in DEFAULT_HASHES:
        sample = mock_spectrum(cards[name], 11, index)
        assert sample.meta["labels"]["spectral_class"] == cls
        assert _digest(sample) == digest, (name, index, cls)


REST = np.geomspace(3700.0, 9000.0, 30000)


def _ew(flux, lo, hi, side=20.0):
    """Equivalent width [A] over lo..hi against a line fitted to side bands of `side` A."""
    band = (REST > lo) & (REST < hi)
    sides = ((REST > lo - side) & (REST < lo)) | ((REST > hi) & (REST < hi + side))
    cont = np.polyval(np.polyfit(REST[sides], flux[sides], 1), REST[band])
    return float(np.trapezoid(1 - flux[band] / cont, REST[band])), flux[band] / cont, REST[band]


def _width_at(norm, wave, level):
    """Full width [A] of the part of a line deeper than `level` below the continuum."""
    below = wave[norm < 1 - level]
    return float(below.max() - below.min()) if below.size else 0.0


def test_log_g_widens_balmer_wings():
    """Stark wings grow with gravity: an A0 dwarf's H delta is wider at 20 % depth than a
    horizontal-branch star's (the D0.2 criterion of Xue et al. 2008); an F dwarf's too."""
    for teff, (g_lo, g_hi) in ((9600.0, (3.1, 4.3)), (6500.0, (3.5, 4.4))):
        widths = []
        for logg in (g_lo, g_hi):
            flux = stellar.star_spectrum(REST, StarParams(teff, logg, 0.0), 2000.0)
            _, norm, wave = _ew(flux, 4040.0, 4165.0, side=15.0)
            widths.append(_width_at(norm, wave, 0.2 if teff > 9000 else 0.1))
        assert widths[1] > 1.2 * widths[0] > 0, (teff, widths)


def test_metallicity_deepens_mg_b_and_reddening_reddens_by_ccm():
    ews = [_ew(stellar.star_spectrum(REST, StarParams(5800.0, 4.4, feh), 2000.0), 5155.0, 5200.0)[0] for feh in (-1.5, -0.5, 0.0)]
    assert ews[0] < ews[1] < ews[2] and ews[2] > 2.5 * ews[0], ews
    # E(B-V) reddens a continuum by 10^(-0.4 E(B-V) [k(4400) - k(5500)] R_V), ~10^(-0.4 E(B-V)) for CCM89 at R_V = 3.1
    obj = ObjectParams("STAR_G2", 0.0, {"teff": 5800.0, "logg": 4.4, "feh": 0.0, "ebv_mw": 0.0})
    wave = np.array([4400.0, 5500.0, 8000.0])
    clear = survey_model(obj, wave, 2000.0)
    obj.params["ebv_mw"] = 0.2
    red = survey_model(obj, wave, 2000.0)
    k = stellar.ccm89(wave) * 3.1
    expected = 10 ** (-0.4 * 0.2 * (k[0] - k[1]))
    assert (red[0] / red[1]) / (clear[0] / clear[1]) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(10 ** (-0.4 * 0.2), rel=0.01)  # A_B - A_V = E(B-V)
    assert red[2] / red[1] > clear[2] / clear[1]


def test_quiescent_galaxy_differs_from_a_k_giant_of_its_colour():
    """An old population at sigma = 250 km/s (z ~ 0.005: rest ~ observed) beside the K giant
    with the same 4700 / 6300 A colour: shallower but broader Mg b, stronger Mg b (alpha
    enhancement, dwarfs), Na D and H beta (turn-off stars)."""
    p = {"sigma_kms": 250.0, "ssp_weights": [1.0], "ssp_ages_gyr": [10.0], "feh": 0.1, "alpha_fe": 0.25}
    gal = galaxy_sps.galaxy_continuum(REST, p, 2000.0)

    def colour(f):
        return f[(REST > 4400) & (REST < 5000)].mean() / f[(REST > 6000) & (REST < 6600)].mean()

    teffs = np.arange(4200.0, 5600.0, 50.0)
    giants = [stellar.star_spectrum(REST, StarParams(t, 2.5, 0.0), 2000.0) for t in teffs]
    giant = giants[int(np.argmin([abs(colour(g) - colour(gal)) for g in giants]))]
    assert colour(giant) == pytest.approx(colour(gal), rel=0.03)
    (ew_g, norm_g, wave), (ew_k, norm_k, _) = _ew(gal, 5155.0, 5200.0), _ew(giant, 5155.0, 5200.0)
    assert norm_g.min() > norm_k.min() + 0.05  # shallower
    assert _width_at(norm_g, wave, 0.15) > _width_at(norm_k, wave, 0.15) + 3.0  # broader [A]
    assert ew_g > ew_k
    assert _ew(gal, 5880.0, 5910.0)[0] > _ew(giant, 5880.0, 5910.0)[0]
    assert _ew(gal, 4850.0, 4875.0)[0] > _ew(giant, 4850.0, 4875.0)[0]


def test_survey_emission_regions_keep_their_labels():
    """LINER-like lines only in quiescent galaxies (weak: EW(Halpha) < 3 A); composites only among
    star-forming galaxies, between Kauffmann 2003 and Kewley 2001 and below SDSS's AGN line."""
    from cosmofm.data_cards.mocks.spectra import draw_object, kauffmann03, kewley01

    rng = np.random.default_rng(8)
    regions = set()
    for cls in ("GALAXY", "GALAXY_STARFORMING", "GALAXY_STARBURST", "GALAXY_AGN"):
        for _ in range(40):
            p = draw_object(rng, cls).params
            p.update(galaxy_sps.draw_population(rng, cls, p))
            region = p.get("bpt_region")
            regions.add((cls, region))
            x, y = p["log_n2ha"], p["log_o3hb"]
            if region == "liner":
                assert cls == "GALAXY" and p["halpha_ew"] < 3 and x > -0.25
            if region == "composite":
                assert cls == "GALAXY_STARFORMING" and kauffmann03(x) < y < min(kewley01(x), galaxy_sps.brinchmann04(x))
    assert {r for _, r in regions} == {None, "liner", "composite"}


def test_out_of_set_objects_never_carry_a_class_label():
    card = load_card("sdss-like-survey")
    samples = generate_out_of_set(card, 25, seed=4)
    labels = {s.meta["labels"]["spectral_class"] for s in samples}
    assert labels <= set(OOS_CLASSES) and not labels & set(CLASSES)
    assert labels == set(OOS_CLASSES)  # 25 draws see every kind
    for s in samples:
        assert s.meta["out_of_set"] is True and np.all(np.isfinite(s.values)) and np.all(s.ivar >= 0)
    # M stars show TiO; white dwarfs broad Balmer lines
    m_star = mock_out_of_set(card, 1, 0, "OOS_MSTAR").meta["truth"]["params"]
    assert m_star["teff"] < 3900
    wd = mock_out_of_set(card, 1, 1, "OOS_WD")
    assert wd.meta["labels"]["spectral_class"] == "OOS_WD"


def test_survey_card_makes_finite_spectra_of_the_thirteen_classes():
    card = load_card("sdss-like-survey")
    assert card.mock_realism == "survey"
    basic = load_card("sdss-like")
    snr, masked = [], []
    for index in range(14):
        s = mock_spectrum(card, 11, index)
        assert np.all(np.isfinite(s.values)) and np.all(np.isfinite(s.ivar)) and np.all(s.ivar >= 0)
        assert s.values.shape == wavelength_grid(card).shape
        assert s.meta["mock_realism"] == "survey"
        twin = mock_spectrum(basic, 11, index)  # the same object: class and redshift
        assert s.meta["labels"] == twin.meta["labels"]
        snr.append(np.median(np.abs(s.values) * np.sqrt(s.ivar)))
        masked.append(np.mean(s.ivar == 0))
        params = s.meta["truth"]["params"]
        if s.meta["labels"]["spectral_class"].startswith("STAR"):
            assert {"logg", "feh", "ebv_mw"} <= set(params)
    assert min(snr) > 1.0 and max(snr) < 150.0 and np.ptp(np.log(snr)) > 1.0  # S/N spread over 2-100
    assert max(masked) > 0
    again = mock_spectrum(card, 11, 3)
    np.testing.assert_array_equal(again.values, mock_spectrum(card, 11, 3).values)


def test_bad_option_values_raise_input_error_naming_the_field(tmp_path):
    import yaml

    raw = load_card("sdss-like").to_dict()
    raw["spectrum"]["mock_realism"] = "realistic"
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError, match=r"sdss-like\.spectrum\.mock_realism"):
        load_card(path)
    with pytest.raises(InputError, match="mock_realism"):
        dataclasses.replace(load_card("sdss-like"), mock_realism="survey-ish")
    with pytest.raises(InputError, match="kind"):
        mock_out_of_set(load_card("sdss-like"), 0, 0, kind="OOS_QUASAR")
    with pytest.raises(InputError, match="kinds"):
        generate_out_of_set(load_card("sdss-like"), 2, kinds=("STAR_K1",))


def test_instrument_calibration_masks_and_snr():
    from cosmofm.data_cards.mocks import instrument

    wave = wavelength_grid(load_card("sdss-like"))
    for seed in range(5):
        calib = instrument.calibration_error(wave, np.random.default_rng(seed))
        assert 0.049 < np.std(calib) < 0.101  # 5-10 % rms
        assert np.max(np.abs(np.diff(calib, 2))) < 1e-5  # smooth: no pixel-scale structure
    model = stellar.star_spectrum(wave, StarParams(5800.0, 4.4, 0.0), 2000.0)
    snrs, runs = [], 0
    for seed in range(30):
        flux, ivar, and_mask, info = instrument.observe_survey(model, wave, 2000.0, np.random.default_rng(seed))
        assert np.all(ivar[and_mask > 0] == 0) and np.all(ivar[and_mask == 0] > 0)
        bad = (and_mask & instrument.BAD_COLUMN) > 0
        runs += int(np.any(bad[1:] & bad[:-1]))  # a run of >= 2 masked pixels: a bad column
        assert instrument.SNR_RANGE[0] <= info["snr_target"] <= instrument.SNR_RANGE[1]
        snrs.append(np.median(np.abs(flux[ivar > 0]) * np.sqrt(ivar[ivar > 0])) / info["snr_target"])
    assert runs > 10
    assert np.median(snrs) == pytest.approx(1.0, rel=0.2)  # the median S/N is the drawn one
    bright, faint = (instrument.observe_survey(model, wave, 2000.0, np.random.default_rng(1), r)[3]["snr_target"] for r in (16.5, 20.5))
    assert bright > 50 and faint < 4  # S/N follows the magnitude: 100 -> 2 over the survey window


def test_readers_never_pick_a_mock_variant_card_unasked():
    """sdss-like-survey shares sdss-like's grid; a file with that coverage and no survey markers reads as sdss-like."""
    from cosmofm.data_cards.readers.common import choose_card

    card, _ = choose_card(None, "spectrum", "spec.fits", coverage=(3600.0, 10400.0))
    assert card.name == "sdss-like" and load_card("sdss-like-survey").wavelength_min == card.wavelength_min
