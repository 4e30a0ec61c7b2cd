"""The command line as a user meets it: clear one-line errors, mocks, inspect, demo."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cosmofm.cli import main


def test_bad_recipe_value_is_a_one_line_error(tmp_path, capsys):
    code = main(["pretrain", "--config", "tiny", "--output", str(tmp_path), "--set", "optim.lr=-1"])
    err = capsys.readouterr().err
    assert code == 2 and "recipe.optim.lr" in err and "Traceback" not in err


def test_unknown_recipe_key_and_missing_recipe(tmp_path, capsys):
    assert main(["pretrain", "--config", "tiny", "--set", "optim.learning_rate=1"]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "tiny" in capsys.readouterr().err  # lists the shipped recipes


def test_resume_without_checkpoint_says_what_to_do(tmp_path, capsys):
    code = main(["pretrain", "--config", "tiny", "--output", str(tmp_path), "--resume", "--set", "data.mock_counts=[2,2,2,2]"])
    err = capsys.readouterr().err
    assert code == 2 and "no checkpoint" in err and "without --resume" in err


def test_mock_to_fits_then_inspect(tmp_path, capsys, monkeypatch):
    assert main(["mock", "spectra", "--n", "3", "--format", "fits", "--out", str(tmp_path)]) == 0
    path = tmp_path / "sdss-like-3.fits"
    assert path.exists()
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "objects: 3" in text and "wavelength: 3600 .. 10400 Angstrom" in text and "1e-17 erg" in text
    # a big file is summarised from its first rows only (read without the rest)
    import cosmofm.inspect

    monkeypatch.setattr(cosmofm.inspect, "PREVIEW_OBJECTS", 2)
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "objects: 2" in text and "objects in file: 3; the first 2 read for this summary, 2 usable" in text


def test_mock_dataset_and_card_and_wrong_card(tmp_path, capsys):
    assert main(["mock", "lightcones", "--n", "2", "--out", str(tmp_path / "lc")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "lc")]) == 0
    assert "field" in capsys.readouterr().out
    assert main(["inspect", "data_cards/cards/ska_hi_like.yaml"]) == 0
    assert "channel_width" in capsys.readouterr().out
    assert main(["mock", "cubes", "--card", "sdss-like", "--out", str(tmp_path / "x")]) == 2
    assert "spectrum card" in capsys.readouterr().err


def test_inspect_corrupt_fits_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "broken.fits"
    bad.write_bytes(b"SIMPLE  =                    T" + b"\x00" * 100)
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "broken.fits" in err and "Traceback" not in err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "cosmofm.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "pretrain" in out.stdout


@pytest.mark.slow
def test_demo_end_to_end_short(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from cosmofm.demo import run_demo

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # the hub download cache, as a user sets it
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf-home"))

    report = run_demo(output=tmp_path, steps=8, n_labelled=120)
    assert report["reload_identical"] is True
    # the classifier steps: a release each, and a catalogue of the same 4MOST-like ESO file (200 rows),
    # from a classifier of another instrument (sdss-like) and one of the file's own card (4most-lrs)
    from cosmofm.data_cards.io.catalogue import read_catalogue
    from cosmofm.data_cards.mocks.generators import mock_samples
    from cosmofm.data_cards.schema import load_card
    from cosmofm.demo import ESO_FILE_CARD, HELD_OUT_SEED

    truth = {s.id: s.meta["labels"]["spectral_class"] for s in mock_samples(load_card(ESO_FILE_CARD), 200, seed=HELD_OUT_SEED + 2)}
    runs = [report["classification"], report["classification_own_card"]]
    assert [r["card"] for r in runs] == ["sdss-like", ESO_FILE_CARD] and runs[0]["catalogue"] != runs[1]["catalogue"]
    for run in runs:
        assert (Path(run["output_dir"]) / "model" / "model.safetensors").exists()
        rows = read_catalogue(run["catalogue"])
        assert len(rows) == 200
        # the reported accuracy is the catalogue's CLASS against the truth of the objects written to the file
        print(run["card"], "ESO file accuracy", run["eso_file_accuracy"])
        correct = np.array([str(c) == truth[str(o)] for o, c in zip(rows["OBJECT"], rows["CLASS"])])
        assert run["eso_file_accuracy"] == np.mean(correct)
        # the count it prints (24 calibration spectra set no threshold at 1.5 %: then no OUT_OF_SET column and 0)
        flagged = np.asarray(rows["OUT_OF_SET"], dtype=bool) if "OUT_OF_SET" in rows.colnames else np.zeros(200, bool)
        assert run["eso_file_out_of_set"] == int(flagged.sum())
        np.testing.assert_equal(run["eso_file_accuracy_not_flagged"], np.mean(correct[~flagged]) if (~flagged).any() else np.nan)
    assert (tmp_path / "loss_curve.png").stat().st_size > 10_000
    assert (tmp_path / "pretrain" / "model" / "model.safetensors").exists()
    # published to the local-directory hub under the output folder, loaded back by repo id
    assert report["hub"]["reload_identical"] is True and report["hub"]["repo_id"] == "cosmofm/demo"
    assert (tmp_path / "hub" / "models" / "cosmofm" / "demo" / "HEAD").is_file()
    assert Path(report["hub"]["local_folder"]).is_relative_to(tmp_path / "hf-home")
    assert "model-index" in (Path(report["hub"]["local_folder"]) / "README.md").read_text()
    saved = json.loads((tmp_path / "demo_report.json").read_text())
    assert saved["held_out"]["n_pairs"] == 64
