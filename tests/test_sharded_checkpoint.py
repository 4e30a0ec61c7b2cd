"""Sharded FSDP2 checkpoints (pretrain/checkpoint.py, torch.distributed.checkpoint with its
Hugging Face safetensors storage): one shard file per process and no pickle anywhere, a resume
onto another process count (2 -> 1, 1 -> 2) that follows the uninterrupted loss curve, one
consolidated `model.safetensors` that `AutoModel` loads bit for bit, asynchronous saves, and
clear errors for a checkpoint of another model or with a shard missing or damaged.

Each run trains the tiny recipe for 4 steps on CPU (gloo); two launches here, beside the shared reference.
"""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import MIXED_STEPS
from launch import launch_runs  # tests/launch.py

from cosmofm.data_cards import InputError
from cosmofm.pretrain.checkpoint import consolidate_model, load_checkpoint, reference_state
from cosmofm.pretrain.configuration_cosmofm import CosmoFMConfig
from cosmofm.pretrain.recipe import PretrainRecipe
from cosmofm.pretrain.state_tree import flatten_state, skeleton_tensors
from cosmofm.pretrain.train import pretrain

STEPS = MIXED_STEPS  # conftest's mixed_backend_runs, whose FSDP2 run is the reference here
# A resume on another process count reduces in another order. Measured over the two steps
# after the resume: 2 -> 1 equal at step 3, 1.1e-7 relative at step 4; 1 -> 2 likewise.
RESUME_RTOL = 1e-6


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _is_pickle(data: bytes) -> bool:
    """Pickle protocol 2+ opens with PROTO (0x80, version); torch.save writes a zip of pickles."""
    return (len(data) > 1 and data[0] == 0x80 and 2 <= data[1] <= 5) or data[:2] == b"PK"


