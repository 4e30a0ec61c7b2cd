"""Survey-cube realism (issue 21): clustering, the HI mass function below the detection
limit, the primary-beam noise pattern, flagged channels, the w20 convention shared with
the SDC2 scorer, the block-wise writer and `cosmofm mock survey-cube`."""

import math

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.cube_sky import Clustering, PrimaryBeam, flagged_channels, survey_noise
from cosmofm.data_cards.mocks.cubes import hi_number_density, mock_survey_cube as reexported
from cosmofm.data_cards.mocks.cube_survey import mock_survey_cube, w20_from_width_hz, w20_width_hz, write_large_survey_cube, write_survey_cube_fits
from cosmofm.heads.sdc2_score import HI_REST_HZ, score_catalogue
from cosmofm.cli import main

C_KMS = 299792.458
TIGHT = Clustering(radius_mpc=0.1, velocity_dispersion_kms=50.0)  # compact groups: a clear signal in a small cube


@pytest.fixture(scope="module")
def card(cards):
    return cards["ska-hi-like"]


@pytest.fixture(scope="module")
def catalogues(card):
    """300 galaxies down to log M_HI = 8 in a 128^2 x 256-channel cube, uniform and clustered (noiseless)."""
    kw = dict(n_sources=300, seed=4, noise=False, as_sample=False, log_mhi_min=8.0)
    return {cl: mock_survey_cube(card, 256, 128, clustering=TIGHT if cl else None, **kw) for cl in (False, True)}


def _close_pairs(truth, header, r_pix, r_chan):
    x, y, z = WCS(header).all_world2pix(np.asarray(truth["ra"]), np.asarray(truth["dec"]), np.asarray(truth["central_freq"]), 0)
    close = ((x[:, None] - x) ** 2 + (y[:, None] - y) ** 2 < r_pix**2) & (np.abs(z[:, None] - z) < r_chan)
    return (int(close.sum()) - len(x)) // 2


def test_clustering_raises_close_pairs_above_poisson(catalogues):
    n = 300
    poisson = n * (n - 1) / 2 * (math.pi * 10**2 / 128**2) * (2 * 10 / 256)  # pairs within 10 px and 10 channels
    (_, h_uniform, t_uniform), (_, h_clustered, t_clustered) = catalogues[False], catalogues[True]
    uniform = _close_pairs(t_uniform, h_uniform, 10, 10)
    clustered = _close_pairs(t_clustered, h_clustered, 10, 10)
    assert abs(uniform - poisson) < 4 * math.sqrt(poisson)  # the uniform cube is Poisson
    assert clustered > 3 * poisson  # groups overlap on the sky and in frequency
    groups = np.asarray(t_clustered["cluster"])
    assert 0.45 < np.mean(groups >= 0) < 0.75  # field fraction 0.4 by default
    assert np.all(np.asarray(t_uniform["cluster"]) == -1)


def test_mass_function_reaches_far_below_the_bright_end(card, catalogues):
    truth = catalogues[False][2]
    log_m = np.asarray(truth["log_mhi"])
    faint, bright = np.sum(log_m < 9.0), np.sum(log_m >= 10.0)
    expected = (hi_number_density(8.0) - hi_number_density(9.0)) / hi_number_density(8.0) * len(log_m)
    assert log_m.min() < 8.1 and abs(faint - expected) < 4 * math.sqrt(expected)
    assert faint > 10 * max(bright, 1)
    # a crude integrated S/N (noise of a sum over the line's channels and the source's
    # beams): the faint end lies below a 5-sigma detection limit, and S/N rises with mass
    # (near 950 MHz, z ~ 0.5, even log M 10 is only near the limit, as in SDC2)
    dnu = card.channel_width.to_value(u.Hz)
    nu = np.asarray(truth["central_freq"])
    n_chan = np.maximum(np.asarray(truth["w20"]) * nu**2 / (C_KMS * HI_REST_HZ) / dnu, 1.0)
    beams = np.maximum(np.asarray(truth["hi_size"]) ** 2 / card.beam_fwhm.to_value(u.arcsec) ** 2, 1.0)
    snr = np.asarray(truth["line_flux_integral"]) / (card.noise_per_channel * dnu * np.sqrt(n_chan * beams))
    assert np.mean(snr[log_m < 9.0] < 5) > 0.95
    assert np.median(snr[log_m >= 10.0]) > 10 * np.median(snr[log_m < 9.0])


