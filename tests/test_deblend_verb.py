"""`cosmofm deblend` (finetune/deblend.py) with the classical finders on small 2-band mosaics:
the same catalogue for two tilings (blends on tile edges included), the WCS round trip,
an empty field, per-source stamps, and each bad input of issue 20 (bands on another grid,
NaN region, saturated pixels, no WCS, missing IVAR, a missing band, nothing usable)."""

import warnings

import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from test_tiling import write_mosaic  # tests/test_tiling.py

from cosmofm.cli import main as cli_main
from cosmofm.data_cards.errors import InputError
from cosmofm.finetune.deblend import FLAG_BITS, deblend_image

# isolated sources, one on core edges of both tilings below (row 100, col 150), one on the 64/30 tiling's (col 67),
# a blended pair straddling a core edge, one at the image edge
SOURCES = [(30.0, 30.0, 900, 1.8), (100.0, 150.0, 900, 1.8), (66.6, 67.0, 900, 1.8), (160.0, 40.0, 1200, 2.2),
           (130.0, 98.0, 900, 1.8), (130.0, 104.5, 600, 1.8), (3.0, 120.0, 900, 1.8), (170.0, 170.0, 900, 1.8)]


def _deblend(path, out, **kw):
    kw = {"workers": 2, "progress": False, "thresh": 5.0, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the mosaic's flags are asserted on the summary
        return deblend_image(path, out, **kw), Table.read(out)


def _nearest(cat, row, col):
    d = np.hypot(np.asarray(cat["Y"]) - row, np.asarray(cat["X"]) - col)
    return int(np.argmin(d)), float(d.min())


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    path = tmp_path_factory.mktemp("deblend") / "field.fits"
    w = write_mosaic(path, SOURCES)
    return path, w


def test_two_tilings_give_the_same_catalogue(field, tmp_path):
    path, _ = field
    s1, one = _deblend(path, tmp_path / "one.fits")  # sep's default 512 px tiles: one tile, the whole image
    s2, many = _deblend(path, tmp_path / "many.fits", tile=100, overlap=40)  # 4 x 4 tiles, core edges at 50, 100, 150
    s3, more = _deblend(path, tmp_path / "more.fits", tile=64, overlap=30)  # 6 x 6 tiles, core edges at 33, 67, 100, 133, 167
    assert (s1["n_tiles"], s2["n_tiles"], s3["n_tiles"]) == (1, 16, 36)
    assert len(one) == len(SOURCES)  # the pair is deblended, nothing split, nothing spurious at 5 sigma
    for cat in (many, more):
        assert len(cat) == len(one)  # no duplicates at tile edges, nothing lost
        for k in range(len(one)):
            j, d = _nearest(cat, one["Y"][k], one["X"][k])
            # Every source lies whole (footprint, Kron ellipse, parent blend) within overlap / 2 of
            # its core, and the sky is one level for the mosaic: the tiles hold the same pixels, so
            # sep gives the same numbers up to float32 sums in another order.
            assert d < 1e-4
            for b in ("g", "r"):
                np.testing.assert_allclose(cat[f"FLUX_{b}"][j], one[f"FLUX_{b}"][k], rtol=1e-5)
                np.testing.assert_allclose(cat[f"FLUXERR_{b}"][j], one[f"FLUXERR_{b}"][k], rtol=1e-5)
            assert cat["FLAGS"][j] == one["FLAGS"][k]
    j, _ = _nearest(one, 3.0, 120.0)
    assert one["FLAGS"][j] & FLAG_BITS["edge"]
    assert sum(bool(f & FLAG_BITS["edge"]) for f in one["FLAGS"]) == 1


def test_catalogue_columns_units_and_wcs_round_trip(field, tmp_path):
    path, w = field
    # a source injected at a known RA/Dec, in a tile other than the first
    ra0, dec0 = 150.003, 2.004
    col0, row0 = (float(v) for v in w.all_world2pix(ra0, dec0, 0))
    assert 100 < row0 < 200 and 0 < col0 < 100
    src = tmp_path / "one_source.fits"
    write_mosaic(src, [(row0, col0, 20000, 1.8)], seed=3)
    _, cat = _deblend(src, tmp_path / "c.fits", tile=100, overlap=40)
    assert len(cat) == 1
    assert cat.colnames == ["ID", "RA", "DEC", "X", "Y", "FLUX_g", "FLUXERR_g", "FLUX_r", "FLUXERR_r", "FLAGS"]
    assert (str(cat["RA"].unit), str(cat["X"].unit), str(cat["FLUX_g"].unit), str(cat["FLUXERR_r"].unit)) == ("deg", "pix", "nJy", "nJy")
    sep_px = np.hypot((cat["RA"][0] - ra0) * np.cos(np.radians(dec0)), cat["DEC"][0] - dec0) * 3600 / 0.2
    assert sep_px < 0.1
    assert abs(cat["X"][0] - col0) < 0.1 and abs(cat["Y"][0] - row0) < 0.1
    assert abs(cat["FLUX_g"][0] / 20000 - 1) < 0.05  # the Kron flux of a bright isolated source
    assert abs(cat["FLUX_r"][0] / cat["FLUX_g"][0] - 1) < 0.05


def test_empty_field_gives_an_empty_catalogue_with_every_column(tmp_path):
    path = tmp_path / "empty.fits"
    write_mosaic(path, [])
    summary, cat = _deblend(path, tmp_path / "c.fits", tile=100, overlap=40, thresh=5.0)
    assert summary["n_sources"] == 0 and len(cat) == 0
    assert cat.colnames == ["ID", "RA", "DEC", "X", "Y", "FLUX_g", "FLUXERR_g", "FLUX_r", "FLUXERR_r", "FLAGS"]
    assert str(cat["FLUX_r"].unit) == "nJy"
    assert fits.getheader(tmp_path / "c.fits", 0)["NSOURCES"] == 0


def test_stamps_isolate_each_source(field, tmp_path):
    path, _ = field
    _, cat = _deblend(path, tmp_path / "s.fits", tile=100, overlap=40, write_stamps=True)
    with fits.open(tmp_path / "s.fits") as hdul:
        stamps = {h.header["ID"]: h for h in hdul[2:]}
        assert len(hdul) == 2 + len(cat) and set(stamps) == set(int(i) for i in cat["ID"])
        k, _ = _nearest(cat, 130.0, 98.0)  # the brighter member of the blended pair
        s = stamps[int(cat["ID"][k])]
        assert s.name == f"SRC{cat['ID'][k]}" and s.data.shape[0] == 2
        rel_row, rel_col = 130 - s.header["ROW0"], 104.5 - s.header["COL0"]  # the neighbour's centre, inside this stamp
        assert 0 <= rel_row < s.data.shape[1] and 0 <= rel_col < s.data.shape[2]
        assert s.data[:, int(round(rel_row)), int(round(rel_col))].tolist() == [0.0, 0.0]  # the neighbour is cut out
        centre = s.data[0, int(round(130 - s.header["ROW0"])), int(round(98 - s.header["COL0"]))]
        assert centre > 20  # the source itself is kept (peak ~ 900 / (2 pi 1.8^2) ~ 44 nJy)
    # each stamp's WCS is the mosaic's shifted to the stamp: its pixel (0, 0) is the full frame's (COL0, ROW0)
    _, w = field
    for s in stamps.values():
        np.testing.assert_allclose(WCS(s.header, naxis=2).all_pix2world(0, 0, 0), w.all_pix2world(s.header["COL0"], s.header["ROW0"], 0), atol=1e-10)
    with pytest.raises(InputError, match="stamps need a FITS"):
        deblend_image(path, tmp_path / "s.parquet", write_stamps=True, progress=False)
    with pytest.raises(InputError, match="bf16: runs a model's network in bfloat16, but the deblender is sep"):
        deblend_image(path, tmp_path / "b.fits", bf16=True, progress=False)


def test_photutils_finds_the_same_sources(field, tmp_path):
    path, _ = field
    _, sep_cat = _deblend(path, tmp_path / "sep.fits", tile=100, overlap=40)
    _, phot = _deblend(path, tmp_path / "phot.fits", tile=100, overlap=40, method="photutils")
    isolated = [(r, c) for r, c, _, _ in SOURCES if r != 130.0]
    assert all(_nearest(phot, r, c)[1] < 0.5 for r, c in isolated)  # photutils may merge the close pair (6.5 px, 1.4 FWHM)
    assert len(sep_cat) == len(SOURCES) and len(isolated) + 1 <= len(phot) <= len(SOURCES)


def _variant(path, tmp_path, name, edit):
    """A copy of the mosaic at `path` with `edit(hdul)` applied."""
    out = tmp_path / name
    with fits.open(path) as hdul:
        hdul = fits.HDUList([h.copy() for h in hdul])
    edit(hdul)
    hdul.writeto(out)
    return out


def test_band_on_another_grid_is_skipped_and_flagged(field, tmp_path):
    path, _ = field

    def shift_r(hdul):
        hdul["r"].header["CRPIX1"] += 1.5  # same shape, 1.5 px off

    def crop_r(hdul):
        hdul["r"].data = hdul["r"].data[:150]

    for name, edit in (("shifted.fits", shift_r), ("cropped.fits", crop_r)):
        bad = _variant(path, tmp_path, name, edit)
        with pytest.warns(UserWarning, match="another pixel grid"):
            summary = deblend_image(bad, tmp_path / f"c_{name}", tile=100, overlap=40, thresh=5.0, progress=False, workers=1)
        cat = Table.read(tmp_path / f"c_{name}")
        assert summary["bands"] == ["g"] and "band_off_grid" in summary["flags"]
        assert "FLUX_r" not in cat.colnames and len(cat) == len(SOURCES)
        assert fits.getheader(tmp_path / f"c_{name}", 0)["OFFGRID"] is True


def test_nan_region_and_saturated_pixels_are_masked_and_flagged(field, tmp_path):
    path, _ = field

    def nan_and_saturate(hdul):
        for b in ("g", "r"):
            hdul[b].data[:, 180:] = np.nan  # a blank strip next to the source at (170, 170)
            hdul[b].header["SATURATE"] = 30.0  # the peaks of the 900 nJy sources (~44) saturate
        hdul["g"].data[0:20, 0:20] = np.nan

    bad = _variant(path, tmp_path, "nan.fits", nan_and_saturate)
    summary, cat = _deblend(bad, tmp_path / "c.fits", tile=100, overlap=40)
    assert summary["flags"] == {}
    assert not np.any(np.asarray(cat["X"]) > 181)  # nothing found in the blank strip
    k, d = _nearest(cat, 170.0, 170.0)
    assert d < 1.0 and cat["FLAGS"][k] & FLAG_BITS["masked_pixels"]
    k, d = _nearest(cat, 160.0, 40.0)  # 1200 nJy, sigma 2.2: peak ~39 > 30, saturated too
    assert d < 1.0 and cat["FLAGS"][k] & FLAG_BITS["masked_pixels"]
    masked = sum(bool(f & FLAG_BITS["masked_pixels"]) for f in cat["FLAGS"])
    assert masked == len(cat)  # all these sources peak above SATURATE


def test_no_wcs_gives_pixel_positions_and_a_flag(field, tmp_path):
    path, _ = field

    def strip_wcs(hdul):
        for b in ("g", "r"):
            for key in ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CDELT1", "CDELT2", "CUNIT1", "CUNIT2", "WCSAXES", "LATPOLE", "LONPOLE", "MJDREF", "RADESYS"):
                hdul[b].header.remove(key, ignore_missing=True)

    bad = _variant(path, tmp_path, "nowcs.fits", strip_wcs)
    with pytest.warns(UserWarning, match="no celestial WCS"):
        summary = deblend_image(bad, tmp_path / "c.fits", tile=100, overlap=40, thresh=5.0, progress=False, workers=1)
    cat = Table.read(tmp_path / "c.fits")
    assert "no_wcs" in summary["flags"] and len(cat) == len(SOURCES)
    assert np.all(np.isnan(np.ma.filled(cat["RA"], np.nan))) and np.all(cat["FLAGS"] & FLAG_BITS["no_wcs"])  # NaN reads back masked
    assert fits.getheader(tmp_path / "c.fits", 0)["NOWCS"] is True
    k, d = _nearest(cat, 30.0, 30.0)
    assert d < 0.1


def test_missing_ivar_is_estimated_from_the_sky(field, tmp_path):
    path, _ = field
    _, ref = _deblend(path, tmp_path / "ref.fits", tile=100, overlap=40)
    bad = _variant(path, tmp_path, "noivar.fits", lambda hdul: [hdul.pop(hdul.index_of("IVAR_g")), hdul.pop(hdul.index_of("IVAR_r"))])
    summary, cat = _deblend(bad, tmp_path / "c.fits", tile=100, overlap=40)
    assert "ivar_estimated" in summary["flags"] and np.all(cat["FLAGS"] & FLAG_BITS["ivar_estimated"])
    assert len(cat) == len(ref)
    k, _ = _nearest(cat, 30.0, 30.0)
    j, _ = _nearest(ref, 30.0, 30.0)
    # the sky estimate recovers the true noise (1 nJy) to ~1 %: errors within 5 % of those from the true IVAR
    assert cat["FLUXERR_g"][k] == pytest.approx(ref["FLUXERR_g"][j], rel=0.05)


def test_missing_band_and_nothing_usable(field, tmp_path):
    path, _ = field
    listed = _variant(path, tmp_path, "listed.fits", lambda hdul: hdul[0].header.__setitem__("BANDS", "g,r,i"))
    summary, cat = _deblend(listed, tmp_path / "c.fits", tile=100, overlap=40)
    assert summary["bands"] == ["g", "r"] and "band_missing" in summary["flags"]

    def blank_all(hdul):
        for b in ("g", "r"):
            hdul[b].data[:] = np.nan

    with pytest.raises(InputError, match="no usable band"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        deblend_image(_variant(path, tmp_path, "blank.fits", blank_all), tmp_path / "d.fits", progress=False)


def test_cli_deblend(field, tmp_path, capsys):
    path, _ = field
    out = tmp_path / "cli.fits"
    assert cli_main(["deblend", str(path), "--output", str(out), "--tile", "100", "--overlap", "40", "--workers", "1", "--thresh", "5"]) == 0
    assert len(Table.read(out)) == len(SOURCES) and "deblended 8 sources (sep" in capsys.readouterr().out
    assert cli_main(["deblend", str(path), "--output", str(tmp_path / "x.fits"), "--model", str(tmp_path / "none"), "--method", "sep"]) == 2
    assert "either --model or --method" in capsys.readouterr().err


def test_model_path_runs_the_tasks_tile_finder(field, tiny_config, tmp_path):
    from cosmofm.heads.deblending import CosmoFMForDeblending, DeblendingHeadConfig

    path, _ = field
    model = CosmoFMForDeblending.from_backbone_config(tiny_config, DeblendingHeadConfig(n_bands=2, bands=["g", "r"], band_wavelengths=[4800.0, 6300.0], card="lsst-like"))  # untrained
    from cosmofm.data_cards.io.catalogue import read_catalogue

    summary, _ = _deblend(path, tmp_path / "m.parquet", model=model)
    cat = read_catalogue(tmp_path / "m.parquet")  # units from the Parquet field metadata
    assert summary["method"] == "model" and summary["n_tiles"] == 4  # a model's default tiles: 128 px, overlap 32 (sep's: 1)
    assert cat.colnames[:10] == ["ID", "RA", "DEC", "X", "Y", "FLUX_g", "FLUXERR_g", "FLUX_r", "FLUXERR_r", "FLAGS"]  # a Parquet catalogue too
    assert str(cat["FLUX_g"].unit) == "nJy" and len(cat) == summary["n_sources"]
    # --write-stamps from the model's segmentation: one isolated cut-out per source with a segment
    # untrained, its heatmap's peaks are weak and the background channel takes every pixel: lower
    # both so that the segmentation has sources to cut out
    model.head_config.peak_threshold = 1e-3
    with torch.no_grad():
        model.decoder.out.bias[3:5] = -30.0  # the two bands' background logits
    _, fits_cat = _deblend(path, tmp_path / "m.fits", model=model, tile=128, overlap=32, write_stamps=True, bf16=False)
    with fits.open(tmp_path / "m.fits") as hdul:
        stamps = [h for h in hdul[2:]]
        assert len(fits_cat) > 0 and len(stamps) == len(fits_cat)
        assert all(h.name == f"SRC{h.header['ID']}" and h.data.shape[0] == 2 and np.abs(h.data).sum() > 0 for h in stamps)
    # bf16: the network under bfloat16 autocast in the tiler's workers, recorded in the header (its
    # numbers: test_deblending_head.py; here the untrained heatmap's noise-level peaks move with rounding)
    _deblend(path, tmp_path / "m16.fits", model=model, tile=128, overlap=32, bf16=True)
    assert fits.getheader(tmp_path / "m16.fits", 0)["BF16"] is True and fits.getheader(tmp_path / "m.fits", 0)["BF16"] is False
    assert not np.array_equal(Table.read(tmp_path / "m16.fits")["X"], fits_cat["X"])  # the autocast reached the workers
    # the default: bfloat16 where the CPU computes it natively (AVX512-BF16 / AMX), float32 elsewhere
    from cosmofm.heads.redshift_net_cpu import native_bf16

    _deblend(path, tmp_path / "mdef.fits", model=model, tile=128, overlap=32)
    assert fits.getheader(tmp_path / "mdef.fits", 0)["BF16"] is native_bf16()


def test_a_model_meeting_another_seeing_flags_every_row(field, tiny_config, tmp_path):
    """The mosaic's PSFFWHM against the head's training card (fwhm_pixels 4.5 at 0.2 arcsec):
    0.92 arcsec (1.02x) passes with PSFRATIO in the header; 1.2 arcsec (1.33x) warns, sets
    PSFDIFF and the psf_unlike_training bit on every row, and names the problem in the summary."""
    import shutil

    from cosmofm.finetune.deblend import psf_check
    from cosmofm.heads.deblending import CosmoFMForDeblending, DeblendingHeadConfig

    model = CosmoFMForDeblending.from_backbone_config(tiny_config, DeblendingHeadConfig(n_bands=2, bands=["g", "r"], band_wavelengths=[4800.0, 6300.0],
                                                                                        card="lsst-like", peak_threshold=1e-3))
    with torch.no_grad():
        model.decoder.out.bias[3:5] = -30.0  # untrained: let the weak peaks through (as the test above)
    bit = FLAG_BITS["psf_unlike_training"]
    for fwhm, flagged in ((0.92, False), (1.2, True)):
        path = tmp_path / f"psf{fwhm}.fits"
        shutil.copy(field[0], path)
        for band in ("g", "r"):
            fits.setval(path, "PSFFWHM", value=fwhm, extname=band)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = deblend_image(path, tmp_path / f"cat{fwhm}.fits", model=model, workers=1, progress=False, bf16=False)
        cat, header = Table.read(tmp_path / f"cat{fwhm}.fits"), fits.getheader(tmp_path / f"cat{fwhm}.fits", 0)
        assert len(cat) > 0 and header["PSFRATIO"] == pytest.approx(fwhm / 0.2 / 4.5, rel=1e-3)
        assert bool(header.get("PSFDIFF", False)) is flagged and ("psf_unlike_training" in summary["flags"]) is flagged
        assert np.all((np.asarray(cat["FLAGS"]) & bit) == (bit if flagged else 0))
        assert any("1.33x the card's, outside the seeing the head was trained on (4.50 px" in str(w.message) for w in caught) is flagged
    mosaic = type("Mosaic", (), {"psf_fwhm": None, "pixscale": 0.2})()
    assert psf_check(model.head_config, mosaic) == (None, None)  # no PSF given: nothing to compare
    told = DeblendingHeadConfig(n_bands=2, bands=["g", "r"], card="lsst-like", psf_conditioning=True)
    assert "no PSFFWHM" in psf_check(told, mosaic)[1]  # ... but a head told the seeing would be told the card's
    # a head trained across seeing (trained_psf_range, `DeblendingTask.prepare`) is flagged only outside it, with 10 % to spare
    across = DeblendingHeadConfig(n_bands=2, bands=["g", "r"], card="lsst-like", trained_psf_range=[0.85, 1.35])
    for ratio, flagged in ((0.76, True), (0.78, False), (1.0, False), (1.33, False), (1.48, False), (1.5, True)):
        mosaic.psf_fwhm = ratio * 4.5 * 0.2  # arcsec
        measured, problem = psf_check(across, mosaic)
        assert measured == pytest.approx(ratio) and (problem is not None) is flagged, (ratio, problem)
    assert "0.85-1.35x its 4.50 px" in psf_check(across, mosaic)[1]
