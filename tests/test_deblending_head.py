"""The deblending head (heads/deblending.py, heads/deblending_net.py): shapes and losses, any
stamp size, flux conservation, known-positions mode, the save / load round trip, a short
training that learns to detect, the shipped recipe end to end, and bad input."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import cosmofm
from cosmofm.data_cards import InputError, load_card
from cosmofm.data_cards.mocks.blends import mock_blend
from cosmofm.data_cards.mocks.images import mock_image
from cosmofm.finetune.recipe import FinetuneRecipe, run_recipe
from cosmofm.heads.base import task_class, task_model_class
from cosmofm.heads.deblend_baseline import DeblendCatalog
from cosmofm.heads.deblending import PEAK_THRESHOLDS, CosmoFMForDeblending, DeblendingHeadConfig, DeblendingTask
from cosmofm.heads.deblending_data import blend_targets, blend_truth_arrays
from cosmofm.heads.deblending_predict import deblend_samples, deblend_stamp
from cosmofm.pretrain import CosmoFMConfig, collate_samples
from cosmofm.pretrain.checkpoint import write_manifest

CARD = load_card("lsst-like")
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_patch_size=8, coord_frequencies=6,
            projection_dim=16, survey_names=[CARD.name])


def _model(seed: int = 0, **head) -> CosmoFMForDeblending:
    torch.manual_seed(seed)
    return CosmoFMForDeblending.from_backbone_config(CosmoFMConfig(**TINY), DeblendingHeadConfig.from_card(CARD, hidden_size=32, **head))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on 2 shared cores, two threads contend and run 5-10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def blends():
    """Six 64 x 64 blends of 2-6 objects, with their isolated images attached."""
    return DeblendingTask.labelled_mocks(CARD, 6, 0)


def test_config_registration_from_card_and_bad_values():
    head = DeblendingHeadConfig.from_card(CARD)
    assert (head.n_bands, head.bands, head.card) == (6, ["u", "g", "r", "i", "z", "y"], "lsst-like")
    assert head.fwhm_pixels == pytest.approx(4.5) and head.pixel_scale == pytest.approx(0.2)
    assert task_model_class("deblending") is CosmoFMForDeblending and task_class("deblending") is DeblendingTask
    assert DeblendingHeadConfig.from_dict(head.to_dict()) == head
    assert head.refine_steps == 1 and head.to_dict()["schema_version"] == 2
    old = {k: v for k, v in head.to_dict().items() if k != "refine_steps"} | {"schema_version": 1}
    assert DeblendingHeadConfig.from_dict(old).refine_steps == 0  # a head saved before the refiner keeps its split
    assert DeblendingHeadConfig.from_dict(old | {"refine_steps": 2}).refine_steps == 2  # a stated value is kept
    assert head.slots((64, 64)) == 16 and head.slots((40, 56)) == 16 and head.slots((128, 128)) == 64
    for bad, match in [(dict(max_sources=0), "task.max_sources"), (dict(peak_threshold=1.5), "task.peak_threshold"),
                       (dict(heatmap_sigma=0), "task.heatmap_sigma"), (dict(n_bands=2, bands=["g"]), "task.bands"),
                       (dict(refine_steps=-1), "task.refine_steps"), (dict(refine_steps=True), "task.refine_steps"),
                       (dict(refine_channels=0), "task.refine_channels"), (dict(refine_dilations=[]), "task.refine_dilations"),
                       (dict(refine_dilations=[1, 0]), "task.refine_dilations"), (dict(refine_dilations=2), "task.refine_dilations")]:
        with pytest.raises(InputError, match=match):
            DeblendingHeadConfig(**bad)


def test_forward_loss_and_output_shapes_with_targets(blends):
    model = _model()
    task = DeblendingTask(model.head_config)
    targets = task.targets(blends)
    k = max(s.meta["labels"]["n_objects"] for s in blends)
    assert targets["centres"].shape == (6, k, 2) and targets["fractions"].shape == (6, k + 1, 6, 64, 64)
    # the true centres are the mock's pixel positions, the in-stamp fluxes the isolated images' sums
    sample, truth = mock_blend(dataclasses.replace(CARD, stamp_size=64), 0, 1, n_objects=(2, 6), separation=(0.5, 3.0), delta_mag=(0.0, 2.5))
    n1 = len(truth.pair_ids)
    assert np.allclose(targets["centres"][1, :n1].numpy(), truth.pixel_positions, atol=1e-5)
    assert np.allclose(targets["fluxes"][1, :n1].numpy(), truth.isolated.sum((2, 3)), rtol=2e-3)
    assert np.allclose(targets["total_flux"][1, :n1].numpy(), truth.flux_njy, rtol=1e-6)
    # the noiseless blend (the flux loss's image) is the sum of the isolated images, not the noisy stamp
    assert np.allclose(targets["noiseless"][1].numpy(), truth.isolated.sum(0), rtol=2e-3, atol=1e-3 * truth.isolated.max())
    pull = (blends[1].values - targets["noiseless"][1].numpy()) * np.sqrt(blends[1].ivar)  # the stamp's noise in sigma
    assert np.median(np.abs(pull)) == pytest.approx(0.674, rel=0.1)  # a unit Gaussian's median |x|
    # the re-rendered truth (no attached arrays: e.g. read back from FITS) equals the attached one
    bare = dataclasses.replace(blends[1], meta={k_: v for k_, v in blends[1].meta.items() if k_ != "blend_truth"})
    iso_attached, iso_rendered = blend_truth_arrays(blends[1])[0], blend_truth_arrays(bare)[0]
    assert np.allclose(iso_attached, iso_rendered, rtol=2e-3, atol=1e-3 * iso_rendered.max())

    out = model(collate_samples(blends, model.config.survey_names), **targets)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    assert model.decoder.out.weight.grad.abs().sum() > 0 and model.cosmofm.embeddings.tokenizers["image"].content.weight.grad.abs().sum() > 0
    assert out.positions.shape == (6, 16, 2) and out.fluxes.shape == out.flux_errors.shape == (6, 16, 6)
    assert out.segmentation.shape == out.heatmap.shape == (6, 64, 64) and len(out.fractions) == 6
    # training uses the true centres: every object is a source
    assert out.n_sources.tolist() == [s.meta["labels"]["n_objects"] for s in blends]


def test_targets_of_a_batch_are_each_blends_own_padded_to_the_most_objects(blends):
    """blend_targets builds one blend at a time with K from the truth metadata: each row equals
    that blend's targets alone, padded (NaN, zero fractions) with the background plane at K."""
    head = DeblendingHeadConfig.from_card(CARD)
    batch = blend_targets(blends, head)
    counts = [s.meta["labels"]["n_objects"] for s in blends]
    k = batch["centres"].shape[1]
    assert k == max(counts) and min(counts) < k  # the fixture mixes object counts, so padding is exercised
    for i, s in enumerate(blends):
        alone, m = blend_targets([s], head), counts[i]
        for key in ("centres", "fluxes", "total_flux"):
            assert torch.equal(batch[key][i, :m], alone[key][0]) and batch[key][i, m:].isnan().all()
        assert torch.equal(batch["fractions"][i, :m], alone["fractions"][0, :m])
        assert torch.equal(batch["fractions"][i, k], alone["fractions"][0, m]) and not batch["fractions"][i, m:k].any()
        assert torch.equal(batch["noiseless"][i], alone["noiseless"][0])


