"""The deblending value-of-pretraining bench (`cosmofm.bench.deblend_pretraining`): equal
optimizer steps for every arm and label fraction, its guards and its seed summary."""

import argparse
import dataclasses

import pytest
import torch

from cosmofm.bench import deblend_pretraining as bench
from cosmofm.bench import seed_summary
from cosmofm.bench.deblend_quality import TRAIN_SEED, _blends
from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.schema import load_card
from cosmofm.pretrain.configuration_cosmofm import CosmoFMConfig
from cosmofm.pretrain.modeling_cosmofm import CosmoFMModel

CARD = dataclasses.replace(load_card("lsst-like"), stamp_size=64)
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_patch_size=8, coord_frequencies=6,
            projection_dim=16, survey_names=[CARD.name])


@pytest.fixture(scope="module")
def blends():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _blends(CARD, 20, TRAIN_SEED, 1), _blends(CARD, 3, 1, 1)
    torch.set_num_threads(threads)


def test_every_arm_and_fraction_trains_the_same_number_of_steps(blends):
    train, test = blends
    args = argparse.Namespace(batch_size=4, lr=1e-3, steps=5, n_tune=4, progress=False)
    torch.manual_seed(0)
    backbone = CosmoFMModel(CosmoFMConfig(**TINY))
    rows = {(arm, f): bench.one_run(arm, f, 0, train, test, CARD, args, backbone, TINY) for arm in ("scratch", "frozen") for f in (0.34, 1.0)}
    # 20 blends: a training block of 12 (60 %); 34 % of it is 4 blends = one batch a step
    assert rows["scratch", 1.0]["n_train"] == 12 and rows["frozen", 0.34]["n_train"] == 4
    assert rows["frozen", 0.34]["epochs"] == 5 and rows["scratch", 1.0]["epochs"] == 2  # 5 steps of 1 batch; of 3 batches
    for row in rows.values():
        assert row["steps"] == 5 and row["peak_threshold"] in (0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
        assert set(row["test"]) == set(bench.HEADLINE)


def test_the_summary_is_the_mean_and_spread_over_seeds():
    runs = {f"full/1.0/{s}": {"test": {m: float(s) for m in bench.HEADLINE}} for s in range(3)}
    runs["frozen/0.1/0"] = {"test": {m: 0.5 for m in bench.HEADLINE}}
    summary = seed_summary(runs, ["frozen", "full"], bench.HEADLINE)
    assert list(summary) == ["frozen/0.1", "full/1.0"]  # every fraction present, arms in the order given
    assert summary["full/1.0"]["seeds"] == 3 and summary["full/1.0"]["test_f1"] == [1.0, 1.0]
    assert summary["frozen/0.1"]["test_blended_mape"] == [0.5, 0.0] and "full/0.1" not in summary
    assert "| full | 100% | 3 | 1.000 +- 1.000 |" in bench.markdown_table(summary)


def test_the_seed_summary_keeps_each_split_apart():
    """photoz_quality summarises a test block and a shifted set of every run."""
    runs = {f"knn/1.0/{s}": {"test": {"nmad": 0.02 * (s + 1)}, "shifted": {"nmad": 0.1}} for s in range(2)}
    summary = seed_summary(runs, ["knn"], ["nmad"], splits=("test", "shifted"))
    assert summary["knn/1.0"]["test_nmad"] == pytest.approx([0.03, 0.0141421356])
    assert summary["knn/1.0"]["shifted_nmad"] == [0.1, 0.0]


def test_test_universes_must_not_be_the_training_or_pretraining_ones(tmp_path):
    for bad in (["0"], [str(TRAIN_SEED)]):
        with pytest.raises(InputError, match="--test-universes"):
            bench.main(["--out", str(tmp_path), "--test-universes", *bad])
