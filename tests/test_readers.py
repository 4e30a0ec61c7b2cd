"""Survey-format readers (data_cards/readers/): files built from the mocks following each
published data model are read back exactly, and every malformed variant is an InputError
that names the file and HDU/column, while per-object problems are flags, not crashes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy import constants as const
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table

from cosmofm.cli import main
from cosmofm.data_cards import InputError, load_card
from cosmofm.data_cards.io.catalogue import CatalogueWriter, catalogue_rows, read_catalogue, write_catalogue
from cosmofm.data_cards.io.fits_io import write_fits
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.data_cards.readers import air_to_vacuum, cutouts, detect, iter_cube_chunks, read_any, read_cutouts, vacuum_to_air
from cosmofm.data_cards.readers.desi import _join_interpolated, join_cameras
from cosmofm.data_cards.io.survey_files import write_desi_coadd, write_eso_sdp, write_fits_cube, write_fits_image, write_sdss_spec

C_KMS = const.c.to_value("km/s")


@pytest.fixture(scope="module")
def mocks():
    return {
        "sdss": mock_samples(load_card("sdss-like"), 1, seed=5)[0],
        "desi": mock_samples(load_card("desi-like"), 3, seed=5),
        "4most": mock_samples(load_card("4most-lrs"), 2, seed=5),
        "image": mock_samples(load_card("lsst-like"), 1, seed=5)[0],
        "cube": mock_samples(load_card("ska-hi-like"), 1, seed=5)[0],
    }


def edit(path, fn):
    """Rewrite a FITS file after fn(hdul) changed it in memory."""
    with fits.open(path) as hdul:
        hdul = fits.HDUList([h.copy() for h in hdul])
    fn(hdul)
    hdul.writeto(path, overwrite=True)


# ---------------------------------------------------------------------------- conventions


def test_air_vacuum_follow_morton_2000():
    # H-alpha: 6564.61 A in vacuum, 6562.80 A in air (IAU standard).
    assert vacuum_to_air(np.array([6564.61]))[0] == pytest.approx(6562.80, abs=0.01)
    w = np.linspace(2001, 25000, 1000)  # (air wavelengths below 2000 A are not converted)
    np.testing.assert_allclose(air_to_vacuum(vacuum_to_air(w)), w, rtol=0, atol=1e-8)
    assert vacuum_to_air(np.array([1500.0]))[0] == 1500.0  # vacuum below 2000 A by convention


# ---------------------------------------------------------------------------- SDSS


def test_sdss_spec_lite_round_trip(tmp_path, mocks):
    s = mocks["sdss"]
    and_mask = np.where(s.ivar == 0, 1 << 24, 0).astype(np.int32)
    sky = np.flatnonzero(s.ivar > 0)[100:105]
    and_mask[sky] |= 1 << 23  # BRIGHTSKY on good pixels: masked by default (any and_mask bit)
    path = write_sdss_spec(s, tmp_path / "spec-4055-55359-0001.fits", and_mask=and_mask)
    r = read_any(path)
    assert (r.format, r.card.name, len(r.samples)) == ("sdss-spec", "sdss-like", 1)
    assert "SDSS 2.5-M" in r.card_reason
    got = r.samples[0]
    loglam = np.asarray(fits.getdata(path, "COADD")["loglam"], np.float64)
    np.testing.assert_array_equal(got.coords["wavelength"], 10.0**loglam)
    np.testing.assert_array_equal(got.values, s.values)
    expect_ivar = np.where(and_mask != 0, 0, s.ivar)
    np.testing.assert_array_equal(got.ivar, expect_ivar)
    m = got.meta
    assert (m["id"], m["plate"], m["mjd"], m["fiberid"], m["ra"], m["dec"]) == ("spec-4055-55359-0001", 4055, 55359, 1, 150.1, 2.2)
    assert "labels" not in m and m["pipeline"]["z"] == pytest.approx(s.meta["labels"]["redshift"])  # pipeline answers are metadata only
    assert m["resolving_power"] == pytest.approx(1 / (2.3548 * 1.1 * 1e-4 * np.log(10)), rel=1e-3)
    assert list(r.identifiers["plate"]) == [4055] and r.identifiers["ra"].unit == "deg"
    # only the NODATA bit: the BRIGHTSKY pixels keep their ivar
    again = read_any(path, mask_bits=1 << 24).samples[0]
    assert np.all(again.ivar[sky] > 0)


def test_sdss_flux_unit_and_air_wavelengths_from_header(tmp_path, mocks):
    s = mocks["sdss"]
    path = write_sdss_spec(s, tmp_path / "spec.fits", vacuum=False)
    edit(path, lambda h: h[0].header.update(BUNIT="1E-16 erg/cm^2/s/Ang"))
    got = read_any(path).samples[0]
    loglam = np.asarray(fits.getdata(path, "COADD")["loglam"], np.float64)
    np.testing.assert_allclose(got.coords["wavelength"], air_to_vacuum(10.0**loglam), rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.coords["wavelength"], s.coords["wavelength"], rtol=1.5e-6)  # float32 loglam
    np.testing.assert_allclose(got.values, s.values * 10, rtol=1e-6)
    np.testing.assert_allclose(got.ivar, s.ivar / 100, rtol=1e-6)


def test_sdss_missing_coadd_hdu(tmp_path, mocks):
    path = write_sdss_spec(mocks["sdss"], tmp_path / "spec.fits")
    edit(path, lambda h: h.pop(1))
    with pytest.raises(InputError) as e:
        read_any(path)
    assert "spec.fits[COADD]" in str(e.value) and "missing" in str(e.value)


def test_sdss_all_masked_spectrum_is_reported(tmp_path, mocks):
    s = mocks["sdss"]
    path = write_sdss_spec(s, tmp_path / "spec.fits", and_mask=np.full(s.shape[0], 1 << 24, np.int32))
    with pytest.raises(InputError) as e:
        read_any(path)
    assert "spec.fits" in str(e.value) and "all_masked" in str(e.value)


def _specobj_table(path, samples, spectra=True):
    n = len(samples)
    cols = [fits.Column("PLATE", "J", array=[7000] * n), fits.Column("MJD", "J", array=[56000] * n), fits.Column("FIBERID", "J", array=np.arange(1, n + 1)),
            fits.Column("CLASS", "6A", array=["GALAXY"] * n), fits.Column("Z", "E", array=[0.1] * n),
            fits.Column("PLUG_RA", "D", array=[10.0 + i for i in range(n)]), fits.Column("PLUG_DEC", "D", array=[-1.0] * n)]
    if spectra:
        npix = samples[0].shape[0]
        cols += [fits.Column("LOGLAM", f"{npix}E", array=np.stack([np.log10(s.coords["wavelength"]) for s in samples]).astype(np.float32)),
                 fits.Column("FLUX", f"{npix}E", array=np.stack([s.values for s in samples])),
                 fits.Column("IVAR", f"{npix}E", array=np.stack([s.ivar for s in samples]))]
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols, name="SPECOBJ")]).writeto(path)
    return path


def test_sdss_specobj_table_flags_bad_rows_and_keeps_the_rest(tmp_path):
    samples = mock_samples(load_card("sdss-like"), 3, seed=8)
    samples[1].ivar[:] = 0  # all masked
    r = read_any(_specobj_table(tmp_path / "specObj-lite.fits", samples))
    assert r.format == "sdss-table" and [s.id for s in r.samples] == ["spec-7000-56000-0001", "spec-7000-56000-0003"]
    assert [(f.code, f.id, f.action) for f in r.flags] == [("all_masked", "spec-7000-56000-0002", "skipped")]
    assert list(r.identifiers["used"]) == [True, False, True] and list(r.identifiers["fiberid"]) == [1, 2, 3]
    np.testing.assert_array_equal(r.samples[1].values, samples[2].values)
    assert r.samples[1].meta["pipeline"]["class"] == "GALAXY" and r.samples[1].meta["ra"] == 12.0


def test_specobj_catalogue_without_spectra_says_so(tmp_path):
    path = _specobj_table(tmp_path / "specObj-dr17.fits", mock_samples(load_card("sdss-like"), 2, seed=8), spectra=False)
    with pytest.raises(InputError) as e:
        read_any(path)
    assert "[SPECOBJ]" in str(e.value) and "without spectra" in str(e.value)


# ---------------------------------------------------------------------------- DESI


def test_desi_coadd_joins_cameras_exactly(tmp_path, mocks):
    samples = mocks["desi"]
    path = write_desi_coadd(samples, tmp_path / "coadd-main-dark-10016.fits", targetids=[11, 22, 33])
    r = read_any(path)
    assert (r.format, r.card.name) == ("desi-coadd", "desi-like")
    assert [s.id for s in r.samples] == ["desi-11", "desi-22", "desi-33"]
    for got, want in zip(r.samples, samples):
        np.testing.assert_array_equal(got.coords["wavelength"], want.coords["wavelength"])  # 7781-pixel union, no duplicates
        good = want.ivar > 0
        np.testing.assert_array_equal(got.values[good], want.values[good])
        np.testing.assert_allclose(got.ivar, want.ivar, rtol=1e-6)  # half the ivar in each camera of an overlap
    m = r.samples[0].meta
    assert m["targetid"] == 11 and m["ra"] == 150.0 and m["resolving_power"]["b"] == pytest.approx(2000, rel=0.01)
    assert r.identifiers["targetid"].dtype == np.int64


def test_iter_read_streams_big_files_in_pieces(tmp_path, mocks):
    """Files of many objects come in pieces of `chunk_rows` (bounded memory), with the same
    samples, flags and identifiers as one read, row numbers file-wide."""
    from cosmofm.data_cards.readers import iter_read

    desi = list(mocks["desi"]) * 2  # 6 targets
    desi[4] = mock_samples(load_card("desi-like"), 1, seed=9)[0]
    desi[4].ivar[:] = 0  # all masked: flagged and skipped
    path = write_desi_coadd(desi, tmp_path / "coadd-main-dark-1.fits", targetids=[1, 2, 3, 4, 5, 6])
    whole = read_any(path)
    pieces = list(iter_read(path, chunk_rows=4))
    assert [p.identifiers["targetid"].tolist() for p in pieces] == [[1, 2, 3], [4, 5, 6]]  # at most 4, near-equal
    assert [s.id for p in pieces for s in p.samples] == [s.id for s in whole.samples] == ["desi-1", "desi-2", "desi-3", "desi-4", "desi-6"]
    for got, want in zip([s for p in pieces for s in p.samples], whole.samples):
        np.testing.assert_array_equal(got.values, want.values)
    assert [(f.index, f.code) for f in pieces[1].flags] == [(f.index, f.code) for f in whole.flags] == [(4, "all_masked")]
    ours = write_fits(mock_samples(load_card("sdss-like"), 5, seed=2), tmp_path / "ours.fits", load_card("sdss-like"))
    assert [len(p.samples) for p in iter_read(ours, chunk_rows=2)] == [1, 2, 2]
    assert len(list(iter_read(tmp_path / "coadd-main-dark-1.fits", chunk_rows=100))) == 1
    single = write_sdss_spec(mocks["sdss"], tmp_path / "spec-1-2-3.fits")  # one object per file: one piece
    assert [len(p.samples) for p in iter_read(single, chunk_rows=1)] == [1]


def test_pieces_are_near_equal_and_shared_evenly_by_workers(tmp_path):
    """piece_readers cuts a file into at most chunk_rows rows per piece, sizes within one row
    of each other, in a multiple of min_pieces (the parallel workers), covering every row once."""
    from cosmofm.data_cards.readers import piece_readers

    path = write_fits(mock_samples(load_card("sdss-like"), 7, seed=4), tmp_path / "seven.fits", load_card("sdss-like"))
    for chunk_rows, workers, sizes in ((2, 2, [1, 2, 2, 2]), (3, 2, [1, 2, 2, 2]), (4, 2, [3, 4]), (7, 2, [3, 4]), (100, 1, [7]), (1, 3, [1] * 7)):
        pieces = piece_readers(path, chunk_rows=chunk_rows, min_pieces=workers)
        rows = [p.keywords["rows"] for p in pieces]
        assert [r.stop - r.start for r in rows] == sizes, (chunk_rows, workers)
        assert rows[0].start == 0 and rows[-1].stop == 7 and all(a.stop == b.start for a, b in zip(rows, rows[1:]))
    assert [s.id for p in piece_readers(path, chunk_rows=2, min_pieces=2) for s in p().samples] == [s.id for s in read_any(path).samples]


def test_desi_overlap_is_inverse_variance_weighted(tmp_path, mocks):
    path = write_desi_coadd(mocks["desi"][:1], tmp_path / "coadd.fits")

    def overlap(h):
        wb, wr = h["B_WAVELENGTH"].data, h["R_WAVELENGTH"].data
        jb, jr = np.flatnonzero(np.isclose(wb, 5780.0)), np.flatnonzero(np.isclose(wr, 5780.0))
        h["B_FLUX"].data[0, jb], h["B_IVAR"].data[0, jb] = 1.0, 1.0
        h["R_FLUX"].data[0, jr], h["R_IVAR"].data[0, jr] = 4.0, 3.0
        k = np.flatnonzero(np.isclose(wr, 5790.4))  # masked in R: B alone counts
        mask = h["R_MASK"].data.astype(np.int32)
        mask[0, k] = 8
        h["R_MASK"] = fits.CompImageHDU(mask, name="R_MASK")  # released coadds tile-compress the masks
        h["B_FLUX"].data[0, np.flatnonzero(np.isclose(wb, 5790.4))] = 7.0

    edit(path, overlap)
    s = read_any(path).samples[0]
    w = s.coords["wavelength"]
    i = np.flatnonzero(np.isclose(w, 5780.0))[0]
    assert s.values[i] == pytest.approx((1 * 1 + 3 * 4) / 4) and s.ivar[i] == pytest.approx(4.0)
    j = np.flatnonzero(np.isclose(w, 5790.4))[0]
    assert s.values[j] == pytest.approx(7.0)
    assert np.unique(w).size == w.size == 7781


def test_join_off_lattice_cameras_interpolates_the_overlap():
    wb, wr = np.arange(0, 100) * 1.0 + 4000, np.arange(0, 100) * 1.0 + 4090.5  # half-pixel offset
    wave, flux, ivar = _join_interpolated([(wb, np.ones(100), np.ones(100)), (wr, np.full(100, 3.0), np.ones(100))])
    assert np.all(np.diff(wave) > 0) and wave.size == 100 + np.sum(wr > wb.max())  # overlap pixels counted once
    inside = (wave >= 4090.5) & (wave <= 4099)
    np.testing.assert_allclose(flux[inside], 2.0) and np.testing.assert_allclose(ivar[inside], 2.0)
    with pytest.raises(InputError):
        join_cameras([(wb, np.ones(100), np.ones(100)), (wr, np.ones(100), np.ones(100))])


@pytest.mark.parametrize("variant", ["mismatched_lengths", "missing_ivar"])
def test_desi_malformed(tmp_path, mocks, variant):
    path = write_desi_coadd(mocks["desi"][:1], tmp_path / "coadd.fits")
    if variant == "mismatched_lengths":
        edit(path, lambda h: h.__setitem__("B_WAVELENGTH", fits.ImageHDU(h["B_WAVELENGTH"].data[:-1], name="B_WAVELENGTH")))
        needle = "coadd.fits[B_FLUX]"
    else:
        edit(path, lambda h: h.pop(h.index_of("R_IVAR")))
        needle = "coadd.fits[R_IVAR]"
    with pytest.raises(InputError) as e:
        read_any(path)
    assert needle in str(e.value)


# ---------------------------------------------------------------------------- ESO SDP / 4MOST


def test_eso_sdp_nm_air_rows_round_trip(tmp_path, mocks):
    samples = mocks["4most"]
    path = write_eso_sdp(samples, tmp_path / "ADP.2025-01-01T00:00:00.000.fits", wave_unit="nm", medium="air", objects=["J1", "J2"])
    r = read_any(path)
    assert (r.format, r.card.name) == ("eso-sdp", "4most-lrs") and "4MOST" in r.card_reason
    assert [s.id for s in r.samples] == ["J1-0", "J2-1"] and r.samples[0].meta["object"] == "J1"
    for got, want in zip(r.samples, samples):
        np.testing.assert_allclose(got.coords["wavelength"], want.coords["wavelength"], rtol=0, atol=1e-6)
        good = want.ivar > 0
        np.testing.assert_array_equal(got.ivar == 0, ~good)  # QUAL != 0 masked
        np.testing.assert_allclose(got.values[good], want.values[good], rtol=1e-6)  # erg/s/cm2/A -> 1e-17 units
        np.testing.assert_allclose(got.ivar[good], want.ivar[good], rtol=1e-5)
    assert r.samples[0].meta["frame"] == "barycent" and "air" in r.notes[0]


def test_eso_topocentric_is_corrected_or_flagged(tmp_path, mocks):
    s = mocks["4most"][:1]
    path = write_eso_sdp(s, tmp_path / "topo.fits", wave_unit="Angstrom", specsys="TOPOCENT", extra_primary={"BARYCORR": 30.0})
    got = read_any(path).samples[0]
    np.testing.assert_allclose(got.coords["wavelength"], s[0].coords["wavelength"] * (1 + 30.0 / C_KMS), rtol=1e-12)
    path = write_eso_sdp(s, tmp_path / "topo2.fits", wave_unit="Angstrom", specsys="TOPOCENT")
    r = read_any(path)
    assert len(r.samples) == 1 and [(f.code, f.action) for f in r.flags] == [("topocentric", "kept")]


def test_eso_reduced_flux_columns_are_used_when_flux_is_absent(tmp_path, mocks):
    path = write_eso_sdp(mocks["4most"][:1], tmp_path / "adp.fits")

    def rename(h):
        cols = h["SPECTRUM"].columns
        cols.change_name("FLUX", "FLUX_REDUCED")
        cols.change_name("ERR", "ERR_REDUCED")
        h["SPECTRUM"] = fits.BinTableHDU.from_columns(cols, name="SPECTRUM")

    edit(path, rename)
    got = read_any(path).samples[0]
    assert got.meta["flux_column"] == "FLUX_REDUCED"
    good = mocks["4most"][0].ivar > 0
    np.testing.assert_allclose(got.values[good], mocks["4most"][0].values[good], rtol=1e-6)


@pytest.mark.parametrize("variant", ["unknown_unit", "mismatched_lengths", "missing_hdu"])
def test_eso_malformed(tmp_path, mocks, variant):
    path = write_eso_sdp(mocks["4most"][:1], tmp_path / "adp.fits")

    def broken(h):
        t = h["SPECTRUM"]
        cols = t.columns
        if variant == "unknown_unit":
            cols["FLUX"].unit = "furlong per fortnight"
            h["SPECTRUM"] = fits.BinTableHDU.from_columns(cols, name="SPECTRUM")
        elif variant == "mismatched_lengths":
            n = int(cols["WAVE"].format[:-1])
            new = [fits.Column("WAVE", f"{n - 1}D", unit="nm", array=t.data["WAVE"][:, :-1])] + [c for c in cols if c.name != "WAVE"]
            h["SPECTRUM"] = fits.BinTableHDU.from_columns(new, name="SPECTRUM")
        else:
            h.pop(1)  # PRODCATG still says SCIENCE.SPECTRUM

    edit(path, broken)
    with pytest.raises(InputError) as e:
        read_any(path)
    msg = str(e.value)
    assert {"unknown_unit": "adp.fits[SPECTRUM].FLUX", "mismatched_lengths": "different lengths", "missing_hdu": "SPECTRUM is missing"}[variant] in msg


# ---------------------------------------------------------------------------- plain tables


def test_csv_long_table_units_from_header_and_two_objects(tmp_path, mocks):
    s = mocks["sdss"]
    good = s.ivar > 0
    w, f, e = s.coords["wavelength"][good], s.values[good], 1 / np.sqrt(s.ivar[good])
    rng = np.random.default_rng(0)
    order = rng.permutation(2 * w.size)  # rows in any order
    t = Table({"id": np.repeat(["a", "b"], w.size), "wave [nm]": np.tile(w / 10, 2), "flux [1e-17 erg/(s cm2 Angstrom)]": np.tile(f, 2), "err [1e-17 erg/(s cm2 Angstrom)]": np.tile(e, 2)})[order]
    path = tmp_path / "spectra.csv"
    t.write(path, format="ascii.csv")
    r = read_any(path)
    assert r.format == "table" and [x.id for x in r.samples] == sorted({"a", "b"}, key=list(t["id"]).index)
    got = r.samples[0]
    np.testing.assert_allclose(got.coords["wavelength"], w, rtol=1e-12)
    np.testing.assert_allclose(got.values, f, rtol=1e-6)
    np.testing.assert_allclose(got.ivar, s.ivar[good], rtol=1e-5)
    assert r.card.name == "sdss-like" and "coverage" in r.card_reason


def test_parquet_wide_table_with_ivar_and_field_units(tmp_path):
    samples = mock_samples(load_card("desi-like"), 2, seed=9)
    fields = [pa.field("targetid", pa.int64()), pa.field("wavelength", pa.list_(pa.float64()), metadata={"unit": "Angstrom"}),
              pa.field("flux", pa.list_(pa.float32()), metadata={"unit": "1e-17 erg / (s cm2 Angstrom)"}),
              pa.field("ivar", pa.list_(pa.float32()), metadata={"unit": "1e34 s2 cm4 Angstrom2 / erg2"})]
    table = pa.Table.from_arrays([pa.array([7, 8]), pa.array([s.coords["wavelength"] for s in samples]), pa.array([s.values for s in samples]), pa.array([s.ivar for s in samples])], schema=pa.schema(fields))
    path = tmp_path / "spectra.parquet"
    pq.write_table(table, path)
    r = read_any(path, card="desi-like")
    assert r.card_reason == "given explicitly" and [s.id for s in r.samples] == ["7", "8"]
    np.testing.assert_array_equal(r.samples[1].values, samples[1].values)
    np.testing.assert_array_equal(r.samples[1].ivar, samples[1].ivar)


def test_fits_table_in_f_nu_is_converted_per_pixel(tmp_path, mocks):
    import astropy.units as u

    s = mocks["sdss"]
    w = s.coords["wavelength"] * u.AA
    fnu = (s.values * u.Unit("1e-17 erg / (s cm2 Angstrom)")).to(u.mJy, equivalencies=u.spectral_density(w))
    err = np.where(s.ivar > 0, 1 / np.sqrt(np.where(s.ivar > 0, s.ivar, 1)), np.nan) * u.Unit("1e-17 erg / (s cm2 Angstrom)")
    enu = err.to(u.mJy, equivalencies=u.spectral_density(w))
    cols = [fits.Column("WAVE", "D", unit="Angstrom", array=w.value), fits.Column("FLUX", "D", unit="mJy", array=fnu.value), fits.Column("ERR", "D", unit="mJy", array=enu.value)]
    path = tmp_path / "fnu.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(path)
    r = read_any(path)
    good = s.ivar > 0
    np.testing.assert_allclose(r.samples[0].values, s.values, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(r.samples[0].ivar[good], s.ivar[good], rtol=1e-6)
    assert [f.code for f in r.flags] == []  # NaN errors become ivar 0 without a flag


def test_table_per_pixel_problems_are_masked_with_flags(tmp_path):
    w = np.linspace(4000, 8000, 500)
    f, iv = np.ones(500), np.ones(500)
    f[10:13] = np.nan
    iv[20:22] = -1.0
    t = Table({"wavelength": w, "flux": f, "ivar": iv})
    t["wavelength"].unit, t["flux"].unit = "Angstrom", "1e-17 erg / (s cm2 Angstrom)"
    path = tmp_path / "spec.ecsv"
    t.write(path)
    r = read_any(path)
    assert {f.code: f.action for f in r.flags} == {"nonfinite_flux": "masked", "bad_ivar": "masked"}
    s = r.samples[0]
    assert np.all(s.ivar[10:13] == 0) and np.all(s.ivar[20:22] == 0) and np.all(s.values[10:13] == 0) and s.ivar[30] == 1


@pytest.mark.parametrize("variant", ["no_unit", "missing_column", "outside_card"])
def test_table_malformed(tmp_path, variant):
    w = np.linspace(4000, 8000, 50) if variant != "outside_card" else np.linspace(20000, 25000, 50)
    t = Table({"wavelength": w, "flux": np.ones(50), "error": np.ones(50)})
    if variant == "missing_column":
        t.remove_column("flux")
    path = tmp_path / "spec.csv"
    t.write(path, format="ascii.csv")
    with pytest.raises(InputError) as e:
        read_any(path, **({"wavelength_unit": "Angstrom", "flux_unit": "1e-17 erg/(s cm2 Angstrom)", "card": "sdss-like"} if variant == "outside_card" else {}))
    msg = str(e.value)
    assert {"no_unit": "spec.csv[table].wavelength: has no unit", "missing_column": "no flux column", "outside_card": "outside_card_range"}[variant] in msg
    if variant == "no_unit":
        assert "wavelength_unit=" in msg


# ---------------------------------------------------------------------------- images


def test_fits_image_bands_units_and_offsets(tmp_path, mocks):
    im, card = mocks["image"], load_card("lsst-like")
    path = write_fits_image(im, tmp_path / "calexp.fits", card)
    r = read_any(path)
    assert (r.format, r.card.name, len(r.samples)) == ("fits-image", "lsst-like", 1)
    got = r.samples[0]
    np.testing.assert_array_equal(got.values, im.values)
    np.testing.assert_array_equal(got.ivar, im.ivar)
    np.testing.assert_array_equal(got.coords["band_wavelength"], im.coords["band_wavelength"])
    np.testing.assert_allclose(got.coords["ra_offset"], -im.coords["ra_offset"], atol=1e-9)  # east is left: RA offset falls with column
    np.testing.assert_allclose(got.coords["dec_offset"], im.coords["dec_offset"], atol=1e-9)
    assert got.meta["ra"] == pytest.approx(150.0) and got.meta["bands"] == ["u", "g", "r", "i", "z", "y"]


def test_band_cube_with_zero_point(tmp_path, mocks):
    im, card = mocks["image"], load_card("lsst-like")
    path = write_fits_image(im, tmp_path / "cube.fits", card, layout="cube", zero_point=27.0)
    got = read_any(path).samples[0]
    np.testing.assert_allclose(got.values, im.values, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(got.ivar, im.ivar, rtol=1e-5)


def test_image_without_ivar_hdu_estimates_the_noise(tmp_path, mocks):
    from cosmofm.data_cards.sample import Sample

    im, card = mocks["image"], load_card("lsst-like")
    sigma = np.array([5.0, 4.0, 3.0, 3.0, 4.0, 8.0])
    y, x = np.mgrid[:64, :64]
    blob = 500.0 * np.exp(-0.5 * ((x - 32) ** 2 + (y - 32) ** 2) / 3.0**2)  # a galaxy over ~10 % of the pixels
    values = blob[None] + np.random.default_rng(1).normal(size=(6, 64, 64)) * sigma[:, None, None]
    offsets = (np.arange(64) - 31.5) * 0.2
    noisy = Sample("image", values, np.ones_like(values), {"band_wavelength": im.coords["band_wavelength"], "dec_offset": offsets, "ra_offset": offsets}, {})
    r = read_any(write_fits_image(noisy, tmp_path / "noivar.fits", card, ivar=False))
    np.testing.assert_allclose(r.samples[0].ivar[:, 0, 0], 1 / sigma**2, rtol=0.1)  # clipped MAD ignores the galaxy
    assert any("sigma-clipped MAD" in n for n in r.notes)


def test_cutouts_around_catalogue_positions(tmp_path, mocks):
    im, card = mocks["image"], load_card("lsst-like")
    paths = {}
    for b in ("g", "r"):
        full = write_fits_image(im, tmp_path / "all.fits", card)
        with fits.open(full) as h:
            fits.HDUList([fits.PrimaryHDU(), h[b.upper()].copy(), h[f"{b.upper()}_IVAR"].copy()]).writeto(tmp_path / f"{b}.fits")
        paths[b] = tmp_path / f"{b}.fits"
    pos = SkyCoord([150.0, 150.0 + 14 * 0.2 / 3600, 151.0], [2.0, 2.0, 2.0], unit="deg")
    r = read_cutouts(paths, pos, 8, card, ids=["centre", "edge", "far"])
    assert [s.id for s in r.samples] == ["centre", "edge"]
    assert {f.id: f.code for f in r.flags} == {"edge": "partial_overlap", "far": "outside_image"}
    c = r.samples[0]
    assert c.shape == (2, 8, 8)
    np.testing.assert_array_equal(c.values[0], im.values[1, 12:20, 12:20])  # g band, centred stamp
    assert c.coords["ra_offset"].mean() == pytest.approx(0.0, abs=0.11) and abs(np.diff(c.coords["ra_offset"])[0]) == pytest.approx(0.2)
    assert r.samples[1].ivar[:, :, :2].max() == 0 or r.samples[1].ivar[:, :, -2:].max() == 0  # off the image: ivar 0
    assert len(cutouts(paths, pos, 8, card)) == 2


def test_image_without_unit_or_zero_point(tmp_path, mocks):
    path = write_fits_image(mocks["image"], tmp_path / "img.fits", load_card("lsst-like"), bunit=None)
    with pytest.raises(InputError) as e:
        read_any(path)
    assert "img.fits[U].BUNIT" in str(e.value) and "MAGZP" in str(e.value)


# ---------------------------------------------------------------------------- cubes


def test_velocity_cube_with_stokes_round_trip(tmp_path, mocks):
    cube, card = mocks["cube"], load_card("ska-hi-like")
    path = write_fits_cube(cube, tmp_path / "sky_ldev.fits", card, spectral="VRAD")
    r = read_any(path)
    assert (r.format, r.card.name) == ("fits-cube", "ska-hi-like")
    got = r.samples[0]
    np.testing.assert_allclose(got.coords["frequency"], cube.coords["frequency"], rtol=1e-12)
    np.testing.assert_array_equal(got.values, cube.values)
    assert got.meta["beam_major_arcsec"] == pytest.approx(7.0) and got.meta["specsys"] == "LSRK"
    np.testing.assert_allclose(np.abs(np.diff(got.coords["ra_offset"])), 2.8)


def test_cube_chunks_are_memory_mapped_sections(tmp_path, mocks):
    cube, card = mocks["cube"], load_card("ska-hi-like")
    from cosmofm.data_cards.sample import Sample

    big = Sample("cube", np.tile(cube.values, (1, 2, 2))[:, :48, :40], np.ones((64, 48, 40)), {"frequency": cube.coords["frequency"], "dec_offset": np.arange(48) * 2.8, "ra_offset": np.arange(40) * 2.8}, {})
    path = write_fits_cube(big, tmp_path / "big.fits", card, stokes=False)
    chunks = list(iter_cube_chunks(path))
    assert len(chunks) == 4 and all(c.shape == (64, 32, 32) for c in chunks)
    np.testing.assert_array_equal(chunks[0].values, big.values[:, :32, :32])
    edge = chunks[3]  # y 32..47, x 32..39 real; the rest padded with ivar 0
    np.testing.assert_array_equal(edge.values[:, :16, :8], big.values[:, 32:, 32:])
    assert edge.ivar[:, 16:, :].max() == 0 and edge.ivar[:, :, 8:].max() == 0 and edge.ivar[:, :16, :8].min() > 0
    assert len(read_any(path, chunks=True, limit=2).samples) == 2


def test_cube_in_kelvin_is_converted_with_the_beam(tmp_path, mocks):
    cube, card = mocks["cube"], load_card("ska-hi-like")
    got = read_any(write_fits_cube(cube, tmp_path / "k.fits", card, bunit="K")).samples[0]
    bmaj, bmin = card.beam_fwhm.to_value("rad"), 0.8 * card.beam_fwhm.to_value("rad")
    omega = np.pi * bmaj * bmin / (4 * np.log(2))  # Gaussian beam solid angle
    nu = cube.coords["frequency"]
    jy_per_k = 2 * const.k_B.value * nu**2 / const.c.value**2 * omega / 1e-26  # Rayleigh-Jeans
    np.testing.assert_allclose(got.values, cube.values * jy_per_k[:, None, None], rtol=1e-3, atol=1e-15)


def test_cube_without_rest_frequency_uses_the_card_and_says_so(tmp_path, mocks):
    path = write_fits_cube(mocks["cube"], tmp_path / "c.fits", load_card("ska-hi-like"), spectral="VRAD", restfrq=False)
    r = read_any(path)
    np.testing.assert_allclose(r.samples[0].coords["frequency"], mocks["cube"].coords["frequency"], rtol=1e-12)
    assert any("card's rest frequency" in n for n in r.notes)


# ---------------------------------------------------------------------------- detection, inspect, catalogues


@pytest.fixture
def one_of_each(tmp_path, mocks):
    return {
        "sdss-spec": write_sdss_spec(mocks["sdss"], tmp_path / "spec-4055-55359-0001.fits"),
        "desi-coadd": write_desi_coadd(mocks["desi"][:1], tmp_path / "coadd-main-dark-1.fits"),
        "eso-sdp": write_eso_sdp(mocks["4most"][:1], tmp_path / "ADP.fits"),
        "fits-image": write_fits_image(mocks["image"], tmp_path / "img.fits", load_card("lsst-like")),
        "fits-cube": write_fits_cube(mocks["cube"], tmp_path / "cube.fits", load_card("ska-hi-like")),
        "cosmofm-fits": write_fits(mock_samples(load_card("sdss-like"), 2, seed=1), tmp_path / "ours.fits", load_card("sdss-like")),
    }


def test_detect_and_inspect_every_format(one_of_each, capsys):
    for name, path in one_of_each.items():
        assert detect(path).name == name
        assert main(["inspect", str(path)]) == 0
        out = capsys.readouterr().out
        assert "flags: none" in out and ("card: " in out) and ("Angstrom" in out or "Hz" in out)
        if name != "cosmofm-fits":
            assert f"format: {name}" in out
    main(["inspect", str(one_of_each["desi-coadd"])])
    out = capsys.readouterr().out
    assert "wavelength: 3600 .. 9824 Angstrom" in out and "card: desi-like (DESI coadd layout" in out and "identifiers: TARGETID, RA, DEC" in out


def test_inspect_unrecognised_file_names_what_it_saw(tmp_path, capsys):
    path = tmp_path / "mystery.fits"
    fits.HDUList([fits.PrimaryHDU(np.zeros((4, 4))), fits.BinTableHDU.from_columns([fits.Column("FOO", "E", array=[1.0])], name="STUFF")]).writeto(path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "mystery.fits" in err and "STUFF (table: FOO)" in err and "Traceback" not in err


def test_explicit_card_wins_and_must_match_modality(one_of_each):
    r = read_any(one_of_each["sdss-spec"], card="desi-like")
    assert (r.card.name, r.card_reason) == ("desi-like", "given explicitly")
    with pytest.raises(InputError) as e:
        read_any(one_of_each["sdss-spec"], card="lsst-like")
    assert "image card" in str(e.value)


def test_catalogue_carries_identifiers_and_units(tmp_path, one_of_each):
    import astropy.units as u

    samples = list(read_any(one_of_each["sdss-spec"]).samples) + list(read_any(one_of_each["desi-coadd"]).samples)
    rows = catalogue_rows(samples, [{"CLASS": "GALAXY", "VDISP": 150.0 * u.km / u.s}, {"CLASS": "QSO", "VDISP": 0.2 * u.Unit("1000 km/s")}])
    for name in ("cat.fits", "cat.parquet"):
        t = read_catalogue(write_catalogue(rows, tmp_path / name))
        assert list(t["ID"]) == ["spec-4055-55359-0001", f"desi-{39627000000000000}"]
        assert t["PLATE"][0] == 4055 and bool(np.ma.getmaskarray(t["PLATE"])[1]) and t["TARGETID"][1] == 39627000000000000
        assert t["RA"].unit == u.deg and t["VDISP"].unit == u.km / u.s and t["VDISP"][1] == pytest.approx(200.0)
    assert pq.read_schema(tmp_path / "cat.parquet").field("RA").metadata[b"unit"] == b"deg"


def test_catalogue_writer_streams_pieces_with_differing_columns(tmp_path):
    """Pieces are merged column by column (issue 5: catalogues of any size, written as
    pieces finish): a column a piece lacks is null there, ints that meet floats become
    floats, FITS and Parquet give the same table, and a failure leaves no file behind."""
    import astropy.units as u

    rng = np.random.default_rng(3)
    pieces = []
    for k in range(7):
        n = 3 + k
        t = Table({"ID": [f"obj-{k}-{i}" for i in range(n)], "Z": rng.random(n) * u.dimensionless_unscaled,
                   "FLAGS": ["" if i % 2 else "low_snr|edge" * k for i in range(n)]})
        if k % 2:  # SDSS-like pieces carry plates, DESI-like ones do not
            t["PLATE"] = np.arange(n) + 100 * k
        t["SCORE"] = np.arange(n) if k < 3 else rng.random(n)  # int in the first pieces, float later
        pieces.append(t)
    tables = {}
    for name in ("cat.fits", "cat.parquet"):
        with CatalogueWriter(tmp_path / name, order=["ID", "PLATE"]) as out:
            for t in pieces:
                out.add(t)
        tables[name] = read_catalogue(tmp_path / name)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # spool and temp files gone
    fits_t, pq_t = tables["cat.fits"], tables["cat.parquet"]
    assert fits_t.colnames[:2] == ["ID", "PLATE"] and set(fits_t.colnames) == set(pq_t.colnames) == {"ID", "PLATE", "Z", "FLAGS", "SCORE"}
    expected_ids = [i for t in pieces for i in t["ID"]]
    assert list(fits_t["ID"]) == list(pq_t["ID"]) == expected_ids
    plate_mask = np.concatenate([np.full(len(t), "PLATE" not in t.colnames) for t in pieces])
    for t in (fits_t, pq_t):
        np.testing.assert_array_equal(np.ma.getmaskarray(t["PLATE"]), plate_mask)
        np.testing.assert_array_equal(np.asarray(t["PLATE"])[~plate_mask], np.concatenate([t_["PLATE"] for t_ in pieces if "PLATE" in t_.colnames]))
        assert t["SCORE"].dtype.kind == "f" and t["Z"].unit == u.dimensionless_unscaled
        np.testing.assert_allclose(np.asarray(t["SCORE"]), np.concatenate([np.asarray(t_["SCORE"], float) for t_ in pieces]))
        assert ["" if f is np.ma.masked else str(f) for f in t["FLAGS"]] == [f for t_ in pieces for f in t_["FLAGS"]]  # astropy masks FITS's empty strings
    assert fits.getheader(tmp_path / "cat.fits", 1)["TFORM" + str(fits_t.colnames.index("FLAGS") + 1)] == f"{len('low_snr|edge' * 6)}A"

    (tmp_path / "keep.parquet").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="stopped"):
        with CatalogueWriter(tmp_path / "keep.parquet") as out:
            out.add(pieces[0])
            raise RuntimeError("stopped mid-run")
    assert (tmp_path / "keep.parquet").read_bytes() == b"old"  # the old file stays until a new one is complete
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with CatalogueWriter(tmp_path / "clash.fits") as out:
        out.add(Table({"ID": ["a"], "X": [1.0]}))
        with pytest.raises(InputError, match="X: .*double.*string|X: .*string.*double"):
            out.add(Table({"ID": ["b"], "X": ["text"]}))
    with pytest.raises(InputError, match="non-ASCII"):
        write_catalogue([{"ID": "Ω Cen"}], tmp_path / "greek.fits")
    with pytest.raises(InputError, match="not a catalogue format"):
        CatalogueWriter(tmp_path / "cat.csv")