def test_flux_correction_scales_the_sources_and_keeps_the_image_flux():
    """The per-source flux correction (deblending_net.flux_correction) starts at exactly 1 (the
    fresh head measures fraction x image, as the test below checks); once it is not 1, each
    source's fluxes and errors are fraction x image times exp(0.5 tanh(c)) and the background
    keeps what the sources leave, so sources + background still add up to the image."""
    sample, truth = mock_blend(dataclasses.replace(CARD, stamp_size=48), 5, 0, n_objects=3, separation=(1.0, 2.0))
    model = _model().eval()
    assert model.decoder.correction.weight.abs().sum() == 0 and model.decoder.correction.bias.abs().sum() == 0
    batch = collate_samples([sample], model.config.survey_names)
    pos = torch.as_tensor(truth.pixel_positions, dtype=torch.float32)[None]
    with torch.no_grad():
        model.decoder.correction.bias.copy_(torch.linspace(-0.4, 0.6, 6))  # per band: x0.83 .. x1.31
        o = model(batch, centres=pos)  # true centres, as in training (given positions are not corrected)
    fr = o.fractions[0].double().numpy()
    good = sample.ivar > 0
    raw = (fr[:3] * np.where(good, sample.values, 0)[None]).sum((2, 3))  # (3, B) fraction x image
    scale = np.exp(0.5 * np.tanh(np.linspace(-0.4, 0.6, 6)))
    assert np.allclose(o.fluxes[0, :3].double().numpy(), raw * scale, rtol=1e-4, atol=1e-4 * np.abs(raw).max())
    image = np.where(good, sample.values, 0).sum((1, 2))
    total = o.fluxes[0, :3].double().sum(0) + o.background_flux[0].double()
    assert np.allclose(total.numpy(), image, rtol=1e-5, atol=1e-3 * np.abs(sample.values).max())
    var = np.where(good, 1 / np.where(good, sample.ivar, 1), 0)
    assert np.allclose(o.flux_errors[0, :3].double().numpy(), np.sqrt((fr[:3] ** 2 * var[None]).sum((2, 3))) * scale, rtol=1e-4)


