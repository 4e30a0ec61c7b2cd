"""`cosmofm detect` (finetune/detect.py) with the SoFiA-style finder on small cubes (64 x 96 x 96):
the same sources for different tilings (spatial and spectral, sources on core edges), the
WCS round trip in frequency and in radio velocity, an empty cube, blank regions, a cube
without a spectral axis, and `cosmofm score` reading the catalogue as written."""

import json
import math

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy import ndimage

from cosmofm.cli import main as cli_main
from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.cubes import survey_header
from cosmofm.finetune.detect import detect_cube
from cosmofm.heads.sdc2_score import HI_REST_HZ
from cosmofm.heads.sofia_baseline import SofiaConfig

C_KMS = 299792.458
NOISE = 3e-5  # Jy/beam per channel, the card's
SHAPE = (64, 96, 96)
# (chan, row, col, peak Jy/beam, sigma_xy px, sigma_z ch): sources on the core edges of the
# tilings below (rows / cols 24, 48, 72; channel 32) and well inside
SOURCES = [(32.0, 20.0, 20.0, 3e-4, 2.5, 4.0), (30.0, 48.0, 47.5, 3e-4, 2.5, 4.0), (36.0, 70.0, 30.0, 3e-4, 2.5, 4.0),
           (28.0, 30.0, 75.0, 3e-4, 2.5, 4.0), (33.0, 72.0, 72.0, 3e-4, 2.5, 4.0), (31.5, 24.0, 52.0, 3e-4, 2.0, 3.0)]


@pytest.fixture(scope="module")
def card(cards):
    return cards["ska-hi-like"]


def write_cube(path, card, sources=SOURCES, seed=0, velocity=False, blank=None, header_edit=None):
    """Beam-correlated noise + 3-D Gaussians; the header of `survey_header` (FREQ) or its
    radio-velocity twin (VRAD in m/s with RESTFRQ)."""
    nf, ny, nx = SHAPE
    h = survey_header(card, nf, ny, nx, 30.0, -30.0, 1.25e9)
    if velocity:
        f0, df, rest = h["CRVAL3"], h["CDELT3"], h["RESTFRQ"]
        h["CTYPE3"], h["CUNIT3"] = "VRAD", "m/s"
        h["CRVAL3"], h["CDELT3"] = C_KMS * 1e3 * (1 - f0 / rest), -C_KMS * 1e3 * df / rest  # radio velocity is linear in frequency
    rng = np.random.default_rng(seed)
    beam_sigma = card.beam_fwhm.to_value(u.arcsec) / math.sqrt(8 * math.log(2)) / card.pixel_scale.to_value(u.arcsec)
    n = ndimage.gaussian_filter(rng.standard_normal(SHAPE).astype(np.float32), (0, beam_sigma / math.sqrt(2), beam_sigma / math.sqrt(2)), mode="wrap")
    data = n * np.float32(NOISE / n.std())
    zz, yy, xx = np.indices(SHAPE, dtype=np.float32)
    for z, y, x, peak, sxy, sz in sources:
        data += np.float32(peak) * np.exp(-0.5 * (((yy - y) ** 2 + (xx - x) ** 2) / sxy**2 + ((zz - z) / sz) ** 2))
    if blank is not None:
        data[blank] = np.nan
    if header_edit is not None:
        header_edit(h)
    fits.PrimaryHDU(data, h).writeto(path)
    return survey_header(card, nf, ny, nx, 30.0, -30.0, 1.25e9)


def _detect(path, out, **kw):
    """SoFiA's default kernels unless told (the tuned SOFIA_TUNED adds a 31-channel boxcar and
    6-voxel merging, whose reach needs more overlap than these 64-channel cubes allow)."""
    return detect_cube(path, out, **{"workers": 2, "progress": False, "config": SofiaConfig(), **kw}), Table.read(out)


def _match(cat, z, y, x):
    d = np.sqrt((np.asarray(cat["CHAN"]) - z) ** 2 + (np.asarray(cat["ROW"]) - y) ** 2 + (np.asarray(cat["COL"]) - x) ** 2)
    return int(np.argmin(d)), float(d.min())


