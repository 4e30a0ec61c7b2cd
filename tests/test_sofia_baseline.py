"""The SoFiA-style baseline: injected Gaussian sources are recovered with their parameters,
pure noise gives no reliable detection, a mock survey cube scores high, bad input is refused."""

import math

import astropy.units as u
import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS
from scipy import ndimage

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.cube_survey import w20_from_width_hz
from cosmofm.data_cards.mocks.cubes import mock_survey_cube, survey_header
from cosmofm.heads.sdc2_score import score_catalogue
from cosmofm.heads.sofia_baseline import SofiaConfig, find_sources

C_KMS = 299792.458
NOISE = 3e-5  # Jy/beam per channel, the card's


@pytest.fixture(scope="module")
def card(cards):
    return cards["ska-hi-like"]


def _noise(rng, shape, beam_sigma_pix):
    """White noise smoothed to beam-correlated noise, rms NOISE."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0, beam_sigma_pix / math.sqrt(2), beam_sigma_pix / math.sqrt(2)), mode="wrap")
    return n * np.float32(NOISE / n.std())


def _inject(card, shape, sources, seed=0):
    """A cube of tilted 3-D Gaussians (velocity gradient along the major axis, + half
    receding) plus noise, its header, and the truth Table under the baseline's conventions."""
    nf, ny, nx = shape
    header = survey_header(card, nf, ny, nx, 0.0, -30.0, 1.25e9)
    w = WCS(header)
    scale = card.pixel_scale.to_value(u.arcsec)
    beam_sigma = card.beam_fwhm.to_value(u.arcsec) / math.sqrt(8 * math.log(2)) / scale  # px
    beam_area = 2 * math.pi * beam_sigma**2
    dnu = card.channel_width.to_value(u.Hz)
    zz, yy, xx = np.indices(shape, dtype=np.float64)
    cube = np.zeros(shape)
    rows = []
    for x0, y0, z0, flux, sig_maj, sig_min, pa, sig_z, grad in sources:  # px, px, ch, Jy Hz, px (intrinsic), deg, ch, ch/px
        p = math.radians(pa)
        east, north = -(xx - x0), yy - y0  # RA---SIN with CDELT1 < 0: east to lower x
        maj = east * math.sin(p) + north * math.cos(p)
        mnr = east * math.cos(p) - north * math.sin(p)
        a2, b2 = sig_maj**2 + beam_sigma**2, sig_min**2 + beam_sigma**2
        spatial = np.exp(-0.5 * (maj**2 / a2 + mnr**2 / b2)) / (2 * math.pi * math.sqrt(a2 * b2))
        spectral = np.exp(-0.5 * ((zz - z0 + grad * maj) / sig_z) ** 2) / (math.sqrt(2 * math.pi) * sig_z)  # + half at lower channel
        cube += flux * beam_area / dnu * spatial * spectral
        ra, dec, freq = w.all_pix2world(x0, y0, z0, 0)
        sa = math.sqrt(a2)  # w20 of the injected integrated spectrum, on a fine grid
        fine = np.linspace(-6 * sa, 6 * sa, 601)
        grid = np.linspace(-40, 40, 4001)
        prof = (np.exp(-0.5 * (fine / sa) ** 2)[:, None] * np.exp(-0.5 * ((grid[None] + grad * fine[:, None]) / sig_z) ** 2)).sum(0)
        above = grid[prof >= 0.2 * prof.max()]
        rows.append([float(ra), float(dec), float(freq), flux, 2.8 * sig_maj * scale, float(w20_from_width_hz((above[-1] - above[0]) * dnu, float(freq))), pa % 360, math.degrees(math.acos(sig_min / sig_maj))])
    cube = cube.astype(np.float32) + _noise(np.random.default_rng(seed), shape, beam_sigma)
    names = ["ra", "dec", "central_freq", "line_flux_integral", "hi_size", "w20", "pa", "i"]
    truth = Table(rows=rows, names=names)
    for n_, unit in zip(names, [u.deg, u.deg, u.Hz, u.Jy * u.Hz, u.arcsec, u.km / u.s, u.deg, u.deg]):
        truth[n_].unit = unit
    return cube, header, truth


