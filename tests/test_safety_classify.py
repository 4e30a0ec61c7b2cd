"""`cosmofm classify` against careless and hostile input (issue 15): nothing lost, nothing overwritten.

One bad object costs only itself; masked spectra get no answer; an empty file, a wrong
wavelength or flux unit and a killed run are each reported or cleaned up; the catalogue
never replaces an input or an existing file unless asked to.
"""

import subprocess
import sys

import astropy.units as u
import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table

from cosmofm.cli import main as cli_main
from cosmofm.data_cards import load_card
from cosmofm.data_cards.io.catalogue import read_catalogue
from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.io.fits_io import write_fits
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.finetune.classify import classify
from cosmofm.heads.classification import ClassificationHeadConfig, CosmoFMForSpectralClassification
from cosmofm.pretrain import CosmoFMConfig
from cosmofm.pretrain.checkpoint import write_manifest

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, spectrum_patch_size=128, coord_frequencies=6, projection_dim=16)


@pytest.fixture(scope="module")
def model_dir(sdss, tmp_path_factory):
    """A tiny classifier with random weights: every check here compares runs of one model."""
    torch.manual_seed(0)
    head = ClassificationHeadConfig.from_card(sdss, hidden_size=16)
    model = CosmoFMForSpectralClassification.from_backbone_config(CosmoFMConfig(survey_names=["sdss-like"], **TINY), head).eval()
    model.set_calibration(1.0, 0.1, 0.5)
    folder = tmp_path_factory.mktemp("tiny-classifier")
    model.save_pretrained(folder)
    write_manifest(folder)
    return str(folder)


@pytest.fixture(scope="module")
def spectra(sdss):
    return mock_samples(sdss, 6, seed=31)


def _run(inputs, model_dir, out, **options) -> Table:
    classify(inputs, model_dir, out, progress=False, **options)
    return read_catalogue(out)


def _same_predictions(t: Table, ref: Table, ids: list[str]) -> None:
    """The rows of `ids` in `t` hold the predictions `ref` holds for them."""
    rows = {str(i): k for k, i in enumerate(t["ID"])}
    ref_rows = {str(i): k for k, i in enumerate(ref["ID"])}
    k, r = [rows[i] for i in ids], [ref_rows[i] for i in ids]
    assert [str(t["CLASS"][i]) for i in k] == [str(ref["CLASS"][i]) for i in r]
    for name in [c for c in ref.colnames if c.startswith("P_") or c == "Z"]:
        np.testing.assert_allclose(np.asarray(t[name])[k], np.asarray(ref[name])[r], rtol=1e-5, atol=1e-7, err_msg=name)


