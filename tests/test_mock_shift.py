"""Shifted survey mocks (`mock_shift` on a survey spectrum card): the same objects under
observing conditions the training set never had, each factor doing what it names, the
unshifted card bit-identical, bad shifts named."""

import dataclasses

import numpy as np
import pytest
import yaml

from cosmofm.data_cards import InputError, load_card
from cosmofm.data_cards.mocks.instrument import SKY_LINES
from cosmofm.data_cards.mocks.spectra import Z_RANGE, mock_spectrum

CARD = load_card("sdss-like-survey")
INDICES = range(12)


def _shifted(**shift):
    card = dataclasses.replace(CARD, mock_shift=shift)
    return [mock_spectrum(card, 3, i) for i in INDICES]


@pytest.fixture(scope="module")
def unshifted():
    return [mock_spectrum(CARD, 3, i) for i in INDICES]


def test_factors_of_one_leave_the_mocks_bit_identical(unshifted):
    ones = _shifted(ebv_scale=1, calibration_scale=1, sky_residual_scale=1, snr_scale=1)
    for a, b in zip(unshifted, ones):
        assert np.array_equal(a.values, b.values) and np.array_equal(a.ivar, b.ivar)


def test_each_factor_scales_what_it_names_on_the_same_objects(unshifted):
    dust = _shifted(ebv_scale=3)
    calib = _shifted(calibration_scale=2)
    noisy = _shifted(snr_scale=0.5)
    sky = _shifted(sky_residual_scale=4)
    for i, base in enumerate(unshifted):
        assert dust[i].meta["labels"] == base.meta["labels"]  # same object
        assert dust[i].meta["truth"]["params"]["ebv_mw"] == pytest.approx(3 * base.meta["truth"]["params"]["ebv_mw"], rel=1e-12)
        assert calib[i].meta["truth"]["instrument"]["calib_rms"] == pytest.approx(2 * base.meta["truth"]["instrument"]["calib_rms"], rel=1e-9)
        assert noisy[i].meta["truth"]["instrument"]["snr_target"] == pytest.approx(0.5 * base.meta["truth"]["instrument"]["snr_target"], rel=1e-12)
        # sky residuals change the flux by more than 1 % of its noise only near sky lines
        wave = base.coords["wavelength"]
        gap = np.min(np.abs(wave[:, None] - SKY_LINES[None, :]), axis=1)
        changed = np.abs(sky[i].values - base.values) * np.sqrt(base.ivar) > 0.01
        assert changed[gap < 3.0].mean() > 0.3 and not changed[gap > 20.0].any()
    # more dust: redder spectra (blue-to-red flux ratio falls for every object)
    blue, red = slice(200, 800), slice(3800, 4400)
    ratio = [np.median(d.values[blue]) / np.median(d.values[red]) < np.median(b.values[blue]) / np.median(b.values[red])
             for d, b in zip(dust, unshifted)]
    assert np.mean(ratio) >= 0.75


def test_redshift_ranges_map_galaxies_and_qsos_and_leave_stars(unshifted):
    moved = _shifted(galaxy_z_range=[0.8, 1.0], qso_z_range=[3.5, 4.0])
    for base, new in zip(unshifted, moved):
        cls, z, z_new = base.meta["labels"]["spectral_class"], base.meta["labels"]["redshift"], new.meta["labels"]["redshift"]
        assert new.meta["labels"]["spectral_class"] == cls
        if cls.startswith("STAR"):
            assert z_new == z
        else:
            lo, hi = (0.8, 1.0) if cls.startswith("GALAXY") else (3.5, 4.0)
            a, b = Z_RANGE[cls]
            assert lo <= z_new <= hi and z_new == pytest.approx(lo + (z - a) / (b - a) * (hi - lo))
    assert any(not s.meta["labels"]["spectral_class"].startswith("STAR") for s in unshifted)


@pytest.mark.parametrize("shift, match", [
    ({"dust": 2}, r"mock_shift\.dust.*not a known shift"),
    ({"ebv_scale": 0}, r"mock_shift\.ebv_scale.*positive"),
    ({"snr_scale": "low"}, r"mock_shift\.snr_scale"),
    ({"galaxy_z_range": [1.0, 0.8]}, r"mock_shift\.galaxy_z_range.*increasing"),
    ({"qso_z_range": [3.5]}, r"mock_shift\.qso_z_range"),
])
def test_bad_shifts_name_the_field(shift, match):
    with pytest.raises(InputError, match=match):
        dataclasses.replace(CARD, mock_shift=shift)


def test_basic_mocks_cannot_be_shifted(tmp_path):
    with pytest.raises(InputError, match=r"sdss-like\.spectrum\.mock_shift.*survey"):
        dataclasses.replace(load_card("sdss-like"), mock_shift={"snr_scale": 0.5})
    text = tmp_path / "c.yaml"
    raw = CARD.to_dict()
    raw["spectrum"]["mock_shift"] = {"calibration_scale": 2}
    text.write_text(yaml.safe_dump(raw))
    assert load_card(text).mock_shift == {"calibration_scale": 2.0}
