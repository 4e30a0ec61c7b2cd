"""The shared fine-tune loop (finetune/loop.py) on a toy regression task: it learns, gradient
accumulation equals the whole batch, a crashed run resumes bit for bit, a non-finite loss
stops it, bf16 runs, and two processes equal one (slow)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed

from cosmofm.data_cards import InputError, load_card
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.finetune.loop import EpochBatchSampler, LoopConfig, finetune_loop
from cosmofm.finetune.strategies import Strategy
from cosmofm.pretrain import CosmoFMConfig
from cosmofm.pretrain.train import TrainingDiverged
from launch import accelerate_launch  # tests/launch.py
from toy_task import CosmoFMForToyRegression, ToyHeadConfig, ToyTask  # tests/toy_task.py

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, spectrum_patch_size=128, coord_frequencies=6,
            projection_dim=16, survey_names=["sdss-like"])


redshift_targets = ToyTask(ToyHeadConfig(target_label="redshift")).targets  # {"target": redshift (N,)}


def toy_model(seed: int = 0, dropout: float = 0.0) -> CosmoFMForToyRegression:
    set_seed(seed)
    return CosmoFMForToyRegression.from_backbone_config(CosmoFMConfig(**TINY, hidden_dropout_prob=dropout), ToyHeadConfig())


@pytest.fixture(scope="module")
def spectra():
    return mock_samples(load_card("sdss-like"), 24, seed=5)


def run(samples, strategy="full", dropout=0.0, targets=redshift_targets, **knobs):
    cfg = LoopConfig(**{"epochs": 2, "batch_size": 8, "lr": 3e-3, "seed": 1, **knobs})
    return finetune_loop(toy_model(dropout=dropout), samples, targets, Strategy(strategy), cfg)


def weights(result):
    return {k: v.clone() for k, v in result.model.state_dict().items()}


def test_the_loop_learns(spectra):
    result = run(spectra, epochs=8, lr=1e-2, warmup_fraction=0.0)
    assert result.steps == 8 * 3 and len(result.epoch_losses) == 8 and len(result.step_losses) == 24
    assert result.epoch_losses[-1] < 0.9 * result.epoch_losses[0]  # it learns the redshifts' mean first


def test_sampler_cuts_seeded_permutations_and_shards_them():
    """The order of the old classification loop: one permutation per epoch from
    default_rng(seed), np.array_split into ceil(N / batch) batches; 2 ranks x 2 micro-batches
    hold exactly the same optimizer batches as one process."""
    rng = np.random.default_rng(4)
    expected = [b.tolist() for _ in range(2) for b in np.array_split(rng.permutation(21), 3)]
    one = [[i for i, _ in keys] for keys in EpochBatchSampler(21, 8, epochs=2, seed=4)]
    assert one == expected
    parts = [list(EpochBatchSampler(21, 8, epochs=2, seed=4, grad_accum=2, rank=r, world_size=2)) for r in (0, 1)]
    for step, batch in enumerate(expected):
        got = [i for m in (0, 1) for r in (0, 1) for i, _ in parts[r][2 * step + m]]
        assert sorted(got) == sorted(batch) and {n for r in (0, 1) for keys in parts[r][2 * step:2 * step + 2] for _, n in keys} == {len(batch)}
    resumed = [[i for i, _ in keys] for keys in EpochBatchSampler(21, 8, epochs=2, seed=4, start_step=4)]
    assert resumed == expected[4:]


def test_gradient_accumulation_equals_the_whole_batch(spectra):
    """2 micro-batches of 4 accumulated == one batch of 8 (dropout off), to float32 summation
    order: measured up to 1.2e-6 in one weight of 4096 on an Intel Xeon with AMX (0 on the AMD
    EPYC before), far below one AdamW step (lr 3e-3), which a lost or doubled micro-batch moves."""
    whole, accumulated = run(spectra), run(spectra, grad_accum=2)
    np.testing.assert_allclose(accumulated.step_losses, whole.step_losses, rtol=1e-6)
    for name, value in weights(whole).items():
        torch.testing.assert_close(weights(accumulated)[name], value, rtol=0, atol=5e-6)


def test_a_crashed_run_resumes_bit_for_bit(spectra, tmp_path):
    """Stopped after 4 of 6 steps (checkpoint at step 2, with dropout on), resumed: the same
    weights and losses as a run that never stopped; LoRA adapters included."""
    for strategy in ("full", "lora"):
        whole = run(spectra, strategy, dropout=0.1, epochs=2)
        out = str(tmp_path / strategy)
        crashed = run(spectra, strategy, dropout=0.1, epochs=2, output_dir=out, checkpoint_every=2, max_steps=4)
        assert crashed.steps == 4
        with pytest.raises(InputError, match="earlier fine-tune"):
            run(spectra, strategy, dropout=0.1, output_dir=out, checkpoint_every=2)
        resumed = run(spectra, strategy, dropout=0.1, epochs=2, output_dir=out, checkpoint_every=2, resume=True)
        assert resumed.steps == whole.steps == 6
        assert resumed.step_losses == whole.step_losses and resumed.epoch_losses == whole.epoch_losses
        for name, value in weights(whole).items():
            assert torch.equal(weights(resumed)[name], value), name


def test_classification_resumes_through_the_loop(tmp_path):
    """finetune_classification gets checkpoints and exact resume from the loop (head dropout on)."""
    from cosmofm.finetune.classification import FinetuneConfig, finetune_classification

    card = load_card("sdss-like")
    samples = mock_samples(card, 40, seed=4)
    knobs = dict(strategy="full", epochs=2, batch_size=8, seed=2)
    tiny = {k: v for k, v in TINY.items() if k != "survey_names"}
    whole = finetune_classification(samples, card, FinetuneConfig(**knobs), backbone_config=tiny)
    out = str(tmp_path / "cls")
    finetune_classification(samples, card, FinetuneConfig(**knobs, output_dir=out, checkpoint_every=2, max_steps=4), backbone_config=tiny)
    resumed = finetune_classification(samples, card, FinetuneConfig(**knobs, output_dir=out, checkpoint_every=2, resume=True), backbone_config=tiny)
    assert resumed["history"] == whole["history"]
    for name, value in whole["model"].state_dict().items():
        assert torch.equal(resumed["model"].state_dict()[name], value), name


def test_resume_needs_a_checkpoint_and_the_same_data(spectra, tmp_path):
    with pytest.raises(InputError, match="no checkpoint"):
        run(spectra, output_dir=str(tmp_path), resume=True)
    run(spectra, output_dir=str(tmp_path), checkpoint_every=2, max_steps=2)
    with pytest.raises(InputError, match="batch_size"):
        run(spectra, output_dir=str(tmp_path), checkpoint_every=2, resume=True, batch_size=6)


def test_a_non_finite_loss_stops_the_run(spectra, tmp_path):
    def bad_targets(samples):
        z = redshift_targets(samples)["target"]
        z[3] = float("nan")
        return {"target": z}

    with pytest.raises(TrainingDiverged, match="loss nan") as stopped:
        run(spectra, targets=bad_targets, output_dir=str(tmp_path), checkpoint_every=1)
    bad_step = int(stopped.value.field.split()[-1])  # the step whose batch holds sample 3
    saved = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "checkpoints").glob("step_*"))
    assert saved == list(range(1, bad_step))[-2:]  # every step before it (keep_last 2), none from it


def test_targets_are_checked_before_any_compute(spectra):
    with pytest.raises(InputError, match="rows"):
        run(spectra, targets=lambda s: {"target": torch.zeros(len(s) - 1)})
    with pytest.raises(InputError, match="no loss"):
        run(spectra, targets=lambda s: {})


def test_bf16_autocast_runs_on_cpu(spectra):
    result = run(spectra, mixed_precision="bf16", epochs=1)
    assert result.steps == 3 and all(np.isfinite(result.step_losses))


def test_trackers_log_offline(spectra, tmp_path, monkeypatch):
    """TensorBoard events under <output_dir>/cosmofm-finetune, wandb in offline mode (conftest)."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run(spectra, epochs=1, output_dir=str(tmp_path), trackers=("tensorboard", "wandb"))
    assert list((tmp_path / "cosmofm-finetune").rglob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 on CPU (gloo) == one process, same batches."""
    from safetensors.torch import load_file

    single = subprocess.run([sys.executable, __file__, str(tmp_path / "one.safetensors")], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run(accelerate_launch(2) + [__file__, str(tmp_path / "two.safetensors")], capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stdout[-3000:] + double.stderr[-3000:]
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert (int(one.pop("world_size")), int(two.pop("world_size"))) == (1, 2)
    np.testing.assert_allclose(two.pop("step_losses"), one.pop("step_losses"), rtol=1e-5)
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_two_process_cli_finetune_saves_once_what_one_process_saves(tmp_path):
    """`accelerate launch -m cosmofm.cli finetune --task photoz` on 2 CPU processes: the main process
    alone calibrates, scores and saves; the release equals a one-process run's (same batches; no
    dropout, whose masks are drawn per process)."""
    from safetensors.torch import load_file

    args = ["finetune", "--task", "photoz", "--set", "backbone_recipe=tiny", "--set", "finetune.head.dropout=0", "--n-train", "40", "--epochs", "2", "--batch-size", "8",
            "--workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "cosmofm.cli", *args, "--output", str(tmp_path / "one")], capture_output=True, text=True,
                            timeout=600, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run(accelerate_launch(2) + ["-m", "cosmofm.cli", *args, "--output", str(tmp_path / "two")], capture_output=True,
                            text=True, timeout=600, env=env)
    assert double.returncode == 0, double.stdout[-3000:] + double.stderr[-3000:]
    assert double.stdout.count("model: ") == 1  # one summary: the other rank saved nothing and printed nothing
    one, two = load_file(tmp_path / "one" / "model" / "model.safetensors"), load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert one.keys() == two.keys()
    for name, value in one.items():  # atol: Adam divides near-zero gradients by their own size, so their rounding
        torch.testing.assert_close(two[name], value, rtol=1e-3, atol=2e-4)  # (gloo's sum of two halves) moves a weight up to ~lr/10
    metrics = [json.loads((tmp_path / run / "eval_results.json").read_text())["details"] for run in ("one", "two")]
    assert metrics[1]["nmad"] == pytest.approx(metrics[0]["nmad"], rel=1e-3)


def test_max_grad_norm_clips_an_outlier_step_and_leaves_ordinary_steps_alone(spectra):
    """One batch whose loss is 1e6x the others (as one wild 3D-detection source gave a step ~1,000x the usual
    gradient norm, docs/benchmarks.md): clipped, the run ends nearer the run without it; a run
    without an outlier is bit-identical with and without the clip (the toy's ordinary norms are < 10)."""
    calls = {"n": 0}

    def spiked(out, index):
        calls["n"] += 1
        return out.loss * (1e6 if calls["n"] == 3 else 1.0)

    def spiked_run(**knobs):
        calls["n"] = 0
        cfg = LoopConfig(**{"epochs": 4, "batch_size": 8, "lr": 3e-3, "seed": 1, **knobs})
        return finetune_loop(toy_model(), spectra, redshift_targets, Strategy("full"), cfg, loss=spiked)

    def distance(a, b):
        return float(sum(((a[k] - b[k]).float() ** 2).sum() for k in a) ** 0.5)

    clean = run(spectra, epochs=4)
    assert run(spectra, epochs=4, max_grad_norm=10.0).clipped_steps == [] and clean.clipped_steps == []
    assert all(torch.equal(a, b) for a, b in zip(weights(clean).values(), weights(run(spectra, epochs=4, max_grad_norm=10.0)).values()))
    hit, clipped = spiked_run(), spiked_run(max_grad_norm=10.0)
    assert clipped.clipped_steps == [3]
    assert distance(weights(clipped), weights(clean)) < 0.6 * distance(weights(hit), weights(clean))
    with pytest.raises(InputError, match="max_grad_norm"):
        LoopConfig(max_grad_norm=-1.0)


if __name__ == "__main__":  # one run of the two-process test
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    result = run(mock_samples(load_card("sdss-like"), 24, seed=5))
    if os.environ.get("RANK", "0") != "0":  # the other rank holds the same weights
        sys.exit(0)
    from accelerate import PartialState

    save_file({**{k: v.contiguous() for k, v in result.model.state_dict().items()}, "world_size": torch.tensor(PartialState().num_processes),
               "step_losses": torch.tensor(result.step_losses, dtype=torch.float64)}, sys.argv[1])
