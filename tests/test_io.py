"""Tests of the FITS and Hugging Face `datasets` readers/writers (data_cards/io/fits_io.py, hf_io.py).

Round trips must be exact for every modality, units must be converted on read, and every
bad input must surface as an InputError naming the file and the HDU/column.
"""

from __future__ import annotations


import astropy.units as u
import datasets
import numpy as np
import pytest
import yaml
from astropy.io import fits
from huggingface_hub import DatasetCard

from cosmofm.data_cards import InputError, load_card
from cosmofm.data_cards.io.fits_io import data_unit, read_fits, write_fits
from cosmofm.data_cards.io.hf_io import FEATURES, SampleDataset, row_to_sample, sample_to_row, write_dataset
from cosmofm.data_cards.mocks.generators import mock_samples

CARD_NAMES = ["sdss-like", "lsst-like", "ska-hi-like", "lightcone-21cm"]


# `cards` (the shipped cards by name) comes from conftest.py.


@pytest.fixture(scope="module")
def samples(cards):
    # Few samples per card: enough to catch row mix-ups, small enough to stay fast.
    return {name: mock_samples(card, 4, seed=7) for name, card in cards.items()}


def assert_same(a, b):
    """Exact equality of two Samples (values, ivar, coords, meta)."""
    assert a.modality == b.modality
    assert a.values.dtype == b.values.dtype == np.float32
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.ivar, b.ivar)
    assert a.coords.keys() == b.coords.keys()
    for axis in a.coords:
        np.testing.assert_array_equal(a.coords[axis], b.coords[axis])
    assert a.meta == b.meta


def rewrite_table(path, drop=(), units=None, arrays=None, name="SAMPLES"):
    """Rebuild the SAMPLES table of `path` with columns dropped / units or arrays replaced."""
    units, arrays = units or {}, arrays or {}
    with fits.open(path, memmap=False) as hdul:
        table = hdul["SAMPLES"]
        columns = [
            fits.Column(c.name, format=c.format, dim=c.dim, unit=units.get(c.name, c.unit), array=arrays.get(c.name, table.data[c.name]))
            for c in table.columns
            if c.name not in drop
        ]
        primary = hdul[0].copy()
    fits.HDUList([primary, fits.BinTableHDU.from_columns(columns, name=name)]).writeto(path, overwrite=True)


def fits_column(path, name):
    with fits.open(path, memmap=False) as hdul:
        return np.array(hdul["SAMPLES"].data[name])


# ---------------------------------------------------------------------------- FITS


@pytest.mark.parametrize("name", CARD_NAMES)
def test_fits_round_trip_is_exact(tmp_path, cards, samples, name):
    path = write_fits(samples[name], tmp_path / f"{name}.fits", cards[name])
    back = read_fits(path)  # card from the CARD header
    assert len(back) == len(samples[name])
    for a, b in zip(samples[name], back):
        assert_same(a, b)
    assert not list(tmp_path.glob("*.tmp")), "the temporary file must be renamed away"


def test_fits_layout_and_units(tmp_path, cards, samples):
    path = write_fits(samples["lsst-like"], tmp_path / "img.fits", cards["lsst-like"])
    with fits.open(path) as hdul:
        assert (hdul[0].header["CARD"], hdul[0].header["MODALITY"], hdul[0].header["CFMFMT"]) == ("lsst-like", "image", 1)
        cols = hdul["SAMPLES"].columns
        assert cols.names == ["ID", "VALUES", "IVAR", "BAND_WAVELENGTH", "DEC_OFFSET", "RA_OFFSET", "PAIR_ID", "META"]
        assert cols["VALUES"].dim == "(32,32,6)"  # FITS order: fastest axis first
        assert u.Unit(cols["VALUES"].unit) == data_unit(cards["lsst-like"]) == u.nJy
        assert cols["DEC_OFFSET"].unit == "arcsec"


def test_data_unit_per_modality(cards):
    assert data_unit(cards["sdss-like"]) == u.Unit("1e-17 erg / (s cm2 Angstrom)")
    assert data_unit(cards["ska-hi-like"]) == u.Jy / u.beam
    assert data_unit(cards["lightcone-21cm"]) == u.mK


