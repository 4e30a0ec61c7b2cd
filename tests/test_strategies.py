"""Parameter groups from the model, the fine-tuning strategies, and the evaluation metrics."""

import numpy as np
import pytest
import torch

from cosmofm.cli import main as cli_main
from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.finetune.classification import FinetuneConfig, finetune_classification
from cosmofm.heads.metrics import CATASTROPHIC_DZ, classification_metrics, pull_width, redshift_error_scale, redshift_metrics
from cosmofm.finetune.strategies import Strategy, apply_strategy, eval_frozen_layers, finish_strategy, peft_available
from cosmofm.heads.classification import ClassificationHeadConfig, CosmoFMForSpectralClassification, labels_from_samples
from cosmofm.pretrain import CosmoFMConfig, CosmoFMModel, collate_samples
from cosmofm.pretrain.modeling_cosmofm import CosmoFMForPretraining

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, spectrum_patch_size=128, coord_frequencies=6, projection_dim=16)


@pytest.fixture(scope="module")
def spectra(sdss):
    return mock_samples(sdss, 40, seed=4)  # 24 train, 8 calibration, 8 test in a fine-tune


def classifier(sdss, seed: int = 0) -> CosmoFMForSpectralClassification:
    torch.manual_seed(seed)
    head = ClassificationHeadConfig.from_card(sdss, hidden_size=16)
    return CosmoFMForSpectralClassification.from_backbone_config(CosmoFMConfig(survey_names=["sdss-like"], **TINY), head)


def by_name(model, groups) -> dict[str, tuple[float, float]]:
    """name -> (lr, weight_decay) of each grouped parameter; fails when one is in two groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in groups:
        for p in g["params"]:
            assert names[id(p)] not in out, f"{names[id(p)]} is in two groups"
            out[names[id(p)]] = (g["lr"], g["weight_decay"])
    return out


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def one_step(model, groups, samples, sdss) -> set[str]:
    """Names of the parameters one AdamW step on `samples` changed."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    labels, z = labels_from_samples(samples, ClassificationHeadConfig.from_card(sdss))
    optimizer = torch.optim.AdamW(groups)
    model.train()
    model(collate_samples(samples, ["sdss-like"]), labels, z).loss.backward()
    optimizer.step()
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}


# ---------------------------------------------------------------------------- parameter groups


def test_layer_decay_factors_and_no_decay_on_1d(sdss):
    model = classifier(sdss)
    groups = model.parameter_groups(lr=1.0, weight_decay=0.1, layer_decay=0.5, head_lr=8.0)
    got = by_name(model, groups)
    assert set(got) == {n for n, _ in model.named_parameters()}  # every trainable parameter, once
    expected_lr = {"cosmofm.embeddings.": 0.25, "cosmofm.encoder.layers.0.": 0.5, "cosmofm.encoder.layers.1.": 1.0, "cosmofm.encoder.ln_f.": 1.0,
                   "head.": 8.0}
    params = dict(model.named_parameters())
    for name, (lr, wd) in got.items():
        prefix = next(k for k in expected_lr if name.startswith(k))
        assert lr == expected_lr[prefix], name
        assert wd == (0.1 if params[name].dim() >= 2 else 0.0), name
    assert any(params[n].dim() == 1 and not n.endswith("bias") for n in got)  # norms and the mask token: no decay either
    assert len(groups) == len({(g["lr"], g["weight_decay"]) for g in groups})  # one group per LR and kind


def test_frozen_parameters_are_left_out(sdss):
    model = classifier(sdss)
    model.cosmofm.embeddings.requires_grad_(False)
    model.cosmofm.encoder.layers[0].attn.qkv.bias.requires_grad_(False)
    got = by_name(model, model.parameter_groups(1e-3, 0.01))
    assert set(got) == trainable(model)
    assert "cosmofm.encoder.layers.0.attn.qkv.weight" in got and "cosmofm.encoder.layers.0.attn.qkv.bias" not in got


def test_pretraining_groups_keep_the_optimizer_state_order(tiny_config):
    """layer_decay 1 without head_lr: [matrices, the rest], each in model.parameters() order,
    as the pretraining checkpoints store the optimizer state."""
    model = CosmoFMForPretraining(tiny_config)
    groups = model.parameter_groups(3e-4, 0.05)
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in model.parameters() if p.dim() >= 2],
                                                              [id(p) for p in model.parameters() if p.dim() < 2]]
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(3e-4, 0.05), (3e-4, 0.0)]


