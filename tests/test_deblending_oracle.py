"""The deblending noise-floor oracle (`deblending_metrics.fraction_fluxes`, the bench's
`oracle_catalogues`), the shared sky sigma, and the flux-weighted fraction loss
(`deblending_net.fraction_flux_loss`) the head now trains with."""

import dataclasses

import numpy as np
import pytest
import torch

from cosmofm.bench.deblend_quality import MAG_EDGES, ORACLES, _blends, oracle_catalogues, summarise
from cosmofm.data_cards import load_card
from cosmofm.heads import deblending_metrics as dm
from cosmofm.heads import deblending_net as net
from cosmofm.heads.deblend_baseline import fwhm_in_pixels, reference_band
from cosmofm.heads.deblending import CosmoFMForDeblending, DeblendingHeadConfig, DeblendingTask
from cosmofm.pretrain import CosmoFMConfig, collate_samples

CARD = dataclasses.replace(load_card("lsst-like"), stamp_size=64)


def _blobs(shape=(2, 32, 32)):
    """Two round Gaussian sources, 6 pixels apart, of total flux 1000 and 250 per band."""
    b, h, w = shape
    r, c = np.mgrid[:h, :w]
    iso = np.zeros((2, b, h, w))
    for k, (cr, cc, f) in enumerate([(16, 13, 1000.0), (16, 19, 250.0)]):
        g = np.exp(-((r - cr) ** 2 + (c - cc) ** 2) / (2 * 2.0**2))
        iso[k] = f * g / g.sum()
    return iso


def test_sky_sigma_per_band_and_a_band_with_no_pixels():
    ivar = np.stack([np.full((4, 4), 4.0), np.zeros((4, 4)), np.full((4, 4), 100.0)])
    ivar[0, 0, 0] = 0.0  # a masked pixel does not count
    assert np.allclose(dm.sky_sigma(ivar), [0.5, 1.0, 0.1])


def test_true_fractions_give_the_true_fluxes_on_a_noiseless_blend():
    iso = _blobs()
    values, ivar = iso.sum(0), np.full(iso.shape[1:], 1e4)
    flux, err = dm.fraction_fluxes(values, ivar, iso, eps=np.full(2, 1e-9))
    assert np.allclose(flux, iso.sum((2, 3)), rtol=1e-6)  # flux = sum_p iso_k / sum_j iso_j x sum_j iso_j
    # the errors: sqrt(sum fraction^2 / ivar), at most the whole image's sqrt(n_pix / ivar)
    assert np.all(err > 0) and np.all(err < np.sqrt(32 * 32 / 1e4))
    # a masked pixel counts 0, as in the head
    ivar2 = ivar.copy()
    ivar2[:, 16, 13] = 0
    flux2, _ = dm.fraction_fluxes(values, ivar2, iso, eps=np.full(2, 1e-9))
    assert np.allclose(iso.sum((2, 3)) - flux2, iso[:, :, 16, 13], rtol=1e-6, atol=1e-5)
    # eps_b gives the faint outskirts to the background: the fluxes fall, never rise
    flux3, _ = dm.fraction_fluxes(values, ivar, iso, eps=np.full(2, 0.1))
    assert np.all(flux3 < flux) and np.all(flux3 > 0.95 * flux)
    with pytest.raises(ValueError, match="expected"):
        dm.fraction_fluxes(values, ivar, iso[0], eps=np.ones(2))


def test_fraction_flux_loss_bounds_the_relative_flux_error():
    iso = torch.from_numpy(_blobs()).float().unsqueeze(0)  # (1, K, B, H, W)
    image = iso.sum(1)
    target = iso / image.unsqueeze(1)
    true_flux = iso.sum((-2, -1))
    zero = torch.zeros_like(true_flux)
    assert float(net.fraction_flux_loss(target, target, image, true_flux, zero)) == pytest.approx(0.0, abs=1e-6)
    # the faint source takes 5 % of the bright one's share everywhere: its flux rises by 5 % of
    # the bright source's (200 % of its own 250); the loss bounds the mean |relative error|
    steal = 0.05 * target[:, 0]
    pred = torch.stack([target[:, 0] - steal, target[:, 1] + steal], dim=1)
    rel = ((pred * image.unsqueeze(1)).sum((-2, -1)) - true_flux) / true_flux
    loss = float(net.fraction_flux_loss(pred, target, image, true_flux, zero))
    assert float(rel.abs().mean()) == pytest.approx(0.5 * (0.05 + 0.05 * 4), rel=1e-4)
    assert loss >= float(rel.abs().mean()) - 1e-6
    # a NaN (padding) source is left out
    nan_flux = true_flux.clone()
    nan_flux[:, 1] = float("nan")
    assert float(net.fraction_flux_loss(pred, target, image, nan_flux, zero)) == pytest.approx(0.05, rel=1e-4)


