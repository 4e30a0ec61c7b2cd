"""Realism checks of the image and blend generator (data_cards/mocks/images.py, blends.py).

Survey numbers against surveycodex, colours against speclite and the paired spectrum,
pixels against GalSim's own drawImage, sizes / fluxes / shapes / PSF / noise against
their inputs, and blend truth against the blended stamp.
"""

import copy

import astropy.units as u
import galsim
import numpy as np
import pytest
import speclite.filters
import surveycodex

from cosmofm.data_cards import InputError, load_card
from cosmofm.data_cards.mocks.common import C_ANGSTROM_S
from cosmofm.data_cards.mocks.images import (
    MAX_HLR,
    MIN_HLR,
    NJY_AB_ZP,
    SURVEYS,
    Source,
    band_fluxes,
    draw_source,
    filter_names,
    galsim_profile,
    mock_image,
    psf_profile,
    render,
    sky_noise_njy,
)
from cosmofm.data_cards.mocks.blends import mock_blend, read_blend_fits, write_blend_fits
from cosmofm.data_cards.mocks.spectra import mock_object, mock_spectrum, rest_model
from cosmofm.data_cards.schema import card_from_dict

IMAGE_CARDS = ["lsst-like", "hsc-like", "euclid-like"]


@pytest.fixture(scope="module")
def image_cards():
    return {name: load_card(name) for name in IMAGE_CARDS}


def _first(card, seed, want, limit=200):
    """Indices of objects (seed, index) whose Source satisfies `want`."""
    return [i for i in range(limit) if want(draw_source(card, seed, i))]


def test_cards_carry_surveycodex_numbers(image_cards):
    for name, card in image_cards.items():
        survey = SURVEYS[name]
        codex = surveycodex.get_survey(survey.codex)
        assert card.pixel_scale.to_value("arcsec") == pytest.approx(codex.pixel_scale.to_value("arcsec"))
        for band, curve in zip(card.bands, filter_names(card)):
            f = codex.get_filter(survey.bands[band.name][0])
            assert band.psf_fwhm.to_value("arcsec") == pytest.approx(f.psf_fwhm.to_value("arcsec"))
            assert band.wavelength.to_value("Angstrom") == pytest.approx(f.effective_wavelength.to_value("Angstrom"))
            # sky noise per pixel from sky brightness, zero point and exposure (mock_images.sky_noise_njy)
            assert band.sky_noise == pytest.approx(sky_noise_njy(survey.codex, f.name, card.pixel_scale.value), rel=1e-3)
            assert band.zero_point == pytest.approx(NJY_AB_ZP, abs=1e-3)  # stamps are in nJy
            assert speclite.filters.load_filter(curve).effective_wavelength.to_value("Angstrom") == pytest.approx(band.wavelength.value, rel=0.02)
    # the formula, once by hand: LSST g at full depth
    n_sky = 10 ** (-0.4 * (22.26 - 28.29)) * 2400 * 0.2**2
    assert sky_noise_njy("LSST", "g") == pytest.approx(np.sqrt(n_sky) / (2400 * 10 ** (-0.4 * (31.4 - 28.29))), rel=1e-4)


def test_band_fluxes_match_speclite(image_cards):
    """Our filter integrals equal speclite's AB maggies of the same model spectrum."""
    wave = np.arange(2900.0, 12100.0, 0.5)
    for name in ("lsst-like", "euclid-like"):
        card = image_cards[name]
        filters = speclite.filters.load_filters(*filter_names(card))
        for index in range(3):
            obj, norm = mock_object(2, index)
            f_lambda = rest_model(obj, wave, 500.0) * norm * 1e-17 * u.erg / u.s / u.cm**2 / u.AA
            maggies = filters.get_ab_maggies(f_lambda, wave * u.AA)
            expected = np.array([maggies[c][0] for c in maggies.colnames]) * 3631e9  # nJy
            np.testing.assert_allclose(band_fluxes(card, obj, norm), expected, rtol=3e-3)


