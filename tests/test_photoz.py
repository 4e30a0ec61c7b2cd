"""The photo-z task (heads/photoz.py): head config and registry, save -> load, a short
overfit on image mocks, the meta-device forward, the metric functions on hand-computed
cases (heads/photoz_metrics.py), and the kNN photometry baseline (heads/photoz_baseline.py)."""

import json

import numpy as np
import pytest
import torch
from scipy.special import ndtr

from cosmofm.data_cards import InputError, load_card
from cosmofm.data_cards.mocks.images import mock_image
from cosmofm.finetune.release import from_pretrained
from cosmofm.heads.base import Task, TaskHeadConfig, task_class, task_model_class
from cosmofm.heads.photoz import (
    CosmoFMForPhotoz,
    PhotozHeadConfig,
    PhotozTask,
    pdf_quantiles,
    pdf_summary,
    redshifts_from_samples,
    smoothed_targets,
)
from cosmofm.heads.photometry import aperture_photometry
from cosmofm.heads.photoz_baseline import KNNPhotoz, MLPPhotoz, constant_prediction, galaxy_mocks, photometry_features
from cosmofm.heads.photoz_metrics import binned_cdf, interval_coverage, nmad, photoz_metrics, pit_histogram, pit_ks, point_metrics
from cosmofm.pretrain import CosmoFMConfig, collate_samples
from cosmofm.pretrain.checkpoint import write_manifest

SURVEYS = ["lsst-like"]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, coord_frequencies=6, projection_dim=16, survey_names=SURVEYS)
HEAD = dict(n_bins=40, hidden_size=32, pooling_heads=2)
META = torch.device("meta")
PHOTOMETRY = dict(photometry_bands=6, reference_band=2)  # lsst-like: u g r i z y


@pytest.fixture(scope="module")
def images():
    return galaxy_mocks(load_card("lsst-like"), 8, seed=1)


def _model(**head) -> CosmoFMForPhotoz:
    torch.manual_seed(0)
    return CosmoFMForPhotoz.from_backbone_config(CosmoFMConfig(**TINY), PhotozHeadConfig(**{**HEAD, **head}))


# --------------------------------------------------------------------------- config and registry


def test_head_config_round_trip_registration_and_bad_values():
    head = PhotozHeadConfig(**HEAD)
    saved = head.to_dict()
    assert (saved["type"], saved["schema_version"]) == ("photoz", 1)
    assert TaskHeadConfig.from_dict(json.loads(json.dumps(saved))) == head
    assert task_model_class("photoz") is CosmoFMForPhotoz and task_class("photoz") is PhotozTask
    assert isinstance(PhotozTask(head), Task)
    edges = head.bin_edges().numpy()
    assert edges.shape == (41,) and edges[0] == 0 and edges[-1] == pytest.approx(4.0)
    assert np.allclose(np.diff(np.log1p(edges)), np.log1p(4.0) / 40)  # uniform in ln(1 + z)
    for bad, match in [(dict(z_max=0), "task.z_max"), (dict(n_bins=1), "task.n_bins"), (dict(target_width=-1), "task.target_width"),
                       (dict(temperature=0), "task.temperature"), (dict(pooling="max"), "task.pooling")]:
        with pytest.raises(InputError, match=match):
            PhotozHeadConfig(**bad)