@pytest.fixture(scope="module")
def cube(card, tmp_path_factory):
    path = tmp_path_factory.mktemp("detect") / "cube.fits"
    header = write_cube(path, card)
    return path, header


def _sorted(cat):
    return cat[np.lexsort((np.asarray(cat["COL"]), np.asarray(cat["ROW"]), np.asarray(cat["CHAN"])))]


def test_tilings_give_the_same_catalogue(cube, tmp_path):
    path, _ = cube
    s0, whole = _detect(path, tmp_path / "whole.fits", tile=(64, 96, 96), overlap=0)
    s1, spatial = _detect(path, tmp_path / "spatial.fits", tile=(64, 60, 60), overlap=(0, 36, 36))  # 4 x 4 tiles, core edges 24, 48, 72
    s2, spectral = _detect(path, tmp_path / "spectral.fits", tile=(56, 96, 96), overlap=(48, 0, 0))  # 2 tiles, core edge at channel 32
    s3, short = _detect(path, tmp_path / "short.fits", tile=(48, 96, 96), overlap=(32, 0, 0))  # the same edge, 16 channels each side
    assert (s0["n_tiles"], s1["n_tiles"], s2["n_tiles"], s3["n_tiles"]) == (1, 16, 2, 2)
    for cat in (whole, spatial, spectral, short):
        for z, y, x, *_ in SOURCES:
            d = np.sqrt((np.asarray(cat["CHAN"]) - z) ** 2 + (np.asarray(cat["ROW"]) - y) ** 2 + (np.asarray(cat["COL"]) - x) ** 2)
            assert (d < 1.0).sum() == 1  # found, and once: no duplicate from the neighbouring tile
    # Identical catalogues: every tile is normalised by the cube's noise per channel, clips each
    # smoothed cube at the cube's rms of that kernel (measured once in the parent), and the
    # reliability is one density over all tiles' candidates. So a source that lies whole, with
    # the reach of the kernels (7 channels for the 15-channel boxcar, ~8 px for the 6 px
    # Gaussian), inside the tile whose core holds it is measured exactly as on the whole cube:
    # equal to float64 round-off of the tile offset added to the centroids.
    ref = _sorted(whole)
    for cat in (spatial, spectral):
        cat = _sorted(cat)
        assert len(cat) == len(ref) == len(SOURCES)
        for name in ("CHAN", "ROW", "COL", "ra", "dec", "central_freq", "line_flux_integral", "hi_size", "w20", "pa", "i", "snr", "reliability"):
            np.testing.assert_allclose(np.asarray(cat[name]), np.asarray(ref[name]), rtol=1e-12, atol=1e-12)
    # 16 channels of overlap each side are fewer than a bright source's S+C mask reaches along
    # the spectrum (the 15-channel boxcar spreads its 10-sigma line to +-20 channels), so the
    # masks there are cut at the tile edge: measured up to 0.05 channel / 0.5 % line flux.
    cat = _sorted(short)
    assert len(cat) == len(ref)
    np.testing.assert_allclose(np.asarray(cat["CHAN"]), np.asarray(ref["CHAN"]), atol=0.1)
    np.testing.assert_allclose(np.asarray(cat["line_flux_integral"]), np.asarray(ref["line_flux_integral"]), rtol=0.015)