def _spectrum_band_flux(spectrum, curve):
    """f_nu [nJy] of a mock spectrum through a speclite curve (photon counting, masked pixels skipped)."""
    wave, flux, good = spectrum.coords["wavelength"], spectrum.values, spectrum.ivar > 0
    resp = np.interp(wave, curve.wavelength, curve.response, left=0, right=0) / wave * np.gradient(wave) * good
    f_nu = flux * 1e-17 * wave**2 / C_ANGSTROM_S * 1e32
    return np.sum(resp * f_nu) / np.sum(resp)


def test_image_colours_match_the_paired_spectrum(cards, image_cards):
    """Same (seed, index), same object: colours of the stamp = colours of the spectrum."""
    card = image_cards["lsst-like"]
    curves = [speclite.filters.load_filter(f"lsst2023-{b}") for b in "griz"]  # inside the sdss-like range
    compact = _first(card, 11, lambda s: s.kind == "point" or s.disk_hlr < 0.4, limit=30)[:6]
    assert len(compact) >= 4
    for index in compact:
        image = mock_image(card, 11, index)
        spectrum = mock_spectrum(cards["sdss-like"], 11, index)
        assert image.meta["pair_id"] == spectrum.meta["pair_id"] == f"obj-11-{index}"
        stamp = image.values[1:5].sum(axis=(1, 2))  # g, r, i, z
        spec = np.array([_spectrum_band_flux(spectrum, c) for c in curves])
        np.testing.assert_allclose(stamp[:-1] / stamp[1:], spec[:-1] / spec[1:], rtol=0.05, err_msg=image.meta["truth"]["spectral_class"])
        # and the absolute flux, within the stamp's aperture loss and the spectrum's calibration
        np.testing.assert_allclose(stamp, spec, rtol=0.1)


def test_renderer_matches_galsim_draw_image(image_cards):
    """Our Fourier-space renderer = GalSim's drawImage of the truth profile, pixel by pixel."""
    for name, card in image_cards.items():
        n, p = card.stamp_size, card.pixel_scale.to_value("arcsec")
        galaxies = _first(card, 5, lambda s: s.kind == "galaxy", limit=20)[:3]
        for index in galaxies + [_first(card, 5, lambda s: s.kind == "point", limit=20)[0]]:
            source = draw_source(card, 5, index)
            source.dec, source.ra = 0.07, -0.033
            ours = render(card, [source])[0]
            for b in range(len(card.bands)):
                ref = galsim.Convolve(galsim_profile(source, b), psf_profile(card, b)).drawImage(nx=n, ny=n, scale=p).array
                assert np.abs(ours[b] - ref).max() < 2e-3 * ref.max(), (name, index, b)


@pytest.fixture(scope="module")
def sharp_card():
    """A card unknown to SURVEYS (Kolmogorov PSF, top-hat bands): sharp PSF, fine pixels."""
    return card_from_dict({
        "name": "sharp-test", "modality": "image", "survey": "test",
        "image": {"pixel_scale": "0.04 arcsec", "stamp_size": 192, "flux_unit": "nJy",
                  "bands": [{"name": "r", "wavelength": "6250 Angstrom", "psf_fwhm": "0.1 arcsec", "sky_noise": 1.0}]},
    })


def _elliptical_hlr(image, p, q, beta_deg):
    """Circularised half-light radius [arcsec] from the curve of growth in elliptical apertures."""
    n = image.shape[0]
    y, x = (np.mgrid[:n, :n] - (n - 1) / 2) * p
    b = np.deg2rad(beta_deg)
    major, minor = x * np.cos(b) + y * np.sin(b), -x * np.sin(b) + y * np.cos(b)
    r = np.sqrt(q * major**2 + minor**2 / q).ravel()
    order = np.argsort(r)
    growth = np.cumsum(image.ravel()[order])
    return float(np.interp(0.5 * growth[-1], growth, r[order]))


