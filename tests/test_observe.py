"""Pretraining observability (pretrain/observe.py): the model-FLOPs formula against a hand
count, per-modality losses summed over 2 gloo ranks equal to those of the whole batch in one
process (and a signal seen by one rank reaching both), and the rows a run writes."""

import json
import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch import free_port  # tests/launch.py

from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.data_cards.schema import load_card
from cosmofm.pretrain import CosmoFMConfig, CosmoFMForPretraining, collate_samples
from cosmofm.pretrain.checkpoint_signal import SaveOnSignal
from cosmofm.pretrain.observe import (
    GPU_PEAK_TFLOPS, FlopCount, Observer, all_reduce_sum, means_by_modality, modality_loss_sums,
)
from cosmofm.pretrain.recipe import PretrainRecipe
from cosmofm.pretrain.train import pretrain

pytestmark = pytest.mark.timeout(120)

CARDS = {"sdss-like": 4, "lsst-like": 2, "ska-hi-like": 2}  # spectra, images, cubes


def _tiny_model() -> CosmoFMForPretraining:
    torch.manual_seed(0)
    model = dict(PretrainRecipe.load("tiny").model)
    return CosmoFMForPretraining(CosmoFMConfig(**model, survey_names=list(CARDS))).eval()


def _samples() -> list:
    return [s for card, n in CARDS.items() for s in mock_samples(load_card(card), n, seed=3)]


def _sums(model, samples, seeds) -> torch.Tensor:
    batch = collate_samples(samples, list(CARDS), seeds=seeds)
    with torch.no_grad():
        out = model(batch)
    return modality_loss_sums(out, log_loss=model.config.masked_loss == "log_chi2"), out


# -- MFU: the FLOPs formula --------------------------------------------------------------

def test_flops_per_sample_match_a_hand_count_for_the_tiny_config():
    model = _tiny_model()
    count = FlopCount.of(model)
    d, layers, r, freq, proj = 32, 2, 4, 6, 16  # tiny.yaml: hidden 32, 2 layers, mlp_ratio 4, 6 frequencies, projection 16
    encoder = layers * (3 * d * d + d * d + r * d * d + r * d * d)  # qkv, attention out, MLP in and out
    assert encoder == 24576
    # spectrum: 128-pixel patches (value + weight channels) -> d and 3 coordinates x 6 frequencies x sin/cos -> d
    # (maps of the data: no input gradient), then the encoder and the decoder d -> 128
    d_spectrum, n_spectrum = 2 * 128 * d + 2 * freq * 3 * d, encoder + d * 128
    d_image, n_image = 2 * 64 * d + 2 * freq * 5 * d, encoder + d * 64  # 8 x 8 patches; 5 coordinates
    assert (count.dense["spectrum"], count.data["spectrum"], count.dense["image"], count.data["image"]) == (
        n_spectrum, d_spectrum, n_image, d_image) == (28672, 9344, 26624, 6016)
    t = 36
    assert count.per_sample("spectrum", t) == 6 * t * n_spectrum + 4 * t * d_spectrum + 12 * layers * d * t * t + 6 * d * proj
    # the observer adds up exactly these over a batch's token groups
    samples = _samples()
    _, out = _sums(model, samples, list(range(len(samples))))
    observer = Observer(count, torch.device("cpu"))
    observer.add_batch(out)
    by_hand = sum(len(g.rows) * count.per_sample(g.modality, g.content.shape[1]) for g in out.backbone.token_groups)
    assert observer.model_flops == by_hand and observer.samples == {"spectrum": 4, "image": 2, "cube": 2, "field": 0}
    assert observer.tokens == sum(len(g.rows) * g.content.shape[1] for g in out.backbone.token_groups)


def test_gpu_peaks_by_device_name():
    peaks = dict(GPU_PEAK_TFLOPS)
    assert peaks["H100"]["bf16"] == 989.4 and peaks["A100"]["bf16"] == 312.0
    # the PCIe H100 is matched before the SXM one it contains the name of
    first = next(p for key, p in GPU_PEAK_TFLOPS if key in "NVIDIA H100 PCIe")
    assert first["bf16"] == 756.0


# -- per-modality losses over 2 gloo ranks -----------------------------------------------

