"""The "ivar_local" pixel weight (issue 17): 1/sigma over its running median along the spectrum.

Where the noise follows the source's counts, the global "ivar" weight is a copy of the
continuum's shape; the local one must be flat on a smooth continuum (and the same for a
reddened copy) while a narrow sky line or a noisy bad column still reads as noisy.
"""

import numpy as np
import pytest
import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.pretrain import CosmoFMConfig, CosmoFMModel, collate_samples
from cosmofm.pretrain.recipe import PretrainRecipe
from cosmofm.pretrain.cpu_kernels import nan_lower_median
from cosmofm.pretrain.tokenizers import ImageTokenizer, SpectrumTokenizer, _running_nanmedian

L = 4000
WAVE = torch.logspace(np.log10(3600.0), np.log10(10300.0), L, dtype=torch.float64)


def _tokenizer(kind: str, **kw) -> SpectrumTokenizer:
    return SpectrumTokenizer(CosmoFMConfig(hidden_size=32, num_attention_heads=2, spectrum_patch_size=64, pixel_weight=kind, **kw))


def _counts_ivar(flux: torch.Tensor) -> torch.Tensor:
    """ivar of a spectrum whose noise is Poisson on the source's counts plus a flat sky."""
    return (1.0 / (flux + 0.2)).float()


def _cool_star() -> torch.Tensor:
    """A smooth red continuum (a ~4000 K blackbody, a factor ~6 from blue to red)."""
    x = 1.4388e8 / (WAVE * 4000.0)
    return (WAVE / 5000.0) ** -5 / torch.expm1(x) * torch.expm1(torch.tensor(1.4388e8 / (5000.0 * 4000.0), dtype=torch.float64))


def _weights(kind: str, ivar: torch.Tensor, **kw) -> torch.Tensor:
    ivar = ivar.view(-1, L)
    return _tokenizer(kind, **kw).pixel_weight(ivar, (ivar > 0).float())


def test_flat_on_a_smooth_continuum_and_unchanged_by_reddening():
    star = _cool_star()
    reddened = star * torch.exp(-1.5 * (5500.0 / WAVE - 1))  # a smooth dust-like tilt: blue end dimmed ~2x
    ivar = torch.stack([_counts_ivar(star), _counts_ivar(reddened)])
    local, glob = _weights("ivar_local", ivar), _weights("ivar", ivar)
    # the global weight carries the continuum's shape (and reddening changes it) ...
    assert float(glob[0].max() - glob[0].min()) > 0.5  # 1/sigma varies by ~70 % along this star
    assert float((glob[0] - glob[1]).abs().max()) > 0.2
    # ... the local one is flat to 2 % (the one-sided windows at the ends included) and the same for both
    assert float((local - 1).abs().max()) < 0.02
    assert float((local[0] - local[1]).abs().max()) < 0.01


def test_still_dips_at_a_sky_line_and_a_bad_column():
    ivar = _counts_ivar(_cool_star()).clone()
    ivar[1500:1505] /= 25.0  # a bright sky line: 5x the noise over 5 pixels
    ivar[3100:3103] /= 100.0  # a noisy bad column: 10x the noise
    ivar[2500:2520] = 0.0  # a masked stretch: left out of the medians
    w = _weights("ivar_local", ivar)[0]
    torch.testing.assert_close(w[1500:1505], torch.full((5,), 0.2), atol=0.01, rtol=0)
    torch.testing.assert_close(w[3100:3103], torch.full((3,), 0.1), atol=0.01, rtol=0)
    assert torch.all(w[2500:2520] == 0)
    clean = torch.ones(L, dtype=torch.bool)
    for a, b in ((1500, 1505), (3100, 3103), (2500, 2520)):
        clean[a:b] = False
    assert float((w[clean] - 1).abs().max()) < 0.02  # neighbours of all three read as clean
    # a pixel cleaner than its surroundings reads above 1, clipped at 3 as the global weight is
    ivar[700] *= 100.0
    assert float(_weights("ivar_local", ivar)[0, 700]) == pytest.approx(3.0)