@pytest.mark.parametrize("profile", ["disk", "bulge"])
def test_sizes_fluxes_and_shapes_are_recovered(sharp_card, profile):
    """Half-light radius, total flux and axis ratio measured on a noiseless stamp = the input."""
    hlr, q, beta = (0.45, 0.5, 30.0) if profile == "disk" else (0.3, 0.8, 110.0)
    source = Source("test", "GALAXY", 0.1, "galaxy", [1000.0], bulge_fraction=[1.0 if profile == "bulge" else 0.0],
                    bulge_n=4.0, bulge_hlr=hlr, bulge_q=q, disk_hlr=hlr, disk_q=q, beta_deg=beta)
    image = render(sharp_card, [source])[0, 0]
    assert image.sum() == pytest.approx(1000.0, rel=0.01)
    # the input size, up to the 0.1" PSF; exactly what the PSF-convolved input gives
    measured = _elliptical_hlr(image, 0.04, q, beta)
    assert measured == pytest.approx(hlr, rel=0.06)
    expected = galsim.Convolve(galsim_profile(source, 0), psf_profile(sharp_card, 0)).drawImage(nx=192, ny=192, scale=0.04).array
    assert measured == pytest.approx(_elliptical_hlr(expected, 0.04, q, beta), rel=0.01)
    # axis ratio and angle from adaptive moments (the PSF rounds the cuspy bulge's core a little)
    shape = galsim.hsm.FindAdaptiveMom(galsim.Image(image.astype(np.float64), scale=0.04)).observed_shape
    ref = galsim.hsm.FindAdaptiveMom(galsim.Image(expected.astype(np.float64), scale=0.04)).observed_shape
    assert (1 - shape.g) / (1 + shape.g) == pytest.approx(q, abs=0.1)
    assert shape.g == pytest.approx(ref.g, abs=0.005)
    assert np.rad2deg(shape.beta.rad) % 180 == pytest.approx(beta, abs=2)


def test_psf_fwhm_matches_the_card(image_cards):
    for name, card in image_cards.items():
        p = card.pixel_scale.to_value("arcsec")
        star = next(i for i in range(40) if mock_object(3, i)[0].cls.startswith("STAR"))
        stamp = mock_image(card, 3, star, noise=False)
        for b, band in enumerate(card.bands):
            fwhm = band.psf_fwhm.to_value("arcsec")
            assert psf_profile(card, b).calculateFWHM(scale=fwhm / 40, size=256) == pytest.approx(fwhm, rel=0.01)
            if fwhm > 3 * p:  # a well-sampled star: its pixelised FWHM is the card's (+ the pixel)
                truth = stamp.meta["truth"]
                image = galsim.Image(stamp.values[b].astype(np.float64), scale=p)
                measured = image.calculateFWHM(center=image.true_center + galsim.PositionD(truth["ra"] / p, truth["dec"] / p))
                assert measured == pytest.approx(fwhm, rel=0.06), (name, band.name)


def test_noise_matches_sky_noise_and_ivar(image_cards):
    for name, card in image_cards.items():
        sigma = np.array([b.sky_noise for b in card.bands])
        resid, chi = [], []
        for index in range(4):
            noisy, clean = mock_image(card, 8, index), mock_image(card, 8, index, noise=False)
            r = noisy.values.astype(float) - clean.values
            resid.append(np.concatenate([r[:, :6, :6], r[:, -6:, -6:]], axis=2))  # empty corners
            chi.append(r * np.sqrt(noisy.ivar))
        corner_std = np.concatenate(resid, axis=2).reshape(len(sigma), -1).std(axis=1)
        np.testing.assert_allclose(corner_std, sigma, rtol=0.12, err_msg=name)
        assert np.std(chi) == pytest.approx(1.0, abs=0.05), name  # ivar includes the source's Poisson noise