def test_backbone_alone_has_no_head_tier(tiny_config):
    backbone = CosmoFMModel(tiny_config)
    groups = backbone.parameter_groups(1.0, 0.0, layer_decay=0.5, head_lr=99.0)
    assert {g["lr"] for g in groups} == {0.25, 0.5, 1.0}  # embeddings, block 0, last block + norm
    assert sum(len(g["params"]) for g in groups) == len(list(backbone.parameters()))


# ---------------------------------------------------------------------------- strategies


def test_frozen_trains_the_head_only(sdss, spectra):
    model = classifier(sdss)
    strategy = Strategy("frozen")
    groups = apply_strategy(model, strategy, lr=1e-2, weight_decay=0.01)
    head = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    assert trainable(model) == set(by_name(model, groups)) == head
    changed = one_step(model, groups, spectra[:8], sdss)
    assert changed and changed <= head
    model.train()
    eval_frozen_layers(model, strategy)
    assert not any(m.training for group in model.cosmofm.layer_groups() for m in group.modules())  # no dropout in the backbone
    assert model.head.training


def test_last_n_trains_the_last_blocks_and_the_head(sdss, spectra):
    model = classifier(sdss)
    strategy = Strategy("last-n", n_blocks=1, layer_decay=0.5, backbone_lr_scale=0.1)
    groups = apply_strategy(model, strategy, lr=1.0, weight_decay=0.01)
    expected = {n for n, _ in model.named_parameters() if n.startswith(("head.", "cosmofm.encoder.layers.1.", "cosmofm.encoder.ln_f."))}
    got = by_name(model, groups)
    assert trainable(model) == set(got) == expected
    assert {lr for n, (lr, _) in got.items() if not n.startswith("head.")} == {0.1} and {lr for n, (lr, _) in got.items() if n.startswith("head.")} == {1.0}
    changed = one_step(model, groups, spectra[:8], sdss)
    assert changed <= expected and any(n.startswith("cosmofm.encoder.layers.1.") for n in changed)
    model.train()
    eval_frozen_layers(model, strategy)
    assert not model.cosmofm.embeddings.training and not model.cosmofm.encoder.layers[0].training
    assert model.cosmofm.encoder.layers[1].training and model.cosmofm.encoder.ln_f.training


def test_full_with_layer_decay(sdss):
    model = classifier(sdss)
    got = by_name(model, apply_strategy(model, Strategy("full", layer_decay=0.5, backbone_lr_scale=0.5), lr=1.0, weight_decay=0.0))
    assert set(got) == {n for n, _ in model.named_parameters()}
    assert got["cosmofm.encoder.layers.1.mlp.fc.weight"][0] == 0.5 and got["cosmofm.encoder.layers.0.mlp.fc.weight"][0] == 0.25
    assert got["cosmofm.embeddings.mask_token"][0] == 0.125 and got["head.classifier.weight"][0] == 1.0


@pytest.mark.skipif(not peft_available(), reason="peft not installed")
def test_lora_trains_adapters_and_merges_to_the_same_outputs(sdss, spectra):
    model = classifier(sdss)
    plain_keys = set(model.state_dict())
    strategy = Strategy("lora", lora_rank=4, lora_alpha=8)
    groups = apply_strategy(model, strategy, lr=1e-2, weight_decay=0.01)
    adapters = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert adapters and all(".attn.qkv." in n or ".attn.proj." in n for n in adapters)
    assert trainable(model) == set(by_name(model, groups)) == adapters | {n for n, _ in model.named_parameters() if n.startswith("head.")}
    one_step(model, groups, spectra[:8], sdss)
    with torch.no_grad():  # lora_B starts at zero: make the adapters count before comparing
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.1)
    batch = collate_samples(spectra[8:16], ["sdss-like"])
    model.eval()
    with torch.no_grad():
        unmerged = model(batch).logits
    merged = finish_strategy(model, strategy).eval()
    with torch.no_grad():
        assert torch.allclose(merged(batch).logits, unmerged, atol=1e-5)
    assert set(merged.state_dict()) == plain_keys and isinstance(merged.cosmofm, CosmoFMModel)
    assert all(p.requires_grad for p in merged.parameters())