def test_split_refiner_changes_each_present_sources_logits_in_its_window_only():
    """SplitRefiner adds its output to each present source's logits in the window around
    its rounded centre, clipped at the stamp's edges; absent sources and the background
    keep theirs. With a zero last layer but for a per-band bias c, the change is exactly c
    there and 0 elsewhere; the fresh refiner (all zero) changes nothing."""
    from cosmofm.heads.deblending_net import SplitRefiner

    torch.manual_seed(0)
    n, k, b, h, w = 2, 3, 2, 40, 48
    refiner = SplitRefiner(b, channels=8, window=16)
    logits = torch.randn(n, k + 1, b, h, w)
    present = torch.tensor([[True, True, False], [True, False, False]])
    logits[:, :k] = logits[:, :k].masked_fill(~present[:, :, None, None, None], float("-inf"))
    centres = torch.tensor([[[3.4, 45.6], [20.0, 20.0], [float("nan")] * 2], [[38.7, 1.2], [float("nan")] * 2, [float("nan")] * 2]])
    image = torch.randn(n, b, h, w)
    assert torch.equal(refiner(logits, image, centres, present), logits)
    with torch.no_grad():
        refiner.out.bias.copy_(torch.tensor([0.5, -1.0]))
    got = refiner(logits, image, centres, present)
    for i in range(n):
        for j in range(k):
            window = torch.zeros(h, w)
            if present[i, j]:
                r, c = int(round(centres[i, j, 0].item())), int(round(centres[i, j, 1].item()))
                window[max(r - 8, 0):r + 8, max(c - 8, 0):c + 8] = 1
            for band, bias in enumerate([0.5, -1.0]):
                expect = logits[i, j, band] + bias * window
                assert torch.equal(torch.isinf(got[i, j, band]), torch.isinf(expect))
                assert torch.allclose(got[i, j, band].nan_to_num(neginf=0), expect.nan_to_num(neginf=0), atol=1e-6)
    assert torch.equal(got[:, k], logits[:, k])


def test_refiner_width_and_dilations_come_from_the_config():
    """refine_channels / refine_dilations set the refiner's layers: one 3 x 3 convolution per
    dilation, padded to keep the window; the defaults keep the layout saved heads load into."""
    model = _model(refine_channels=8, refine_dilations=[1, 3, 9])
    convs = [m[0] for m in model.refiner.body]
    assert [(c.out_channels, c.dilation, c.padding) for c in convs] == [(8, (d, d), (d, d)) for d in (1, 3, 9)]
    default = _model().refiner
    assert [k for k in default.state_dict()] == [f"body.{i}.0.{p}" for i in range(4) for p in ("weight", "bias")] + ["out.weight", "out.bias"]
    assert [m[0].dilation[0] for m in default.body] == [1, 2, 4, 1] and default.body[0][0].out_channels == 24


def test_refined_head_starts_as_the_plain_split_and_its_refiner_learns(blends):
    """refine_steps=1 adds a refiner whose fresh output is the plain split's (same weights
    otherwise, same fractions); the training loss reaches its weights."""
    plain, refined = _model(refine_steps=0).eval(), _model(refine_steps=1).eval()
    assert plain.refiner is None and refined.refiner is not None
    missing = refined.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(key.startswith("refiner.") for key in missing)
    batch = collate_samples(list(blends), plain.config.survey_names)
    targets = DeblendingTask(plain.head_config).targets(blends)
    with torch.no_grad():
        a, r = plain(batch, **targets), refined(batch, **targets)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a.fractions, r.fractions))
    assert torch.allclose(a.loss, r.loss, atol=1e-5)
    refined.train()
    refined(batch, **targets).loss.backward()
    assert refined.refiner.out.weight.grad.abs().sum() > 0


