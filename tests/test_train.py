"""The pretraining loop: a tiny run, exact resume after a real kill, 1 vs 2 processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import MIXED_STEPS

from cosmofm.pretrain.recipe import PretrainRecipe
from cosmofm.pretrain.train import pretrain

CLI = [sys.executable, "-m", "cosmofm.cli"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _env(threads: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    env.pop("COSMOFM_DEBUG", None)
    return env


def test_tiny_pretraining_run_writes_safetensors_and_learns(tmp_path):
    recipe = PretrainRecipe.load("tiny", [f"run.output_dir={tmp_path}", "optim.max_steps=60", "run.trackers=[tensorboard]"])
    summary = pretrain(recipe)
    assert len(summary["losses"]) == 60
    # learning: on a fixed batch of the corpus, the trained model beats its initialisation
    from cosmofm.pretrain import CosmoFMForPretraining, collate_samples
    from cosmofm.pretrain.corpus import load_corpus
    from cosmofm.pretrain.train import load_pretraining_model

    trained = load_pretraining_model(tmp_path)
    torch.manual_seed(recipe.run.seed)  # pretrain() initialises after set_seed(seed)
    untrained = CosmoFMForPretraining(trained.config).eval()
    corpus, _, _ = load_corpus(recipe.data, tmp_path)
    batch = collate_samples([corpus[i] for i in range(len(corpus))], trained.config.survey_names)
    with torch.no_grad():
        # mean log(chi2/dof) down by 0.4: the geometric-mean chi2 a third lower
        assert trained(batch).masked_loss < untrained(batch).masked_loss - 0.4
    ckpt = tmp_path / "checkpoints" / "step_00000060"
    suffixes = {p.suffix for p in ckpt.iterdir()}
    assert suffixes == {".safetensors", ".json"}, suffixes
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000060"
    assert len(list((tmp_path / "checkpoints").glob("step_*"))) == 2  # keep_last
    assert list(tmp_path.rglob("events.out.tfevents*")), "TensorBoard events were not written"
    assert (tmp_path / "recipe.yaml").exists()

    from transformers import AutoModel

    import cosmofm
    from cosmofm.pretrain import CosmoFMModel

    model = AutoModel.from_pretrained(summary["model_dir"])
    assert isinstance(model, CosmoFMModel)
    assert isinstance(cosmofm.from_pretrained(summary["model_dir"]), CosmoFMModel)


def test_save_load_round_trip_is_bit_exact(tmp_path, tiny_config, mixed_samples):
    from transformers import AutoModel

    from cosmofm.pretrain import CosmoFMModel, collate_samples
    from cosmofm.pretrain.checkpoint import write_manifest

    torch.manual_seed(1)
    model = CosmoFMModel(tiny_config).eval()
    model.save_pretrained(tmp_path)
    write_manifest(tmp_path)
    again = AutoModel.from_pretrained(tmp_path).eval()
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    batch = collate_samples(mixed_samples, tiny_config.survey_names)
    with torch.no_grad():
        assert torch.equal(model(batch).last_hidden_state, again(batch).last_hidden_state)


def test_release_with_missing_or_altered_file_is_refused(tmp_path, tiny_config):
    import cosmofm
    from cosmofm.data_cards import InputError
    from cosmofm.pretrain import CosmoFMModel
    from cosmofm.pretrain.checkpoint import write_manifest

    CosmoFMModel(tiny_config).save_pretrained(tmp_path)
    write_manifest(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="model.safetensors"):
        cosmofm.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(InputError, match="model.safetensors"):
        cosmofm.from_pretrained(tmp_path)


def _run(args, env, **kw):
    return subprocess.Popen(CLI + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_resume_after_kill_continues_exactly(tmp_path):
    """Kill -9 a run after its step-10 checkpoint; the resumed loss curve equals an uninterrupted one."""
    common = ["pretrain", "--config", "tiny", "--set", "optim.max_steps=60", "--set", "run.save_every=10", "--set", "run.keep_last=3"]
    reference, broken = tmp_path / "reference", tmp_path / "broken"
    ref = _run(common + ["--output", str(reference)], _env())
    assert ref.wait(timeout=600) == 0, ref.stdout.read()

    proc = _run(common + ["--output", str(broken)], _env())
    metrics = broken / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 14:
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(_metrics(broken))
    assert killed_at < 60 and not (broken / "model").exists(), "the run finished before it was killed"

    resumed = _run(common + ["--output", str(broken), "--resume"], _env())
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    a, b = _metrics(reference), _metrics(broken)
    assert [r["step"] for r in b] == list(range(1, 61))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # step for step, bit for bit
    assert [r["lr"] for r in a] == [r["lr"] for r in b]


@pytest.mark.slow
def test_two_processes_match_one_process(mixed_backend_runs, tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 on CPU (gloo; conftest's DDP run) == one process, same global batch."""
    out, _ = mixed_backend_runs
    pretrain(PretrainRecipe.load("tiny", [f"run.output_dir={tmp_path / 'one'}", f"optim.max_steps={MIXED_STEPS}", "run.save_every=2",
                                          "run.progress=false", "run.trackers=[]"]))
    state = json.loads((out / "ddp" / "checkpoints" / f"step_{MIXED_STEPS:08d}" / "trainer_state.json").read_text())
    assert state["metadata"]["world_size"] == 2
    one = [r["loss"] for r in _metrics(tmp_path / "one")]
    two = [r["loss"] for r in _metrics(out / "ddp")]
    assert len(one) == MIXED_STEPS
    np.testing.assert_allclose(two, one, rtol=2e-4)
    # and the parameters agree at the end
    from safetensors.torch import load_file

    w1 = load_file(tmp_path / "one" / "model" / "model.safetensors")
    w2 = load_file(out / "ddp" / "model" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-5)


