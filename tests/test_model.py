"""Tokenizers (shapes, physical coordinates, grids) and the backbone contract."""

import math

import numpy as np
import pytest
import torch

from cosmofm.data_cards import Sample
from cosmofm.pretrain import CosmoFMConfig, CosmoFMForPretraining, CosmoFMModel, collate_samples
from cosmofm.pretrain.tokenizers import SpectrumTokenizer


def _spectrum(wave, values=None, card="sdss-like"):
    values = np.sin(wave / 50.0) + 2 if values is None else values
    return Sample("spectrum", values, np.ones_like(wave), {"wavelength": wave}, {"card": card, "id": "s"})


def test_token_counts_per_modality(tiny_config, mixed_samples):
    model = CosmoFMModel(tiny_config).eval()
    batch = collate_samples(mixed_samples, tiny_config.survey_names)
    out = model(batch)
    tokens = {g.modality: g.content.shape[1] for g in out.token_groups}
    assert tokens == {
        "spectrum": math.ceil(4608 / 128),
        "image": 6 * (32 // 8) ** 2,  # one token per band per 8x8 patch
        "cube": (64 // 16) * (32 // 16) ** 2,
        "field": (32 // 16) ** 3,
    }
    assert out.last_hidden_state.shape == (12, max(tokens.values()), 32)
    assert out.attention_mask.sum(1).tolist() == [tokens[s.modality] for s in mixed_samples]
    assert out.pooled.shape == (12, 32)


def test_spectrum_tokens_carry_physical_wavelengths(tiny_config):
    """Two grids (log R~2000 and linear finer) map patch centres to their true wavelengths."""
    tok = SpectrumTokenizer(tiny_config)
    log_grid = np.logspace(np.log10(3600), np.log10(10400), 1024)
    lin_grid = np.linspace(3700, 9500, 2048)
    for grid in (log_grid, lin_grid):
        group = tok(collate_samples([_spectrum(grid)]).groups[0])
        centres = 10 ** group.coords[0, :, 0].numpy()
        expected = grid.reshape(-1, 128).mean(1)
        np.testing.assert_allclose(centres, expected, rtol=1e-12)
    # the step feature tells resolutions apart: the linear grid is sampled more finely
    coarse = tok(collate_samples([_spectrum(log_grid)]).groups[0]).coords[0, :, 1]
    fine = tok(collate_samples([_spectrum(lin_grid)]).groups[0]).coords[0, :, 1]
    assert fine.mean() < coarse.mean()


def test_spectrum_padding_masks_the_tail(tiny_config):
    tok = SpectrumTokenizer(tiny_config)
    grid = np.linspace(4000, 6000, 300)  # 300 = 2*128 + 44: last token padded
    group = tok(collate_samples([_spectrum(grid)]).groups[0])
    assert group.patches.shape == (1, 3, 128)
    assert group.patch_ivar[0, 2, 44:].eq(0).all() and group.patch_ivar[0, 2, :44].gt(0).all()
    # padded wavelengths continue the grid instead of repeating the last value
    assert 10 ** group.coords[0, 2, 0].item() > grid[-1] - 1


def test_normalisation_makes_tokens_unit_free(tiny_config):
    """Scaling flux by 1e3 (and ivar by 1e-6) leaves patches and chi-square weights unchanged."""
    tok = SpectrumTokenizer(tiny_config)
    grid = np.linspace(4000, 6000, 256)
    a = _spectrum(grid)
    b = Sample("spectrum", a.values * 1e3, a.ivar * 1e-6, a.coords, a.meta)
    ga, gb = (tok(collate_samples([s]).groups[0]) for s in (a, b))
    torch.testing.assert_close(ga.patches, gb.patches)
    torch.testing.assert_close(ga.patch_ivar, gb.patch_ivar)
    assert gb.scale.item() == pytest.approx(ga.scale.item() * 1e3, rel=1e-5)


def test_image_tokens_know_their_band_and_sky_position(tiny_config, cards):
    from cosmofm.data_cards.mocks.generators import mock_samples

    img = mock_samples(cards["lsst-like"], 1, seed=0)[0]
    model = CosmoFMModel(tiny_config)
    group = model.embeddings.tokenizers["image"](collate_samples([img]).groups[0])
    band_lam = 10 ** group.coords[0, :, 0].numpy()
    expected_bands = np.repeat([b.wavelength.value for b in cards["lsst-like"].bands], 16)
    np.testing.assert_allclose(band_lam, expected_bands, rtol=1e-10)
    dec, ra = group.coords[0, :16, 1].numpy(), group.coords[0, :16, 2].numpy()
    assert dec.min() == pytest.approx(-2.4) and ra.max() == pytest.approx(2.4)  # 8-pixel patch centres at 0.2"
    assert 10 ** group.coords[0, 0, 3].item() == pytest.approx(0.2)  # pixel scale


def test_a_sample_gets_the_same_output_alone_or_in_a_mixed_batch(tiny_config, mixed_samples):
    """Padding and attention masks keep modalities from leaking into each other."""
    model = CosmoFMModel(tiny_config).eval()
    with torch.no_grad():
        mixed = model(collate_samples(mixed_samples, tiny_config.survey_names))
        for i in (0, 5, 9, 11):
            alone = model(collate_samples([mixed_samples[i]], tiny_config.survey_names))
            torch.testing.assert_close(alone.pooled[0], mixed.pooled[i], rtol=1e-4, atol=1e-5)


def test_masking_is_per_sample_deterministic(tiny_config, mixed_samples):
    model = CosmoFMModel(tiny_config).eval()
    batch = collate_samples(mixed_samples, seeds=range(100, 112))
    with torch.no_grad():
        a, b = model(batch, mask_ratio=0.5), model(batch, mask_ratio=0.5)
    assert torch.equal(a.token_mask, b.token_mask)
    frac = a.token_mask.sum(1).float() / a.attention_mask.sum(1)
    assert torch.all((frac > 0.4) & (frac < 0.6))
    sub = collate_samples(mixed_samples[4:8], seeds=range(104, 108))
    with torch.no_grad():
        c = model(sub, mask_ratio=0.5)
    assert torch.equal(c.token_mask[:, : c.token_mask.shape[1]], a.token_mask[4:8, : c.token_mask.shape[1]])


def test_config_round_trip_and_schema_version(tmp_path, tiny_config):
    tiny_config.save_pretrained(tmp_path)
    again = CosmoFMConfig.from_pretrained(tmp_path)
    assert again.to_dict() == tiny_config.to_dict()
    with pytest.raises(ValueError, match="upgrade cosmofm"):
        CosmoFMConfig(schema_version=99)


def test_state_dict_key_contract(tiny_config):
    keys = set(CosmoFMModel(tiny_config).state_dict())
    for k in (
        "embeddings.tokenizers.spectrum.content.weight",
        "embeddings.tokenizers.image.position.proj.weight",
        "embeddings.tokenizers.cube.content.bias",
        "embeddings.tokenizers.field.position.proj.bias",
        "embeddings.mask_token",
        "embeddings.modality_embedding.weight",
        "embeddings.survey_embedding.weight",
        "encoder.layers.0.attn.qkv.weight",
        "encoder.layers.1.mlp.proj.weight",
        "encoder.ln_f.weight",
    ):
        assert k in keys
    assert not any("omegas" in k for k in keys)  # recomputed, never stored


def test_layer_groups_cover_all_parameters(tiny_config):
    model = CosmoFMModel(tiny_config)
    grouped = {id(p) for g in model.layer_groups() for p in g.parameters()}
    assert grouped == {id(p) for p in model.parameters()}
    assert len(model.layer_groups()) == tiny_config.num_hidden_layers + 2


def test_pretraining_loss_decreases_on_a_small_batch(tiny_config, mixed_samples):
    torch.manual_seed(0)
    model = CosmoFMForPretraining(tiny_config)
    batch = collate_samples(mixed_samples, tiny_config.survey_names)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = model(batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert out.contrastive_loss is not None and out.masked_loss is not None
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0  # log chi2: a factor e lower


def test_contrastive_needs_pairs(tiny_config, cards):
    from cosmofm.data_cards.mocks.generators import mock_samples

    model = CosmoFMForPretraining(tiny_config)
    cubes_only = collate_samples(mock_samples(cards["ska-hi-like"], 2, seed=0))
    out = model(cubes_only)
    assert out.contrastive_loss is None and torch.isfinite(out.loss)


def test_backbone_rejects_non_batch_input(tiny_config):
    with pytest.raises(TypeError, match="CosmoFMBatch"):
        CosmoFMModel(tiny_config)(torch.zeros(2, 10))


def test_global_batch_sampler_is_layout_independent_and_keeps_blocks():
    from cosmofm.pretrain.data import GlobalBatchSampler

    one = GlobalBatchSampler(40, 8, seed=3, block=2)
    two = [GlobalBatchSampler(40, 8, rank=r, world_size=2, seed=3, block=2) for r in range(2)]
    for step in range(12):  # crosses epoch boundaries (5 steps per epoch)
        assert one.batch_at(step) == two[0].batch_at(step) + two[1].batch_at(step)
        idx = [i for i, _ in one.batch_at(step)]
        assert all(idx[k] // 2 == idx[k + 1] // 2 for k in range(0, 8, 2))  # blocks stay together
    epoch = sorted(i for s in range(5) for i, _ in one.batch_at(s))
    assert epoch == list(range(40))  # every sample once per epoch
    resumed = GlobalBatchSampler(40, 8, seed=3, block=2, start_step=7, n_steps=2)
    assert list(resumed) == [one.batch_at(7), one.batch_at(8)]
    with pytest.raises(ValueError, match="multiple of the pairing block"):
        GlobalBatchSampler(40, 6, world_size=2, block=2)


def test_gapped_multi_window_grid_keeps_the_true_pixel_step(tiny_config, cards):
    from cosmofm.data_cards import load_card
    from cosmofm.data_cards.mocks.generators import mock_samples

    spec = mock_samples(load_card("4most-hrs"), 1, seed=0)[0]
    group = SpectrumTokenizer(tiny_config)(collate_samples([spec]).groups[0])
    step = 10 ** group.coords[0, :, 1].numpy() * 10 ** group.coords[0, :, 0].numpy()  # (step / lambda) * lambda
    assert np.allclose(step, 0.08, rtol=0.01)  # not inflated by the 800 A gaps


def _stem_config(tiny_config, **kw):
    return CosmoFMConfig(**{**tiny_config.to_dict(), "spectrum_patch_size": 64, "pixel_weight": "ivar", "spectrum_stem_channels": 4, **kw})


def test_stem_tokens_do_not_see_hidden_neighbours(tiny_config, mixed_samples):
    """With the convolutional stem, what a hidden (masked-modelling) token holds must not
    reach the visible tokens: changing only hidden pixels leaves the visible content alone."""
    tok = SpectrumTokenizer(_stem_config(tiny_config)).eval()
    spec = mixed_samples[0]
    batch = collate_samples([spec], seeds=[7]).groups[0]
    with torch.no_grad():
        a = tok(batch, mask_ratio=0.5, seeds=torch.tensor([7]))
        hidden_px = a.hidden[0].repeat_interleave(64)[: spec.values.size]
        assert a.hidden.any() and (~a.hidden).any()
        # flip the sign of hidden pixels: keeps the sample's rms normalisation, changes their content
        changed = Sample("spectrum", np.where(hidden_px.numpy(), -spec.values, spec.values), spec.ivar, spec.coords, spec.meta)
        b = tok(collate_samples([changed], seeds=[7]).groups[0], mask_ratio=0.5, seeds=torch.tensor([7]))
        visible = ~a.hidden[0]
        torch.testing.assert_close(a.content[0, visible], b.content[0, visible])
        # without masking the stem does look across patch edges: the test can fail
        c, d = tok(batch), tok(collate_samples([changed]).groups[0])
        assert not torch.allclose(c.content[0, visible], d.content[0, visible])


def test_stem_finds_a_line_wherever_it_falls_in_a_patch(tiny_config):
    """Pooled stem features make a narrow line's signature nearly shift-invariant within a
    patch (what a linear patch embedding cannot give)."""
    tok = SpectrumTokenizer(_stem_config(tiny_config, spectrum_stem_stride=1))
    wave = np.geomspace(4000, 4000 * 10 ** (1e-4 * 1023), 1024)
    feats = []
    for centre in (300, 306, 312):
        values = 1 + 5 * np.exp(-0.5 * ((np.arange(1024) - centre) / 2.0) ** 2)
        s = Sample("spectrum", values, np.ones_like(wave), {"wavelength": wave}, {"card": "sdss-like", "id": "s"})
        n = tok.patch_size
        x = torch.from_numpy(values / np.sqrt(np.mean(values**2))).float().view(1, -1, n)
        local = tok.stem(torch.stack([x.reshape(1, -1), torch.ones(1, 1024)], dim=1))
        feats.append(local.view(1, -1, 1024 // n, n).amax(-1)[0, :, 4])  # the patch holding the line
    torch.testing.assert_close(feats[0], feats[1], rtol=0.05, atol=0.02)
    torch.testing.assert_close(feats[0], feats[2], rtol=0.05, atol=0.02)


def test_ivar_pixel_weights_flag_noisy_pixels(tiny_config):
    tok = SpectrumTokenizer(_stem_config(tiny_config))
    ivar = torch.ones(1, 256)
    ivar[0, 100:110] = 1 / 25.0  # a sky line: 5x the noise
    ivar[0, 200:210] = 0.0  # masked
    w = tok.pixel_weight(ivar, (ivar > 0).float())
    assert torch.allclose(w[0, :100], torch.ones(100))
    assert torch.allclose(w[0, 100:110], torch.full((10,), 0.2))
    assert torch.all(w[0, 200:210] == 0)
    with pytest.raises(ValueError, match="pixel_weight"):
        CosmoFMConfig(pixel_weight="sigma")
    with pytest.raises(ValueError, match="multiple of spectrum_stem_stride"):
        SpectrumTokenizer(_stem_config(tiny_config, spectrum_stem_stride=3))


def test_survey_file_batches_share_their_grid_without_changing_tokens(tiny_config):
    """Readers hand out a piece of a file as row views of one block with one shared grid:
    collation then copies neither, and the tokens are those of separate per-sample arrays."""
    from cosmofm.pretrain.data import _stack_rows

    tok = SpectrumTokenizer(_stem_config(tiny_config)).eval()
    rng = np.random.default_rng(3)
    wave = np.geomspace(3600, 10000, 1000)
    block = (rng.normal(size=(5, 1000)) + 3).astype(np.float32)
    ivar = rng.uniform(0.5, 2, size=(5, 1000)).astype(np.float32)
    ivar[2, 400:600] = 0  # a masked stretch in one spectrum
    shared = [Sample.validated("spectrum", block[i], ivar[i], {"wavelength": wave}, {"card": "sdss-like", "id": str(i)}) for i in range(1, 4)]
    separate = [Sample("spectrum", block[i].copy(), ivar[i].copy(), {"wavelength": wave.copy()}, {"card": "sdss-like", "id": str(i)}) for i in range(1, 4)]
    a, b = collate_samples(shared).groups[0], collate_samples(separate).groups[0]
    assert a.coords["wavelength"].stride(0) == 0 and np.shares_memory(a.values.numpy(), block)  # no copies
    assert b.coords["wavelength"].stride(0) != 0 and not np.shares_memory(b.values.numpy(), block)
    with torch.no_grad():
        ta, tb = tok(a), tok(b)
        torch.testing.assert_close(ta.content, tb.content)
        torch.testing.assert_close(ta.position, tb.position)
        torch.testing.assert_close(ta.coords, tb.coords)
    # rows out of order, or not from one block, are stacked as before
    np.testing.assert_array_equal(_stack_rows([block[3], block[1]]), block[[3, 1]])
    assert not np.shares_memory(_stack_rows([block[3], block[1]]), block)
    # arrays a worker pool hands back are rebuilt on the bytes they came in: their base is no array
    received = [np.frombuffer(block[i].tobytes(), dtype=block.dtype) for i in (1, 2)]
    assert isinstance(received[0].base, bytes)
    np.testing.assert_array_equal(_stack_rows(received), block[1:3])