def test_fits_converts_values_and_wavelengths(tmp_path, cards, samples):
    card, original = cards["sdss-like"], samples["sdss-like"]
    path = write_fits(original, tmp_path / "spec.fits", card)
    # 1e-17 erg/s/cm2/A = 1e-19 W/m2/nm; 1 nm = 10 A. IVAR keeps its own (old) TUNIT,
    # so only VALUES and WAVELENGTH change.
    rewrite_table(
        path,
        units={"VALUES": "W / (m2 nm)", "WAVELENGTH": "nm"},
        arrays={"VALUES": fits_column(path, "VALUES") * np.float32(1e-19), "WAVELENGTH": fits_column(path, "WAVELENGTH") / 10},
    )
    back = read_fits(path)
    for a, b in zip(original, back):
        np.testing.assert_allclose(b.values, a.values, rtol=1e-6, atol=1e-30)
        np.testing.assert_allclose(b.ivar, a.ivar, rtol=1e-6)
        np.testing.assert_allclose(b.coords["wavelength"], a.coords["wavelength"], rtol=1e-12)


def test_fits_converts_f_nu_spectra_per_pixel(tmp_path, cards, samples):
    # f_nu -> f_lambda depends on each pixel's wavelength (spectral_density equivalency).
    card, original = cards["sdss-like"], samples["sdss-like"][:2]
    path = write_fits(original, tmp_path / "fnu.fits", card)
    wave = fits_column(path, "WAVELENGTH") * u.AA
    to_ujy = data_unit(card).to(u.uJy, equivalencies=u.spectral_density(wave))  # (rows, pixels)
    rewrite_table(
        path,
        units={"VALUES": "uJy", "IVAR": "uJy-2"},
        arrays={"VALUES": fits_column(path, "VALUES") * to_ujy, "IVAR": fits_column(path, "IVAR") / to_ujy**2},
    )
    for a, b in zip(original, read_fits(path)):
        np.testing.assert_allclose(b.values, a.values, rtol=1e-5, atol=1e-6 * np.abs(a.values).max())
        np.testing.assert_allclose(b.ivar, a.ivar, rtol=1e-5)


def test_fits_write_refuses_mixed_modalities(tmp_path, cards, samples):
    with pytest.raises(InputError, match="separate|one FITS file per modality"):
        write_fits(samples["sdss-like"] + samples["lsst-like"], tmp_path / "mixed.fits", cards["sdss-like"])
    assert not list(tmp_path.iterdir()), "nothing may be left behind"


@pytest.fixture
def spectrum_file(tmp_path, cards, samples):
    return write_fits(samples["sdss-like"], tmp_path / "spec.fits", cards["sdss-like"])


def test_fits_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.fits.*does not exist"):
        read_fits(tmp_path / "nope.fits")


def test_fits_random_bytes(tmp_path):
    path = tmp_path / "noise.fits"
    path.write_bytes(np.random.default_rng(0).bytes(6000))
    with pytest.raises(InputError, match="noise.fits.*not a readable FITS file"):
        read_fits(path)


