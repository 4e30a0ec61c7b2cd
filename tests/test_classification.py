"""Spectral classification head: config round trip, a short fine-tune, calibration, `cosmofm classify`."""

import json

import astropy.units as u
import numpy as np
import pytest
import torch

import cosmofm
from cosmofm.cli import main as cli_main
from cosmofm.data_cards import load_card
from cosmofm.data_cards.io.catalogue import read_catalogue
from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.data_cards.mocks.spectra import CLASSES
from cosmofm.finetune.classification import FinetuneConfig, finetune_classification
from cosmofm.finetune.classify import classify, predict
from cosmofm.finetune.strategies import peft_available
from cosmofm.finetune.model_card import load_eval_results
from cosmofm.heads.calibration import expected_calibration_error, fit_temperature, softmax
from cosmofm.heads.classification import ClassificationHeadConfig, CosmoFMForSpectralClassification, labels_from_samples
from cosmofm.heads.metrics import redshift_metrics
from cosmofm.pretrain import CosmoFMConfig, CosmoFMModel, collate_samples
from cosmofm.pretrain.checkpoint import write_manifest

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, spectrum_patch_size=128, coord_frequencies=6, projection_dim=16)
# the shape of the spectral benchmark model (pretrain/recipes/spectra-small.yaml), tiny
TINY_STEM = {**TINY, "pixel_weight": "ivar", "spectrum_stem_channels": 4}


@pytest.fixture(scope="module")
def labelled(sdss):
    return mock_samples(sdss, 400, seed=11)


@pytest.fixture(scope="module")
def finetuned(labelled, sdss, tmp_path_factory):
    out = tmp_path_factory.mktemp("cls-run")
    cfg = FinetuneConfig(strategy="full", epochs=25, batch_size=16, lr=3e-3, backbone_lr_scale=1.0, mc_samples=8, output_dir=str(out))
    return finetune_classification(labelled, sdss, cfg, backbone_config=TINY_STEM)


def _missing(v) -> bool:
    return bool(np.ma.is_masked(v) or v is None or v == "" or (isinstance(v, (float, np.floating)) and np.isnan(v)))


def test_config_round_trip_and_loaders(sdss, tmp_path):
    head = ClassificationHeadConfig.from_card(sdss, hidden_size=16)
    assert head.class_names == list(CLASSES)
    model = CosmoFMForSpectralClassification.from_backbone_config(CosmoFMConfig(survey_names=["sdss-like"], **TINY), head).eval()
    model.set_calibration(1.7, 0.1, 0.83)
    model.save_pretrained(tmp_path)
    write_manifest(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["CosmoFMForSpectralClassification"]
    assert saved["task"]["class_names"] == list(CLASSES) and saved["task"]["temperature"] == 1.7

    samples = mock_samples(sdss, 3, seed=2)
    batch = collate_samples(samples, ["sdss-like"])
    ref = model(batch)
    assert ref.loss is None and ref.logits.shape == (3, len(CLASSES)) and ref.redshift_err.shape == (3,)
    ids, z = labels_from_samples(samples, model.head_config)
    assert model(batch, ids, z).loss.ndim == 0

    loaded = cosmofm.from_pretrained(tmp_path).eval()
    assert type(loaded) is CosmoFMForSpectralClassification
    assert loaded.head_config == model.head_config
    out = loaded(batch)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.redshift, ref.redshift)

    from transformers import AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(auto) is CosmoFMForSpectralClassification and torch.equal(auto(batch).logits, ref.logits)