def test_refine_window_sets_the_refiners_crop():
    assert _model(refine_window=48).refiner.window == 48 and _model().refiner.window == 32
    with pytest.raises(InputError, match="refine_window"):
        _model(refine_window=0)
    with pytest.raises(InputError, match="flux_correction"):
        _model(flux_correction="yes")


@pytest.mark.parametrize("shape", [(40, 56), (64, 64)])
def test_any_stamp_size_and_flux_conservation(shape):
    card = dataclasses.replace(CARD, stamp_size=max(shape))  # then cropped to (H, W)
    sample, truth = mock_blend(card, 3, 0, n_objects=4, separation=(0.5, 1.5))
    h, w = shape
    values, ivar = sample.values[:, :h, :w], sample.ivar[:, :h, :w]
    ivar = ivar.copy()
    ivar[2, :3, :5] = 0  # masked pixels count zero in every sum
    model = _model().eval()
    positions = truth.pixel_positions
    cat = deblend_stamp(model, values, ivar, positions=positions)
    assert cat.segmentation.shape == (h, w) and cat.fluxes["head"].shape == (4, 6)
    with torch.no_grad():
        from cosmofm.heads.deblending_predict import stamp_sample
        o = model(collate_samples([stamp_sample(model.head_config, values, ivar)], model.config.survey_names),
                  positions=torch.as_tensor(positions, dtype=torch.float32)[None])
    image = np.where(ivar > 0, values, 0).sum((1, 2))
    total = o.fluxes[0].nan_to_num(0).double().sum(0) + o.background_flux[0].double()
    assert np.allclose(total.numpy(), image, rtol=1e-5, atol=1e-3 * np.abs(values).max())
    fr = o.fractions[0]
    assert fr.shape == (5, 6, h, w) and torch.allclose(fr.sum(0), torch.ones(6, h, w), atol=1e-5)
    # errors: at least the propagated pixel noise of fraction x image
    var = np.where(ivar > 0, 1 / np.where(ivar > 0, ivar, 1), 0)
    expect = np.sqrt((fr[:4].double().numpy() ** 2 * var[None]).sum((2, 3)))
    assert np.allclose(cat.flux_errors["head"], expect, rtol=1e-4)


def test_known_positions_mode_returns_exactly_the_given_sources(blends):
    model = _model().eval()
    given = [np.array([[30.0, 31.5], [20.0, 40.0], [45.2, 12.0]]), np.array([[10.0, 10.0]])]
    cats = deblend_samples(model, blends[:2], positions=given)
    for cat, pos in zip(cats, given):
        assert isinstance(cat, DeblendCatalog) and np.array_equal(cat.positions, pos)
        assert cat.fluxes["head"].shape == (len(pos), 6) and np.isfinite(cat.fluxes["head"]).all()
        assert set(np.unique(cat.segmentation)) <= set(range(len(pos) + 1))
    with pytest.raises(InputError, match="positions"):
        deblend_stamp(model, blends[0].values, blends[0].ivar, positions=np.zeros((17, 2)))


def test_bf16_runs_the_network_in_bfloat16_and_the_flux_split_in_float32(blends):
    """`bf16=True`: the backbone and decoder under bfloat16 autocast, the fractions and flux sums
    in float32, so the fluxes move by rounding only (measured: <= 0.1 % on these blends)."""
    model = _model().eval()
    given = [blend_truth_arrays(b)[1] for b in blends]
    plain, fast = (deblend_samples(model, blends, positions=given, bf16=bf16) for bf16 in (False, True))
    for a, b in zip(plain, fast):
        assert not np.array_equal(a.fluxes["head"], b.fluxes["head"])  # the autocast did run
        np.testing.assert_allclose(b.fluxes["head"], a.fluxes["head"], rtol=0.01)
        assert np.array_equal(a.segmentation, b.segmentation)