def test_images_are_deterministic_and_shared_across_cards(image_cards):
    lsst, hsc = image_cards["lsst-like"], image_cards["hsc-like"]
    a, b = mock_image(lsst, 4, 2), mock_image(lsst, 4, 2)
    np.testing.assert_array_equal(a.values, b.values)
    assert a.meta == b.meta
    assert not np.array_equal(a.values, mock_image(lsst, 4, 3).values)
    # one object, two surveys: same class, redshift and shape; fluxes through each survey's filters
    galaxy = _first(lsst, 4, lambda s: s.kind == "galaxy", limit=20)[0]
    s1, s2 = draw_source(lsst, 4, galaxy), draw_source(hsc, 4, galaxy)
    for key in ("pair_id", "spectral_class", "redshift", "bulge_hlr", "disk_hlr", "disk_q", "beta_deg", "knot_seed"):
        assert getattr(s1, key) == getattr(s2, key)
    assert s1.flux_njy[2] == pytest.approx(s2.flux_njy[1], rel=0.05)  # LSST r ~ HSC r


def test_galaxy_sizes_follow_the_size_luminosity_relation(image_cards):
    """Brighter (in absolute magnitude) late-type galaxies are larger, as in Shen et al. 2003."""
    card = image_cards["lsst-like"]
    disks = [s for s in (draw_source(card, 21, i) for i in range(120)) if s.size_relation == "shen03-late"]
    m = np.array([s.abs_mag_r for s in disks])
    hlr = np.array([s.disk_hlr for s in disks])  # arcsec
    z = np.array([s.redshift for s in disks])
    assert len(disks) > 20
    assert all(MIN_HLR <= s.disk_hlr <= MAX_HLR and 0.05 < s.disk_q <= 1.0 for s in disks)
    # at fixed redshift, size grows with luminosity: partial correlation of log size with M, given z
    x = np.column_stack([np.ones_like(z), np.log(z), m])
    coef = np.linalg.lstsq(x, np.log(hlr), rcond=None)[0]
    assert coef[2] < 0  # more negative M (brighter) -> larger
    assert 0.05 < np.mean([s.disk_q < 0.4 for s in disks]) < 0.5  # edge-on disks exist, not most


def test_sources_carry_their_objects_luminosity(image_cards):
    """Sizes use the object's own absolute magnitude (mock_object, exact K-correction);
    a blend neighbour rescaled in flux is that much more or less luminous."""
    card = image_cards["lsst-like"]
    galaxies = _first(card, 4, lambda s: s.kind == "galaxy", limit=30)[:3]
    assert galaxies
    for index in galaxies:
        obj, _ = mock_object(4, index)
        assert draw_source(card, 4, index).abs_mag_r == pytest.approx(obj.mags["M_r"], abs=1e-9)
        brighter = draw_source(card, 4, index, ref=(2, obj.mags["r"] - 1.0))
        assert brighter.abs_mag_r == pytest.approx(obj.mags["M_r"] - 2.5 * np.log10(brighter.flux_scale), abs=1e-9)
        assert brighter.abs_mag_r < obj.mags["M_r"]


