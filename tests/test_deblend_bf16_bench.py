"""The bf16 deblending bench (scripts/bench/deblend_bf16.py) on a saved head: interleaved
float32 / bf16 rounds timed, both precisions scored on the same stamps, the JSON named."""

import dataclasses
import json

import numpy as np
import torch

from cosmofm.bench.deblend_bf16 import main
from cosmofm.bench.deblend_quality import TRAIN_SEED, _blends, train_head
from cosmofm.data_cards.schema import load_card
from cosmofm.pretrain.manifest import save_release


def test_bench_times_and_scores_a_saved_head_in_both_precisions(tmp_path):
    card = dataclasses.replace(load_card("lsst-like"), stamp_size=64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        model, _ = train_head(card, _blends(card, 2, TRAIN_SEED, 1, n_truth=0), 1, 2, 1e-3, 0, None, log_every=100)
    finally:
        torch.set_num_threads(threads)
    save_release(model, tmp_path / "head")
    report = main(["--out", str(tmp_path / "out"), "--model", str(tmp_path / "head"), "--n-test", "1", "--rounds", "2", "--name", "x.json",
                   "--n-tune", "2"])
    assert [r["bf16"] for r in report["rounds"]] == [False, True, False, True]
    assert all(r["stamps_per_cpu_s"] > 0 for r in report["rounds"])
    for precision in ("float32", "bf16"):
        known = report[precision]["true_centres"]["flux_all"]["r"]
        assert known["n"] == sum(len(t.pixel_positions) for seed in (0, 1, 2) for _, t in _blends(card, 1, seed, 1))
        assert np.isfinite(known["mape"])
    assert json.loads((tmp_path / "out" / "x.json").read_text())["args"]["model"] == str(tmp_path / "head")