def test_catalogue_columns_and_wcs_round_trip_in_frequency_and_velocity(card, tmp_path):
    nf, ny, nx = SHAPE
    w = WCS(survey_header(card, nf, ny, nx, 30.0, -30.0, 1.25e9))
    ra0, dec0, f0 = 29.985, -29.99, 1.25e9 + 40.3 * 30e3  # in the last tiles of the tiling below
    x0, y0, z0 = (float(v) for v in w.all_world2pix(ra0, dec0, f0, 0))
    assert 60 < x0 < 96 and 48 < y0 < 96 and 32 < z0 < 64
    src = [(z0, y0, x0, 6e-4, 2.5, 4.0)]
    for velocity in (False, True):
        path = tmp_path / f"one_{velocity}.fits"
        write_cube(path, card, src, seed=5, velocity=velocity)
        summary, cat = _detect(path, tmp_path / f"c_{velocity}.fits", tile=(48, 60, 60), overlap=(32, 36, 36))
        assert len(cat) == 1
        assert cat.colnames[:9] == ["id", "ra", "dec", "hi_size", "line_flux_integral", "central_freq", "pa", "i", "w20"]
        assert [str(cat[c].unit) for c in ("ra", "line_flux_integral", "central_freq", "hi_size", "w20", "CHAN")] == ["deg", "Hz Jy", "Hz", "arcsec", "km / s", "pix"]
        scale = card.pixel_scale.to_value(u.deg)
        assert math.hypot((cat["ra"][0] - ra0) * math.cos(math.radians(dec0)), cat["dec"][0] - dec0) / scale < 0.1
        assert abs(cat["central_freq"][0] - f0) < 0.1 * 30e3  # a tenth of a channel
        if velocity:
            assert fits.getheader(tmp_path / "c_True.fits", 0)["RESTFRQ"] == pytest.approx(HI_REST_HZ)


def test_empty_cube_gives_an_empty_catalogue_with_every_column(card, tmp_path):
    path = tmp_path / "noise.fits"
    write_cube(path, card, [], seed=11)
    # pure noise; an S/N cut of 8 (default 4) so that no noise peak passes in any of the 16 tiles
    summary, cat = _detect(path, tmp_path / "c.fits", tile=(64, 60, 60), overlap=(0, 36, 36), config=SofiaConfig(min_snr=8.0))
    assert summary["n_sources"] == 0 and len(cat) == 0
    assert cat.colnames[:12] == ["id", "ra", "dec", "hi_size", "line_flux_integral", "central_freq", "pa", "i", "w20", "CHAN", "ROW", "COL"]
    assert str(cat["line_flux_integral"].unit) == "Hz Jy"


def test_blank_regions_are_masked_and_blank_tiles_skipped(card, tmp_path):
    path = tmp_path / "blank.fits"
    write_cube(path, card, blank=(slice(None), slice(0, 43), slice(0, 43)))  # blanks the first tile (rows, cols 0..41) and the source at (20, 20)
    summary, cat = _detect(path, tmp_path / "c.fits", tile=(64, 60, 60), overlap=(0, 36, 36))
    assert summary["n_skipped_tiles"] == 1 and summary["skipped"] == {"tile_all_masked": 1}
    found = [_match(cat, z, y, x)[1] < 1.0 for z, y, x, *_ in SOURCES]
    assert found == [False, True, True, True, True, True]


def test_cube_without_spectral_axis_or_beam_is_refused(card, tmp_path):
    def no_spectral(h):
        h["CTYPE3"], h["CUNIT3"] = "LINEAR", ""

    path = tmp_path / "nospec.fits"
    write_cube(path, card, [], header_edit=no_spectral)
    with pytest.raises(InputError, match="no frequency or velocity axis"):
        detect_cube(path, tmp_path / "c.fits", progress=False)
    nobeam = tmp_path / "nobeam.fits"
    write_cube(nobeam, card, [], header_edit=lambda h: [h.remove("BMAJ"), h.remove("BMIN")])
    with pytest.raises(InputError, match="no beam"):
        detect_cube(nobeam, tmp_path / "c.fits", progress=False)
    image = tmp_path / "image.fits"
    fits.PrimaryHDU(np.zeros((8, 8), np.float32)).writeto(image)
    with pytest.raises(InputError, match="no 3D/4D image HDU"):
        detect_cube(image, tmp_path / "c.fits", progress=False)
    assert not (tmp_path / "c.fits").exists()