def test_save_load_gives_identical_outputs_and_keeps_the_calibration(images, tmp_path):
    model = _model().eval()
    batch = collate_samples(images, SURVEYS)
    task = PhotozTask(model.head_config)
    with torch.no_grad():
        out = model(batch)
    # a calibration split whose true redshifts follow p(z) with logits x 2: temperature ~ 2
    rng = np.random.default_rng(0)
    logits = torch.randn(2000, 40, dtype=torch.float64) * 2
    probs = (logits / 2).softmax(-1).numpy()
    true_bin = np.array([rng.choice(40, p=p / p.sum()) for p in probs])
    edges = model.head_config.bin_edges().numpy()
    z = torch.from_numpy(0.5 * (edges[true_bin] + edges[true_bin + 1]))
    fitted = task.calibrate(model, {"logits": logits}, {"redshift": z})
    assert fitted["temperature"] == pytest.approx(2.0, rel=0.1) and model.head_config.temperature == fitted["temperature"]

    model.save_pretrained(tmp_path / "photoz")
    write_manifest(tmp_path / "photoz")
    assert json.loads((tmp_path / "photoz" / "config.json").read_text())["task"]["type"] == "photoz"
    loaded = from_pretrained(tmp_path / "photoz", expect_task="photoz").eval()
    assert type(loaded) is CosmoFMForPhotoz and loaded.head_config == model.head_config
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.probs, b.probs) and torch.equal(a.redshift, b.redshift)
    assert torch.equal(a.logits, out.logits) and not torch.allclose(a.probs, out.probs)  # temperature applied to probs only


# --------------------------------------------------------------------------- the model


def test_outputs_targets_metrics_and_catalogue_columns(images):
    model = _model().eval()
    task = PhotozTask(model.head_config)
    targets = task.targets(images)
    assert targets["redshift"].shape == (8,) and torch.all(targets["redshift"] > 0)
    out = model(collate_samples(images, SURVEYS), **targets)
    n = len(images)
    assert out.logits.shape == out.probs.shape == (n, 40) and torch.allclose(out.probs.sum(-1), torch.ones(n))
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert torch.all((out.z_lo95 <= out.z_lo68) & (out.z_lo68 <= out.redshift) & (out.redshift <= out.z_hi68) & (out.z_hi68 <= out.z_hi95))
    assert torch.allclose(out.redshift_err, 0.5 * (out.z_hi68 - out.z_lo68))
    metrics = task.metrics(out, targets)
    assert set(metrics) >= {"nmad", "outlier_fraction", "bias", "pit_ks", "pit_histogram", "coverage_68", "coverage_95"}
    json.dumps(metrics)  # plain floats and lists: goes into an eval JSON as is
    assert [(c.name, c.unit) for c in task.catalogue_columns][:2] == [("Z_PHOT", ""), ("Z_PHOT_ERR", "")]
    rows = task.catalogue_rows(out)
    assert list(rows) == [c.name for c in task.catalogue_columns] and all(v.shape == (n,) for v in rows.values())
    unlabelled = mock_image(load_card("lsst-like"), 1, 0)
    del unlabelled.meta["labels"]["redshift"]
    with pytest.raises(InputError, match=r"lsst-like-1-0: labels\.redshift: is None, not a redshift"):
        task.targets([*images, unlabelled])


@pytest.mark.parametrize("photometry", [{}, PHOTOMETRY], ids=["tokens", "tokens+photometry"])
def test_loss_decreases_on_a_small_batch_of_image_mocks(images, photometry):
    model = _model(dropout=0.0, **photometry).train()
    batch = collate_samples(images, SURVEYS)
    redshift = redshifts_from_samples(images)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(15):
        loss = model(batch, redshift=redshift).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses  # ln(40) = 3.7 at the start


@pytest.mark.parametrize("photometry", [{}, PHOTOMETRY], ids=["tokens", "tokens+photometry"])
def test_photoz_head_runs_on_the_meta_device(images, photometry):
    """No host round trips in the forward (photometry branch included), the loss, the quantiles or the backward."""
    batch = collate_samples(images, SURVEYS)
    with META:
        model = CosmoFMForPhotoz.from_backbone_config(CosmoFMConfig(**TINY), PhotozHeadConfig(**HEAD, **photometry))
    out = model(batch.to(META), redshift=torch.full((len(images),), 0.2, device=META))
    assert out.probs.device == META and out.probs.shape == (len(images), 40)
    assert out.redshift.shape == out.redshift_err.shape == out.z_hi95.shape == (len(images),)
    assert out.loss.shape == ()
    out.loss.backward()
    assert model.head.bins.weight.grad.device == META


