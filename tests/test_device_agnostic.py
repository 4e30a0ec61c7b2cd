"""The model code is device-agnostic: every forward runs on PyTorch's `meta` device (which
has no values, so any host round trip -- .item(), .tolist(), numpy, a branch on a tensor's
value -- fails there), and the CPU fast paths (pretrain/cpu_kernels.py) give the reference
path's outputs and gradients to float32 rounding."""

from collections import Counter

import numpy as np
import pytest
import torch

from cosmofm.data_cards import Sample
from cosmofm.heads.classification import ClassificationHeadConfig, CosmoFMForSpectralClassification
from cosmofm.pretrain import CosmoFMConfig, CosmoFMForPretraining, CosmoFMModel, collate_samples, cpu_kernels
from cosmofm.pretrain.tokenizers import token_mask

META = torch.device("meta")
SHAPES = {  # spectrum tokenizer variants: linear patch map, stem at full resolution, stem at stride 8
    "linear": {},
    "stem-stride-1": dict(spectrum_patch_size=64, pixel_weight="ivar", spectrum_stem_channels=4, spectrum_stem_stride=1),
    "stem-stride-8": dict(pixel_weight="ivar", spectrum_stem_channels=8, spectrum_stem_stride=8),
}
HEAD = ClassificationHeadConfig(class_names=["GALAXY", "QSO", "STAR"])


def _config(tiny_config, shape: str, **kw) -> CosmoFMConfig:
    return CosmoFMConfig(**{**tiny_config.to_dict(), **SHAPES[shape], **kw})


def _survey_piece(n: int = 5) -> list[Sample]:
    """Spectra as a reader hands out a piece of a survey file: rows of one block on one shared
    grid (collated to a stride-0 view), with a masked stretch and a fully masked spectrum."""
    rng = np.random.default_rng(3)
    wave = np.geomspace(3600, 10000, 1000)
    block = (rng.normal(size=(n, 1000)) + 3).astype(np.float32)
    ivar = rng.uniform(0.5, 2, size=(n, 1000)).astype(np.float32)
    ivar[1, 400:600] = 0
    ivar[3] = 0
    return [Sample.validated("spectrum", block[i], ivar[i], {"wavelength": wave}, {"card": "sdss-like", "id": str(i)}) for i in range(n)]


def _batches(mixed_samples, survey_names) -> dict:
    """Every modality alone, all of them mixed (padded tokens), and a survey-file piece."""
    by_modality = {m: [s for s in mixed_samples if s.modality == m] for m in ("spectrum", "image", "cube", "field")}
    batches = {m: collate_samples(s, survey_names) for m, s in by_modality.items()}
    batches["mixed"] = collate_samples(mixed_samples, survey_names)
    batches["survey piece"] = collate_samples(_survey_piece(), survey_names)
    assert batches["survey piece"].groups[0].coords["wavelength"].stride(0) == 0
    return batches


# --- the meta device: no host round trips -------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_backbone_runs_on_the_meta_device(tiny_config, mixed_samples, shape):
    config = _config(tiny_config, shape)
    batch = collate_samples(mixed_samples, config.survey_names)
    with torch.no_grad():
        expected = CosmoFMModel(config).eval()(batch)
    with META:
        model = CosmoFMModel(config)
    out = model(batch.to(META))  # autograd on: the training forward
    assert out.last_hidden_state.device == META
    for name in ("last_hidden_state", "pooled", "attention_mask", "token_coords", "token_mask"):
        assert getattr(out, name).shape == getattr(expected, name).shape, name
    for got, want in zip(out.token_groups, expected.token_groups):
        assert got.modality == want.modality
        assert got.content.shape == want.content.shape and got.position.shape == want.position.shape


@pytest.mark.parametrize("shape", ["linear", "stem-stride-1"])
def test_pretraining_forward_and_backward_run_on_the_meta_device(tiny_config, mixed_samples, shape):
    """Masked modelling (the per-sample token mask included) and the contrastive objective."""
    config = _config(tiny_config, shape)
    with META:
        model = CosmoFMForPretraining(config)
    out = model(collate_samples(mixed_samples, config.survey_names, seeds=range(100, 112)).to(META))
    assert out.loss.shape == () and out.loss.device == META
    assert out.masked_loss is not None and out.contrastive_loss is not None
    assert out.per_sample_chi2.shape == (len(mixed_samples),)
    assert out.backbone.token_mask.device == META
    out.loss.backward()
    assert model.cosmofm.embeddings.tokenizers["spectrum"].content.weight.grad.device == META


