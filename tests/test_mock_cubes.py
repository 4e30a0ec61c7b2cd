"""Realism checks of the SDC2-like HI cube generator (fluxes, noise, line widths, WCS, HIMF)."""

import dataclasses
import json

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.data_cards.mocks.cubes import (
    HIMF_ALPHA,
    HIMF_LOG_MSTAR,
    SDC2_COLUMNS,
    beam_area_pixels,
    draw_galaxies,
    COSMOLOGY,
    hi_diameter_kpc,
    hi_number_density,
    line_flux_jyhz,
    mock_cube,
    mock_survey_cube,
    render_galaxy,
    sample_log_mhi,
    write_survey_cube_fits,
)

C_KMS = 299792.458


@pytest.fixture(scope="module")
def card(cards):
    return cards["ska-hi-like"]


@pytest.fixture(scope="module")
def bright(card):
    """One bright nearby galaxy (wholly inside the cube for this seed), noiseless and noisy."""
    kw = dict(n_channels=160, size=96, n_sources=1, seed=0, log_mhi_min=10.5, frequency_start=1.25e9)
    clean = mock_survey_cube(card, noise=False, **kw)
    noisy = mock_survey_cube(card, **kw)
    return clean, noisy


def _width_at(spec, x, level):
    """Outermost crossings of level * peak, linearly interpolated (as a survey pipeline would)."""
    t = level * spec.max()
    above = np.nonzero(spec >= t)[0]
    lo, hi = above[0], above[-1]
    left = np.interp(t, [spec[lo - 1], spec[lo]], [x[lo - 1], x[lo]])
    right = np.interp(t, [spec[hi + 1], spec[hi]], [x[hi + 1], x[hi]])
    return abs(right - left)


def test_injected_flux_is_measured_back(card, bright):
    (clean, _, truth), (noisy, _, truth2) = bright
    assert np.array_equal(truth["line_flux_integral"], truth2["line_flux_integral"])
    s_true = truth["line_flux_integral"][0]
    area, dnu = beam_area_pixels(card), card.channel_width.to_value(u.Hz)
    # Noiseless: Jy/beam -> Jy (beam area in pixels) x channel width gives the catalogue flux.
    assert clean.values.sum(dtype=np.float64) / area * dnu == pytest.approx(s_true, rel=1e-4)
    # Noisy: sum over the source's mask; the noise of that sum (beam-correlated noise:
    # variance N sigma^2 x beam area) sets the tolerance.
    mask = clean.values > 1e-3 * clean.values.max()
    measured = noisy.values[mask].sum(dtype=np.float64) / area * dnu
    missed = s_true - clean.values[mask].sum(dtype=np.float64) / area * dnu
    sigma = np.sqrt(mask.sum() * card.noise_per_channel**2 * area) / area * dnu
    assert 0 <= missed < 0.01 * s_true
    assert abs(measured - s_true) < 4 * sigma + missed
    assert sigma < 0.05 * s_true  # the check has teeth


def test_noise_matches_card_and_is_beam_correlated(card):
    cube, _, truth = mock_survey_cube(card, 48, 96, n_sources=0, seed=4)
    assert len(truth) == 0
    v = cube.values.astype(np.float64)
    assert v.std() == pytest.approx(card.noise_per_channel, rel=0.03)
    acf = lambda a, b: np.mean(a * b) / np.mean(v * v)  # noqa: E731
    sigma_beam = card.beam_fwhm.to_value(u.arcsec) / 2.3548 / card.pixel_scale.to_value(u.arcsec)
    expected = np.exp(-1 / (2 * sigma_beam**2))  # the noise autocorrelation is the beam
    assert acf(v[:, :, 1:], v[:, :, :-1]) == pytest.approx(expected, abs=0.04)
    assert acf(v[:, 1:], v[:, :-1]) == pytest.approx(expected, abs=0.04)
    assert expected > 0.5
    assert abs(acf(v[1:], v[:-1])) < 0.03  # channels are independent
    # The chunks too: source-free corners have the card's noise.
    chunks = mock_samples(card, 6, seed=9)
    corners = np.concatenate([c.values[:, :5, :5].ravel() for c in chunks])
    assert corners.std() == pytest.approx(card.noise_per_channel, rel=0.1)


