"""Noise that varies across the field (data_cards/readers/cube_noise.py, `detect_cube(noise=...)`):
the pattern measured from a primary-beam corrected mock cube follows the generator's own;
a cube of uniform noise is left alone by "auto" (the same catalogue as per-channel scaling);
local scaling divides the pattern out of what the finder reads and multiplies the fluxes back."""

import math

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from scipy import ndimage

from cosmofm.data_cards import load_card
from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.cube_sky import PrimaryBeam, noise_scale
from cosmofm.data_cards.mocks.cubes import mock_survey_cube, survey_header, write_survey_cube_fits
from cosmofm.data_cards.readers.cube_noise import SPREAD_TO_APPLY, NoisePattern, measure_noise_pattern
from cosmofm.data_cards.readers.mosaic import open_survey_cube
from cosmofm.finetune.detect import detect_cube

SHAPE = (48, 64, 64)
NOISE = 3e-5
SOURCE = (24, 52, 50)  # chan, row, col: where the noise is ~1.8x the centre's


@pytest.fixture(scope="module")
def card():
    return load_card("ska-hi-like")


def _pattern(shape):
    ny, nx = shape
    yy, xx = np.indices(shape, dtype=np.float64)
    r2 = ((yy - (ny - 1) / 2) ** 2 + (xx - (nx - 1) / 2) ** 2) / ((ny / 2) ** 2 + (nx / 2) ** 2)
    return 1.0 + r2  # 1 at the centre, 2 at the corners


def _cube(path, card, pattern: bool, seed=0):
    nf, ny, nx = SHAPE
    rng = np.random.default_rng(seed)
    sigma = card.beam_fwhm.to_value(u.arcsec) / math.sqrt(8 * math.log(2)) / card.pixel_scale.to_value(u.arcsec)
    n = ndimage.gaussian_filter(rng.standard_normal(SHAPE), (0, sigma / math.sqrt(2), sigma / math.sqrt(2)), mode="wrap")
    cube = n * (NOISE / n.std()) * (_pattern((ny, nx))[None] if pattern else 1.0)
    zz, yy, xx = np.indices(SHAPE, dtype=np.float64)
    z, y, x = SOURCE
    cube += 1e-3 * np.exp(-0.5 * (((yy - y) ** 2 + (xx - x) ** 2) / 2.5**2 + ((zz - z) / 4.0) ** 2))
    fits.PrimaryHDU(cube.astype(np.float32), survey_header(card, nf, ny, nx, 30.0, -30.0, 1.25e9)).writeto(path)
    return path


def test_the_measured_pattern_follows_the_primary_beams(card, tmp_path):
    cube, header, truth = mock_survey_cube(card, 64, 96, density=10000.0, seed=4, log_mhi_min=9.5, as_sample=False,
                                           primary_beam=PrimaryBeam(dish_diameter_m=200.0))
    path = write_survey_cube_fits(tmp_path / "pb.fits", cube, header, truth)
    pattern = measure_noise_pattern(open_survey_cube(path))
    true = noise_scale(header, [32])[0]
    ratio = pattern.region(slice(0, 96), slice(0, 96)) / (true / np.median(true))
    assert pattern.spread > SPREAD_TO_APPLY + 0.2 and 0.85 < ratio.min() and ratio.max() < 1.15
    assert pattern.at([0.0, 47.5], [0.0, 47.5]) == pytest.approx(pattern.region(slice(0, 48), slice(0, 48))[[0, 47], [0, 47]], rel=0.02)
    uniform = mock_survey_cube(card, 64, 96, density=10000.0, seed=4, log_mhi_min=9.5, as_sample=False)
    flat = measure_noise_pattern(open_survey_cube(write_survey_cube_fits(tmp_path / "flat.fits", *uniform)))
    assert flat.spread < SPREAD_TO_APPLY - 0.05


def test_local_scaling_reads_a_uniform_noise_and_keeps_the_fluxes(card, tmp_path):
    path = _cube(tmp_path / "pb.fits", card, pattern=True)
    cube = open_survey_cube(path)
    pattern = measure_noise_pattern(cube)
    cube.noise_pattern = pattern
    values, _ = cube.read((slice(0, 20), slice(0, 64), slice(0, 64)))  # channels without the source
    corner, centre = values[:, :12, :12].std(), values[:, 26:38, 26:38].std()
    assert pattern.spread > 1.4 and abs(corner / centre - 1) < 0.2  # read as uniform (2x before)
    fluxes = {}
    for mode in ("channel", "local"):
        s = detect_cube(path, tmp_path / f"{mode}.fits", method="sofia", workers=1, progress=False, noise=mode, tile=SHAPE, overlap=(8, 8, 8))
        assert s["noise_pattern"]["applied"] is (mode == "local")
        cat = Table.read(tmp_path / f"{mode}.fits")
        best = cat[int(np.argmax(np.asarray(cat["line_flux_integral"])))]
        assert abs(best["ROW"] - SOURCE[1]) < 2 and abs(best["COL"] - SOURCE[2]) < 2
        fluxes[mode] = float(best["line_flux_integral"])
    assert fluxes["local"] == pytest.approx(fluxes["channel"], rel=0.1)  # measured on the divided cube, scaled back


def test_auto_leaves_a_cube_of_uniform_noise_as_it_is(card, tmp_path):
    path = _cube(tmp_path / "flat.fits", card, pattern=False)
    runs = {mode: detect_cube(path, tmp_path / f"{mode}.fits", method="sofia", workers=1, progress=False, noise=mode, tile=SHAPE, overlap=(8, 8, 8))
            for mode in ("auto", "channel")}
    assert runs["auto"]["noise_pattern"]["applied"] is False and runs["auto"]["noise_pattern"]["spread"] < SPREAD_TO_APPLY
    a, c = Table.read(tmp_path / "auto.fits"), Table.read(tmp_path / "channel.fits")
    assert len(a) == len(c) >= 1 and np.array_equal(np.asarray(a["line_flux_integral"]), np.asarray(c["line_flux_integral"]))
    with pytest.raises(InputError, match="noise"):
        detect_cube(path, tmp_path / "bad.fits", method="sofia", workers=1, progress=False, noise="pixel")


def test_a_pattern_is_flat_beyond_its_outer_cells():
    p = NoisePattern(np.array([[1.0, 2.0], [3.0, 4.0]]), (8, 8))  # cell centres at pixels 1.5 and 5.5
    assert p.at([0.0, 1.5, 3.5, 7.0], [0.0, 1.5, 3.5, 7.0]) == pytest.approx([1.0, 1.0, 2.5, 4.0])
    assert p.region(slice(0, 8), slice(0, 8))[0, 7] == pytest.approx(2.0)