def test_classification_head_runs_on_the_meta_device(tiny_config, mixed_samples):
    config = _config(tiny_config, "stem-stride-8")
    batch = collate_samples(mixed_samples, config.survey_names)
    n = len(mixed_samples)
    with META:
        model = CosmoFMForSpectralClassification.from_backbone_config(config, HEAD)
    labels = torch.zeros(n, dtype=torch.long, device=META)
    out = model(batch.to(META), class_labels=labels, redshift=torch.full((n,), 0.1, device=META), mc_samples=3)
    assert out.logits.shape == (n, 3) and out.logits.device == META
    assert out.redshift.shape == out.redshift_err.shape == (n,)
    assert out.mc_logits.shape == (3, n, 3)
    assert out.loss.shape == ()


# --- CPU fast paths == reference path -----------------------------------------------------


def _fast_and_reference(config_class, config: CosmoFMConfig, *args):
    """The same weights built twice: with the CPU kernels (the default) and without."""
    torch.manual_seed(0)
    fast = config_class(CosmoFMConfig(**{**config.to_dict(), "cpu_kernels": True}), *args)
    reference = config_class(CosmoFMConfig(**{**config.to_dict(), "cpu_kernels": False}), *args)
    reference.load_state_dict(fast.state_dict())
    return fast, reference