def test_primary_beam_noise_rises_by_the_expected_factor(card):
    pb = PrimaryBeam(dish_diameter_m=200.0)  # a narrow beam, so that a small cube spans it
    nf, n, f0 = 48, 96, 1.25e9
    sample, header, _ = mock_survey_cube(card, nf, n, n_sources=0, seed=5, frequency_start=f0, primary_beam=pb)
    v = sample.values.astype(np.float64)
    scale_deg = card.pixel_scale.to_value(u.deg)
    yy, xx = np.indices((n, n))
    r = np.hypot(yy - (n - 1) / 2, xx - (n - 1) / 2)
    freq = f0 + np.arange(nf) * card.channel_width.to_value(u.Hz)
    fwhm_pix = np.degrees(1.13 * C_KMS * 1e3 / (freq * 200.0)) / scale_deg  # (F,)
    factor = np.exp(4 * np.log(2) * r[None] ** 2 / fwhm_pix[:, None, None] ** 2)  # 1/PB
    centre, ring = r < 12, (r > 36) & (r < 46)
    expected = np.sqrt(np.mean(factor[:, ring] ** 2)) / np.sqrt(np.mean(factor[:, centre] ** 2))
    measured = v[:, ring].std() / v[:, centre].std()
    assert expected > 1.4  # the check has teeth
    assert measured == pytest.approx(expected, rel=0.05)
    assert v[:, centre].std() == pytest.approx(card.noise_per_channel, rel=0.06)
    sigma = survey_noise(header)  # the pattern, rebuilt from the header keywords
    np.testing.assert_allclose(sigma, card.noise_per_channel * factor, rtol=1e-5)
    np.testing.assert_allclose(sample.ivar, 1 / sigma.astype(np.float64) ** 2, rtol=1e-5)
    # a mosaic of pointings flattens the pattern: the edge noise drops
    mosaic = PrimaryBeam(dish_diameter_m=200.0, mosaic_spacing_deg=0.03)
    sm = survey_noise(mock_survey_cube(card, 4, n, n_sources=0, frequency_start=f0, primary_beam=mosaic, as_sample=False)[1])
    assert sm[0, 0, 0] < 0.7 * sigma[0, 0, 0] and sm[0].max() < sigma[0].max()


def test_flagged_channels_are_blank_and_listed(card, tmp_path):
    cube, header, truth = mock_survey_cube(card, 64, 32, n_sources=3, seed=2, flagged_channels=0.1, as_sample=False)
    blank = np.nonzero(np.isnan(cube).all(axis=(1, 2)))[0]
    assert len(blank) == round(0.1 * 64) and header["NFLAG"] == len(blank)
    assert np.array_equal(flagged_channels(header), blank) and np.array_equal(flagged_channels(truth.meta), blank)
    assert np.isfinite(np.delete(cube, blank, axis=0)).all()  # only whole flagged channels are blank
    listed = mock_survey_cube(card, 16, 24, n_sources=1, flagged_channels=[3, 4, 9])
    assert np.array_equal(listed[0].ivar.sum(axis=(1, 2)) == 0, np.isin(np.arange(16), [3, 4, 9]))
    assert listed[1]["FLAGCHAN"] == "3-4,9"
    path = write_survey_cube_fits(tmp_path / "flagged.fits", *listed)
    with fits.open(path) as hdul:  # the Sample holds 0 there; the file holds NaN again
        assert np.isnan(hdul[0].data[[3, 4, 9]]).all() and np.isfinite(hdul[0].data[[0, 5, 15]]).all()


def test_w20_is_the_observed_width_the_scorer_assumes(card):
    cube, header, truth = mock_survey_cube(card, 200, 64, n_sources=1, seed=0, log_mhi_min=10.5, frequency_start=1.05e9, noise=False, as_sample=False)
    row = truth[0]
    assert truth.meta["W20FRAME"] == "observed"
    assert row["w20"] == pytest.approx(row["w20_rest"] * (1 + row["z"]), rel=1e-12)
    # the width at 20 % of the peak of the rendered line, in Hz, is w20 nu^2 / (c nu_rest):
    # the window sdc2_score gives a truth source (its spectral_size)
    spec = np.nansum(cube, axis=(1, 2))
    freq = header["CRVAL3"] + np.arange(header["NAXIS3"]) * header["CDELT3"]
    above = np.nonzero(spec >= 0.2 * spec.max())[0]
    lo, hi = above[0], above[-1]
    t = 0.2 * spec.max()
    width_hz = np.interp(t, [spec[hi + 1], spec[hi]], [freq[hi + 1], freq[hi]]) - np.interp(t, [spec[lo - 1], spec[lo]], [freq[lo - 1], freq[lo]])
    window = row["w20"] * row["central_freq"] ** 2 / (C_KMS * HI_REST_HZ)  # as sdc2_score.candidate_pairs
    assert w20_width_hz(row["w20"], row["central_freq"]) == pytest.approx(window, rel=1e-12)
    assert row["z"] > 0.3  # the frames differ by 30 %: the check has teeth
    assert width_hz == pytest.approx(window, abs=2 * header["CDELT3"])
    # a catalogue that measures the width in Hz and converts it the same way matches the
    # truth's w20 to a few per cent; read as rest-frame (c dnu / nu) it would be 1 / (1+z) off
    sub = truth.copy()
    sub["w20"] = w20_from_width_hz(width_hz, row["central_freq"]) * u.km / u.s
    assert score_catalogue(sub, truth).errors["w20"][0] < 0.05
    assert abs(C_KMS * width_hz / row["central_freq"] / row["w20"] - 1) > 0.2


