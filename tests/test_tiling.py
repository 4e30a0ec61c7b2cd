"""Tiled inference (finetune/tiling.py) over a lazily read mosaic (data_cards/readers/mosaic.py):
the plan's cores partition the image, each source is kept by exactly one tile whatever the
tiling, the tile headers carry the WCS shifted to the tile, empty and blank tiles, and the
contract errors. The finder here is a plain threshold + label + centroid one, written in
the test, so the plumbing is checked apart from sep."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy import ndimage

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.readers.mosaic import open_mosaic
from cosmofm.finetune.tiling import TilePlan, axis_tiles, cli_shape, run_tiled

SHAPE = (200, 200)


def write_mosaic(path, sources=(), shape=SHAPE, bands=("g", "r"), noise=1.0, seed=0, blank=None):
    """A mosaic file in the agreed format: Gaussian sources (row, col, flux, sigma) + white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    w = WCS(naxis=2)
    w.wcs.ctype, w.wcs.crval = ["RA---TAN", "DEC--TAN"], [150.0, 2.0]
    w.wcs.crpix, w.wcs.cdelt = [shape[1] / 2 + 0.5, shape[0] / 2 + 0.5], [-0.2 / 3600, 0.2 / 3600]
    hdus = [fits.PrimaryHDU()]
    hdus[0].header["BANDS"] = ",".join(bands)
    for b, band in enumerate(bands):
        img = rng.normal(0.0, noise, shape)
        for row, col, flux, sigma in sources:
            img += flux / (2 * np.pi * sigma**2) * np.exp(-0.5 * ((yy - row) ** 2 + (xx - col) ** 2) / sigma**2)
        if blank is not None:
            img[blank] = np.nan
        h = w.to_header()
        h.update({"BUNIT": "nJy", "FILTER": band, "PIXSCALE": 0.2, "WAVELEN": 4800.0 + 1500 * b})
        hdus += [fits.ImageHDU(img.astype(np.float32), h, name=band), fits.ImageHDU(np.full(shape, 1 / noise**2, np.float32), name=f"IVAR_{band}")]
    fits.HDUList(hdus).writeto(path)
    return w


def label_finder(values, ivar, header):
    """Sources above 5 sigma in band 0: centroid, flux; and RA/Dec from the *tile's* header."""
    good = ivar[0] > 0
    mask = good & (values[0] * np.sqrt(np.where(good, ivar[0], 0)) > 5)
    labels, n = ndimage.label(mask)
    idx = np.arange(1, n + 1)
    cy, cx = (np.array(c).reshape(n) for c in zip(*ndimage.center_of_mass(np.where(mask, values[0], 0), labels, idx))) if n else (np.zeros(0), np.zeros(0))
    t = Table({"ROW": cy, "COL": cx, "FLUX_g": np.asarray(ndimage.sum(values[0], labels, idx)).reshape(n)})
    w = WCS(header)
    t["RA_TILE"], t["DEC_TILE"] = (np.asarray(a) for a in w.all_pix2world(cx, cy, 0)) if n else (np.zeros(0), np.zeros(0))
    return t


TEMPLATE = Table({"ID": np.zeros(0, np.int64), "RA": np.zeros(0), "DEC": np.zeros(0), "ROW": np.zeros(0), "COL": np.zeros(0), "FLUX_g": np.zeros(0)})


def _run(path, out, tile, overlap, workers=2, finder=label_finder):
    mosaic = open_mosaic(path)
    summary = run_tiled(mosaic, finder, out, TilePlan(mosaic.shape, tile, overlap), template=TEMPLATE, workers=workers, progress=False, inputs=[path])
    return summary, Table.read(out)


@pytest.mark.parametrize("n,tile,overlap", [(200, 100, 20), (200, 64, 16), (1024, 256, 64), (7, 3, 1), (100, 100, 10), (513, 128, 33)])
def test_plan_cores_partition_the_axis(n, tile, overlap):
    spans = axis_tiles(n, tile, overlap)
    assert spans[0][2] == 0 and spans[-1][3] == n
    for (r0, r1, c0, c1), nxt in zip(spans, spans[1:] + [None]):
        assert r1 - r0 <= tile and r0 <= c0 < c1 <= r1
        if nxt is not None:
            assert c1 == nxt[2]  # contiguous cores: every pixel in exactly one
            assert r1 - c1 >= overlap - overlap // 2 and nxt[2] - nxt[0] >= overlap // 2  # inner margins
    assert len(spans) == (1 if n <= tile else len(axis_tiles(n, tile, overlap)))


def test_core_boundary_keeps_a_centroid_once():
    tiles = list(TilePlan((200,), 100, 20))
    on_edge = np.array([[66.5], [66.4999], [-3.0], [205.0]])  # a core edge (67 - 0.5), just below, off the image both ways
    kept = np.array([t.holds(on_edge) for t in tiles])  # (tiles, points)
    assert kept.sum(axis=0).tolist() == [1, 1, 1, 1]
    assert kept[:, 0].tolist() == [False, True, False] and kept[:, 1].tolist() == [True, False, False]