def assert_no_pickle_anywhere(root: Path):
    """Every file is JSON, plain text (`latest`) or a safetensors file whose header parses:
    nothing a loader would unpickle, whatever its name."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert files
    for path in files:
        data = path.read_bytes()
        if path.suffix == ".safetensors":
            (n,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8:8 + n])  # a pickle or zip under this name would not parse
            assert all(isinstance(v, dict) for v in header.values()), path
        elif path.suffix == ".json":
            json.loads(data)
        assert not _is_pickle(data), path


@pytest.fixture(scope="module")
def two(mixed_backend_runs) -> Path:
    """The reference: FSDP2 on 2 processes, checkpoints at steps 2 and 4 (conftest's mixed_backend_runs)."""
    out, _ = mixed_backend_runs
    return out / "fsdp2"


SETS = [f"optim.max_steps={STEPS}", "run.save_every=2", "run.keep_last=2"]


@pytest.fixture(scope="module")
def one_process(two, tmp_path_factory) -> Path:
    """One launch of 1 process (torchrun: FSDP2 needs a process group): the 2-process run resumed
    from step 2 ("two-on-one", a copy), and a 1-process run of its own ("one")."""
    out = tmp_path_factory.mktemp("fsdp2-one")
    shutil.copytree(two, out / "two-on-one", ignore=shutil.ignore_patterns(".cosmofm-run.lock"))
    launch_runs(out, [{"name": "two-on-one", "backend": "fsdp2", "sets": SETS, "resume_from": 2, "fresh": False},
                      {"name": "one", "backend": "fsdp2", "sets": SETS}], num_processes=1)
    return out


@pytest.fixture(scope="module")
def two_processes(one_process, tmp_path_factory) -> Path:
    """One launch of 2 processes: the 1-process run resumed from step 2 ("one-on-two", a copy), and
    the reference run again with the backend's async_checkpoint ("async")."""
    out = tmp_path_factory.mktemp("fsdp2-two")
    shutil.copytree(one_process / "one", out / "one-on-two", ignore=shutil.ignore_patterns(".cosmofm-run.lock"))
    (out / "fsdp2-async.yaml").write_text("kind: fsdp2\nasync_checkpoint: true\n")
    launch_runs(out, [{"name": "one-on-two", "backend": "fsdp2", "sets": SETS, "resume_from": 2, "fresh": False},
                      {"name": "async", "backend": str(out / "fsdp2-async.yaml"), "sets": SETS}])
    return out


def _resumed_copy(run: Path, tmp_path: Path) -> Path:
    """A copy of a finished run folder, to resume (a resume rewrites its folder)."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".cosmofm-run.lock"))
    return copy


# -- fast: the state encoding -------------------------------------------------------------

def test_reference_state_names_tensors_as_flatten_state_and_keeps_them():
    w = torch.arange(6.0).reshape(2, 3)
    state = {"state": {"layer.weight": {"step": torch.tensor(3.0), "exp_avg": w}}, "param_groups": [{"lr": 1e-3, "params": ["layer.weight"]}]}
    tensors, skeleton = reference_state(state)
    flat, flat_skeleton = flatten_state(state)
    assert skeleton == flat_skeleton and tensors.keys() == flat.keys()
    assert tensors["state/layer.weight/exp_avg"].data_ptr() == w.data_ptr()  # not copied: DCP reads each process's part
    assert skeleton_tensors(skeleton) == {"state/layer.weight/step": ("float32", []), "state/layer.weight/exp_avg": ("float32", [2, 3])}


def test_sharded_round_trip_in_one_process_is_bit_exact(tmp_path):
    """The sharded path without a process group (world size 1): write, publish, read back whole
    and into a fresh model + optimizer; every tensor and number bit for bit, nothing pickled."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from cosmofm.pretrain.backend import load_sharded_states, sharded_states
    from cosmofm.pretrain.checkpoint import begin_sharded_save, publish_sharded_checkpoint, write_sharded_state

    def model_and_optimizer(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    model, optimizer = model_and_optimizer(0)
    for _ in range(3):
        model(torch.randn(4, 5)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    tmp = begin_sharded_save(tmp_path, 3)
    skeletons = {key: write_sharded_state(tmp, key, state)[0] for key, state in sharded_states(model, optimizer).items()}
    step_dir = publish_sharded_checkpoint(tmp, 3, {"extra": {"epoch": 1}}, skeletons, {"note": "x"})
    assert sorted(p.name for p in step_dir.iterdir()) == ["extra.json", "extra.safetensors", "manifest.json", "model", "model.json",
                                                          "optimizer", "optimizer.json", "trainer_state.json"]
    assert_no_pickle_anywhere(tmp_path)
    states, meta = load_checkpoint(tmp_path)
    assert meta == {"note": "x", "step": 3, "sharded": ["model", "optimizer"]} and states["extra"] == {"epoch": 1}
    assert all(torch.equal(states["model"][k], v) for k, v in model.state_dict().items())

    again, again_optimizer = model_and_optimizer(1)
    load_sharded_states(step_dir, again, again_optimizer)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    want, got = get_optimizer_state_dict(model, optimizer), get_optimizer_state_dict(again, again_optimizer)
    assert want["param_groups"] == got["param_groups"]
    for name, st in want["state"].items():
        assert all(torch.equal(v, got["state"][name][k]) for k, v in st.items()), name


# -- 2 CPU processes (gloo) -----------------------------------------------------------------

@pytest.mark.slow
def test_fsdp2_writes_one_shard_per_process_and_no_pickle(two):
    ckpts = sorted(p.name for p in (two / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000002", f"step_{STEPS:08d}"]
    step = two / "checkpoints" / ckpts[-1]
    for key in ("model", "optimizer"):
        shards = sorted(p.name for p in (step / key).iterdir())
        assert shards == ["shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
        with safe_open(step / key / shards[1], "pt") as f:  # where each part sits in the whole: JSON in the header
            assert "saved_offsets" in f.metadata()["DCP_SHARDING_INFO"]
    manifest = json.loads((step / "manifest.json").read_text())["files"]
    assert {"model/" + s for s in shards} <= manifest.keys() and "optimizer.json" in manifest
    assert not list(step.rglob(".metadata")) and not list((two / "checkpoints").glob(".*tmp*"))
    assert_no_pickle_anywhere(two)
    # read whole by one process: the optimizer keeps the step counters and hyper-parameters
    states, meta = load_checkpoint(step)
    assert meta["sharded"] == ["model", "optimizer"] and meta["world_size"] == 2
    groups = states["optimizer"]["param_groups"]
    steps = [s["step"].item() for s in states["optimizer"]["state"].values()]  # fewer for a modality some batches lack
    assert max(steps) == STEPS and min(steps) >= 1
    assert isinstance(groups[0]["betas"], tuple) and {p for g in groups for p in g["params"]} == set(states["optimizer"]["state"])


@pytest.mark.slow
def test_consolidated_model_loads_bit_exactly_with_automodel(two, tmp_path):
    from transformers import AutoModel

    step = two / "checkpoints" / f"step_{STEPS:08d}"
    out = consolidate_model(step, tmp_path / "consolidated", CosmoFMConfig.from_pretrained(two / "model"))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    model = AutoModel.from_pretrained(out)
    release = load_file(two / "model" / "model.safetensors")  # the run's release, gathered by FSDP2 itself
    whole = load_checkpoint(step)[0]["model"]
    assert model.state_dict().keys() == release.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, release[k]) and torch.equal(v, whole[f"cosmofm.{k}"]), k


@pytest.mark.slow
def test_two_process_checkpoint_resumes_on_one_process(two, one_process):
    run = one_process / "two-on-one"
    reference = _losses(two)
    resumed = _losses(run)
    assert resumed[:2] == reference[:2] and len(resumed) == STEPS
    np.testing.assert_allclose(resumed, reference, rtol=RESUME_RTOL, atol=0)
    meta = json.loads((run / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json").read_text())["metadata"]
    assert meta["world_size"] == 1 and len(list((run / "checkpoints" / f"step_{STEPS:08d}" / "model").iterdir())) == 1


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_processes(one_process, two_processes):
    reference = _losses(one_process / "one")
    resumed = _losses(two_processes / "one-on-two")
    np.testing.assert_allclose(resumed, reference, rtol=RESUME_RTOL, atol=0)
    assert resumed[:2] == reference[:2] and len(resumed) == STEPS
    meta = json.loads((two_processes / "one-on-two" / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json").read_text())["metadata"]
    assert meta["world_size"] == 2


@pytest.mark.slow
def test_async_save_writes_the_same_checkpoint(two, two_processes):
    """With the backend's async_checkpoint the shards are written by a thread while training goes
    on; the state was copied at the save, so the checkpoint equals the synchronous run's bit for bit."""
    run = two_processes / "async"
    assert _losses(run) == _losses(two)
    assert yaml.safe_load((run / "backend.yaml").read_text())["async_checkpoint"] is True
    a, b = (load_checkpoint(r / "checkpoints" / f"step_{STEPS:08d}")[0] for r in (run, two))
    for key in ("model",):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    for name, st in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][name][n]) for n, v in st.items()), name
    assert_no_pickle_anywhere(run)


# -- bad input: one clear error before any training step --------------------------------

def _ddp_recipe(run: Path, *overrides: str) -> PretrainRecipe:
    """A one-process (no launcher) resume of the FSDP2 checkpoint under DDP."""
    return PretrainRecipe.load("tiny", [f"run.output_dir={run}", f"optim.max_steps={STEPS + 2}", "run.save_every=2", "run.keep_last=2", *overrides])


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_under_ddp_in_one_process(two, tmp_path):
    """FSDP2 on 2 processes -> DDP on 1: the loss curve goes on as the uninterrupted FSDP2 run's."""
    run = _resumed_copy(two, tmp_path)
    summary = pretrain(_ddp_recipe(run, f"optim.max_steps={STEPS}"), resume_from=2)
    assert summary["steps"] == STEPS
    np.testing.assert_allclose(_losses(run), _losses(two), rtol=RESUME_RTOL, atol=0)
    assert (run / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors").is_file()  # DDP: the whole-state format


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_refused_before_any_step(two, tmp_path):
    run = _resumed_copy(two, tmp_path)
    rows = (run / "metrics.jsonl").read_text()
    for override, where in (("model.hidden_size=48", r"/model: \S+: is float32\[16, 32\] in the checkpoint but float32\[16, 48\] in this model"),
                            ("model.num_hidden_layers=3", r"model.json: is the model of another model.*encoder.layers.2")):
        with pytest.raises(InputError, match=where):
            pretrain(_ddp_recipe(run, override), resume=True)
        assert (run / "metrics.jsonl").read_text() == rows  # no step was taken


@pytest.mark.slow
def test_a_missing_or_damaged_shard_is_refused_before_any_step(two, tmp_path):
    run = _resumed_copy(two, tmp_path)
    shard = run / "checkpoints" / f"step_{STEPS:08d}" / "optimizer" / "shard-00002-model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    rows = (run / "metrics.jsonl").read_text()
    # named explicitly (a plain --resume falls back to step 2 with a warning, as for any bad checkpoint)
    with pytest.raises(InputError, match="shard-00002.*sha256"):
        pretrain(_ddp_recipe(run), resume_from=STEPS)
    shard.unlink()
    with pytest.raises(InputError, match="shard-00002.*missing"):
        pretrain(_ddp_recipe(run), resume_from=STEPS)
    assert (run / "metrics.jsonl").read_text() == rows
    # without the manifest's help (a reader that skips it): the shards no longer cover the whole
    from cosmofm.pretrain.checkpoint import read_full_sharded_state

    with pytest.raises(InputError, match="not whole in the shard files"):
        read_full_sharded_state(run / "checkpoints" / f"step_{STEPS:08d}", "optimizer")