def test_running_median_matches_the_exact_one_on_smooth_data_and_handles_empty_windows():
    x = _cool_star().float().sqrt()[None].repeat(2, 1)
    x[1, :300] = float("nan")  # nothing measured over the first 300 pixels of row 1
    exact = torch.nn.functional.pad(x, (50, 50), value=float("nan")).unfold(1, 101, 1).nanmedian(-1).values
    approx = _running_nanmedian(x, 101)
    # 0.1 % inside; up to 0.3 % in the first and last half windows, where whole blocks are dropped
    torch.testing.assert_close(approx[0, 50:-50], exact[0, 50:-50], rtol=1e-3, atol=0)
    torch.testing.assert_close(approx[0], exact[0], rtol=5e-3, atol=0)
    ok = ~torch.isnan(approx[1])
    torch.testing.assert_close(approx[1, ok], exact[1, ok], rtol=5e-3, atol=0)
    assert bool(torch.isnan(approx[1, :200]).all())  # windows with nothing measured stay NaN
    assert int(ok.sum()) >= L - 300  # and no measured pixel is left without a median
    # the weight falls back to the global median there: finite, 0 where masked
    ivar = _counts_ivar(_cool_star())[None].repeat(2, 1)
    ivar[1, :300] = 0
    w = _weights("ivar_local", ivar)
    assert bool(torch.isfinite(w).all()) and torch.all(w[1, :300] == 0)
    assert torch.all(_weights("ivar_local", torch.zeros(1, L)) == 0)  # nothing measured at all


def test_sorting_network_median_equals_torch_nanmedian():
    gen = torch.Generator().manual_seed(0)
    for m in (1, 2, 3, 8, 12, 13):
        x = torch.randn(500, m, generator=gen)
        x[x > 0.8] = float("nan")  # ~21 % missing, some rows entirely
        expected = x.nanmedian(dim=-1).values
        got = nan_lower_median(x)
        assert torch.equal(torch.isnan(got), torch.isnan(expected))
        assert torch.equal(got.nan_to_num(), expected.nan_to_num())


def test_the_cpu_kernel_gives_the_reference_weight():
    """config.cpu_kernels swaps only the median's algorithm: the weights are identical."""
    ivar = _counts_ivar(_cool_star()).repeat(3, 1)
    ivar[1, 1000:1300] = 0.0  # a masked stretch
    ivar[2, ::7] /= 16.0  # scattered noisy pixels
    fast = _weights("ivar_local", ivar, cpu_kernels=True)
    reference = _weights("ivar_local", ivar, cpu_kernels=False)
    assert torch.equal(fast, reference) and fast[1, 1000:1300].abs().max() == 0


def test_window_is_a_config_field():
    ivar = _counts_ivar(_cool_star()).clone()
    ivar[2000:2040] /= 25.0  # a 40-pixel stretch of 5x noise: noisy against a 201-pixel window, half of a 41-pixel one
    wide, narrow = _weights("ivar_local", ivar, pixel_weight_window=201)[0], _weights("ivar_local", ivar, pixel_weight_window=41)[0]
    assert float(wide[2020]) == pytest.approx(0.2, abs=0.01)
    assert float(narrow[2020]) > 0.5
    cfg = CosmoFMConfig(pixel_weight="ivar_local", pixel_weight_window=51)
    again = CosmoFMConfig.from_dict(cfg.to_dict())
    assert (again.pixel_weight, again.pixel_weight_window) == ("ivar_local", 51)
    assert CosmoFMConfig().pixel_weight_window == 101  # old config.json files (no field) get the default


def test_config_refuses_unknown_kinds_and_bad_windows():
    with pytest.raises(InputError, match="pixel_weight: unknown kind 'ivar_global'.*mask, ivar, ivar_local"):
        CosmoFMConfig(pixel_weight="ivar_global")
    for window in (1, 2.5, True):
        with pytest.raises(InputError, match="pixel_weight_window"):
            CosmoFMConfig(pixel_weight="ivar_local", pixel_weight_window=window)


def test_refused_for_images_with_the_fix():
    tok = ImageTokenizer(CosmoFMConfig(hidden_size=32, num_attention_heads=2, pixel_weight="ivar_local"))
    ivar = torch.ones(2, 3, 16, 16)
    with pytest.raises(InputError, match="pixel_weight: 'ivar_local'.*image batch.*use pixel_weight 'ivar'"):
        tok.pixel_weight(ivar, torch.ones_like(ivar))


def test_recipe_and_backbone_forward(tiny_config, mixed_samples):
    recipe = PretrainRecipe.load("spectra-small-local")
    assert (recipe.model["pixel_weight"], recipe.model["pixel_weight_window"]) == ("ivar_local", 101)
    spectra = [s for s in mixed_samples if s.modality == "spectrum"]
    config = CosmoFMConfig(**{**tiny_config.to_dict(), "pixel_weight": "ivar_local"})
    model = CosmoFMModel(config).eval()
    with torch.no_grad():
        out = model(collate_samples(spectra, config.survey_names))
    assert bool(torch.isfinite(out.last_hidden_state).all())
    with pytest.raises(InputError, match="pixel_weight"):
        model(collate_samples(mixed_samples, config.survey_names))
