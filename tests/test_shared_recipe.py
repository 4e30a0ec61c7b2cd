"""The shared multi-modal recipe (pretrain/recipes/shared.yaml, issue 17): the demo's shape
and four modalities with the spectral recipe's tokenizer (stem, 1/sigma pixel weight), a
weight every modality takes: where a card's ivar is constant it is the mask itself."""

import numpy as np
import torch

from cosmofm.data_cards.schema import load_card
from cosmofm.pretrain import CosmoFMConfig, CosmoFMModel, collate_samples
from cosmofm.pretrain.recipe import PretrainRecipe

SHAPE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "spectrum_patch_size", "image_patch_size", "cube_patch_size", "field_patch_size")
SPECTRAL = ("pixel_weight", "spectrum_stem_channels", "spectrum_stem_stride", "spectrum_stem_kernel")


def test_shared_recipe_is_the_demo_shape_with_the_spectral_tokenizer():
    shared, demo, spectral = (PretrainRecipe.load(name) for name in ("shared", "demo", "spectra-small"))
    assert {k: shared.model[k] for k in SHAPE} == {k: demo.model[k] for k in SHAPE}
    assert {k: shared.model[k] for k in SPECTRAL} == {k: spectral.model[k] for k in SPECTRAL}
    modalities = [load_card(name).modality for name in shared.data.mock_cards]
    assert sorted(modalities) == sorted(load_card(name).modality for name in demo.data.mock_cards)
    assert load_card(shared.data.mock_cards[modalities.index("spectrum")]).mock_realism == "survey"


def test_ivar_weight_and_stem_serve_every_modality(tiny_config, mixed_samples):
    config = CosmoFMConfig(**{**tiny_config.to_dict(), "pixel_weight": "ivar", "spectrum_stem_channels": 4})
    model = CosmoFMModel(config).eval()
    with torch.no_grad():
        out = model(collate_samples(mixed_samples, config.survey_names))
    assert out.last_hidden_state.shape[0] == len(mixed_samples) and bool(torch.isfinite(out.last_hidden_state).all())
    for modality, constant in (("cube", True), ("field", True), ("image", False)):
        ivar = torch.as_tensor(np.stack([s.ivar for s in mixed_samples if s.modality == modality]))
        mask = (ivar > 0).float()
        weight = model.embeddings.tokenizers[modality].pixel_weight(ivar, mask)
        assert torch.equal(weight, mask) == constant, modality  # a stamp's weight follows its per-pixel noise