def _final_weights(tmp_path, name, overrides):
    from safetensors.torch import load_file

    recipe = PretrainRecipe.load("tiny", [f"run.output_dir={tmp_path / name}", "model.objectives=[masked]"] + overrides)
    pretrain(recipe)
    return load_file(tmp_path / name / "model" / "model.safetensors")


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    """2 micro-batches of 4 with accumulation == 1 batch of 8 (masked objective is per-sample)."""
    full = _final_weights(tmp_path, "full", ["optim.max_steps=3", "optim.global_batch=8", "optim.grad_accum=1"])
    accum = _final_weights(tmp_path, "accum", ["optim.max_steps=3", "optim.global_batch=4", "optim.grad_accum=2"])
    for k in full:
        torch.testing.assert_close(accum[k], full[k], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_run_on_cpu(tmp_path):
    recipe = PretrainRecipe.load("tiny", [f"run.output_dir={tmp_path}", "optim.max_steps=2", "run.mixed_precision=bf16", "data.mock_counts=[8,8,4,4]"])
    summary = pretrain(recipe)
    assert len(summary["losses"]) == 2 and all(np.isfinite(summary["losses"]))


def test_pretrain_reads_survey_files_directly(tmp_path, cards):
    """recipe.data.datasets may name survey files as published (issue 7): no conversion step."""
    from cosmofm.data_cards import load_card
    from cosmofm.data_cards.mocks.generators import mock_samples
    from cosmofm.data_cards.io.survey_files import write_desi_coadd, write_eso_sdp

    eso = write_eso_sdp(mock_samples(load_card("4most-lrs"), 6, seed=4), tmp_path / "ADP.4most.fits")
    desi = write_desi_coadd(mock_samples(load_card("desi-like"), 6, seed=5), tmp_path / "coadd-main-dark-1.fits")
    recipe = PretrainRecipe.load("tiny", [
        f"run.output_dir={tmp_path / 'run'}", "optim.max_steps=3", "optim.global_batch=4",
        f"data.datasets=[{eso}, {desi}]",
    ])
    summary = pretrain(recipe)
    assert len(summary["losses"]) == 3 and all(np.isfinite(summary["losses"]))
    from cosmofm.pretrain import CosmoFMConfig

    config = CosmoFMConfig.from_pretrained(summary["model_dir"])
    assert config.survey_names == ["4most-lrs", "desi-like"]
