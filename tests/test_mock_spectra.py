"""Realism checks of the 13-class spectrum generator (lines, resolution, BPT, colours, S/N,
and the magnitude-limited population: luminosity functions, magnitudes, redshifts)."""

import astropy.units as u
import numpy as np
import pytest
import speclite.filters
from astropy.cosmology import Planck18

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.common import C_ANGSTROM_S
from cosmofm.data_cards.mocks.generators import mock_object, mock_samples
from cosmofm.data_cards.mocks.images import band_fluxes
from cosmofm.data_cards.mocks.luminosity import BLUE, RED, SURVEY_WINDOW, redshift_density
from cosmofm.data_cards.mocks.spectra import (
    CLASSES, NEBULAR, R_BAND, R_TOP_HAT, draw_object, kauffmann03, kewley01, magnitude_model, rest_model,
)


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
    # chosen indices: the same objects as in the full run, serial or parallel, in the order asked
    for workers in (1, 2):
        picked = list(generate(card, 3, seed=9, workers=workers, indices=[5, 1, 3]))
        assert [s.id for s in picked] == [serial[i].id for i in (5, 1, 3)]
        np.testing.assert_array_equal(picked[0].values, serial[5].values)
    with pytest.raises(InputError, match="indices"):
        next(generate(card, 4, seed=9, indices=[1, 2]))


def _rank_correlation(a, b):
    """Spearman's rho (no ties in continuous draws)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.fixture(scope="module")
def population():
    """(class, z, r) of objects (31, 0..1299), as `mock_object` draws them."""
    objs = [mock_object(31, i)[0] for i in range(1300)]
    return np.array([o.cls for o in objs]), np.array([o.z for o in objs]), np.array([o.mags["r"] for o in objs])


def test_objects_are_deterministic_and_inside_the_survey_window(population):
    cls, z, r = population
    assert np.all((r >= SURVEY_WINDOW[0]) & (r <= SURVEY_WINDOW[1]))
    for index in (0, 7, 8, 9, 500):
        (a, na), (b, nb) = mock_object(31, index), mock_object(31, index)
        assert (a.cls, a.z, a.params, a.mags, na) == (b.cls, b.z, b.params, b.mags, nb)
        assert (a.cls, a.z, a.mags["r"]) == (cls[index], z[index], r[index])
    # every class's redshift range holds, and galaxies and QSOs fill more than a corner of it
    for name in ("GALAXY", "GALAXY_STARFORMING", "GALAXY_STARBURST", "QSO_BROADLINE"):
        zc = z[cls == name]
        assert len(zc) > 60 and np.ptp(zc) > 0.2, name


def test_galaxy_redshift_rises_with_apparent_magnitude(population):
    """As in a magnitude-limited survey: faint galaxies are farther, and more numerous.
    With r drawn uniformly and independently of z (the generator before the luminosity
    functions) both halves of the window have the same median z and rho ~ 0."""
    cls, z, r = population
    gal = np.char.startswith(cls.astype(str), "GALAXY")
    zg, rg = z[gal], r[gal]
    assert gal.sum() > 300
    bright = rg < np.mean(SURVEY_WINDOW)
    assert bright.sum() > 30
    assert np.median(zg[~bright]) - np.median(zg[bright]) > 0.05  # 0.10 here
    assert _rank_correlation(rg, zg) > 0.2  # 0.33 here
    assert np.sum(rg > 19.5) > 3 * np.sum(rg < 18.5)  # counts rise steeply with magnitude


def test_luminosity_functions_give_the_observed_median_redshifts():
    """Red + blue galaxies in the sky's proportions (the LFs' phi*), with the K-corrections
    of mock SEDs: median z 0.10 at r < 17.77 as SDSS's main sample (Strauss et al. 2002),
    0.2 at r < 19.8 as GAMA (Baldry et al. 2010)."""
    rng = np.random.default_rng(3)
    z = np.linspace(0.005, 0.4, 300)  # blue galaxies stop at their classes' z = 0.4
    medians = []
    for window in ((10.0, 17.77), (10.0, 19.8)):
        total = np.zeros_like(z)
        for cls, lf in (("GALAXY", RED), ("GALAXY_STARFORMING", BLUE)):
            for _ in range(12):
                _, k = magnitude_model(draw_object(rng, cls))
                total += redshift_density(lf, z, lambda zz: k(zz, lf.key), window)
        cdf = np.cumsum(total)
        medians.append(float(np.interp(0.5 * cdf[-1], cdf, z)))
    assert 0.085 < medians[0] < 0.12, medians
    assert 0.17 < medians[1] < 0.23, medians


def _ab_mag(f_lambda, wave, band):
    return float(speclite.filters.load_filter(band).get_ab_magnitude(f_lambda * u.erg / u.s / u.cm**2 / u.AA, wave * u.AA))


def test_magnitudes_are_those_of_the_spectrum():
    """`obj.mags` against the noiseless spectrum: r in the R_TOP_HAT, and every absolute
    magnitude through speclite from the rest-frame spectrum (exact K-correction, Planck18)."""
    wave = np.arange(900.0, 12000.0, 0.25)
    checked = set()
    for index in range(100):
        obj, norm = mock_object(12, index)
        if obj.cls.startswith("STAR") or obj.cls in checked:
            continue
        checked.add(obj.cls)
        f_obs = rest_model(obj, wave, 2000.0) * norm * 1e-17  # erg/s/cm^2/A
        top_hat = (wave >= R_TOP_HAT[0]) & (wave <= R_TOP_HAT[1])
        r = -2.5 * np.log10(f_obs[top_hat].mean() * R_BAND**2 / C_ANGSTROM_S / 3631e-23)
        assert r == pytest.approx(obj.mags["r"], abs=0.01), obj.cls
        # the spectrum the object would show at z_Q and 10 pc luminosity distance: M = its m
        f_10pc = lambda rest: np.interp(rest * (1 + obj.z), wave, f_obs) * (1 + obj.z) * (Planck18.luminosity_distance(obj.z).to_value("pc") / 10) ** 2  # noqa: E731
        for name, band, band_z in (("M_B", "bessell-B", 0.0), ("M_r", "sdss2010-r", 0.0), ("M_g(z=2)", "sdss2010-g", 2.0)):
            if name in obj.mags:
                lam = np.arange(3000.0, 8000.0, 0.25)
                assert _ab_mag(f_10pc(lam / (1 + band_z)) / (1 + band_z), lam, band) == pytest.approx(obj.mags[name], abs=0.01), (obj.cls, name)
    assert checked == {c for c in CLASSES if not c.startswith("STAR")}