SOURCES = [  # x, y, z, flux [Jy Hz], sigma major / minor [px], PA [deg], sigma_z [ch], gradient [ch/px]
    (16.0, 18.0, 30.0, 300.0, 4.0, 2.0, 40.0, 2.5, 1.0),
    (46.0, 20.0, 70.0, 250.0, 3.5, 3.0, 200.0, 3.0, 0.8),
    (20.0, 48.0, 95.0, 400.0, 5.0, 2.5, 300.0, 2.0, 1.2),
    (48.0, 46.0, 40.0, 200.0, 3.0, 1.5, 120.0, 2.5, 1.0),
]


def test_injected_sources_recovered(card):
    cube, header, truth = _inject(card, (128, 64, 64), SOURCES)
    cat = find_sources(cube, header)
    assert set(cat.colnames) >= {"ra", "dec", "central_freq", "line_flux_integral", "hi_size", "w20", "pa", "i"}
    assert cat["central_freq"].unit == u.Hz and cat["line_flux_integral"].unit == u.Jy * u.Hz
    r = score_catalogue(cat, truth)
    assert r.completeness == 1.0 and r.n_false == 0
    order = np.argsort(r.truth_index)
    si = r.candidate_index[order]
    np.testing.assert_allclose(cat["x"][si], [s[0] for s in SOURCES], atol=0.5)
    np.testing.assert_allclose(cat["y"][si], [s[1] for s in SOURCES], atol=0.5)
    np.testing.assert_allclose(cat["z"][si], [s[2] for s in SOURCES], atol=1.0)  # the mask cuts a tilted line unevenly
    np.testing.assert_allclose(cat["line_flux_integral"][si], truth["line_flux_integral"], rtol=0.25)  # ~1 sigma of noise is 6 %
    pa_err = r.errors["pa"][order]
    assert np.all(pa_err < 60.0)  # the receding half is found (a wrong half is 180 deg off)
    elongated = np.array([s[5] / s[4] <= 0.6 for s in SOURCES])
    assert np.all(pa_err[elongated] < 20.0)
    assert np.median(r.errors["w20"]) < 0.3
    assert r.total > 0.7 * len(SOURCES)


def test_pure_noise_gives_no_reliable_detection(card):
    cube = _noise(np.random.default_rng(7), (128, 64, 64), 1.06)
    header = survey_header(card, 128, 64, 64, 0.0, -30.0, 1.25e9)
    cat = find_sources(cube, header)
    assert len(cat) == 0
    assert cat.meta["n_negative"] > 0  # the reliability had negatives to work with


def test_mock_survey_cube_scores_high(card):
    cube, header, truth = mock_survey_cube(card, 160, 96, n_sources=6, seed=11, log_mhi_min=10.0, frequency_start=1.25e9, as_sample=False)
    cat = find_sources(cube, header)
    r = score_catalogue(cat, truth)
    assert r.purity == 1.0
    assert r.completeness >= 5 / 6
    assert r.total > 0.6 * len(truth)


def test_empty_blanked_and_velocity_cubes(card):
    header = survey_header(card, 32, 24, 24, 0.0, -30.0, 1.25e9)
    cube = np.zeros((32, 24, 24), np.float32)
    cube[5:8] = np.nan  # flagged channels
    assert len(find_sources(cube, header)) == 0  # an empty catalogue is a valid answer
    vel = header.copy()  # the same cube on a radio-velocity axis
    vel["CTYPE3"], vel["CUNIT3"] = "VRAD", "m/s"
    rest = vel["RESTFRQ"]
    vel["CRVAL3"] = C_KMS * 1e3 * (1 - header["CRVAL3"] / rest)
    vel["CDELT3"] = -C_KMS * 1e3 * header["CDELT3"] / rest
    cube2, h2, truth = _inject(card, (64, 40, 40), [(20.0, 20.0, 30.0, 300.0, 3.0, 2.0, 60.0, 2.5, 1.0)], seed=2)
    ref = find_sources(cube2, h2)
    for key in ("CTYPE3", "CUNIT3", "CRVAL3", "CDELT3"):
        h2[key] = vel[key]
    cat = find_sources(cube2, h2)
    assert len(cat) == len(ref) == 1
    assert float(cat["central_freq"][0]) == pytest.approx(float(ref["central_freq"][0]), abs=1.0)  # Hz
    assert float(cat["w20"][0]) == pytest.approx(float(ref["w20"][0]), rel=1e-6)
    assert abs(float(cat["central_freq"][0]) - float(truth["central_freq"][0])) < header["CDELT3"]