def test_save_pretrained_from_pretrained_round_trip(blends, tmp_path):
    model = _model(seed=3).eval()
    model.save_pretrained(tmp_path / "deblend")
    write_manifest(tmp_path / "deblend")
    assert json.loads((tmp_path / "deblend" / "config.json").read_text())["task"]["type"] == "deblending"
    loaded = cosmofm.from_pretrained(str(tmp_path / "deblend"), expect_task="deblending").eval()
    assert type(loaded) is CosmoFMForDeblending and loaded.head_config == model.head_config
    batch = collate_samples(blends, model.config.survey_names)
    pos = torch.tensor([[[32.0, 32.0], [28.0, 36.0]]]).expand(6, 2, 2)
    with torch.no_grad():
        a, b = model(batch, positions=pos), loaded(batch, positions=pos)
    assert torch.equal(a.fluxes.nan_to_num(-1), b.fluxes.nan_to_num(-1)) and torch.isfinite(a.fluxes[:, :2]).all()
    assert torch.equal(a.heatmap, b.heatmap) and torch.equal(a.segmentation, b.segmentation)


def test_short_training_learns_to_detect_well_separated_pairs():
    """Two objects 1.7-2.4 PSF FWHM apart (7.5-11 px at 0.2 arcsec, worst FWHM 4.5 px), at most
    1 mag apart: resolved by eye and by sep. An untrained head (heatmap prior p = 0.01 <
    threshold 0.2) detects nothing; after 200 steps it must find most objects of held-out pairs
    (measured: recall 0.94, precision 1.0 on these 16 pairs)."""
    card = dataclasses.replace(CARD, stamp_size=24)
    samples = DeblendingTask.labelled_mocks(card, 112, 0, n_objects=2, separation=(1.5, 2.2), delta_mag=(0.0, 1.0), stamp_size=None)
    train, test = samples[:96], samples[96:]
    model = _model(seed=0)
    task = DeblendingTask(model.head_config)
    targets, test_targets = task.targets(train), task.targets(test)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        before = model.eval()(collate_samples(test, model.config.survey_names)).n_sources.sum()
    model.train()
    for step in range(200):
        idx = torch.randint(0, len(train), (8,), generator=gen)
        out = model(collate_samples([train[i] for i in idx], model.config.survey_names), **{k: v[idx] for k, v in targets.items()})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert np.mean(losses[-20:]) < 0.4 * np.mean(losses[:5])
    model.eval()
    with torch.no_grad():
        o = model(collate_samples(test, model.config.survey_names))
    met = task.metrics({k: v for k, v in o.items() if isinstance(v, torch.Tensor)}, test_targets)
    assert before == 0 and met["recall"] >= 0.8 and met["precision"] >= 0.8, met["detection"]
    assert met["detection"]["tp"] + met["detection"]["fn"] == 32


def test_the_shipped_recipe_end_to_end(tmp_path):
    out = tmp_path / "run"
    recipe = FinetuneRecipe.load("deblending", ["n_labelled=20", "backbone_recipe=tiny", "mocks.stamp_size=32", "finetune.epochs=1",
                                                "finetune.batch_size=8", f"finetune.output_dir={out}"])
    assert recipe.mocks["n_objects"] == [2, 6] and recipe.card == "lsst-like"
    result = run_recipe(recipe, progress=False)
    results = json.loads((out / "eval_results.json").read_text())
    details = results["details"]
    assert (details["n_train"], details["n_calibration"], details["n_test"]) == (12, 4, 4)
    assert {"f1", "recall"} <= {m["type"] for m in results["results"][0]["metrics"]} and "precision" in details["detection"]
    card = dataclasses.replace(CARD, stamp_size=32)
    test_objects = [mock_blend(card, 0, i, n_objects=(2, 6), separation=(0.5, 3.0))[0].meta["labels"]["n_objects"] for i in range(16, 20)]
    assert details["detection"]["tp"] + details["detection"]["fn"] == sum(test_objects)  # the last 4 blends are the test block
    model = cosmofm.from_pretrained(result["model_dir"], expect_task="deblending")
    assert isinstance(model, CosmoFMForDeblending) and model.config.hidden_size == 32
    assert model.head_config.trained_psf_range == [0.85, 1.35]  # the recipe's psf_scales, all in the training block
    calibrated = details["calibration"]  # the peak threshold chosen by F1 on the calibration block, saved with the model
    assert calibrated["peak_threshold"] in PEAK_THRESHOLDS and model.head_config.peak_threshold == calibrated["peak_threshold"]