def test_blend_truth(image_cards, tmp_path):
    card = image_cards["lsst-like"]
    p, n = card.pixel_scale.to_value("arcsec"), card.stamp_size
    for index in range(3):
        sample, truth = mock_blend(card, 6, index, n_objects=(2, 4), separation=(1.2, 2.4), delta_mag=(0.0, 1.0), noise=False)
        meta = sample.meta["truth"]
        k = len(truth.pair_ids)
        assert 2 <= k <= 4 and sample.meta["labels"]["n_objects"] == k
        # the isolated truth images add up to the (noiseless) blend
        np.testing.assert_allclose(truth.isolated.sum(axis=0), sample.values, rtol=1e-4, atol=1e-3)
        # separations and magnitude differences as requested, in the reference band
        sep = np.hypot(*(truth.positions[1:] - truth.positions[0]).T)
        assert np.all((sep >= 1.2) & (sep <= 2.4))
        np.testing.assert_allclose(sep, meta["separation_arcsec"], atol=1e-9)
        ref = truth.bands.index(meta["reference_band"])
        dmag = -2.5 * np.log10(truth.flux_njy[1:, ref] / truth.flux_njy[0, ref])
        np.testing.assert_allclose(dmag, meta["delta_mag"], atol=1e-6)
        assert np.all((dmag >= 0) & (dmag <= 1.0))
        np.testing.assert_allclose(truth.pixel_positions, truth.positions / p + (n - 1) / 2)
        # every object: its light is centred on its position, its centre pixel is in its footprint
        for j in range(k):
            img = truth.isolated[j].sum(axis=0)
            row, col = np.round(truth.pixel_positions[j]).astype(int)
            if not (0 <= row < n and 0 <= col < n):
                continue
            yy, xx = np.mgrid[:n, :n]
            near = np.hypot(yy - truth.pixel_positions[j][0], xx - truth.pixel_positions[j][1]) < 5
            centroid = np.array([np.sum(yy * img * near), np.sum(xx * img * near)]) / np.sum(img * near)
            assert np.hypot(*(centroid - truth.pixel_positions[j])) < 1.0, (index, j)
            assert truth.footprints[j, row, col] and truth.segmentation[row, col] == j + 1, (index, j)
        assert set(np.unique(truth.segmentation)) <= set(range(k + 1))
        assert np.all(truth.segmentation[truth.footprints.any(axis=0)] > 0)
    # the primary is the object of mock_image(seed, index): same pair_id, same fluxes
    single = mock_image(card, 6, 2)
    assert sample.meta["pair_id"] == single.meta["pair_id"] == truth.pair_ids[0]
    np.testing.assert_allclose(truth.flux_njy[0], single.meta["truth"]["flux_njy"])
    # deterministic, with noise, and the FITS writer / reader round trip
    noisy, truth2 = mock_blend(card, 6, 2, separation=(1.2, 2.4), delta_mag=(0.0, 1.0))
    again, _ = mock_blend(card, 6, 2, separation=(1.2, 2.4), delta_mag=(0.0, 1.0))
    np.testing.assert_array_equal(noisy.values, again.values)
    back, truth3 = read_blend_fits(write_blend_fits(tmp_path / "blend.fits", noisy, truth2, card))
    np.testing.assert_array_equal(back.values, noisy.values)
    np.testing.assert_array_equal(back.ivar, noisy.ivar)
    assert back.meta == noisy.meta
    for field in ("isolated", "flux_njy", "positions", "pixel_positions", "segmentation", "footprints"):
        np.testing.assert_array_equal(getattr(truth3, field), getattr(truth2, field))
    assert truth3.pair_ids == truth2.pair_ids and truth3.bands == truth2.bands


def test_bad_input_is_named(image_cards):
    card = image_cards["lsst-like"]
    with pytest.raises(InputError, match="separation"):
        mock_blend(card, 0, 0, separation=(-1.0, 1.0))
    with pytest.raises(InputError, match="separation.*half the stamp"):
        mock_blend(card, 0, 0, separation=(1.0, 5.0))
    with pytest.raises(InputError, match="n_objects"):
        mock_blend(card, 0, 0, n_objects=1)
    with pytest.raises(InputError, match="delta_mag"):
        mock_blend(card, 0, 0, delta_mag=(2.0, 1.0))
    with pytest.raises(InputError, match="reference_band.*'w'"):
        mock_blend(card, 0, 0, reference_band="w")
    raw = card.to_dict()
    raw["image"]["bands"][0]["name"] = "w"
    with pytest.raises(InputError, match=r"\['w'\] are not LSST bands"):
        mock_image(card_from_dict(raw), 0, 0)
    with pytest.raises(InputError, match="'w' is not a LSST filter"):
        sky_noise_njy("LSST", "w")
    with pytest.raises(InputError, match="surveycodex"):
        sky_noise_njy("NOPE", "g")


def test_source_truth_is_json_and_rebuilds_the_image(image_cards):
    import json

    card = image_cards["hsc-like"]
    image = mock_image(card, 9, 1, noise=False)
    truth = json.loads(json.dumps(image.meta["truth"]))
    source = Source.from_json(truth)
    np.testing.assert_allclose(render(card, [copy.deepcopy(source)])[0], image.values, rtol=1e-5, atol=1e-3)