def _rank(rank: int, port: int, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, samples = _tiny_model(), _samples()
        mine = list(range(rank, len(samples), 2))  # every other sample: each rank holds some of each modality
        sums, _ = _sums(model, [samples[i] for i in mine], mine)
        gathered = all_reduce_sum(sums)
        with SaveOnSignal() as signals:
            if rank == 1:
                os.kill(os.getpid(), signal.SIGUSR1)  # one rank signalled
            requests = all_reduce_sum(torch.tensor(signals.take()))
        observer = Observer(FlopCount.of(model), torch.device("cpu"), rank=rank, world=2)
        observer.add_step(gathered)
        row = observer.interval_row(step=1)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"sums": gathered.tolist(), "requests": requests.tolist(), "row": row}, f)
    finally:
        dist.destroy_process_group()


def test_per_modality_loss_over_two_gloo_ranks_equals_the_whole_batch(tmp_path):
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    model, samples = _tiny_model(), _samples()
    whole, _ = _sums(model, samples, list(range(len(samples))))
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["sums"]), whole, rtol=1e-5, atol=1e-5)
    loss, chi2 = means_by_modality(whole)
    assert set(loss) == {"spectrum", "image", "cube"}  # the tiny mocks hide measured pixels of each
    assert [x[2] for x in whole.tolist()][:3] == [4, 2, 2]  # every sample counted once
    row = ranks[0]["row"]
    for m in loss:
        assert row["loss_by_modality"][m] == pytest.approx(loss[m], rel=1e-5, abs=1e-6)  # a log chi2 near 0: absolute
        assert row["chi2_by_modality"][m] == pytest.approx(chi2[m], rel=1e-5, abs=1e-6)
    # one rank got SIGUSR1: both ranks read a save request, and no stop
    assert ranks[0]["requests"] == ranks[1]["requests"] == [1.0, 0.0]
    # each rank's peak memory in its own slot (a process with torch loaded is well over 100 MB)
    assert len(row["memory_bytes_by_rank"]) == 2 and min(row["memory_bytes_by_rank"]) > 100e6
    assert row["memory_bytes_by_rank"] == ranks[1]["row"]["memory_bytes_by_rank"]


# -- the rows of a run ---------------------------------------------------------------------

def test_a_run_writes_interval_rows_with_every_field(tmp_path):
    recipe = PretrainRecipe.load("tiny", [f"run.output_dir={tmp_path / 'run'}", "data.mock_counts=[8,8,4,4]", "optim.max_steps=4",
                                          "run.log_every=2", "run.save_every=4"])
    summary = pretrain(recipe)
    rows = [json.loads(line) for line in (tmp_path / "run" / "observe.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and summary["observe"].endswith("observe.jsonl")
    fields = {"steps", "seconds", "world_size", "samples", "tokens", "samples_per_s", "tokens_per_s", "samples_per_s_by_modality",
              "model_flops", "model_flops_per_s", "peak_flops_per_s_per_device", "peak_source", "mfu", "memory_bytes_by_rank",
              "memory_kind", "loss_by_modality", "chi2_by_modality"}
    for r in rows:
        assert fields <= set(r), fields - set(r)
        assert r["samples"] == 2 * 8  # 2 steps of the global batch of 8
        assert r["samples_per_s"] == pytest.approx(r["samples"] / r["seconds"])
        assert r["mfu"] == pytest.approx(r["model_flops"] / r["seconds"] / r["peak_flops_per_s_per_device"])
        assert r["memory_kind"] == "cpu_peak_rss" and len(r["memory_bytes_by_rank"]) == 1
        assert sum(r["samples_per_s_by_modality"].values()) == pytest.approx(r["samples_per_s"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("per_modality_loss" in m and "per_modality_chi2" in m for m in metrics)


# -- the ZeRO sizing formulas (scripts/bench/zero_memory.py) ----------------------------------

def test_zero_sizing_reproduces_the_papers_figure_1():
    """Rajbhandari et al. 2020, figure 1: 7.5B parameters on 64 GPUs, mixed-precision Adam
    (K = 12): 120 GB per GPU for the baseline, 31.4 (stage 1), 16.6 (stage 2), 1.88 (stage 3)."""
    from cosmofm.bench.zero_memory import zero_bytes_per_gpu

    got = [zero_bytes_per_gpu(7.5e9, stage, 64) / 1e9 for stage in range(4)]
    assert [round(g, 2) for g in got] == [120.0, 31.41, 16.64, 1.88]