# --------------------------------------------------------------------------- the photometry branch


def test_from_card_turns_the_photometry_branch_on_and_old_configs_load_without_it():
    card = load_card("lsst-like")
    head = PhotozHeadConfig.from_card(card)
    assert (head.photometry_bands, head.reference_band, head.card) == (6, 2, "lsst-like")  # u g r i z y: r is band 2
    assert PhotozHeadConfig.from_card(card, photometry_bands=0).photometry_bands == 0
    old = {k: v for k, v in PhotozHeadConfig(**HEAD).to_dict().items() if k not in ("photometry_bands", "reference_band")}
    assert TaskHeadConfig.from_dict(old).photometry_bands == 0  # saved before the branch existed: tokens only
    assert _model(**PHOTOMETRY).head.photometry is not None and _model().head.photometry is None
    for bad, match in [(dict(photometry_bands=1), "task.photometry_bands: is 1"), (dict(photometry_bands=-2), "task.photometry_bands"),
                       (dict(photometry_bands=6, reference_band=6), r"task.reference_band: is 6.*\[0, 6\)"),
                       (dict(photometry_warm_start_steps=-1), "task.photometry_warm_start_steps")]:
        with pytest.raises(InputError, match=match):
            PhotozHeadConfig(**bad)


def test_the_branch_reads_the_baselines_photometry_and_refuses_objects_without_a_stamp(images):
    """One implementation: the forward pass's features are the classical baselines' features."""
    from cosmofm.data_cards.mocks.spectra import mock_spectrum
    from cosmofm.heads.photoz import batch_photometry

    head = PhotozHeadConfig(**HEAD, **PHOTOMETRY)
    ours = batch_photometry(collate_samples(images, SURVEYS), head).double().numpy()
    assert ours.shape == (8, 7) and np.allclose(ours, photometry_features(images), atol=1e-4)
    assert np.all(np.abs(ours[:, :5]) < 5) and np.all((ours[:, 5] > 18) & (ours[:, 5] < 32))  # colours, r magnitude
    spectrum = mock_spectrum(load_card("sdss-like"), 0, 0)
    with pytest.raises(InputError, match=r"\['sdss-like-0-0'\]: have no image stamp of 6 bands"):
        batch_photometry(collate_samples([*images, spectrum], SURVEYS), head)


# --------------------------------------------------------------------------- p(z) helpers and metrics


def test_quantiles_targets_and_cdf_on_hand_computed_cases():
    probs, edges = torch.tensor([[0.5, 0.5]]), torch.tensor([0.0, 1.0, 2.0])
    assert torch.allclose(pdf_quantiles(probs, edges, (0.5, 0.25, 0.975)), torch.tensor([[1.0, 0.5, 1.95]]))
    summary = pdf_summary(probs, edges)
    assert summary["redshift"].item() == 1.0 and summary["redshift_err"].item() == pytest.approx(0.68)
    assert binned_cdf(probs.numpy(), edges.numpy(), [0.5]).tolist() == [0.25]
    assert binned_cdf([[0.2, 0.6]], [0, 1, 2], [-1.0])[0] == 0 and binned_cdf([[0.2, 0.6]], [0, 1, 2], [5.0])[0] == 1  # normalised
    head = PhotozHeadConfig(n_bins=40)
    z = torch.tensor([0.0, 0.3, 3.99])
    soft, hard = smoothed_targets(z, head.bin_edges(), 0.01), smoothed_targets(z, head.bin_edges(), 0.0)
    assert torch.allclose(soft.sum(-1), torch.ones(3)) and torch.equal(hard.sum(-1), torch.ones(3))
    assert torch.equal(soft.argmax(-1), hard.argmax(-1)) and hard.argmax(-1).tolist() == [0, int(np.log1p(0.3) / (np.log1p(4) / 40)), 39]
    with pytest.raises(ValueError, match="expected probs"):
        binned_cdf([[0.5, 0.5]], [0, 1], [0.5])