def test_bad_input_is_refused(card):
    header = survey_header(card, 8, 16, 16, 0.0, -30.0, 1.25e9)
    with pytest.raises(InputError, match="3-D"):
        find_sources(np.zeros((16, 16), np.float32), header)
    with pytest.raises(InputError, match="NAXIS"):
        find_sources(np.zeros((9, 16, 16), np.float32), header)
    nobeam = header.copy()
    del nobeam["BMAJ"]
    with pytest.raises(InputError, match="BMAJ"):
        find_sources(np.zeros((8, 16, 16), np.float32), nobeam)
    with pytest.raises(InputError, match="WCS"):
        find_sources(np.zeros((8, 16, 16), np.float32), WCS(header))
    vel = header.copy()
    vel["CTYPE3"], vel["CUNIT3"] = "VRAD", "m/s"
    del vel["RESTFRQ"]
    with pytest.raises(InputError, match="RESTFRQ"):
        find_sources(np.zeros((8, 16, 16), np.float32), vel)
    assert SofiaConfig().threshold == 4.0


def test_fast_boxcars_and_mask_growth_equal_scipy():
    from cosmofm.heads.sofia_baseline import _boxcars, _grow

    x = np.random.default_rng(3).standard_normal((40, 12, 14)).astype(np.float32)
    for width, sm in _boxcars(x, (0, 3, 7, 15, 31, 5)):  # 3, 7, 15, 31 by doubling, 5 through scipy
        ref = x if width <= 1 else ndimage.uniform_filter1d(x, width, axis=0, mode="constant") * np.float32(width)
        np.testing.assert_allclose(sm, ref, rtol=1e-5, atol=2e-5)
    mask = np.random.default_rng(4).random((20, 16, 18)) > 0.97
    for radii in ((1, 1, 1), (2, 1, 1), (0, 2, 2)):
        ref = ndimage.maximum_filter(mask.view(np.uint8), size=tuple(2 * r + 1 for r in radii), mode="constant").astype(bool)
        assert np.array_equal(_grow(mask, radii), ref)


def test_kernel_rms_of_white_noise_follows_the_kernels_noise_reduction():
    from cosmofm.heads.sofia_baseline import kernel_noise

    cfg = SofiaConfig(spatial_fwhm=(0.0, 4.0), spectral_width=(0, 7), noise_step=1)
    norm = np.random.default_rng(5).standard_normal((64, 96, 96)).astype(np.float32)
    rms = kernel_noise([(norm, None)], cfg)
    sigma = 4.0 / math.sqrt(8 * math.log(2))
    gauss = 1 / (2 * math.sqrt(math.pi) * sigma)  # rms of a unit-sum 2-D Gaussian on unit white noise
    np.testing.assert_allclose(rms, [[1.0, math.sqrt(7)], [gauss, gauss * math.sqrt(7)]], rtol=0.03)  # boxcars are sums


def test_candidates_cut_together_equal_the_direct_run(card):
    from cosmofm.heads.sofia_baseline import CANDIDATE_COLUMNS, apply_reliability, kernel_noise, noise_blocks

    cube, header, _ = _inject(card, (128, 64, 64), SOURCES)
    direct = find_sources(cube, header)
    cands = find_sources(cube, header, candidates=True)
    assert (np.asarray(cands["sign"]) < 0).sum() == cands.meta["n_negative"] > 0
    assert (np.asarray(cands["sign"]) > 0).sum() == cands.meta["n_positive"]
    cut = apply_reliability(cands)
    assert len(cut) == len(direct) == len(SOURCES) and not set(CANDIDATE_COLUMNS) & set(cut.colnames)
    for name in ("ra", "central_freq", "line_flux_integral", "w20", "pa", "snr", "reliability"):
        np.testing.assert_array_equal(np.asarray(cut[name]), np.asarray(direct[name]))
    # clip levels handed in (as a tiled run's parent does) give the same catalogue as measured ones
    norm = cube / np.float32(NOISE)
    rms = kernel_noise([(norm[r], None) for r in noise_blocks(norm.shape, SofiaConfig())], SofiaConfig())
    given = find_sources(cube, header, noise=np.full(128, NOISE), kernel_rms=rms)
    assert len(given) == len(SOURCES)
    np.testing.assert_allclose(np.asarray(given["line_flux_integral"]), np.asarray(direct["line_flux_integral"]), rtol=0.02)