def test_strategy_knobs_are_checked():
    with pytest.raises(InputError, match="n_blocks"):
        Strategy("last-n")
    with pytest.raises(InputError, match="n_blocks"):
        Strategy("full", n_blocks=2)
    with pytest.raises(InputError, match="layer_decay"):
        Strategy("full", layer_decay=1.5)
    with pytest.raises(InputError, match="layer_decay"):
        Strategy("frozen", layer_decay=0.5)
    with pytest.raises(InputError, match="strategy"):
        FinetuneConfig(strategy="partial")
    assert FinetuneConfig(strategy="last-n", n_blocks=2, layer_decay=0.7).tuning == Strategy("last-n", n_blocks=2, layer_decay=0.7)


def test_last_n_cannot_exceed_the_blocks(sdss):
    with pytest.raises(InputError, match="has 2 blocks"):
        apply_strategy(classifier(sdss), Strategy("last-n", n_blocks=3), lr=1e-3, weight_decay=0.0)


def test_finetune_last_n_changes_only_the_last_block(sdss, spectra):
    backbone = CosmoFMModel(CosmoFMConfig(survey_names=["sdss-like"], **TINY))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    cfg = FinetuneConfig(strategy="last-n", n_blocks=1, layer_decay=0.8, epochs=1, batch_size=8)
    after = finetune_classification(spectra, sdss, cfg, backbone=backbone)["model"].cosmofm.state_dict()
    same = {k for k in before if torch.equal(before[k], after[k])}
    assert {k for k in before if not k.startswith(("encoder.layers.1.", "encoder.ln_f."))} <= same
    assert any(k.startswith("encoder.layers.1.") and k not in same for k in before)


def test_cli_passes_the_strategy_knobs(tmp_path, capsys):
    assert cli_main(["finetune", "--strategy", "last-n", "--n-train", "10", "--output", str(tmp_path / "a")]) == 2
    assert "n_blocks" in capsys.readouterr().err
    assert cli_main(["finetune", "--strategy", "frozen", "--layer-decay", "0.5", "--n-train", "10", "--output", str(tmp_path / "b")]) == 2
    assert "layer_decay" in capsys.readouterr().err


# ---------------------------------------------------------------------------- metrics


def test_redshift_metrics_by_hand():
    z_true = np.array([0.0, 0.0, 1.0, 1.0])
    z_pred = np.array([0.001, 0.0, 1.01, np.nan])  # dz/(1+z) = 0.001, 0, 0.005 (catastrophic), none (a failure)
    m = redshift_metrics(z_true, z_pred)
    assert m["redshift_catastrophic_fraction"] == 0.5
    assert m["redshift_bias"] == pytest.approx(0.001)
    assert m["redshift_nmad"] == pytest.approx(1.4826 * 0.001)  # |dz - median| = 0, 0.001, 0.004
    assert np.isnan(redshift_metrics(z_true, np.full(4, np.nan))["redshift_nmad"])
    with pytest.raises(ValueError, match="shapes"):
        redshift_metrics(z_true, z_pred[:3])


def test_classification_metrics_by_hand():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [0.1, 0.9, 0.0]])
    labels = np.array([0, 1, 1, 1])  # predicted 0, 1, 0, 1
    m = classification_metrics(probs, labels, ["A", "B", "C"])
    assert m["accuracy"] == 0.75
    assert m["per_class_recall"] == {"A": 1.0, "B": 2 / 3}  # C has no objects
    assert m["macro_recall"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["confusion"].tolist() == [[1, 0, 0], [1, 2, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="3 classes"):
        classification_metrics(probs[:, :2], labels, ["A", "B", "C"])
    with pytest.raises(ValueError):
        classification_metrics(probs, labels[:3], ["A", "B", "C"])


def test_pull_width_and_error_scale_by_hand():
    pulls = np.array([1.0] * 10 + [-2.0] * 11)  # median |pull| = 2
    z_err = np.full(21, 0.001)
    z_true = np.zeros(21)
    z = pulls * z_err
    assert pull_width(z_true, z, z_err) == pytest.approx(2 * 1.4826)
    # a catastrophic redshift and a missing one are left out
    z_true2, z2, err2 = (np.append(a, extra) for a, extra in ((z_true, [0, 0]), (z, [10 * CATASTROPHIC_DZ, np.nan]), (z_err, [0.001, 0.001])))
    assert pull_width(z_true2, z2, err2) == pytest.approx(2 * 1.4826)
    assert redshift_error_scale(z_true, z, z_err) == pytest.approx(2 * 1.4826)
    assert np.isnan(pull_width(z_true[:19], z[:19], z_err[:19])) and redshift_error_scale(z_true[:19], z[:19], z_err[:19]) == 1.0
    with pytest.raises(ValueError, match="shapes"):
        pull_width(z_true, z, z_err[:5])