def test_cosmofm_score_reads_the_detect_catalogue(cube, card, tmp_path, capsys):
    path, header = cube
    out = tmp_path / "cat.fits"
    assert cli_main(["detect", str(path), "--output", str(out), "--tile", "64,60,60", "--overlap", "0,36,36", "--workers", "2"]) == 0
    assert "detected" in capsys.readouterr().out
    w = WCS(header)
    dnu = card.channel_width.to_value(u.Hz)
    beam_sigma = card.beam_fwhm.to_value(u.arcsec) / math.sqrt(8 * math.log(2)) / card.pixel_scale.to_value(u.arcsec)
    truth = Table()
    ra, dec, freq = w.all_pix2world([s[2] for s in SOURCES], [s[1] for s in SOURCES], [s[0] for s in SOURCES], 0)
    truth["id"] = np.arange(len(SOURCES))
    truth["ra"], truth["dec"], truth["central_freq"] = ra * u.deg, dec * u.deg, freq * u.Hz
    truth["line_flux_integral"] = [p * 2 * math.pi * sxy**2 * math.sqrt(2 * math.pi) * sz * dnu / (2 * math.pi * beam_sigma**2) for _, _, _, p, sxy, sz in SOURCES] * u.Jy * u.Hz
    truth["hi_size"] = [2.8 * 2.355 * sxy for *_, sxy, _ in SOURCES] * u.arcsec
    truth["w20"] = [C_KMS * 2 * math.sqrt(2 * math.log(5)) * sz * dnu / f for (*_, sz), f in zip(SOURCES, freq)] * u.km / u.s
    truth["pa"], truth["i"] = np.zeros(len(SOURCES)) * u.deg, np.zeros(len(SOURCES)) * u.deg
    truth.write(tmp_path / "truth.fits")
    assert cli_main(["score", str(out), str(tmp_path / "truth.fits"), "--output", str(tmp_path / "score.json")]) == 0
    score = json.loads((tmp_path / "score.json").read_text())
    assert score["n_match"] == len(SOURCES) and score["n_false"] == 0  # SOFIA_TUNED, the default
    assert fits.getheader(out, 0)["NCANDID"] >= fits.getheader(out, 0)["NSOURCES"] == len(SOURCES)  # S+C candidates, then the cut
    defaults = tmp_path / "defaults.fits"
    assert cli_main(["detect", str(path), "--output", str(defaults), "--tile", "64,60,60", "--overlap", "0,36,36", "--sofia-defaults"]) == 0
    ref = _detect(path, tmp_path / "ref.fits", tile=(64, 60, 60), overlap=(0, 36, 36))[1]
    np.testing.assert_array_equal(np.asarray(Table.read(defaults)["line_flux_integral"]), np.asarray(ref["line_flux_integral"]))


def test_model_path_runs_the_tasks_tile_finder(cube, tiny_config, tmp_path):
    from cosmofm.heads.deblending import CosmoFMForDeblending, DeblendingHeadConfig
    from cosmofm.heads.detection3d import CosmoFMForDetection3D, Detection3DHeadConfig

    path, _ = cube
    model = CosmoFMForDetection3D.from_backbone_config(tiny_config, Detection3DHeadConfig(card="ska-hi-like"))  # untrained
    summary, cat = _detect(path, tmp_path / "m.fits", model=model, tile=(64, 64, 64), overlap=(0, 32, 32), config=None)
    assert summary["method"] == "model" and summary["n_tiles"] == 4
    assert "merge_s" in summary and summary["n_sources"] == len(cat) <= summary["n_candidates"]  # the cube-wide merge of duplicates ran
    assert {"score", "line_flux_integral_err", "CHAN_ERR"} <= set(cat.colnames)  # columns only the head's find_in_tile gives
    assert str(cat["central_freq"].unit) == "Hz"
    other = CosmoFMForDeblending.from_backbone_config(tiny_config, DeblendingHeadConfig(n_bands=2, bands=["g", "r"]))
    with pytest.raises(InputError, match="not a 'detection3d' one"):
        detect_cube(path, tmp_path / "x.fits", model=other, progress=False)
    with pytest.raises(InputError, match="either --model or --method"):
        detect_cube(path, tmp_path / "x.fits", model=model, method="sofia", progress=False)