def test_bad_input_is_refused_naming_the_sample(blends):
    task = DeblendingTask(DeblendingHeadConfig.from_card(CARD))
    single = mock_image(dataclasses.replace(CARD, stamp_size=64), 0, 5)
    with pytest.raises(InputError, match=f"{single.id}: truth.objects"):
        task.targets([blends[0], single])
    from cosmofm.data_cards.mocks.generators import mock_samples

    spectrum = mock_samples(load_card("sdss-like"), 1)[0]
    with pytest.raises(InputError, match="not an image"):
        task.targets([spectrum])
    with pytest.raises(InputError, match="one shape"):
        blend_targets([blends[0], DeblendingTask.labelled_mocks(CARD, 1, 1, stamp_size=32)[0]], task.head)
    model = _model().eval()
    with pytest.raises(InputError, match="bands"):
        deblend_stamp(model, blends[0].values[:4], blends[0].ivar[:4])
    with pytest.raises(InputError, match="n_objects"):
        DeblendingTask.labelled_mocks(CARD, 2, 0, n_objects=(2, 20))


def test_find_in_tile_follows_the_contract(blends):
    from astropy.io import fits

    model = _model().eval()
    task = task_class(model.task_type)(model.head_config)
    header = fits.Header({"PIXSCALE": 0.2, "BUNIT": "nJy", **{f"BAND{k}": b for k, b in enumerate("ugrizy")}})
    s = blends[0]
    table = task.find_in_tile(model, s.values.astype(np.float32), s.ivar.astype(np.float32), header)
    assert table.colnames[:2] == ["ROW", "COL"] and "FLUX_r" in table.colnames and "FLUXERR_y" in table.colnames
    assert str(table["FLUX_r"].unit) == "nJy" and table["FLAGS"].dtype.kind == "i"
    empty = task.find_in_tile(model, s.values.astype(np.float32), np.zeros_like(s.ivar, np.float32), header)
    assert len(empty) == 0 and "FLUX_g" in empty.colnames and "FLAGS" in empty.colnames


def test_cosmofm_predict_writes_the_central_source_of_each_stamp(blends, tmp_path):
    from cosmofm.data_cards.io.catalogue import read_catalogue
    from cosmofm.data_cards.io.fits_io import write_fits
    from cosmofm.finetune.task_predict import predict_task

    model = _model(peak_threshold=1e-3).eval()  # untrained: its heatmap sits near the prior 0.01, so local maxima pass
    model.save_pretrained(tmp_path / "model")
    write_manifest(tmp_path / "model")
    card = dataclasses.replace(CARD, stamp_size=64)
    write_fits(blends[:3], tmp_path / "blends.fits", card)
    summary = predict_task([tmp_path / "blends.fits"], str(tmp_path / "model"), tmp_path / "cat.fits", batch_size=2, card=card, progress=False)
    assert (summary["n_rows"], summary["n_predicted"]) == (3, 3)
    t = read_catalogue(tmp_path / "cat.fits")
    assert str(t["FLUX_r"].unit) == "nJy" and str(t["ROW"].unit) == "pix"
    with torch.no_grad():
        o = model(collate_samples(blends[:3], model.config.survey_names))
    assert np.array_equal(np.asarray(t["N_SOURCES"]), o.n_sources.numpy()) and (o.n_sources > 0).all()
    for i in range(3):  # the row is the detection nearest the stamp centre (31.5, 31.5)
        pos = o.positions[i].numpy()
        k = np.nanargmin(np.hypot(pos[:, 0] - 31.5, pos[:, 1] - 31.5))
        assert t["ROW"][i] == pytest.approx(pos[k, 0], rel=1e-6) and t["FLUX_g"][i] == pytest.approx(float(o.fluxes[i, k, 1]), rel=1e-5)