def test_fits_truncated_file(spectrum_file):
    raw = spectrum_file.read_bytes()
    spectrum_file.write_bytes(raw[: len(raw) // 2])  # cut inside the table data
    with pytest.raises(InputError, match="spec.fits.*truncated"):
        read_fits(spectrum_file)


def test_fits_missing_hdu(spectrum_file):
    rewrite_table(spectrum_file, name="OTHER")
    with pytest.raises(InputError, match=r"spec.fits\[SAMPLES\].*no HDU named SAMPLES"):
        read_fits(spectrum_file)


def test_fits_missing_column(spectrum_file):
    rewrite_table(spectrum_file, drop=("IVAR",))
    with pytest.raises(InputError, match=r"spec.fits\[SAMPLES\]\.IVAR.*missing"):
        read_fits(spectrum_file)


def test_fits_unconvertible_unit(spectrum_file):
    rewrite_table(spectrum_file, units={"VALUES": "Jy/beam"})
    with pytest.raises(InputError, match=r"spec.fits\[SAMPLES\]\.VALUES.*cannot be converted"):
        read_fits(spectrum_file)


def test_fits_unparseable_unit(spectrum_file):
    rewrite_table(spectrum_file, units={"WAVELENGTH": "furlongs-ish"})
    with pytest.raises(InputError, match=r"spec.fits\[SAMPLES\]\.WAVELENGTH.*not a unit"):
        read_fits(spectrum_file)


def test_fits_nan_with_positive_ivar_names_file_and_row(spectrum_file):
    values = fits_column(spectrum_file, "VALUES")
    values[2, 100] = np.nan
    ivar = fits_column(spectrum_file, "IVAR")
    ivar[2, 100] = 1.0
    rewrite_table(spectrum_file, arrays={"VALUES": values, "IVAR": ivar})
    with pytest.raises(InputError, match=r"spec.fits\[SAMPLES\] row 2 \(ID 'sdss-like-7-2'\): values.*NaN") as err:
        read_fits(spectrum_file)
    assert "ivar = 0" in str(err.value)  # the fix is passed on


def test_fits_row_ranges_read_only_those_rows(spectrum_file):
    """Streaming reads (issue 5: a million spectra in bounded memory) see the same samples,
    with file-wide row numbers in errors, and one shared wavelength grid per piece."""
    from cosmofm.data_cards.io.fits_io import count_rows

    whole = read_fits(spectrum_file)
    assert count_rows(spectrum_file) == len(whole) == 4
    pieces = [read_fits(spectrum_file, rows=slice(a, a + 3)) for a in (0, 3)]
    assert [len(p) for p in pieces] == [3, 1] and read_fits(spectrum_file, rows=slice(9, 12)) == []
    for got, want in zip(pieces[0] + pieces[1], whole):
        assert_same(got, want)
    assert pieces[0][0].coords["wavelength"] is pieces[0][2].coords["wavelength"]  # one grid, shared
    values, ivar = fits_column(spectrum_file, "VALUES"), fits_column(spectrum_file, "IVAR")
    values[2, 7], ivar[2, 7] = np.inf, 2.0
    rewrite_table(spectrum_file, arrays={"VALUES": values, "IVAR": ivar})
    assert len(read_fits(spectrum_file, rows=slice(0, 2))) == 2  # the bad row is not in this piece
    with pytest.raises(InputError, match=r"row 2 \(ID 'sdss-like-7-2'\): values.*1 NaN/inf"):
        read_fits(spectrum_file, rows=slice(1, 4))


def test_block_validation_agrees_with_samples():
    """`validate` on a block applies the Sample rules row by row and names the first bad row."""
    from cosmofm.data_cards.sample import RowError, Sample, validate

    rng = np.random.default_rng(0)
    wave = np.linspace(4000.0, 5000.0, 50)
    values = rng.normal(size=(4, 50)).astype(np.float32)
    ivar = np.ones((4, 50), np.float32)
    values[1, 3], ivar[1, 3] = np.nan, 0.0  # masked NaN: zeroed, as Sample does
    v, iv, c = validate("spectrum", values, ivar, {"wavelength": wave}, block=True)
    for i in range(4):
        one = Sample("spectrum", values[i], ivar[i], {"wavelength": wave}, {"id": str(i)})
        np.testing.assert_array_equal(v[i], one.values)
    assert v[1, 3] == 0 and c["wavelength"] is not None
    assert np.isnan(values[1, 3])  # the caller's array is left alone ...
    own = values.copy()
    v_own, _, _ = validate("spectrum", own, ivar, {"wavelength": wave}, block=True, own=True)
    assert v_own is own and own[1, 3] == 0 and np.array_equal(own, v)  # ... unless it is handed over (a reader's copy)
    bad = ivar.copy()
    bad[3, 0] = -1.0
    with pytest.raises(RowError, match="ivar: has negative entries") as err:
        validate("spectrum", values, bad, {"wavelength": wave}, block=True)
    assert err.value.row == 3
    grids = np.tile(wave, (4, 1))
    grids[2, 10] = grids[2, 9]  # one row's grid is not monotonic
    with pytest.raises(RowError, match="not strictly monotonic") as err:
        validate("spectrum", values, ivar, {"wavelength": grids}, block=True)
    assert err.value.row == 2
    with pytest.raises(InputError, match="a spectrum needs 1 axes"):  # one sample given as 2-D is not a block
        Sample("spectrum", values, ivar, {"wavelength": wave})


def test_fits_card_modality_mismatch(spectrum_file, cards):
    with pytest.raises(InputError, match=r"spec.fits\[PRIMARY\]\.MODALITY"):
        read_fits(spectrum_file, card=cards["ska-hi-like"])


# ---------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def saved(tmp_path_factory, cards, samples):
    """One dataset mixing all four modalities, written from a generator."""
    out = tmp_path_factory.mktemp("hf") / "mixed"
    everything = [s for name in CARD_NAMES for s in samples[name]]
    write_dataset((s for s in everything), out, list(cards.values()))
    return out, everything


def test_dataset_round_trip_mixed_modalities(saved):
    out, everything = saved
    ds = SampleDataset(out)
    assert len(ds) == len(everything)
    assert ds.modalities == ["cube", "field", "image", "spectrum"]
    assert ds.cards == sorted(CARD_NAMES)
    for i, original in enumerate(everything):
        assert_same(original, ds[i])
    assert_same(everything[-1], ds[-1])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataset_arrays_are_writable_copies(saved):
    # Samples must not alias the read-only memory map (torch.from_numpy warns on those).
    sample = SampleDataset(saved[0])[0]
    assert sample.values.flags.writeable and sample.ivar.flags.writeable
    assert all(c.flags.writeable for c in sample.coords.values())


def test_dataset_schema_is_shared(saved):
    ds = datasets.load_from_disk(str(saved[0]))
    assert ds.features == FEATURES
    row = ds[0]
    assert row["shape"] == [4608] and len(row["coords"]) == 1
    assert_same(row_to_sample(row), saved[1][0])  # python-list rows decode too


def test_row_helpers_round_trip(samples):
    cube = samples["ska-hi-like"][0]
    row = sample_to_row(cube)
    assert row["shape"] == [64, 32, 32] and row["values"].ndim == 1
    assert_same(row_to_sample(row), cube)


def test_dataset_ships_only_its_path_to_dataloader_workers(saved):
    """Workers receive the object's state over IPC: it must be the path, not the data."""
    ds = SampleDataset(saved[0])
    state = ds.__getstate__()
    assert set(state) == {"path", "cache_dir"}
    clone = SampleDataset.__new__(SampleDataset)
    clone.__setstate__(state)
    assert_same(clone[5], saved[1][5])


def test_dataset_card_parses_and_names_license(saved, cards):
    out, _ = saved
    card = DatasetCard.load(out / "README.md")
    assert card.data.license == "cc-by-4.0"
    assert card.data.tags[:2] == ["astronomy", "cosmofm"] and {"spectrum", "image", "cube", "field"} <= set(card.data.tags)
    assert card.data.pretty_name
    body = card.text
    assert "SDSS-like (BOSS spectrographs)" in body and "Hartley et al. 2023" in body
    assert "| sdss-like | spectrum | SDSS-like (BOSS spectrographs) | 4 |" in body
    assert "1e-17 erg / (Angstrom s cm2)" in body  # the data unit of the spectra


def test_dataset_saves_reloadable_card_copies(saved, cards):
    out, _ = saved
    for name, card in cards.items():
        copy = out / "data_cards" / f"{name}.yaml"
        assert yaml.safe_load(copy.read_text())["name"] == name
        assert load_card(copy).to_dict() == card.to_dict()


def test_dataset_from_parquet_file_and_shards(saved, tmp_path):
    out, everything = saved
    hf = datasets.load_from_disk(str(out))
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(2):
        hf.shard(2, k, contiguous=True).to_parquet(str(shards / f"part-{k}.parquet"))
    ds = SampleDataset(shards, cache_dir=tmp_path / "cache")
    assert len(ds) == len(everything)
    for original, back in zip(everything, ds):
        assert_same(original, back)
    one = SampleDataset(shards / "part-1.parquet", cache_dir=tmp_path / "cache")
    assert_same(one[0], everything[len(everything) // 2])


def test_dataset_rejects_foreign_folder(tmp_path):
    other = tmp_path / "other"
    datasets.Dataset.from_dict({"text": ["hello"]}).save_to_disk(str(other))
    with pytest.raises(InputError, match=r"other.*missing column\(s\) \['id', 'modality'"):
        SampleDataset(other)
    with pytest.raises(InputError, match="is not a dataset saved by write_dataset"):
        SampleDataset(tmp_path)  # a folder with neither state.json nor parquet shards


def test_write_dataset_checks_cards_and_target(tmp_path, cards, samples):
    with pytest.raises(InputError, match=r"meta\['card'\].*'lsst-like' is not one of the cards"):
        write_dataset(samples["lsst-like"], tmp_path / "a", [cards["sdss-like"]])
    assert not (tmp_path / "a").exists(), "a failed write leaves no dataset behind"
    write_dataset(samples["sdss-like"][:2], tmp_path / "b", [cards["sdss-like"]])
    with pytest.raises(InputError, match="already exists"):
        write_dataset(samples["sdss-like"], tmp_path / "b", [cards["sdss-like"]])
    write_dataset(samples["sdss-like"], tmp_path / "b", [cards["sdss-like"]], overwrite=True)
    assert len(SampleDataset(tmp_path / "b")) == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "temp folders are cleaned up"


def test_card_files_are_parsed_once_per_version(tmp_path):
    """load_card caches a card file's YAML (readers resolve it per piece) but hands out
    independent cards, and an edited file is read again."""
    from cosmofm.data_cards.schema import CARDS_DIR

    path = tmp_path / "my_survey.yaml"
    raw = yaml.safe_load((CARDS_DIR / "sdss_like.yaml").read_text())
    path.write_text(yaml.safe_dump({**raw, "name": "my-survey"}))
    first = load_card(path)
    first.labels.clear()  # a caller changing its card changes no one else's
    second = load_card(path)
    assert second is not first and second.labels and second.name == "my-survey"
    path.write_text(yaml.safe_dump({**raw, "name": "my-survey-v2"}))
    assert load_card(path).name == "my-survey-v2"