def test_finetune_learns_and_writes_release(finetuned, labelled, tmp_path):
    m = finetuned["metrics"]
    assert m["accuracy"] > 3 / len(CLASSES), m  # > 3x chance
    assert m["n_train"] == 240 and m["n_calibration"] == 80 and m["n_test"] == 80
    # the network's redshift figures are those of its own predictions on the test block
    test = [labelled[i] for i in finetuned["splits"]["test"]]
    z_true = np.array([s.meta["labels"]["redshift"] for s in test])
    again = redshift_metrics(z_true, predict(finetuned["model"], test)["redshift"])
    assert (m["redshift_nmad"], m["redshift_catastrophic_fraction"]) == pytest.approx(
        (again["redshift_nmad"], again["redshift_catastrophic_fraction"]), rel=1e-5)
    # the scan's redshifts (classify's default Z) are scored too, far better than a tiny network's own
    assert m["redshift_scan_catastrophic_fraction"] < m["redshift_catastrophic_fraction"], m
    assert m["redshift_scan_error_scale"] > 0 and 0.5 < m["redshift_scan_pull_width"] < 2, m
    results = load_eval_results(finetuned["eval_results"])
    types = {x["type"] for x in results[0]["metrics"]}
    assert {"accuracy", "macro_recall", "ece_before", "ece_after", "conformal_coverage", "redshift_nmad"} <= types
    for fig in finetuned["figures"]:
        assert fig.endswith(".png")
    assert {p.split("/")[-1] for p in finetuned["figures"]} == {"confusion_matrix.png", "reliability.png", "redshift.png"}
    reloaded = cosmofm.from_pretrained(finetuned["model_dir"])
    assert reloaded.head_config.temperature == pytest.approx(m["temperature"])
    assert reloaded.head_config.conformal_threshold == pytest.approx(m["conformal_threshold"])
    assert reloaded.head_config.redshift_error_scale == pytest.approx(m["redshift_scan_error_scale"])
    # the out-of-set detector, fitted on the training block with its threshold from the calibration block
    assert reloaded.head_config.ood_active and reloaded.head_config.ood_threshold == pytest.approx(m["ood_threshold"])
    # the threshold is the largest of 80 calibration scores: the test fraction above it is Beta(1, 80), > 0.1 with p = 0.9^80 ~ 2e-4
    assert m["ood_target_rate"] == 0.015 and m["ood_false_flag_rate"] <= 0.1, m


def test_temperature_fit_on_calibration_split(finetuned, labelled):
    """Temperature scaling minimises NLL on the calibration split, so it never raises it there;
    on overconfident logits it also brings the ECE down."""
    model = finetuned["model"]
    cal = [labelled[i] for i in finetuned["splits"]["calibration"]]
    y = labels_from_samples(cal, model.head_config)[0]
    logits = torch.as_tensor(predict(model, cal)["logits"])
    t = finetuned["metrics"]["temperature"]
    nll = lambda temp: float(torch.nn.functional.cross_entropy(logits / temp, y))  # noqa: E731
    assert nll(t) <= nll(1.0) + 1e-6
    overconfident = logits * 5.0
    t5 = fit_temperature(overconfident, y)
    assert t5 > 1
    assert expected_calibration_error(softmax(overconfident, t5), y) <= expected_calibration_error(softmax(overconfident), y)


def test_mc_dropout_members_differ_and_are_scored(finetuned, labelled):
    model = finetuned["model"]
    out = predict(model, labelled[:16], mc_samples=6)
    assert out["mc_logits"].shape == (6, 16, len(CLASSES))
    assert not np.allclose(out["mc_logits"][0], out["mc_logits"][1])  # dropout is on in the passes
    np.testing.assert_array_equal(predict(model, labelled[:16])["logits"], out["logits"])  # the plain pass is not
    mc = finetuned["metrics"]["mc_dropout"]
    # the ensemble classifies about as well as the plain pass, and its uncertainty flags errors better than chance
    assert mc["samples"] == 8 and abs(mc["accuracy"] - finetuned["metrics"]["accuracy"]) < 0.1, mc
    assert mc["error_auroc_total_entropy"] > 0.5 and mc["error_auroc_softmax"] > 0.5, mc
    assert mc["mean_epistemic_nats"] > 0


def test_head_configs_saved_before_attention_pooling_still_load(sdss):
    old = ClassificationHeadConfig.from_card(sdss).to_dict()
    del old["pooling"], old["pooling_heads"]
    cfg = CosmoFMConfig(survey_names=["sdss-like"], **TINY)
    cfg.task = old
    model = CosmoFMForSpectralClassification(cfg)
    assert model.head_config.pooling == "mean" and model.head.pool is None
    with pytest.raises(InputError, match="task.pooling"):
        ClassificationHeadConfig.from_card(sdss, pooling="max")


