"""The shared predict path (finetune/predict.py): a toy task's predictor writes its columns
for FITS files and datasets folders, one row per object in input order, with flagged rows;
worker processes write what one process writes; and classification's own Task."""

import subprocess
import sys

import astropy.units as u
import numpy as np
import pytest
import torch

from cosmofm.data_cards import load_card
from cosmofm.data_cards.io.catalogue import read_catalogue
from cosmofm.data_cards.io.fits_io import write_fits
from cosmofm.data_cards.io.hf_io import write_dataset
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.data_cards.readers.common import SKIPPED, Flag
from cosmofm.finetune.predict import PiecePrediction, predict_files
from cosmofm.heads.base import Task, task_class
from cosmofm.heads.classification import TASK_TYPE, ClassificationHeadConfig, ClassificationTask
from cosmofm.pretrain import CosmoFMConfig, collate_samples
from toy_task import ToyHeadConfig, ToyTask, registered_toy_task  # tests/toy_task.py

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, spectrum_patch_size=128, coord_frequencies=6,
            projection_dim=16, survey_names=["sdss-like"])


class ToyPredictor:
    """A task's part of the predict path: SCORE per spectrum, all-masked spectra skipped."""

    verb, modality = "score", "spectrum"
    columns = ToyTask.catalogue_columns

    def __init__(self, model, workers=None):
        self.model, self.workers, self.device = model.eval(), workers, torch.device("cpu")

    def predict(self, samples) -> PiecePrediction:
        kept, skipped = [], []
        for i in range(len(samples)):
            s = samples[i]
            if np.any(s.ivar > 0):
                kept.append(s)
            else:
                skipped.append(Flag(i, s.id, "all_masked", f"{s.id}: no unmasked pixel", SKIPPED))
        if not kept:
            return PiecePrediction([], {}, skipped)
        with torch.no_grad():
            score = self.model(collate_samples(kept, ["sdss-like"])).prediction[:, 0].double().numpy()
        return PiecePrediction([s.id for s in kept], {"SCORE": score, "SIGN": np.where(score > 0, "+", "-"), "SPREAD": None}, skipped)


@pytest.fixture(scope="module")
def toy_model():
    """Registered for this module only, so the registry is as shipped for every other test."""
    for model_cls, _ in registered_toy_task():
        torch.manual_seed(0)
        yield model_cls.from_backbone_config(CosmoFMConfig(**TINY), ToyHeadConfig()).eval()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    sdss = load_card("sdss-like")
    folder = tmp_path_factory.mktemp("inputs")
    spectra = mock_samples(sdss, 12, seed=3)
    spectra[4].ivar[:] = 0  # skipped by the toy predictor: a flagged row with null columns
    write_fits(spectra, folder / "a.fits", sdss)
    write_dataset(mock_samples(sdss, 5, seed=4), folder / "ds", [sdss])
    return folder, spectra


def test_predict_path_writes_the_tasks_columns_in_input_order_with_flags(toy_model, inputs, tmp_path):
    folder, spectra = inputs
    out = tmp_path / "toy.fits"
    summary = predict_files([folder / "a.fits", folder / "ds"], ToyPredictor(toy_model), out, progress=False, chunk_rows=5)
    assert (summary["n_rows"], summary["n_predicted"], summary["n_files"], summary["flags"]) == (17, 16, 2, {"all_masked": 1})
    t = read_catalogue(out)
    assert t.colnames[:3] == ["ID", "CARD", "FILE"] and t.colnames[-4:] == ["SCORE", "SIGN", "SPREAD", "FLAGS"]
    assert list(t["ID"]) == [s.id for s in spectra] + [f"sdss-like-4-{i}" for i in range(5)]
    assert list(t["FILE"]) == ["a.fits"] * 12 + ["ds"] * 5
    assert t["SCORE"].unit == u.mag and t["SPREAD"].unit == u.dimensionless_unscaled
    flagged = np.array(["all_masked" in str(f) for f in t["FLAGS"]])
    assert flagged.tolist() == [i == 4 for i in range(17)]
    score = np.asarray(t["SCORE"])
    assert np.isnan(score[4]) and np.ma.is_masked(t["SIGN"][4]) and np.isnan(np.asarray(t["SPREAD"])).all()
    kept = [s for i, s in enumerate(spectra) if i != 4]
    with torch.no_grad():
        expected = toy_model(collate_samples(kept, ["sdss-like"])).prediction[:, 0].double().numpy()
    np.testing.assert_allclose(score[:12][~flagged[:12]], expected, rtol=1e-5, atol=1e-6)
    assert [str(x) for x in t["SIGN"][:4]] == ["+" if v > 0 else "-" for v in expected[:4]]


def test_worker_processes_write_what_one_process_writes(toy_model, inputs, tmp_path):
    folder, _ = inputs
    one, many = tmp_path / "one.parquet", tmp_path / "many.parquet"
    predict_files([folder / "a.fits", folder / "ds"], ToyPredictor(toy_model, workers=1), one, progress=False, chunk_rows=3)
    predict_files([folder / "a.fits", folder / "ds"], ToyPredictor(toy_model, workers=2), many, progress=False, chunk_rows=3)
    a, b = read_catalogue(one), read_catalogue(many)
    assert a.colnames == b.colnames
    for name in a.colnames:
        if a[name].dtype.kind == "f":
            np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), rtol=1e-6, equal_nan=True, err_msg=name)
        else:
            assert [str(x) for x in a[name]] == [str(x) for x in b[name]], name


def test_classification_task_is_registered_with_its_columns_targets_and_metrics():
    sdss = load_card("sdss-like")
    head = ClassificationHeadConfig.from_card(sdss, hidden_size=16)
    assert task_class(TASK_TYPE) is ClassificationTask and isinstance(ClassificationTask(head), Task)
    task = ClassificationTask(head)
    units = {c.name: c.unit for c in task.catalogue_columns}
    assert units["CLASS"] is None and units["CONFORMAL_SET"] is None and units["Z"] == units["Z_ERR"] == ""
    assert all(units[f"P_{c}"] == "" for c in head.class_names)
    samples = mock_samples(sdss, 6, seed=1)
    targets = task.targets(samples)
    assert set(targets) == {"class_labels", "redshift"} and targets["class_labels"].dtype == torch.long
    logits = torch.nn.functional.one_hot(targets["class_labels"], len(head.class_names)).float() * 10
    metrics = task.metrics({"logits": logits, "redshift": targets["redshift"].numpy()}, targets)
    assert metrics["accuracy"] == 1.0 and metrics["redshift_catastrophic_fraction"] == 0.0


def test_cli_parser_imports_no_torch():
    """`cosmofm --help` answers without loading torch (the classify verb's --redshift choices included)."""
    code = "import sys, cosmofm.cli; cosmofm.cli.build_parser(); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