def test_split_refiner_equals_its_per_source_reference():
    """The refiner's batched crops and write-back give what one source at a time gives:
    crop the window (zeros outside the image), build its inputs, run the layers, add the
    output to that source's logits inside the image. Random weights, edge and overlapping
    windows, an absent source; equal to float rounding."""
    from cosmofm.heads.deblending_net import SplitRefiner

    torch.manual_seed(1)
    n, k, b, h, w, win = 2, 3, 2, 40, 48, 16
    refiner = SplitRefiner(b, channels=8, window=win)
    with torch.no_grad():
        for p in refiner.parameters():
            p.normal_(0, 0.2)
    logits = torch.randn(n, k + 1, b, h, w)
    present = torch.tensor([[True, True, True], [True, False, True]])
    logits[:, :k] = logits[:, :k].masked_fill(~present[:, :, None, None, None], float("-inf"))
    centres = torch.tensor([[[3.4, 45.6], [20.0, 20.0], [24.0, 27.0]], [[38.7, 1.2], [float("nan")] * 2, [0.2, 0.4]]])
    image = torch.randn(n, b, h, w)
    got = refiner(logits, image, centres, present)
    fr = logits.softmax(1)
    expect = logits.clone()
    half = win // 2
    for i in range(n):
        for j in range(k):
            if not present[i, j]:
                continue
            r0, c0 = int(round(centres[i, j, 0].item())) - half, int(round(centres[i, j, 1].item())) - half
            rs, cs = slice(max(r0, 0), min(r0 + win, h)), slice(max(c0, 0), min(c0 + win, w))
            ws = (slice(rs.start - r0, rs.stop - r0), slice(cs.start - c0, cs.stop - c0))

            def crop(x):  # (C, H, W) -> (C, win, win), zeros outside the image
                out = torch.zeros(x.shape[0], win, win)
                out[:, ws[0], ws[1]] = x[:, rs, cs]
                return out

            img, own = crop(image[i]), crop(fr[i, j])
            rest = crop(fr[i, :k].sum(0)) - own
            inside = crop(torch.ones(1, h, w))
            ar = torch.arange(win, dtype=torch.float32)
            dr = ((r0 + ar - centres[i, j, 0]) / half)[:, None].expand(win, win)
            dc = ((c0 + ar - centres[i, j, 1]) / half)[None, :].expand(win, win)
            x = torch.cat([img, own * img, rest * img, torch.log(own + 1e-3), inside, dr[None], dc[None]])
            with torch.no_grad():
                delta = refiner.out(refiner.body(x[None]))[0] * inside
            expect[i, j][:, rs, cs] += delta[:, ws[0], ws[1]]
    assert torch.equal(torch.isinf(got), torch.isinf(expect))
    assert torch.allclose(got.nan_to_num(neginf=0), expect.nan_to_num(neginf=0), atol=1e-5)


def test_calibration_chooses_the_peak_threshold_of_the_best_f1():
    """DeblendingTask.calibrate finds the peaks again from the collected heatmaps and offsets:
    true sources peak at p = 0.9, a spurious one at 0.25, so F1 is 1 from threshold 0.3 to 0.5
    and the larger wins the tie; with true peaks at 0.45 it is 0.4. With student=True the
    student's threshold is set and the head's kept."""
    model = _model()
    task = DeblendingTask(model.head_config)
    n, h, w = 3, 32, 32
    rows, cols = torch.arange(h)[:, None].float(), torch.arange(w)[None, :].float()
    heat = torch.full((n, h, w), 1e-4)
    centres = torch.full((n, 2, 2), float("nan"))
    for i in range(n):
        for j, (r, c, p) in enumerate([(8 + i, 9, 0.9), (22, 20 - i, 0.9)]):
            heat[i] = torch.maximum(heat[i], p * torch.exp(-((rows - r) ** 2 + (cols - c) ** 2) / 4))
            centres[i, j] = torch.tensor([r, c])
        heat[i] = torch.maximum(heat[i], 0.25 * torch.exp(-((rows - 26) ** 2 + (cols - 5) ** 2) / 4))  # spurious
    outputs = {"heatmap": heat, "offsets": torch.zeros(n, 2, h, w)}
    fitted = task.calibrate(model, outputs, {"centres": centres})
    assert fitted == {"peak_threshold": 0.5, "f1": 1.0} and model.head_config.peak_threshold == 0.5
    assert model.config.task["peak_threshold"] == 0.5  # saved as calibrated
    weak = {"heatmap": heat * torch.where(heat > 0.5, 0.5, 1.0), "offsets": outputs["offsets"]}  # true peaks at 0.45
    fitted = task.calibrate(model, weak, {"centres": centres}, student=True)
    assert fitted["peak_threshold"] == 0.4 and fitted["f1"] == 1.0
    assert model.head_config.student_peak_threshold == 0.4 and model.head_config.peak_threshold == 0.5