def test_distillation_from_a_teacher(finetuned, labelled, sdss):
    cfg = dict(strategy="full", epochs=2, batch_size=16)
    plain = finetune_classification(labelled[:60], sdss, FinetuneConfig(**cfg), backbone_config=TINY)
    off = finetune_classification(labelled[:60], sdss, FinetuneConfig(**cfg, distill_weight=0.0), backbone_config=TINY, teacher=finetuned["model"])
    on = finetune_classification(labelled[:60], sdss, FinetuneConfig(**cfg, distill_weight=1.0), backbone_config=TINY, teacher=finetuned["model_dir"])
    assert off["history"] == plain["history"]  # weight 0: exactly the plain loss
    assert on["history"][0] > plain["history"][0]  # the KL term is added (>= 0, here > 0)
    other = ClassificationHeadConfig(class_names=["A", "B"])
    wrong = CosmoFMForSpectralClassification.from_backbone_config(CosmoFMConfig(survey_names=["sdss-like"], **TINY), other)
    with pytest.raises(InputError, match="teacher"):
        finetune_classification(labelled[:60], sdss, FinetuneConfig(**cfg), backbone_config=TINY, teacher=wrong)


def test_conformal_coverage_near_target(finetuned):
    m = finetuned["metrics"]
    assert abs(m["conformal_coverage"] - (1 - m["conformal_alpha"])) < 0.1, m
    assert 1 <= m["conformal_mean_set_size"] < len(CLASSES)


def test_frozen_keeps_backbone_and_lora_merges(labelled, sdss):
    backbone = CosmoFMModel(CosmoFMConfig(survey_names=["sdss-like"], **TINY))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    r = finetune_classification(labelled[:60], sdss, FinetuneConfig(strategy="frozen", epochs=1, batch_size=16), backbone=backbone)
    after = r["model"].cosmofm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    if not peft_available():
        pytest.skip("peft not installed")
    r = finetune_classification(labelled[:60], sdss, FinetuneConfig(strategy="lora", epochs=1, batch_size=16), backbone=backbone)
    keys = set(r["model"].state_dict())
    assert not any("lora" in k for k in keys) and "cosmofm.encoder.layers.0.attn.qkv.weight" in keys


def test_classify_survey_files_and_own_fits(finetuned, tmp_path):
    from cosmofm.data_cards.io.fits_io import write_fits
    from cosmofm.data_cards.io.survey_files import write_desi_coadd, write_sdss_spec

    sdss, desi = load_card("sdss-like"), load_card("desi-like")
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_sdss_spec(mock_samples(sdss, 1, seed=5)[0], inputs / "spec-4055-55359-0001.fits")
    write_fits(mock_samples(sdss, 3, seed=6), inputs / "ours.fits", sdss)
    coadd = mock_samples(desi, 3, seed=7)
    coadd[1].ivar[:] = 0  # an all-masked spectrum: flagged and skipped by the reader
    write_desi_coadd(coadd, inputs / "coadd-main-dark-10016.fits")

    names = list(CLASSES)
    for suffix in ("fits", "parquet"):
        out = tmp_path / f"pred.{suffix}"
        assert cli_main(["classify", str(inputs), "--model", finetuned["model_dir"], "--output", str(out)]) == 0
        t = read_catalogue(out)
        assert len(t) == 1 + 3 + 3
        for col in ["ID", "CARD", "FILE", "CLASS", "CONFORMAL_SET", "OOD_SCORE", "OUT_OF_SET", "LOW_COVERAGE", "Z", "Z_ERR", "FLAGS", "PLATE",
                    "MJD", "FIBERID", "TARGETID", "RA", "DEC"]:
            assert col in t.colnames, col
        assert all(f"P_{c}" in t.colnames for c in names)
        assert t["Z"].dtype.kind == "f" and t["P_QSO"].dtype.kind == "f" and t["PLATE"].dtype.kind == "i"
        assert t["Z"].unit == u.dimensionless_unscaled and t["RA"].unit == u.deg  # dimensionless survives both formats
        flagged = [i for i in range(len(t)) if "all_masked" in str(t["FLAGS"][i])]
        assert len(flagged) == 1
        row = t[flagged[0]]
        assert _missing(row["Z"]) and _missing(row["Z_ERR"]) and _missing(row["P_QSO"]) and _missing(row["CLASS"])
        assert str(row["ID"]) and int(row["TARGETID"]) > 0  # identifiers kept for the skipped object
        good = [i for i in range(len(t)) if i not in flagged]
        probs = np.array([[t[f"P_{c}"][i] for c in names] for i in good])
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
        for i in good:
            assert str(t["CLASS"][i]) in names
            members = str(t["CONFORMAL_SET"][i]).split("|")
            if t["OUT_OF_SET"][i] or t["LOW_COVERAGE"][i]:  # like none of the classes, or too little spectrum: no set (issue 17)
                assert _missing(t["CONFORMAL_SET"][i]), i
            else:
                assert set(members) <= set(names) and str(t["CLASS"][i]) in members
            assert t["Z_ERR"][i] > 0
        assert {str(x) for x in t["FILE"]} == {"spec-4055-55359-0001.fits", "ours.fits", "coadd-main-dark-10016.fits"}