def test_block_writer_equals_the_in_memory_cube(card, tmp_path):
    kw = dict(n_sources=12, seed=3, log_mhi_min=9.5, frequency_start=1.25e9, clustering=Clustering(radius_mpc=0.2),
              primary_beam=PrimaryBeam(dish_diameter_m=300.0), flagged_channels=0.1, continuum_residual=1e-3)
    cube, header, truth = mock_survey_cube(card, 90, 48, as_sample=False, **kw)
    path = write_large_survey_cube(tmp_path / "big.fits", card, 90, 48, block_channels=7, **kw)  # galaxies straddle blocks
    assert [p.name for p in tmp_path.iterdir()] == ["big.fits"]  # no temp file left
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "TRUTH", "NOISE"]
        np.testing.assert_array_equal(hdul[0].data, cube)  # bit for bit, NaN channels included
        assert np.isnan(hdul[0].data).all(axis=(1, 2)).sum() == 9
        for key in ("CRVAL3", "CDELT3", "CTYPE1", "NSOURCES", "NOISE", "PBDISH", "FLAGCHAN", "W20FRAME"):
            assert hdul[0].header[key] == header[key]
        np.testing.assert_array_equal(hdul["NOISE"].data, survey_noise(header, [45])[0])
    back = Table.read(path, hdu="TRUTH")
    for name in ("ra", "central_freq", "line_flux_integral", "w20", "cluster"):
        np.testing.assert_array_equal(np.asarray(back[name]), np.asarray(truth[name]))
    assert reexported is mock_survey_cube  # the old import path still works


def test_bad_inputs_are_input_errors(card, tmp_path):
    bad = [
        dict(flagged_channels=1.5), dict(flagged_channels=[-1]), dict(flagged_channels=[8]), dict(flagged_channels="3"),
        dict(clustering="yes"), dict(primary_beam=3), dict(log_mhi_min=3.0),
    ]
    for kw in bad:
        with pytest.raises(InputError, match=next(iter(kw)).split("_")[0]):
            mock_survey_cube(card, 8, 8, n_sources=1, **kw)
    for make, match in ((lambda: Clustering(members=0.5), "members"), (lambda: Clustering(field_fraction=2.0), "field_fraction"),
                        (lambda: PrimaryBeam(dish_diameter_m=-1.0), "dish"), (lambda: PrimaryBeam(floor=0.0), "floor")):
        with pytest.raises(InputError, match=match):
            make()
    with pytest.raises(InputError, match="block_channels"):
        write_large_survey_cube(tmp_path / "x.fits", card, 8, 8, block_channels=0)
    with pytest.raises(InputError, match="colour"):
        write_large_survey_cube(tmp_path / "x.fits", card, 8, 8, colour=1)
    with pytest.raises(InputError, match="does not exist"):
        write_large_survey_cube(tmp_path / "missing" / "x.fits", card, 8, 8)
    with pytest.raises(InputError, match="NOISE"):
        survey_noise(fits.Header({"NAXIS3": 4}))
    assert not list(tmp_path.iterdir())


def test_cli_writes_a_survey_cube_and_its_truth(tmp_path, capsys):
    out = tmp_path / "cubes"
    assert main(["mock", "survey-cube", "--card", "ska-hi-like", "--channels", "24", "--size", "32", "--seed", "1", "--out", str(out), "--density", "20000"]) == 0
    cube_path = out / "ska-hi-like-survey-24x32-seed1.fits"
    truth = Table.read(out / "ska-hi-like-survey-24x32-seed1-truth.fits")
    with fits.open(cube_path) as hdul:
        assert hdul[0].data.shape == (24, 32, 32) and hdul[0].header["PBTYPE"] == "GAUSSIAN"
        assert len(truth) == hdul[0].header["NSOURCES"] > 0 and np.isnan(hdul[0].data).all(axis=(1, 2)).any() == (hdul[0].header.get("NFLAG", 0) > 0)
    assert np.min(truth["log_mhi"]) >= 8.0 and "survey cube" in capsys.readouterr().out
    assert main(["mock", "survey-cube", "--channels", "0", "--size", "8", "--out", str(out)]) == 2
    assert main(["mock", "survey-cube", "--size", "8", "--out", str(out)]) == 2  # --channels missing
    assert main(["mock", "cubes", "--channels", "8", "--out", str(out)]) == 2  # survey-cube only