def _count_kernel_calls(monkeypatch) -> Counter:
    """Count calls of the CPU kernels (each still runs), so a test knows which path it timed."""
    calls = Counter()
    for name in ("spectrum_stem_content", "once_per_batch", "coordinate_embedding"):
        real = getattr(cpu_kernels, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(cpu_kernels, name, spy)
    return calls


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_kernels_give_the_reference_outputs(tiny_config, mixed_samples, shape, monkeypatch):
    config = _config(tiny_config, shape)
    fast, reference = _fast_and_reference(CosmoFMForSpectralClassification.from_backbone_config, config, HEAD)
    fast.eval(), reference.eval()
    calls = _count_kernel_calls(monkeypatch)
    for name, batch in _batches(mixed_samples, config.survey_names).items():
        with torch.no_grad():
            calls.clear()
            want = reference(batch)
            assert not calls, f"{name}: the reference path took a CPU kernel"
            got = fast(batch)
        assert calls["coordinate_embedding"] and calls["once_per_batch"], name
        assert bool(calls["spectrum_stem_content"]) == (shape != "linear" and name in ("spectrum", "mixed", "survey piece")), name
        for g, w in zip(got.backbone.token_groups, want.backbone.token_groups):
            torch.testing.assert_close(g.coords, w.coords, rtol=1e-12, atol=0, msg=f"{name}: coordinates")
            torch.testing.assert_close(g.content, w.content, rtol=1e-5, atol=1e-5, msg=f"{name}: content")
            torch.testing.assert_close(g.position.expand_as(w.position), w.position, rtol=1e-5, atol=1e-5, msg=f"{name}: position")
        torch.testing.assert_close(got.backbone.last_hidden_state, want.backbone.last_hidden_state, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.log1pz_mean, want.log1pz_mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", ["stem-stride-1", "stem-stride-8"])
def test_cpu_kernels_give_the_reference_gradients(tiny_config, mixed_samples, shape):
    """CPU pretraining takes the kernels under autograd: its loss and gradients must be the reference's."""
    config = _config(tiny_config, shape)
    fast, reference = _fast_and_reference(CosmoFMForPretraining, config)
    batch = collate_samples(mixed_samples, config.survey_names, seeds=range(12))
    losses = []
    for model in (fast, reference):
        out = model(batch)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    grads = dict(reference.named_parameters())
    for name, p in fast.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("stride", [1, 8])
@pytest.mark.parametrize("kernels", [True, False])
def test_stem_content_is_the_conv1d_stem_pooled_per_patch(tiny_config, stride, kernels):
    """Both paths of SpectrumTokenizer.embed_content (the CPU one runs the Conv1d weights as
    channels-last 2-D convolutions) equal the stem's own Conv1d modules, max- and
    mean-pooled over each patch, then the content map of [values, weights, pooled]."""
    from cosmofm.pretrain.tokenizers import SpectrumTokenizer

    config = _config(tiny_config, "stem-stride-1", spectrum_stem_stride=stride, cpu_kernels=kernels)
    tok = SpectrumTokenizer(config).eval()
    g = torch.Generator().manual_seed(0)
    patches, weights = torch.randn(3, 16, 64, generator=g), torch.rand(3, 16, 64, generator=g)
    with torch.no_grad():
        local = tok.stem(torch.stack([patches.reshape(3, -1), weights.reshape(3, -1)], dim=1))  # (n, C, L / stride)
        local = local.reshape(3, local.shape[1], 16, -1)
        pooled = torch.cat([local.amax(-1), local.mean(-1)], dim=1).transpose(1, 2)
        w = tok.content.weight
        expected = patches @ w[:, :64].T + weights @ w[:, 64:128].T + pooled @ w[:, 128:].T + tok.content.bias
        torch.testing.assert_close(tok.embed_content(patches, torch.ones_like(patches), weights), expected, rtol=1e-5, atol=1e-5)


def test_repeated_coordinates_are_embedded_as_the_full_ones():
    """The CPU coordinate embedding embeds a coordinate shared by every row, or by every
    token, once: the result must be the reference embedding of every (row, token) value."""
    from cosmofm.pretrain.tokenizers import FourierCoordinateEmbedding

    emb = FourierCoordinateEmbedding([(1e-3, 3.0), (0.01, 10.0), (0.1, 30.0)], 6, 16, cpu_kernels=False)
    g = torch.Generator().manual_seed(1)
    shared_grid = torch.rand(1, 7, generator=g, dtype=torch.float64).expand(5, 7) + 3.5
    per_row = torch.rand(5, 1, generator=g, dtype=torch.float64).expand(5, 7)
    free = torch.rand(5, 7, generator=g, dtype=torch.float64)
    coords = torch.stack([shared_grid, free, per_row], dim=-1)
    got = cpu_kernels.coordinate_embedding(emb.proj, coords, emb.omegas(coords.device))
    torch.testing.assert_close(got, emb(coords), rtol=1e-5, atol=1e-6)


# --- the token mask: integer arithmetic on the batch's device -----------------------------


def test_token_mask_is_pinned_per_seed_and_runs_on_meta():
    """The hidden tokens depend on (seed, token index) only, not on the batch or the device;
    pinned, so that a change of the hash (which changes every pretraining run) is seen."""
    valid = torch.ones(3, 10, dtype=torch.bool)
    mask = token_mask(torch.tensor([0, 7, 2**40 + 7]), 10, 0.5, valid)
    assert mask.sum(1).tolist() == [5, 5, 5]
    assert [torch.nonzero(row).flatten().tolist() for row in mask] == PINNED_MASKS
    alone = token_mask(torch.tensor([7]), 10, 0.5, valid[:1])
    assert torch.equal(alone[0], mask[1])
    assert not torch.equal(mask[1], mask[2])  # the seed's high bits count
    partly = valid.clone()
    partly[:, 8:] = False  # padded tokens are never hidden
    assert not token_mask(torch.tensor([0, 7, 2**40 + 7]), 10, 0.5, partly)[:, 8:].any()
    assert token_mask(torch.tensor([0, 7]).to(META), 10, 0.5, valid[:2].to(META)).shape == (2, 10)


PINNED_MASKS = [[0, 1, 3, 5, 9], [1, 2, 3, 8, 9], [0, 1, 2, 4, 6]]


def test_token_mask_hash_is_exact_32_bit_arithmetic():
    """The hash multiplies in 16-bit halves to stay inside int64: it must equal the plain
    32-bit "lowbias32" hash written with Python's unbounded integers."""
    from cosmofm.pretrain.tokenizers import _hash32

    def lowbias32(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = [0, 1, 2**16 - 1, 2**31, 2**32 - 1, 123456789, 0xDEADBEEF]
    assert _hash32(torch.tensor(xs)).tolist() == [lowbias32(x) for x in xs]


def test_token_mask_hides_every_position_equally_often():
    seeds = torch.arange(4000) * 1_000_003 + 12345
    mask = token_mask(seeds, 36, 0.5, torch.ones(4000, 36, dtype=torch.bool))
    per_position = mask.float().mean(0)
    assert torch.all((per_position > 0.45) & (per_position < 0.55)), per_position
    pairs = (mask[:, :-1] & mask[:, 1:]).float().mean()  # neighbours independent: 18/36 * 17/35
    assert abs(pairs.item() - 18 / 36 * 17 / 35) < 0.02
