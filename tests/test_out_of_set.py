"""Out-of-set detection (issue 17): the Mahalanobis score and its threshold, the detector in the
model (buffers saved and loaded), and the OUT_OF_SET / LOW_COVERAGE flags of `cosmofm classify`."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import cosmofm
from cosmofm.cli import main as cli_main
from cosmofm.data_cards import load_card
from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.io.catalogue import read_catalogue
from cosmofm.data_cards.io.fits_io import write_fits
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.finetune.classify import MIN_LOG_WAVELENGTH_COVERAGE, low_coverage, predict
from cosmofm.heads.classification import ClassificationHeadConfig, CosmoFMForSpectralClassification, labels_from_samples
from cosmofm.heads.out_of_set import (
    OutOfSetDetector,
    flag_threshold,
    log_wavelength_coverage,
    mahalanobis_score,
    out_of_set_metrics,
    shrunk_covariance,
)
from cosmofm.pretrain import CosmoFMConfig, collate_samples
from cosmofm.pretrain.checkpoint import write_manifest

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, spectrum_patch_size=128, coord_frequencies=6, projection_dim=16)


def _clusters(rng, n, means, mix):
    """n points of Gaussian clusters around `means` (C, F) with one shared covariance mix mix^T."""
    y = rng.integers(len(means), size=n)
    return means[y] + rng.normal(size=(n, means.shape[1])) @ mix.T, y


def test_mahalanobis_flags_far_points_at_the_target_rate():
    rng = np.random.default_rng(0)
    means = rng.normal(0, 4, size=(5, 12))
    mix = rng.normal(size=(12, 12)) / 3 + np.eye(12)  # correlated: a Euclidean distance would not do
    train, y = _clusters(rng, 3000, means, mix)
    detector = OutOfSetDetector(5, 12)
    detector.fit(torch.as_tensor(train), torch.as_tensor(y))
    score = lambda x: detector(torch.as_tensor(x, dtype=torch.float32)).numpy()  # noqa: E731
    threshold = flag_threshold(score(_clusters(rng, 3000, means, mix)[0]), 0.015)
    fresh = score(_clusters(rng, 40_000, means, mix)[0])
    far = score(_clusters(rng, 2000, rng.normal(0, 4, size=(5, 12)) + 12.0, mix)[0])  # clusters shifted far away
    m = out_of_set_metrics(fresh, far, fresh > threshold, far > threshold, np.full(len(far), "FAR"))
    assert m["auroc"] > 0.99 and m["detection_rate_per_kind"]["FAR"] > 0.99, m
    # conformal threshold: rate <= 1.5 % in expectation; the calibration block of 3000 resolves it to ~0.2 %
    assert 0.015 - 0.006 < m["false_flag_rate"] < 0.015 + 0.006, m
    # squared distances of in-set points follow chi2 with F = 12 dof (the nearest mean is their own here)
    assert np.median(fresh) == pytest.approx(11.34, rel=0.1)
    # the float64 expansion agrees with the direct quadratic form
    x = torch.as_tensor(train[:5])
    d = x.double()[:, None, :] - detector.means.double()[None]
    direct = torch.einsum("ncf,fg,ncg->nc", d, detector.precision.double(), d).min(1).values
    torch.testing.assert_close(mahalanobis_score(x, detector.means, detector.precision), direct)


def test_threshold_and_shrinkage_edge_cases():
    assert flag_threshold(np.arange(10.0), 0.015) == float("inf")  # 10 scores cannot resolve 1.5 %: flag nothing
    assert flag_threshold(np.arange(1000.0), 0.1) == 900.0  # the ceil(1001 * 0.9) = 901st smallest
    with pytest.raises(InputError, match="out_of_set_rate"):
        flag_threshold(np.arange(100.0), 1.5)
    rng = np.random.default_rng(1)
    few = rng.normal(size=(20, 50))  # fewer samples than dimensions: the plain covariance is singular
    centred = few - few.mean(0)
    cov, shrinkage = shrunk_covariance(centred)
    assert shrinkage > 0.7 and np.linalg.eigvalsh(cov).min() > 0.5  # measured 0.86: mostly the scaled identity
    # ... and closer to the true covariance (the identity) than the sample covariance is
    plain = centred.T @ centred / len(centred)
    assert np.linalg.norm(cov - np.eye(50)) < 0.5 * np.linalg.norm(plain - np.eye(50))
    many = rng.normal(size=(20_000, 5)) @ np.diag([1, 2, 3, 4, 5])
    assert shrunk_covariance(many - many.mean(0))[1] < 0.01  # plenty of data: hardly shrunk


def test_coverage_counts_valid_log_wavelength():
    wave = np.geomspace(3600, 10400, 4608)
    ivar = np.ones(4608)
    assert log_wavelength_coverage(wave, ivar) == pytest.approx(1.0)
    ivar[int(0.3 * 4608):] = 0
    assert log_wavelength_coverage(wave, ivar) == pytest.approx(0.3, abs=0.002)
    two_windows = np.r_[np.geomspace(3700, 5000, 1000), np.geomspace(8000, 9000, 1000)]  # the gap is not covered
    span = np.log(5000 / 3700) + np.log(9000 / 8000)
    assert log_wavelength_coverage(two_windows, np.ones(2000), span) == pytest.approx(1.0, abs=0.002)


@pytest.fixture(scope="module")
def fitted(sdss):
    """A tiny classifier with conformal sets and an out-of-set detector fitted at a 30 % false-flag
    rate (so that a few spectra of a small file are flagged), and its spectra."""
    torch.manual_seed(0)
    head = ClassificationHeadConfig.from_card(sdss, hidden_size=16)
    model = CosmoFMForSpectralClassification.from_backbone_config(CosmoFMConfig(survey_names=["sdss-like"], **TINY), head).eval()
    samples = mock_samples(sdss, 60, seed=2)
    labels = labels_from_samples(samples, model.head_config)[0]
    train, cal = predict(model, samples[:40], features=True), predict(model, samples[40:], features=True)
    fit = model.set_out_of_set(train["features"], labels[:40], cal["features"], rate=0.3)
    model.set_calibration(1.0, 0.1, 0.9)
    return model, samples, fit


def test_detector_is_saved_and_loaded_with_the_model(fitted, tmp_path):
    model, samples, fit = fitted
    assert model.head_config.ood_fitted and model.head_config.ood_threshold == fit["threshold"] > 0
    model.save_pretrained(tmp_path)
    write_manifest(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["task"]
    assert saved["ood_threshold"] == fit["threshold"] and saved["ood_false_flag_rate"] == 0.3
    assert {"ood.means", "ood.precision"} <= set(load_file(tmp_path / "model.safetensors"))
    loaded = cosmofm.from_pretrained(tmp_path).eval()
    assert loaded.head_config == model.head_config
    batch = collate_samples(samples[40:], ["sdss-like"])
    with torch.no_grad():
        ref, out = model(batch), loaded(batch)
    assert ref.ood_score.shape == (20,) and torch.equal(out.ood_score, ref.ood_score)
    assert torch.equal(torch.as_tensor(model.out_of_set(ref.ood_score)), ref.ood_score > fit["threshold"])
    # an unfitted detector: buffers zeros / identity, no score, nothing flagged
    head = ClassificationHeadConfig.from_card(load_card("sdss-like"), hidden_size=16)
    fresh = CosmoFMForSpectralClassification.from_backbone_config(CosmoFMConfig(survey_names=["sdss-like"], **TINY), head)
    size = 32  # the backbone's width: the last block's token mean (ood_features "backbone", the default)
    assert fresh.ood_feature_size == size and torch.equal(fresh.ood.precision, torch.eye(size)) and not fresh.ood.means.any()
    assert fresh(batch).ood_score is None and fresh.out_of_set(None) is None


def test_flagged_spectra_get_an_empty_set_in_the_catalogue(fitted, sdss, tmp_path, capsys):
    model, samples, fit = fitted
    model.save_pretrained(tmp_path / "model")
    write_manifest(tmp_path / "model")
    spectra = mock_samples(sdss, 60, seed=2)[40:]  # the calibration spectra again (copies: one is changed)
    spectra[3].ivar[int(0.3 * len(spectra[3].ivar)):] = 0  # valid pixels over only 30 % of the range
    write_fits(spectra, tmp_path / "in.fits", sdss)
    out = tmp_path / "out.fits"
    assert cli_main(["classify", str(tmp_path / "in.fits"), "--model", str(tmp_path / "model"), "--output", str(out)]) == 0
    t = read_catalogue(out)
    scores = np.asarray(t["OOD_SCORE"])
    np.testing.assert_allclose(scores, predict(model, spectra)["ood_score"], rtol=1e-4)  # through the FITS file and back
    flagged = np.asarray(t["OUT_OF_SET"]).astype(bool)
    np.testing.assert_array_equal(flagged, scores > fit["threshold"])
    low = np.asarray(t["LOW_COVERAGE"]).astype(bool)
    assert low.tolist() == [i == 3 for i in range(20)]
    assert 0 < flagged.sum() < 20
    for i in range(20):
        members = str(t["CONFORMAL_SET"][i]) if not np.ma.is_masked(t["CONFORMAL_SET"][i]) else ""
        assert (members == "") == bool(flagged[i] or low[i]), i
        assert str(t["CLASS"][i]) in model.class_names  # flagged spectra keep their class and probabilities
        codes = str(t["FLAGS"][i]).split("|")
        assert ("out_of_set" in codes) == flagged[i] and ("low_coverage" in codes) == low[i]
    err = capsys.readouterr().err
    assert f"{int(flagged.sum())} out_of_set" in err and "1 low_coverage" in err


def test_low_coverage_threshold(sdss):
    spectra = mock_samples(sdss, 3, seed=4)
    n = len(spectra[0].ivar)
    spectra[0].ivar[int(0.3 * n):] = 0
    spectra[1].ivar[: int(0.45 * n)] = 0  # 55 % left, at the red end
    assert low_coverage(spectra).tolist() == [True, False, False] and MIN_LOG_WAVELENGTH_COVERAGE == 0.5


def test_configs_and_releases_from_before_the_detector_load_with_it_off(fitted, sdss, tmp_path):
    model, samples, _ = fitted
    old = {k: v for k, v in model.head_config.to_dict().items() if not k.startswith("ood_")}
    cfg = CosmoFMConfig(survey_names=["sdss-like"], **TINY)
    cfg.task = old
    legacy = CosmoFMForSpectralClassification(cfg).eval()
    assert legacy.ood is None and not legacy.head_config.ood_buffers and not legacy.head_config.ood_active
    legacy.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("ood.")})
    legacy.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert not any(k.startswith("ood.") for k in weights)
    config = json.loads((tmp_path / "config.json").read_text())
    config["task"] = old  # exactly a config.json written before the fields existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    write_manifest(tmp_path)
    loaded = cosmofm.from_pretrained(tmp_path).eval()
    batch = collate_samples(samples[:4], ["sdss-like"])
    with torch.no_grad():
        out = loaded(batch)
        assert out.ood_score is None and torch.equal(out.logits, model(batch).logits)
    # fitting one later adds its buffers
    feats = predict(loaded, samples[:40], features=True)["features"]
    loaded.set_out_of_set(feats, labels_from_samples(samples[:40], loaded.head_config)[0], feats[:30], rate=0.1)
    assert loaded.head_config.ood_buffers and loaded.head_config.ood_active and loaded(batch).ood_score.shape == (4,)
    # 5 calibration spectra cannot resolve 1.5 % false flags: scores, but no threshold (not inf: config.json is JSON)
    assert loaded.set_out_of_set(feats, labels_from_samples(samples[:40], loaded.head_config)[0], feats[:5])["threshold"] is None
    assert not loaded.head_config.ood_active and loaded(batch).ood_score is not None and loaded.out_of_set(loaded(batch).ood_score) is None
    with pytest.raises(InputError, match="task.ood_threshold"):
        ClassificationHeadConfig.from_card(sdss, ood_threshold=3.0)


def test_backbone_features_are_the_last_blocks_tokens_before_the_final_norm(fitted, sdss, tmp_path):
    """ood_features "backbone" (the default) reads the mean of the last block's tokens before the
    final norm; a model fitted on the head's features and saved before the field existed
    loads with "head" and scores exactly as it did."""
    model, samples, _ = fitted
    batch = collate_samples(samples[:6], ["sdss-like"])
    with torch.no_grad():
        out = model(batch)
        tokens, valid = model.cosmofm.embeddings(batch)[:2]
        for layer in model.cosmofm.encoder.layers:
            tokens = layer(tokens, None)  # spectra of one card: no padding, no mask
    keep = valid.unsqueeze(-1).float()
    torch.testing.assert_close(out.features, (tokens * keep).sum(1) / keep.sum(1))
    torch.testing.assert_close(out.backbone.pooled, (model.cosmofm.encoder.ln_f(tokens) * keep).sum(1) / keep.sum(1))  # what the norm changes
    assert out.features.shape == (6, 32) and not torch.allclose(out.features, out.backbone.pooled, atol=1e-2)
    with pytest.raises(InputError, match="task.ood_features"):
        ClassificationHeadConfig.from_card(sdss, ood_features="layer2")
    torch.manual_seed(0)
    head = ClassificationHeadConfig.from_card(sdss, hidden_size=16, ood_features="head")
    old = CosmoFMForSpectralClassification.from_backbone_config(CosmoFMConfig(survey_names=["sdss-like"], **TINY), head).eval()
    feats = predict(old, samples[:40], features=True)["features"]
    assert feats.shape == (40, 32 * (1 + 4) + 16)  # attention-pooled embedding (mean + 4 queries) and the hidden layer
    old.set_out_of_set(feats, labels_from_samples(samples[:40], head)[0], feats[:30], rate=0.1)
    old.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["task"]["ood_features"]  # a config.json written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_manifest(tmp_path)
    loaded = cosmofm.from_pretrained(tmp_path).eval()
    assert loaded.head_config.ood_features == "head" and loaded.head_config.ood_active
    with torch.no_grad():
        assert torch.equal(loaded(batch).ood_score, old(batch).ood_score)


def test_block_output_keeps_only_its_own_threads_calls(fitted, sdss):
    """Worker threads share one model (classify where processes cannot fork): a forward in
    another thread must not overwrite the tokens this thread's detector reads. Before the
    fix the hook kept whichever thread's forward ran last, and the out-of-set flags of a
    threaded classify could differ from a sequential one's."""
    import threading

    from cosmofm.heads.out_of_set import block_output

    model, samples, _ = fitted
    layer = model.cosmofm.encoder.layers[-1]
    mine, theirs = torch.randn(2, 5, 32), torch.randn(3, 7, 32)
    with torch.no_grad(), block_output(layer) as kept:
        expected = layer(mine, None)
        other = threading.Thread(target=lambda: layer(theirs, None))
        other.start()
        other.join()
        assert torch.equal(kept["output"], expected)  # the other thread's (3, 7, 32) tokens are not kept
    batch = collate_samples(samples[:4], ["sdss-like"])
    with torch.no_grad():
        alone = model(batch).ood_score
        scores = {}
        runs = [threading.Thread(target=lambda k=k: scores.__setitem__(k, model(batch).ood_score)) for k in range(4)]
        for run in runs:
            run.start()
        for run in runs:
            run.join()
    for k in range(4):
        torch.testing.assert_close(scores[k], alone)