def test_classify_redshift_methods_and_epistemic_uncertainty(finetuned, tmp_path):
    from cosmofm.data_cards.io.fits_io import write_fits

    sdss = load_card("sdss-like")
    spectra = [s for s in mock_samples(sdss, 30, seed=8) if s.meta["labels"]["spectral_class"].startswith(("GALAXY", "QSO"))][:6]
    write_fits(spectra, tmp_path / "in.fits", sdss)
    z_true = np.array([s.meta["labels"]["redshift"] for s in spectra])
    out = tmp_path / "pred.fits"
    assert cli_main(["classify", str(tmp_path / "in.fits"), "--model", finetuned["model_dir"], "--output", str(out),
                     "--redshift", "template", "--mc-dropout", "5"]) == 0
    t = read_catalogue(out)
    assert {"Z_NETWORK", "EPISTEMIC"} <= set(t.colnames)
    assert np.all(np.asarray(t["EPISTEMIC"]) >= 0)
    # fitted redshifts are the template fit's for the predicted class: mostly right, unlike a tiny network's
    good = np.abs(np.asarray(t["Z"]) - z_true) / (1 + z_true) < 0.0033
    assert good.mean() >= 0.5 and not np.allclose(t["Z"], t["Z_NETWORK"])
    # the default, the batched scan, agrees with the full fit of the same class wherever that is right
    scan = tmp_path / "scan.fits"
    classify([tmp_path / "in.fits"], finetuned["model_dir"], scan, progress=False)
    s = read_catalogue(scan)
    assert list(s["CLASS"]) == list(t["CLASS"]) and "Z_NETWORK" in s.colnames and "EPISTEMIC" not in s.colnames
    np.testing.assert_allclose(np.asarray(s["Z"])[good], np.asarray(t["Z"])[good], atol=0.0033 * (1 + z_true.max()))
    assert np.all(np.asarray(s["Z_ERR"])[good] > 0)
    plain = tmp_path / "plain.fits"
    classify([tmp_path / "in.fits"], finetuned["model_dir"], plain, redshift="network", progress=False)
    assert "Z_NETWORK" not in read_catalogue(plain).colnames
    # the run with the same workers and threads as the scan run (oneDNN's float32 sums depend on the thread split)
    np.testing.assert_allclose(read_catalogue(plain)["Z"], s["Z_NETWORK"], rtol=1e-6)
    with pytest.raises(InputError, match="redshift: is 'fast'"):
        classify([tmp_path / "in.fits"], finetuned["model_dir"], plain, redshift="fast", progress=False)