def test_point_metrics_on_a_hand_computed_example():
    z_true = np.array([0.0, 1.0, 1.0, 0.0, 3.0])
    z_pred = np.array([0.01, 1.02, 0.94, 0.3, 3.0])  # dz/(1+z) = 0.01, 0.01, -0.03, 0.3, 0
    m = point_metrics(z_true, z_pred)
    assert m["nmad"] == pytest.approx(1.4826 * 0.01)  # |x - 0.01| = 0, 0, 0.04, 0.29, 0.01 -> median 0.01
    assert m["outlier_fraction"] == pytest.approx(0.2) and m["bias"] == pytest.approx(0.058)
    assert point_metrics([1.0], [np.nan])["outlier_fraction"] == 1.0
    assert nmad([1.0, 2.0, 3.0]) == pytest.approx(1.4826)
    assert pit_ks([0.5]) == 0.5 and pit_histogram([0.05, 0.15, 0.95], 2) == [2 / 3, 1 / 3]
    assert interval_coverage([0.1, 0.5, 0.9], [0, 0, 0], [0.2, 0.2, 1.0]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="1-D arrays of one length"):
        point_metrics([0.1, 0.2], [0.1])


def test_pit_of_a_perfect_gaussian_predictor_is_uniform_and_an_overconfident_one_is_not():
    rng = np.random.default_rng(0)
    n, edges = 4000, np.linspace(0, 3, 1501)
    mu, sigma = rng.uniform(0.5, 2.5, n), rng.uniform(0.03, 0.1, n)
    z_true = mu + sigma * rng.standard_normal(n)

    def suite(width):
        probs = np.diff(ndtr((edges[None] - mu[:, None]) / (width * sigma[:, None])), axis=1)
        s = pdf_summary(torch.from_numpy(probs), torch.from_numpy(edges))
        pit = binned_cdf(probs, edges, z_true)
        return photoz_metrics(z_true, s["redshift"].numpy(), pit, {"68": (s["z_lo68"].numpy(), s["z_hi68"].numpy()),
                                                                   "95": (s["z_lo95"].numpy(), s["z_hi95"].numpy())})

    perfect, narrow = suite(1.0), suite(0.5)
    assert perfect["pit_ks"] < 0.025  # ~1.36 / sqrt(n) = 0.021 at 5 % for a uniform sample
    assert np.allclose(perfect["pit_histogram"], 0.1, atol=0.02)
    assert perfect["coverage_68"] == pytest.approx(0.68, abs=0.02) and perfect["coverage_95"] == pytest.approx(0.95, abs=0.01)
    assert narrow["pit_ks"] > 0.1 and narrow["coverage_68"] < 0.45


# --------------------------------------------------------------------------- the classical baseline


def test_aperture_photometry_measures_the_pixels_not_the_truth():
    sample = mock_image(load_card("lsst-like"), 1, 3, noise=False)
    c = {k: torch.from_numpy(v)[None] for k, v in sample.coords.items()}
    flux, error = aperture_photometry(torch.from_numpy(sample.values)[None], torch.from_numpy(sample.ivar)[None], c["dec_offset"], c["ra_offset"], (1.0, 100.0))
    flux, error = flux[0].double().numpy(), error[0].numpy()
    assert flux.shape == error.shape == (6, 2)
    assert np.allclose(flux[:, 1], sample.values.sum(axis=(1, 2)))  # the whole stamp
    assert np.all(flux[:, 0] < flux[:, 1]) and np.all(error > 0)
    assert photometry_features([sample]).shape == (1, 7)  # 5 colours, r magnitude, r concentration