def test_same_catalogue_for_any_tiling_and_no_duplicates(tmp_path):
    # sources exactly on core edges of the 100/20 tiling (67, 133) and of the 64/16 one (40, 80, 120, 160), and at the image edge
    sources = [(66.5, 66.5, 800, 1.5), (133.2, 40.0, 800, 1.5), (100.0, 120.3, 800, 1.5), (40.0, 160.0, 800, 1.5),
               (20.0, 80.0, 800, 1.5), (5.0, 150.0, 800, 1.5), (180.0, 180.0, 800, 1.5), (150.0, 100.0, 800, 1.5)]
    path = tmp_path / "m.fits"
    w = write_mosaic(path, sources)
    cats = {}
    for tile, overlap in ((200, 0), (100, 20), (64, 16)):
        summary, cats[tile] = _run(path, tmp_path / f"c{tile}.fits", tile, overlap)
        assert summary["n_sources"] == len(cats[tile]) == len(sources)
    ref = cats[200]
    order = np.lexsort((ref["COL"], ref["ROW"]))
    for tile in (100, 64):
        other = cats[tile][np.lexsort((cats[tile]["COL"], cats[tile]["ROW"]))]
        # the same pixels give the same centroids and fluxes: float rounding only (sums in another order)
        for col in ("ROW", "COL", "FLUX_g"):
            np.testing.assert_allclose(other[col], ref[order][col], rtol=1e-9, atol=1e-9)
        assert np.array_equal(np.sort(cats[tile]["ID"]), np.arange(len(sources)))
    truth = np.array([[r, c] for r, c, _, _ in sources])
    found = np.column_stack([ref["ROW"], ref["COL"]])
    d = np.hypot(*(found[:, None] - truth[None]).transpose(2, 0, 1)).min(axis=0)
    assert d.max() < 0.1  # every injected source, once
    # world columns from the full WCS agree with the finder's own, computed from each tile's shifted header
    for cat in cats.values():
        np.testing.assert_allclose(cat["RA"], cat["RA_TILE"], rtol=0, atol=1e-10)
        np.testing.assert_allclose(cat["DEC"], cat["DEC_TILE"], rtol=0, atol=1e-10)
    ra, dec = w.all_pix2world(ref["COL"], ref["ROW"], 0)
    np.testing.assert_allclose(ref["RA"], ra, atol=1e-10)
    np.testing.assert_allclose(ref["DEC"], dec, atol=1e-10)


def test_one_worker_and_two_give_the_same_rows(tmp_path):
    path = tmp_path / "m.fits"
    write_mosaic(path, [(50.0, 50.0, 800, 1.5), (150.0, 150.0, 800, 1.5), (66.5, 140.0, 800, 1.5)])
    _, one = _run(path, tmp_path / "one.fits", 64, 16, workers=1)
    _, two = _run(path, tmp_path / "two.fits", 64, 16, workers=2)
    assert one.colnames == two.colnames and len(one) == 3
    for col in one.colnames:
        assert np.array_equal(np.asarray(one[col]), np.asarray(two[col]))


def test_blank_tile_is_skipped_and_counted(tmp_path):
    path = tmp_path / "m.fits"
    write_mosaic(path, [(150.0, 150.0, 800, 1.5)], blank=(slice(0, 90), slice(0, 90)))  # covers the first 100/20 tile (0..77)^2
    summary, cat = _run(path, tmp_path / "c.fits", 100, 20)
    assert summary["n_skipped_tiles"] == 1 and summary["skipped"] == {"tile_all_masked": 1}
    assert len(cat) == 1 and abs(cat["ROW"][0] - 150) < 0.1
    assert fits.getheader(tmp_path / "c.fits", 0)["NSKIPTIL"] == 1


def test_empty_field_is_a_valid_empty_catalogue(tmp_path):
    path = tmp_path / "m.fits"
    write_mosaic(path, [])
    summary, cat = _run(path, tmp_path / "c.fits", 100, 20)
    assert summary["n_sources"] == 0 and len(cat) == 0
    assert cat.colnames[: len(TEMPLATE.colnames)] == TEMPLATE.colnames


def test_finder_and_plan_errors(tmp_path):
    path = tmp_path / "m.fits"
    write_mosaic(path, [(50.0, 50.0, 800, 1.5)])
    with pytest.raises(InputError, match="centroid column"):
        _run(path, tmp_path / "a.fits", 100, 20, workers=1, finder=lambda v, i, h: Table({"X": [1.0]}))
    with pytest.raises(InputError, match="not an astropy Table"):
        _run(path, tmp_path / "b.fits", 100, 20, workers=1, finder=lambda v, i, h: {"ROW": [1.0], "COL": [1.0]})
    assert not list(tmp_path.glob(".a.fits*")) and not (tmp_path / "a.fits").exists()  # nothing left behind
    with pytest.raises(InputError, match="smaller than the tile"):
        TilePlan((200, 200), 64, 64)
    with pytest.raises(InputError, match="is one of the inputs"):
        _run(path, path, 100, 20)
    (tmp_path / "exists.fits").write_bytes(b"")
    with pytest.raises(InputError, match="already exists"):
        _run(path, tmp_path / "exists.fits", 100, 20)
    assert cli_shape("256,128,128", 3, "tile") == (256, 128, 128) and cli_shape("512", 2, "tile") == 512
    with pytest.raises(InputError, match="2 numbers for 3 axes"):
        cli_shape("1,2", 3, "tile")