def test_the_head_trains_with_the_fraction_flux_term():
    samples = DeblendingTask.labelled_mocks(CARD, 2, 0)
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_patch_size=8, coord_frequencies=6,
                projection_dim=16, survey_names=[CARD.name])
    losses = []
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        head = DeblendingHeadConfig.from_card(CARD, hidden_size=32, fraction_flux_weight=weight)
        model = CosmoFMForDeblending.from_backbone_config(CosmoFMConfig(**tiny), head)
        targets = DeblendingTask(head).targets(samples)
        out = model(collate_samples(samples, model.config.survey_names), **targets)
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses.append(float(out.loss.detach()))
    assert losses[1] > losses[0] + 1e-3  # the term is on, and positive for an untrained head
    assert DeblendingHeadConfig.from_dict({**head.to_dict()}).fraction_flux_weight == 1.0


def test_oracle_on_mock_blends_is_near_the_truth_and_scored_like_the_head():
    blends = _blends(CARD, 4, 0, 1)
    fwhm, ref = fwhm_in_pixels(CARD), reference_band(CARD)
    bands = [b.name for b in CARD.bands]
    cats = oracle_catalogues(CARD, blends, 0.01)
    assert list(cats) == list(ORACLES) and all(len(c) == 4 for c in cats.values())
    n_true = sum(len(t.pixel_positions) for _, t in blends)
    for name, c in cats.items():
        res = summarise(c, blends, fwhm, "oracle", bands, ref)
        assert res["detection"]["f1"] == 1.0  # the true centres
        assert res["flux_all"][bands[ref]]["n"] == n_true
        # what the data allow: bright lsst-like mocks, flux within a few per cent of the truth
        assert res["flux_all"][bands[ref]]["mape"] < 4.0
        assert len(res["flux_isolated_vs_mag"]) == len(MAG_EDGES) - 1
        assert sum(b["n"] for b in res["flux_blended_vs_mag"]) == res["flux_blended"][bands[ref]]["n"]
        kinds = res["flux_blended_by_kind"]  # galaxies and stars apart, the same blended sources
        assert set(kinds) <= {"galaxy", "point"} and sum(v["n"] for v in kinds.values()) == res["flux_blended"][bands[ref]]["n"]
    # on a noiseless stamp the true-fractions oracle returns exactly the in-stamp fluxes less the eps share
    s, t = blends[0]
    clean = dataclasses.replace(s, values=t.isolated.sum(0).astype(np.float32))
    exact = oracle_catalogues(CARD, [(clean, t)], 1e-9)[ORACLES[0]][0]
    assert np.allclose(exact.fluxes["oracle"], t.isolated.sum((2, 3)), rtol=1e-4)


def test_flux_correction_off_gives_plain_fraction_times_image():
    """The bench's ablation: `flux_correction=False` ignores a learned (non-zero) correction;
    sources at given positions (known-positions mode) never get it."""
    from cosmofm.data_cards.mocks.blends import mock_blend

    sample, truth = mock_blend(dataclasses.replace(CARD, stamp_size=48), 5, 0, n_objects=3, separation=(1.0, 2.0))
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_patch_size=8, coord_frequencies=6,
                projection_dim=16, survey_names=[CARD.name])
    torch.manual_seed(0)
    model = CosmoFMForDeblending.from_backbone_config(CosmoFMConfig(**tiny), DeblendingHeadConfig.from_card(CARD, hidden_size=32)).eval()
    batch = collate_samples([sample], model.config.survey_names)
    pos = torch.as_tensor(truth.pixel_positions, dtype=torch.float32)[None]
    with torch.no_grad():
        model.decoder.correction.bias.fill_(0.5)  # x exp(0.5 tanh 0.5) = x1.26 when applied
        on = model(batch, centres=pos)  # true centres, as in training: corrected
        given = model(batch, positions=pos)  # known-positions mode: plain
        model.head_config.flux_correction = False
        off = model(batch, centres=pos)
    raw = (off.fractions[0][:3].double().numpy() * sample.values[None]).sum((2, 3))
    assert np.allclose(off.fluxes[0, :3].double().numpy(), raw, rtol=1e-4, atol=1e-4 * np.abs(raw).max())
    assert np.allclose(given.fluxes[0, :3].double().numpy(), raw, rtol=1e-4, atol=1e-4 * np.abs(raw).max())
    assert np.allclose(on.fluxes[0, :3].double().numpy(), raw * np.exp(0.5 * np.tanh(0.5)), rtol=1e-4, atol=1e-4 * np.abs(raw).max())
