"""`cosmofm predict` and the task-agnostic predictor (finetune/task_predict.py): a photo-z
release run on FITS image files writes the model's own medians, in the declared units,
with all-masked stamps flagged; another task's model, an unknown task and a backbone are
one-line errors; and the toy task of tests/toy_task.py runs through the same predictor."""

import dataclasses

import astropy.units as u
import numpy as np
import pytest
import torch

from cosmofm.cli import main
from cosmofm.data_cards import load_card
from cosmofm.data_cards.io.catalogue import read_catalogue
from cosmofm.data_cards.io.fits_io import read_fits, write_fits
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.finetune.task_predict import TaskPredictor, predict_task
from cosmofm.heads.base import TASK_MODELS
from cosmofm.heads.photoz import CosmoFMForPhotoz, PhotozHeadConfig, PhotozTask
from cosmofm.pretrain import CosmoFMConfig, CosmoFMModel, collate_samples
from cosmofm.pretrain.checkpoint import write_manifest
from toy_task import TOY, ToyHeadConfig, registered_toy_task  # tests/toy_task.py

SURVEYS = ["lsst-like"]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, coord_frequencies=6, projection_dim=16, survey_names=SURVEYS)
MASKED = 1  # the stamp of masked.fits whose every pixel has ivar 0


def _flags(t) -> list[str]:
    """FLAGS as text ("" where none: read back masked)."""
    return [str(f) for f in np.ma.filled(t["FLAGS"], "")]


def _release(model, folder):
    model.save_pretrained(folder)
    write_manifest(folder)
    return folder