def _error_line(stderr: str) -> str:
    """The CLI's error: one line (progress bars aside), no traceback."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def _flags(t: Table) -> dict[str, str]:
    return {str(i): str(f) for i, f in zip(t["ID"], t["FLAGS"])}


def _missing(v) -> bool:
    """Null as a catalogue stores it: masked (FITS, Parquet), NaN or an empty string."""
    return bool(np.ma.is_masked(v) or v is None or v == "" or (isinstance(v, (float, np.floating)) and np.isnan(v)))


def _null(row) -> bool:
    """No prediction at all: no class, probability, redshift or conformal set."""
    return all(_missing(row[c]) for c in row.colnames if c in ("CLASS", "CONFORMAL_SET", "Z", "Z_ERR") or c.startswith("P_"))


# ---------------------------------------------------------------------------- one bad object costs itself


@pytest.mark.parametrize("fmt", ["fits", "datasets"])
def test_bad_pixels_are_masked_in_their_object_and_the_others_classified(fmt, sdss, spectra, model_dir, tmp_path):
    """A NaN pixel with ivar > 0 and a negative ivar each cost that pixel (masked, flagged on
    their object), not the piece: every other object gets what it gets without them."""
    from cosmofm.data_cards.io.hf_io import write_dataset

    bad = [s.__class__(s.modality, s.values.copy(), s.ivar.copy(), s.coords, s.meta) for s in spectra]
    bad[2].values[100], bad[2].ivar[100] = np.nan, 1.0
    bad[4].ivar[50] = -1.0
    good = [s for i, s in enumerate(spectra) if i not in (2, 4)]

    def write(samples, name):
        if fmt == "fits":
            return write_fits(samples, tmp_path / f"{name}.fits", sdss)
        return write_dataset(samples, tmp_path / name, [sdss])

    t = _run(write(bad, "bad"), model_dir, tmp_path / "bad.parquet", redshift="network")
    ref = _run(write(good, "good"), model_dir, tmp_path / "good.parquet", redshift="network")
    assert len(t) == 6 and list(t["ID"]) == [s.id for s in spectra]
    flags = _flags(t)
    assert flags[spectra[2].id] == "nonfinite_flux" and flags[spectra[4].id] == "bad_ivar"
    assert all(flags[s.id] == "" for s in good)
    assert all(not _null(row) for row in t)  # masked, not dropped: the bad objects are classified too
    _same_predictions(t, ref, [s.id for s in good])


def test_masked_spectra_get_flags_and_null_predictions(sdss, spectra, model_dir, tmp_path):
    """A fully masked spectrum, and one with fewer unmasked pixels than one token of the
    model, get no class, NaN probabilities and redshift and no conformal set; the rest
    are classified as without them (with the default redshift scan)."""
    masked = [s.__class__(s.modality, s.values.copy(), s.ivar.copy(), s.coords, s.meta) for s in spectra]
    masked[1].ivar[:] = 0.0
    masked[3].ivar[50:] = 0.0  # 50 unmasked pixels < 128 per token
    good = [s for i, s in enumerate(spectra) if i not in (1, 3)]
    out = tmp_path / "masked.fits"
    assert cli_main(["classify", str(write_fits(masked, tmp_path / "masked_in.fits", sdss)), "--model", model_dir, "--output", str(out)]) == 0
    t = read_catalogue(out)
    ref = _run(write_fits(good, tmp_path / "good_in.fits", sdss), model_dir, tmp_path / "good.fits")
    flags = _flags(t)
    assert flags[spectra[1].id] == "all_masked" and flags[spectra[3].id] == "too_few_pixels"
    for i in (1, 3):
        row = t[[str(x) for x in t["ID"]].index(spectra[i].id)]
        assert _null(row)
    _same_predictions(t, ref, [s.id for s in good])


def test_empty_file_in_a_folder_is_flagged_and_the_rest_classified(sdss, spectra, model_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = write_fits(spectra[:3], folder / "good.fits", sdss)
    with fits.open(good) as hdul:  # the same layout with no rows
        columns = [fits.Column(c.name, c.format, dim=c.dim, unit=c.unit, array=hdul["SAMPLES"].data[c.name][:0]) for c in hdul["SAMPLES"].columns]
        fits.HDUList([hdul[0].copy(), fits.BinTableHDU.from_columns(columns, name="SAMPLES")]).writeto(folder / "empty.fits")
    summary = classify(folder, model_dir, tmp_path / "cat.fits", redshift="network", progress=False)
    t = read_catalogue(tmp_path / "cat.fits")
    assert summary["n_classified"] == 3 and summary["flags"] == {"empty_file": 1}
    row = t[[str(f) for f in t["FILE"]].index("empty.fits")]
    assert str(row["FLAGS"]).startswith("empty_file") and _null(row)
    assert sorted(str(i) for i in t["ID"] if str(i) != "empty") == sorted(s.id for s in spectra[:3])


# ---------------------------------------------------------------------------- implausible units


def test_wavelength_unit_far_from_the_card_is_a_one_line_error(sdss, spectra, model_dir, tmp_path, capsys):
    """Angstrom numbers under TUNIT 'm' (3.6e13 A): inspect and classify say which column and
    unit, and what the numbers fit, instead of printing them or crashing in linear algebra."""
    from cosmofm.inspect import describe

    path = write_fits(spectra[:2], tmp_path / "metres.fits", sdss)
    with fits.open(path, mode="update") as hdul:
        header = hdul["SAMPLES"].header
        header[f"TUNIT{hdul['SAMPLES'].columns.names.index('WAVELENGTH') + 1}"] = "m"
    with pytest.raises(InputError, match=r"metres.fits\[SAMPLES\].WAVELENGTH: wavelengths 3.6e\+13.*stated unit 'm'.*in Angstrom"):
        describe(path)
    capsys.readouterr()
    assert cli_main(["classify", str(path), "--model", model_dir, "--output", str(tmp_path / "cat.fits")]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "stated unit 'm'" in err and "in Angstrom" in err
    # a plain table in nm that says Angstrom: the error names the unit the numbers fit
    s = spectra[0]
    Table({"wavelength": s.coords["wavelength"] / 10 * u.AA, "flux": s.values * u.Unit(sdss.flux_unit), "ivar": s.ivar}).write(tmp_path / "nm.fits")
    with pytest.raises(InputError, match=r"nm.fits\[.*\].wavelength: wavelengths 360.*if they are in nm"):
        describe(tmp_path / "nm.fits", card="sdss-like")


def test_flux_in_jy_under_an_erg_unit_is_flagged(sdss, spectra, model_dir, tmp_path):
    """Fluxes in Jy under an erg/s/cm2/A unit (~1e12 too bright) are flagged on every object
    they reach, in inspect and in the catalogue; survey files in their own units are not."""
    from cosmofm.data_cards.readers import read_any
    from cosmofm.data_cards.io.survey_files import write_desi_coadd, write_eso_sdp, write_sdss_spec

    s = spectra[0]
    wave = s.coords["wavelength"] * u.AA
    jy = (s.values * u.Unit(sdss.flux_unit)).to_value(u.Jy, equivalencies=u.spectral_density(wave))
    err_jy = (1 / np.sqrt(np.where(s.ivar > 0, s.ivar, np.nan)) * u.Unit(sdss.flux_unit)).to_value(u.Jy, equivalencies=u.spectral_density(wave))
    erg = u.erg / u.s / u.cm**2 / u.AA
    Table({"wavelength": wave, "flux": jy * erg, "error": err_jy * erg}).write(tmp_path / "jy.fits")
    r = read_any(tmp_path / "jy.fits")
    assert [f.code for f in r.flags] == ["implausible_flux_scale"] and "Jy" in r.flags[0].detail
    t = _run(tmp_path / "jy.fits", model_dir, tmp_path / "jy-cat.fits", redshift="network")
    assert str(t["FLAGS"][0]) == "implausible_flux_scale"
    # our own FITS with VALUES in 1e-17 erg/s/cm2/A said to be in erg/s/cm2/A: every object flagged
    path = write_fits(spectra[:3], tmp_path / "ours.fits", sdss)
    with fits.open(path, mode="update") as hdul:
        hdul["SAMPLES"].header[f"TUNIT{hdul['SAMPLES'].columns.names.index('VALUES') + 1}"] = "erg / (s cm2 Angstrom)"
    assert [f.code for f in read_any(path).flags] == ["implausible_flux_scale"] * 3
    desi = load_card("desi-like")
    for survey_file in (write_sdss_spec(spectra[1], tmp_path / "spec-4055-55359-0001.fits"),
                        write_desi_coadd(mock_samples(desi, 3, seed=32), tmp_path / "coadd-main-dark-10016.fits"),
                        write_eso_sdp(mock_samples(load_card("4most-lrs"), 2, seed=33), tmp_path / "ADP.fits")):
        assert "implausible_flux_scale" not in read_any(survey_file).flag_counts(), survey_file


# ---------------------------------------------------------------------------- the catalogue file


def test_output_that_is_an_input_is_refused(sdss, spectra, model_dir, tmp_path, capsys):
    """A spectra file is never replaced by its catalogue: not as itself, through a link, nor as
    a new file in a folder of inputs (read by the next run), not even with --overwrite."""
    folder = tmp_path / "in"
    folder.mkdir()
    path = write_fits(spectra[:2], folder / "spectra.fits", sdss)
    before = path.read_bytes()
    link = tmp_path / "link.fits"
    link.symlink_to(path)
    for inputs, out in ((path, path), (path, link), (folder, path), (folder, folder / "cat.fits")):
        with pytest.raises(InputError, match="is one of the inputs|lies in the input folder"):
            classify(inputs, model_dir, out, progress=False)
    capsys.readouterr()
    assert cli_main(["classify", str(path), "--model", model_dir, "--output", str(path), "--overwrite"]) == 2
    assert _error_line(capsys.readouterr().err).startswith(f"error: {path}: is one of the inputs")
    assert path.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["spectra.fits"]


def test_existing_output_needs_overwrite_and_a_failed_run_keeps_it(sdss, spectra, model_dir, tmp_path):
    path = write_fits(spectra[:2], tmp_path / "spectra.fits", sdss)
    out = tmp_path / "cat.fits"
    out.write_bytes(b"an earlier catalogue")
    with pytest.raises(InputError, match="cat.fits: already exists -- .*--overwrite"):
        classify(path, model_dir, out, progress=False)
    assert cli_main(["classify", str(path), "--model", model_dir, "--output", str(out), "--redshift", "network"]) == 2
    assert out.read_bytes() == b"an earlier catalogue"
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a spectrum")
    with pytest.raises(InputError, match="nothing usable"):  # fails after the writer started: the old file stays whole
        classify(junk, model_dir, out, overwrite=True, progress=False)
    assert out.read_bytes() == b"an earlier catalogue"
    assert cli_main(["classify", str(path), "--model", model_dir, "--output", str(out), "--redshift", "network", "--overwrite"]) == 0
    assert len(read_catalogue(out)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.fits", "junk", "spectra.fits"]  # no temporary file or spool left


def test_spools_of_killed_runs_are_removed_and_live_ones_kept(sdss, spectra, model_dir, tmp_path):
    """A run killed mid-way leaves its hidden spool of pieces; the next run writing the same
    catalogue removes it, but not the spool of a run still writing, nor another catalogue's."""
    from cosmofm.data_cards.io.catalogue import CatalogueWriter

    out = tmp_path / "cat.parquet"
    killed = ("import os, signal, sys\nfrom cosmofm.data_cards.io.catalogue import CatalogueWriter\n"
              "w = CatalogueWriter(sys.argv[1])\nw.add([{'ID': 'a', 'CLASS': 'QSO'}])\nos.kill(os.getpid(), signal.SIGKILL)\n")
    for target in (out, tmp_path / "other.parquet"):
        assert subprocess.run([sys.executable, "-c", killed, str(target)]).returncode == -9
    stale = sorted(tmp_path.glob(".cat.parquet.*.parts"))
    other = sorted(tmp_path.glob(".other.parquet.*.parts"))
    assert len(stale) == 1 and len(other) == 1 and any(stale[0].iterdir())
    live = CatalogueWriter(out)  # a run still writing the same catalogue
    try:
        path = write_fits(spectra[:2], tmp_path / "spectra.fits", sdss)
        classify(path, model_dir, out, redshift="network", progress=False)
        assert not stale[0].exists() and live.spool.exists() and other[0].exists()
        assert len(read_catalogue(out)) == 2
    finally:
        live.abort()
    assert not live.spool.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [other[0].name]