def test_classify_bad_input(finetuned, tmp_path):
    backbone_dir = tmp_path / "backbone"
    CosmoFMModel(CosmoFMConfig(survey_names=["sdss-like"], **TINY)).save_pretrained(backbone_dir)
    write_manifest(backbone_dir)
    spec = tmp_path / "spec.fits"
    from cosmofm.data_cards.io.survey_files import write_sdss_spec

    write_sdss_spec(mock_samples(load_card("sdss-like"), 1)[0], spec)
    with pytest.raises(InputError, match="not a spectral classification model"):
        classify(spec, backbone_dir, tmp_path / "out.fits", progress=False)
    with pytest.raises(InputError, match="chunk_rows: must be >= 1"):
        classify(spec, finetuned["model_dir"], tmp_path / "out.fits", chunk_rows=0, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no files"):
        classify(empty, finetuned["model_dir"], tmp_path / "out.fits", progress=False)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a spectrum")
    with pytest.raises(InputError, match="nothing usable"):
        classify(junk, finetuned["model_dir"], tmp_path / "out.fits", progress=False)
    assert cli_main(["classify", str(empty), "--model", finetuned["model_dir"], "--output", str(tmp_path / "o.fits")]) == 2
    assert not (tmp_path / "o.fits").exists()


def test_classify_datasets_folder(finetuned, tmp_path):
    from cosmofm.data_cards.io.hf_io import write_dataset

    sdss = load_card("sdss-like")
    folder = write_dataset(mock_samples(sdss, 5, seed=9), tmp_path / "ds", [sdss])
    summary = classify(folder, finetuned["model_dir"], tmp_path / "pred.parquet", batch_size=2, progress=False)
    assert summary["n_rows"] == summary["n_classified"] == 5
    t = read_catalogue(tmp_path / "pred.parquet")
    assert list(t["ID"]) == [f"sdss-like-9-{i}" for i in range(5)] and set(t["CARD"]) == {"sdss-like"}


def test_classify_eso_sdp_and_plain_table(finetuned, tmp_path):
    """The other published spectrum formats go through the same reader registry (issue 7)."""
    import astropy.units as u
    from astropy.table import Table

    from cosmofm.data_cards.io.catalogue import read_catalogue
    from cosmofm.data_cards.io.survey_files import write_eso_sdp

    spectra = mock_samples(load_card("4most-lrs"), 3, seed=12)
    eso = write_eso_sdp(spectra, tmp_path / "ADP.2026-01-01T00:00:00.000.fits", objects=["a", "b", "c"])
    s = spectra[0]
    table = Table({"wavelength": s.coords["wavelength"] * u.AA, "flux": s.values * 1e-17 * u.erg / u.s / u.cm**2 / u.AA,
                   "ivar": s.ivar / 1e-34 * (u.erg / u.s / u.cm**2 / u.AA) ** -2})
    table.write(tmp_path / "one.fits")
    out = tmp_path / "pred.parquet"
    assert cli_main(["classify", str(eso), str(tmp_path / "one.fits"), "--model", finetuned["model_dir"], "--output", str(out), "--card", "4most-lrs"]) == 0
    rows = read_catalogue(out)
    assert len(rows) == 4 and "OBJECT" in rows.colnames
    assert sorted(str(o) for o in rows["OBJECT"] if str(o) not in ("", "--")) == ["a", "b", "c"]
    assert all(str(c) in CLASSES for c in rows["CLASS"])


def test_classify_streams_pieces_in_bounded_memory(finetuned, tmp_path, monkeypatch):
    """A file read in pieces gives the catalogue of one read (issue 5: a million spectra in
    bounded memory): same rows, same probabilities, and a peak memory that follows the piece
    size, not the file size. The parallel CPU path agrees with the sequential `predict`;
    worker processes (the default on Linux) write what worker threads write."""
    import tracemalloc

    import cosmofm.data_cards.workers as workers
    from cosmofm.data_cards.io.fits_io import write_fits

    sdss = load_card("sdss-like")
    spectra = mock_samples(sdss, 96, seed=21)
    path = write_fits(spectra, tmp_path / "many.fits", sdss)
    classify([path], finetuned["model_dir"], tmp_path / "processes.parquet", batch_size=8, chunk_rows=8, progress=False)
    monkeypatch.setattr(workers, "can_fork", lambda: False)  # threads: tracemalloc sees the workers' memory
    classify([path], finetuned["model_dir"], tmp_path / "warm.parquet", progress=False)  # imports and caches outside the trace
    peaks, tables = {}, {}
    for chunk in (96, 8):
        tracemalloc.start()
        classify([path], finetuned["model_dir"], tmp_path / f"c{chunk}.parquet", batch_size=8, chunk_rows=chunk, progress=False)
        peaks[chunk] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        tables[chunk] = read_catalogue(tmp_path / f"c{chunk}.parquet")
    assert list(tables[8]["ID"]) == list(tables[96]["ID"]) == [s.id for s in spectra]
    assert peaks[8] < peaks[96] / 2, peaks
    model = finetuned["model"]
    expected = softmax(predict(model, spectra, batch_size=32)["logits"], model.head_config.temperature)
    for j, c in enumerate(model.class_names):
        np.testing.assert_allclose(tables[8][f"P_{c}"], expected[:, j], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(tables[96][f"P_{c}"], expected[:, j], rtol=1e-4, atol=1e-6)
    in_processes = read_catalogue(tmp_path / "processes.parquet")
    assert in_processes.colnames == tables[8].colnames
    for name in in_processes.colnames:
        assert list(in_processes[name]) == list(tables[8][name]), name


def _pid_of(item):
    import os

    if item == "bad":
        raise InputError("item", "is bad", "give a good one")
    return item, os.getpid()


def test_parallel_pieces_run_in_worker_processes_in_order():
    """Where the platform forks, classify's workers are processes: results come back in
    order, and an InputError raised in a worker reaches the caller whole."""
    import os

    from cosmofm.data_cards.workers import can_fork as _can_fork, in_parallel as _in_parallel

    out = list(_in_parallel(_pid_of, iter(range(9)), workers=2, processes=True))
    assert [i for i, _ in out] == list(range(9))
    assert (os.getpid() not in {pid for _, pid in out}) == _can_fork()  # Linux (CI): processes; elsewhere threads
    assert {pid for _, pid in list(_in_parallel(_pid_of, iter(range(4)), workers=2))} == {os.getpid()}  # threads
    with pytest.raises(InputError, match="item: is bad") as caught:
        list(_in_parallel(_pid_of, iter([1, "bad", 2]), workers=2, processes=True))
    assert caught.value.fix == "give a good one"


def test_cli_distils_into_a_recipe_shaped_student(finetuned, tmp_path):
    """`cosmofm finetune --recipe spectra-fast --teacher MODEL`: the fast student of issue 5."""
    from cosmofm.finetune.release import from_pretrained

    out = tmp_path / "student"
    assert cli_main(["finetune", "--task", "spectral-classification", "--recipe", "spectra-fast", "--teacher", finetuned["model_dir"], "--strategy", "full",
                     "--n-train", "40", "--epochs", "1", "--workers", "1", "--output", str(out)]) == 0
    student = from_pretrained(str(out / "model"))
    assert (student.config.hidden_size, student.config.spectrum_stem_stride, student.config.spectrum_patch_size) == (32, 8, 128)
    assert cli_main(["finetune", "--recipe", "spectra-fast", "--backbone", finetuned["model_dir"], "--output", str(tmp_path / "x")]) == 2


def test_redshift_method_follows_the_templates_classes_and_the_network():
    """The scan needs templates of every class the model predicts: a survey's own label
    schema falls back to the network's redshift, and asking for a fit then is an error. A
    model that carries a redshift network uses it by default; the scan stays an option."""
    from cosmofm.finetune.classify import redshift_method
    from cosmofm.heads.redshift_net import RedshiftNet, RedshiftNetConfig

    backbone = CosmoFMConfig(survey_names=["sdss-like"], **TINY)
    mock_classes = CosmoFMForSpectralClassification.from_backbone_config(backbone, ClassificationHeadConfig(class_names=list(CLASSES)))
    own = CosmoFMForSpectralClassification.from_backbone_config(backbone, ClassificationHeadConfig(class_names=["WD", "CV", "QSO"]))
    assert redshift_method(mock_classes) == "scan" and redshift_method(mock_classes, "template") == "template"
    assert redshift_method(own) == "network" and redshift_method(own, "network") == "network"
    with pytest.raises(InputError, match=r"'scan' needs templates for every class; \['CV', 'WD'\]"):
        redshift_method(own, "scan")
    mock_classes.set_redshift_net(RedshiftNet(RedshiftNetConfig()))
    assert redshift_method(mock_classes) == "network" and redshift_method(mock_classes, "scan") == "scan"


def test_redshift_error_scale_matches_the_scatter():
    from cosmofm.heads.metrics import redshift_error_scale

    rng = np.random.default_rng(4)
    z_true = rng.uniform(0, 2, 400)
    sigma = 2e-4 * (1 + z_true)
    z = z_true + rng.normal(0, sigma)
    z[:10] += 0.5  # catastrophic: left out of the width
    assert redshift_error_scale(z_true, z, sigma / 2) == pytest.approx(2.0, rel=0.15)
    assert redshift_error_scale(z_true, z, sigma) == pytest.approx(1.0, rel=0.15)
    assert redshift_error_scale(z_true[:15], z[:15], sigma[:15]) == 1.0  # too few to tell


def test_redshift_candidates_add_a_likely_runner_up_of_the_same_family():
    from cosmofm.heads.redshift_scan import redshift_candidates

    names = np.array(["STAR_A0", "QSO", "QSO_BROADLINE", "GALAXY"])
    probs = np.array([[0.0, 0.70, 0.30, 0.0],  # runner-up of the same family, likely: scanned too
                      [0.30, 0.70, 0.0, 0.0],  # runner-up of another family: not
                      [0.0, 0.97, 0.02, 0.01],  # same family but unlikely: not
                      [0.0, 0.2, 0.0, 0.8]])
    assert redshift_candidates(probs, names) == [["QSO", "QSO_BROADLINE"], ["QSO"], ["QSO"], ["GALAXY"]]


def test_redshift_network_trained_saved_and_used_by_classify(labelled, sdss, tmp_path):
    """redshift_net_steps trains a redshift network into the classifier; the release carries it
    (config + weights) and `classify` writes its z by default, not the head's."""
    from cosmofm.data_cards.io.fits_io import write_fits
    from cosmofm.finetune.classify import load_classifier

    cfg = FinetuneConfig(strategy="full", epochs=1, batch_size=16, redshift_net_steps=40, output_dir=str(tmp_path / "run"))
    r = finetune_classification(labelled[:120], sdss, cfg, backbone_config=TINY)
    model = r["model"]
    assert model.redshift_net is not None and model.head_config.redshift_net["log_lambda_step"] == pytest.approx(1e-4, rel=1e-3)
    # the test block's figures are those of the network the model carries
    test = [labelled[i] for i in r["splits"]["test"]]
    z_true = np.array([s.meta["labels"]["redshift"] for s in test])
    expected_metrics = redshift_metrics(z_true, model.network_redshifts(test).z)
    assert r["metrics"]["redshift_net_nmad"] == pytest.approx(expected_metrics["redshift_nmad"], rel=1e-6)
    assert r["metrics"]["redshift_net_catastrophic_fraction"] == expected_metrics["redshift_catastrophic_fraction"]
    loaded = load_classifier(r["model_dir"])
    for k, v in model.redshift_net.state_dict().items():
        assert torch.equal(v, loaded.redshift_net.state_dict()[k]), k
    spectra = labelled[-6:]
    expected = loaded.network_redshifts(spectra)
    write_fits(spectra, tmp_path / "in.fits", sdss)
    out = tmp_path / "z.fits"
    assert classify([tmp_path / "in.fits"], r["model_dir"], out, progress=False)["redshift"] == "network"
    np.testing.assert_allclose(read_catalogue(out)["Z"], expected.z, rtol=1e-5, atol=1e-7)
    head_z = predict(loaded, spectra)["redshift"]
    assert not np.allclose(expected.z, head_z, atol=1e-3)