@pytest.fixture(scope="module")
def photoz(tmp_path_factory):
    """(model, release folder) of a tiny untrained photo-z model with a calibration temperature."""
    torch.manual_seed(0)
    model = CosmoFMForPhotoz.from_backbone_config(CosmoFMConfig(**TINY), PhotozHeadConfig(n_bins=40, hidden_size=32, pooling_heads=2)).eval()
    model.set_temperature(1.7)
    return model, _release(model, tmp_path_factory.mktemp("photoz") / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder with 12 clean image mocks (clean.fits) and 3 with one all-masked stamp (masked.fits)."""
    lsst = load_card("lsst-like")
    folder = tmp_path_factory.mktemp("images")
    write_fits(mock_samples(lsst, 12, seed=5), folder / "clean.fits", lsst)
    few = mock_samples(lsst, 3, seed=6)
    few[MASKED] = dataclasses.replace(few[MASKED], ivar=np.zeros_like(few[MASKED].ivar))
    write_fits(few, folder / "masked.fits", lsst)
    return folder


@pytest.fixture(scope="module")
def catalogue(photoz, images, tmp_path_factory):
    """`cosmofm predict` of both files with the photo-z release: (table, exit status)."""
    out = tmp_path_factory.mktemp("out") / "photoz.fits"
    rc = main(["predict", str(images / "clean.fits"), str(images / "masked.fits"), "--model", str(photoz[1]), "--output", str(out),
               "--task", "photoz", "--chunk-rows", "5"])
    return read_catalogue(out), rc


def test_predict_writes_the_photoz_models_own_medians_one_row_per_object(photoz, images, catalogue):
    t, rc = catalogue
    clean = read_fits(images / "clean.fits")  # the samples as the project's reader gives them
    assert rc == 0 and len(t) == 15
    assert list(t["ID"][:12]) == [s.id for s in clean] and list(t["FILE"]) == ["clean.fits"] * 12 + ["masked.fits"] * 3
    assert t.colnames[-7:] == [c.name for c in PhotozTask.catalogue_columns] + ["FLAGS"]
    assert all(t[c.name].unit == u.dimensionless_unscaled for c in PhotozTask.catalogue_columns)
    with torch.no_grad():
        out = photoz[0](collate_samples(clean, SURVEYS))
    z = np.asarray(t["Z_PHOT"][:12], dtype=np.float64)
    assert np.isfinite(z).all() and _flags(t[:12]) == [""] * 12
    np.testing.assert_allclose(z, out.redshift.double().numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(t["Z_PHOT_ERR"][:12], dtype=np.float64), out.redshift_err.double().numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(t["Z_PHOT_HI95"][:12], dtype=np.float64), out.z_hi95.double().numpy(), rtol=1e-5)


def test_an_all_masked_stamp_gets_its_flag_and_null_columns(photoz, images, catalogue):
    t, _ = catalogue
    rows = t[12:]
    assert _flags(rows) == ["all_masked" if i == MASKED else "" for i in range(3)]
    z = np.asarray(rows["Z_PHOT"], dtype=np.float64)
    assert np.isnan(z[MASKED]) and np.isnan(np.asarray(rows["Z_PHOT_LO68"], dtype=np.float64)[MASKED])
    kept = [s for i, s in enumerate(read_fits(images / "masked.fits")) if i != MASKED]
    with torch.no_grad():
        expected = photoz[0](collate_samples(kept, SURVEYS)).redshift.double().numpy()
    np.testing.assert_allclose(np.delete(z, MASKED), expected, rtol=1e-5)


def test_a_model_of_another_task_is_one_error_line_naming_both(photoz, images, tmp_path, capsys):
    rc = main(["predict", str(images / "clean.fits"), "--model", str(photoz[1]), "--output", str(tmp_path / "c.fits"), "--task", "spectral-classification"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "'photoz'" in err[0] and "classification" in err[0] and not (tmp_path / "c.fits").exists()
    rc = main(["predict", str(images / "clean.fits"), "--model", str(photoz[1]), "--output", str(tmp_path / "c.fits"), "--task", "morphology"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "'morphology' is not a registered task" in err[0] and str(sorted(TASK_MODELS)) in err[0]


def test_a_backbone_release_is_refused_with_what_to_do(images, tmp_path, capsys):
    torch.manual_seed(0)
    backbone = _release(CosmoFMModel(CosmoFMConfig(**TINY)), tmp_path / "backbone")
    capsys.readouterr()
    rc = main(["predict", str(images / "clean.fits"), "--model", str(backbone), "--output", str(tmp_path / "b.fits")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("Loading weights")]  # less transformers' bar
    assert rc == 2 and err == [f"error: {backbone}: holds no task head (a pretrained backbone) -- fine-tune one with "
                               "cosmofm finetune --task NAME, and predict with its model folder"]
    assert not (tmp_path / "b.fits").exists()


@pytest.fixture
def toy_model():
    """The toy task registered for one test, so the registry is as shipped for every other test."""
    for model_cls, _ in registered_toy_task():
        torch.manual_seed(0)
        yield model_cls.from_backbone_config(CosmoFMConfig(**TINY), ToyHeadConfig()).eval()


def test_the_toy_task_runs_through_the_same_predictor(toy_model, images, tmp_path):
    predictor = TaskPredictor(toy_model, batch_size=4)
    assert (predictor.verb, predictor.modality, [c.name for c in predictor.columns]) == (TOY, "image", ["SCORE", "SIGN", "SPREAD"])
    summary = predict_task([images / "clean.fits", images / "masked.fits"], toy_model, tmp_path / "toy.parquet", batch_size=4, progress=False)
    assert (summary["n_rows"], summary["n_predicted"], summary["flags"]) == (15, 14, {"all_masked": 1})
    t = read_catalogue(tmp_path / "toy.parquet")
    assert t["SCORE"].unit == u.mag and t["SPREAD"].unit == u.dimensionless_unscaled
    clean = read_fits(images / "clean.fits")
    with torch.no_grad():
        expected = toy_model(collate_samples(clean, SURVEYS)).prediction[:, 0].double().numpy()
    np.testing.assert_allclose(np.asarray(t["SCORE"][:12], dtype=np.float64), expected, rtol=1e-5, atol=1e-7)
    assert [str(x) for x in t["SIGN"][:12]] == ["+" if v > 0 else "-" for v in expected]
    assert np.isnan(np.asarray(t["SPREAD"], dtype=np.float64)).all() and np.ma.is_masked(t["SIGN"][12 + MASKED])