def test_knn_baseline_beats_a_constant_predictor():
    """300 lsst-like galaxies (225 train, 75 test). Measured: kNN (k = 5) NMAD 0.028 vs constant 0.079."""
    samples = galaxy_mocks(load_card("lsst-like"), 300, seed=0)
    z = redshifts_from_samples(samples).numpy().astype(np.float64)
    x = photometry_features(samples)
    head = PhotozHeadConfig()
    task, target = PhotozTask(head), {"redshift": torch.from_numpy(z[225:])}
    knn = KNNPhotoz(head).fit(x[:225], z[:225])
    ours, constant = task.metrics(knn.predict(x[225:]), target), task.metrics(constant_prediction(z[:225], 75, head), target)
    assert knn.k in (5, 10, 20, 40, 80) and knn.width > 0
    assert ours["nmad"] < 0.7 * constant["nmad"], (ours, constant)
    assert 0.4 < ours["coverage_68"] <= 1 and abs(ours["bias"]) < 0.05


def test_mlp_baseline_is_the_stronger_baseline():
    """300 lsst-like galaxies (225 train, 75 test): the ANNz-style network on the same
    photometry beats kNN (a colour-redshift relation is smooth; kNN averages over a
    neighbourhood as wide as its k)."""
    samples = galaxy_mocks(load_card("lsst-like"), 300, seed=0)
    z = redshifts_from_samples(samples).numpy().astype(np.float64)
    x = photometry_features(samples)
    head = PhotozHeadConfig()
    task, target = PhotozTask(head), {"redshift": torch.from_numpy(z[225:])}
    knn = task.metrics(KNNPhotoz(head).fit(x[:225], z[:225]).predict(x[225:]), target)
    mlp = MLPPhotoz(head, max_steps=2000).fit(x[:225], z[:225])
    ours = task.metrics(mlp.predict(x[225:]), target)
    assert mlp.width in (64, 128) and 0 < mlp.steps <= 2000 and mlp.temperature > 0
    assert ours["nmad"] < 0.8 * knn["nmad"], (ours["nmad"], knn["nmad"])
    assert ours["outlier_fraction"] <= knn["outlier_fraction"] + 1 / 75 and 0.4 < ours["coverage_68"]
    refit = MLPPhotoz(head, max_steps=2000, refit=True).fit(x[:225], z[:225])  # the same settings, retrained on all 225
    assert (refit.width, refit.steps, refit.temperature) == (mlp.width, mlp.steps, mlp.temperature)
    assert task.metrics(refit.predict(x[225:]), target)["nmad"] < 0.8 * knn["nmad"]


def test_prepare_warm_starts_the_head_from_the_photometry_network_without_moving_the_random_stream():
    """After `PhotozTask.prepare` the model's p(z) is the photometry network's (the image
    features' share of the output layer is zero), and the caller's random stream is where it was."""
    samples = galaxy_mocks(load_card("lsst-like"), 120, seed=2)
    torch.manual_seed(0)
    head = PhotozHeadConfig.from_card(load_card("lsst-like"), **HEAD, photometry_warm_start_steps=1500)
    model = CosmoFMForPhotoz.from_backbone_config(CosmoFMConfig(**TINY), head).eval()
    task = PhotozTask(model.head_config)
    state = torch.get_rng_state()
    task.prepare(model, samples)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.count_nonzero(model.head.bins.weight[:, :32]) == 0 and torch.count_nonzero(model.head.bins.weight[:, 32:]) > 0
    x = torch.from_numpy(photometry_features(samples)).float()
    assert torch.allclose(model.head.photometry.feature_mean, x[torch.from_numpy(np.random.default_rng(torch.initial_seed()).permutation(120) >= 24)].mean(0), atol=1e-4)
    with torch.no_grad():
        ours = model(collate_samples(samples, SURVEYS)).logits
        alone = model.head.bins.weight[:, 32:] @ model.head.photometry(x).T + model.head.bins.bias[:, None]
    assert torch.allclose(ours, alone.T, atol=1e-4)
    z = redshifts_from_samples(samples).numpy()
    probs = ours.softmax(-1)
    warm = task.metrics({"probs": probs, **pdf_summary(probs, model.head_config.bin_edges(dtype=torch.float32))}, {"redshift": torch.from_numpy(z)})
    assert warm["nmad"] < 0.04, warm["nmad"]  # in-sample; a random head is at ~0.3