def test_w20_and_double_horn_of_noiseless_renderings(card):
    nf, n, dnu = 128, 48, card.channel_width.to_value(u.Hz)
    freq0 = 1.0e9
    centre = freq0 + (nf // 2 + 0.3) * dnu
    cols = draw_galaxies(np.random.default_rng(11), 6, centre, card, log_mhi_min=9.5)
    area = beam_area_pixels(card)
    incl = []
    for k in range(6):
        row = {name: cols[name][k] for name in cols}
        canvas = np.zeros((nf, n, n))
        render_galaxy(canvas, freq0, card, (n - 1) / 2, (n - 1) / 2, row)
        assert canvas.sum() / area * dnu == pytest.approx(row["line_flux_integral"], rel=1e-3)
        spec = canvas.sum(axis=(1, 2)) / area  # Jy per channel
        freq = freq0 + np.arange(nf) * dnu
        w20 = _width_at(spec, freq, 0.2) / row["central_freq"] * C_KMS
        channel_kms = dnu / row["central_freq"] * C_KMS
        assert abs(w20 - row["w20"]) < 2 * channel_kms, (k, w20, row["w20"])
        # w20 ~ 2 v_flat sin i plus the dispersion's broadening
        assert row["w20"] == pytest.approx(2 * row["v_flat"] * np.sin(np.radians(row["i"])) + 25, abs=20)
        if row["i"] > 60 and row["v_flat"] > 100:
            # double horn: two maxima with a dip between them
            mid = int(round((row["central_freq"] - freq0) / dnu))
            assert spec[: mid].max() > 1.1 * spec[mid] and spec[mid:].max() > 1.1 * spec[mid]
        incl.append(row["i"])
    assert max(incl) > 60


def test_world_coordinates_of_the_peak_match_the_truth(card, bright):
    (clean, header, truth), _ = bright
    wcs = WCS(header)
    assert wcs.wcs.ctype[0] == "RA---SIN" and wcs.wcs.ctype[2] == "FREQ"
    mom0 = clean.values.sum(axis=0)
    y, x = np.unravel_index(np.argmax(mom0), mom0.shape)
    spec = clean.values.sum(axis=(1, 2))
    channel = np.sum(spec * np.arange(len(spec))) / spec.sum()  # line centre (the peak channel is a horn)
    sky, freq = wcs.pixel_to_world(x, y, channel)
    row = truth[0]  # a Table row: plain numbers in the columns' units
    assert sky.separation(SkyCoord(row["ra"] * u.deg, row["dec"] * u.deg)) < card.pixel_scale
    assert abs(freq.to_value(u.Hz) - row["central_freq"]) < 0.5 * card.channel_width.to_value(u.Hz)
    # The receding half of the disk (lower frequency) lies in the direction of the PA.
    f = clean.coords["frequency"]
    rec, app = clean.values[f < row["central_freq"]].sum(0), clean.values[f > row["central_freq"]].sum(0)
    yy, xx = np.mgrid[: mom0.shape[0], : mom0.shape[1]]
    east = -((rec * xx).sum() / rec.sum() - (app * xx).sum() / app.sum())  # RA grows to lower x
    north = (rec * yy).sum() / rec.sum() - (app * yy).sum() / app.sum()
    angle = np.degrees(np.arctan2(east, north)) % 360
    assert abs((angle - row["pa"] + 180) % 360 - 180) < 5


def test_chunks_carry_truth_wcs_and_card_grid(card):
    chunk = mock_cube(card, 3, 7)
    assert chunk.shape == (card.n_channels, card.spatial_size, card.spatial_size)
    json.dumps(chunk.meta)  # labels, truth rows and WCS keys are JSON-safe
    truth = chunk.meta["truth"]
    assert set(SDC2_COLUMNS) <= set(truth[0]) and chunk.meta["labels"]["hi_flux"] == truth[0]["line_flux_integral"]
    # channels on the card's grid; the centred galaxy's line lies in the chunk
    k = (chunk.coords["frequency"] - card.frequency_start.to_value(u.Hz)) / card.channel_width.to_value(u.Hz)
    np.testing.assert_allclose(k, np.round(k), atol=1e-6)
    assert chunk.coords["frequency"][0] < truth[0]["central_freq"] < chunk.coords["frequency"][-1]
    # the truth RA/Dec sits within the chunk on its WCS, and the offsets follow the same WCS
    wcs = WCS(fits.Header(chunk.meta["wcs"])).celestial
    x, y = wcs.all_world2pix(truth[0]["ra"], truth[0]["dec"], 0)
    n = card.spatial_size
    assert abs(x - (n - 1) / 2) <= n / 4 + 1e-6 and abs(y - (n - 1) / 2) <= n / 4 + 1e-6
    assert np.all(np.diff(chunk.coords["ra_offset"]) < 0)  # RA grows to the east = lower pixel x
    ra_off = np.interp(x, np.arange(n), chunk.coords["ra_offset"])
    dra = ((truth[0]["ra"] - chunk.meta["wcs"]["CRVAL1"] + 180) % 360 - 180) * np.cos(np.radians(truth[0]["dec"])) * 3600
    assert ra_off == pytest.approx(dra, abs=0.05)


def test_mass_function_slope_matches_alfalfa():
    log_m = sample_log_mhi(np.random.default_rng(0), 200_000, log_min=6.0, log_max=12.0)
    edges = np.linspace(6.0, 8.5, 26)
    counts, _ = np.histogram(log_m, edges)
    mid = 0.5 * (edges[1:] + edges[:-1])
    # dn/dlogM ~ (M/M*)^(alpha+1) exp(-M/M*): remove the (tiny) exponential, fit the power law
    y = np.log10(counts) + 10 ** (mid - HIMF_LOG_MSTAR) / np.log(10)
    w = counts * np.log(10) ** 2  # 1 / var(log10 counts)
    a = np.vstack([np.ones_like(mid), mid]).T
    cov = np.linalg.inv(a.T @ (a * w[:, None]))
    slope = (cov @ a.T @ (w * y))[1]
    assert abs(slope - (HIMF_ALPHA + 1)) < 3 * np.sqrt(cov[1, 1])
    assert np.sqrt(cov[1, 1]) < 0.01
    # the knee: the fraction above M* follows the Schechter integral
    frac = np.mean(log_m > HIMF_LOG_MSTAR)
    assert frac == pytest.approx(hi_number_density(HIMF_LOG_MSTAR) / hi_number_density(6.0), rel=0.05)


def test_flux_and_size_follow_the_scaling_relations(card):
    # Meyer et al. 2017: M_HI = 49.7 D_L^2 S[Jy Hz] = 2.356e5 D_L^2 S[Jy km/s] / (1+z)
    z = 0.3
    d_l = COSMOLOGY.luminosity_distance(z).to_value(u.Mpc)
    assert line_flux_jyhz(10.0, z) == pytest.approx(1e10 / (49.7 * d_l**2), rel=2e-3)
    s_kms = line_flux_jyhz(10.0, z) * C_KMS / (1420405751.768 / (1 + z))
    assert s_kms == pytest.approx(1e10 * (1 + z) / (2.356e5 * d_l**2), rel=1e-3)
    assert np.log10(hi_diameter_kpc(10.0)) == pytest.approx(0.506 * 10 - 3.293)
    cols = draw_galaxies(np.random.default_rng(3), 400, 1.0e9, card, log_mhi_min=9.0)
    d_a = COSMOLOGY.angular_diameter_distance(cols["z"][0]).to_value(u.kpc)
    d_kpc = np.radians(cols["hi_size"] / 3600) * d_a
    resid = np.log10(d_kpc) - (0.506 * cols["log_mhi"] - 3.293)
    assert abs(np.mean(resid)) < 0.01 and np.std(resid) == pytest.approx(0.06, abs=0.01)
    assert np.all((cols["i"] >= 0) & (cols["i"] <= 90)) and np.all((cols["pa"] >= 0) & (cols["pa"] < 360))
    assert np.mean(np.cos(np.radians(cols["i"]))) == pytest.approx(0.5, abs=0.05)  # cos i uniform


def test_survey_counts_follow_the_himf(card):
    _, header, truth = mock_survey_cube(card, 600, 128, seed=2, log_mhi_min=8.5, as_sample=False, noise=False)
    assert 5 < len(truth) < 200 and header["NSOURCES"] == len(truth)
    assert list(truth.colnames[: len(SDC2_COLUMNS)]) == list(SDC2_COLUMNS)
    assert truth["line_flux_integral"].unit == u.Jy * u.Hz and truth["w20"].unit == u.km / u.s
    f = header["CRVAL3"] + np.arange(header["NAXIS3"]) * header["CDELT3"]
    assert np.all((truth["central_freq"].value > f[0] - 1) & (truth["central_freq"].value < f[-1] + header["CDELT3"]))
    per_deg2 = mock_survey_cube(card, 8, 128, density=2000.0, seed=5, as_sample=False, noise=False)[2]
    mean = 2000.0 * (128 * card.pixel_scale.to_value(u.deg)) ** 2
    assert abs(len(per_deg2) - mean) < 4 * np.sqrt(mean) + 1


def test_deterministic_given_the_seed(card):
    a, b = mock_cube(card, 1, 5), mock_cube(card, 1, 5)
    np.testing.assert_array_equal(a.values, b.values)
    assert a.meta == b.meta
    assert not np.array_equal(a.values, mock_cube(card, 1, 6).values)
    s1, h1, t1 = mock_survey_cube(card, 32, 40, n_sources=3, seed=8, continuum_residual=1e-2)
    s2, h2, t2 = mock_survey_cube(card, 32, 40, n_sources=3, seed=8, continuum_residual=1e-2)
    np.testing.assert_array_equal(s1.values, s2.values)
    assert h1 == h2 and all(np.array_equal(t1[c], t2[c]) for c in t1.colnames)


def test_continuum_residuals_are_smooth_in_frequency(card):
    kw = dict(n_channels=64, size=64, n_sources=0, seed=6, noise=False)
    clean = mock_survey_cube(card, **kw)[0].values.astype(np.float64)
    resid = mock_survey_cube(card, continuum_residual=1e-2, **kw)[0].values.astype(np.float64) - clean
    assert np.abs(resid).max() > 0
    curvature = np.abs(np.diff(resid, 2, axis=0)).max()
    assert curvature < 1e-3 * np.abs(resid).max()


def test_survey_cube_fits_file(card, tmp_path):
    cube, header, truth = mock_survey_cube(card, 16, 24, n_sources=2, seed=1)
    path = write_survey_cube_fits(tmp_path / "sdc2.fits", cube, header, truth)
    assert [p.name for p in tmp_path.iterdir()] == ["sdc2.fits"]  # no temp file left
    with fits.open(path) as hdul:
        assert hdul[0].data.shape == cube.shape and hdul[0].header["BUNIT"] == "Jy/beam"
        assert hdul[0].header["BMAJ"] == pytest.approx(card.beam_fwhm.to_value(u.deg))
        assert hdul[0].header["RESTFRQ"] == pytest.approx(1420405751.768)
        np.testing.assert_array_equal(hdul[0].data, cube.values)
    back = Table.read(path, hdu="TRUTH")
    assert back["line_flux_integral"].unit == u.Jy * u.Hz and back["ra"].unit == u.deg
    np.testing.assert_allclose(back["central_freq"], truth["central_freq"])


def test_bad_input_is_an_input_error(card, tmp_path):
    negative = dataclasses.replace(card, channel_width=-30 * u.kHz)
    with pytest.raises(InputError, match="channel_width"):
        mock_cube(negative, 0, 0)
    with pytest.raises(InputError, match="channel_width"):
        mock_survey_cube(negative, 8, 8)
    for size in (0, -3):
        with pytest.raises(InputError, match="size"):
            mock_survey_cube(card, 8, size)
    with pytest.raises(InputError, match="n_channels"):
        mock_survey_cube(card, 0, 8)
    with pytest.raises(InputError, match="spatial_size"):
        mock_cube(dataclasses.replace(card, spatial_size=0), 0, 0)
    with pytest.raises(InputError, match="n_sources"):
        mock_survey_cube(card, 8, 8, n_sources=2, density=10.0)
    with pytest.raises(InputError, match="rest frequency"):
        mock_survey_cube(card, 8, 8, frequency_start=1.5e9)
    cube, header, truth = mock_survey_cube(card, 4, 8, n_sources=0)
    with pytest.raises(InputError, match="does not exist"):
        write_survey_cube_fits(tmp_path / "missing" / "x.fits", cube, header, truth)
