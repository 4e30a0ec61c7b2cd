"""DeepSpeed ZeRO checkpoints without pickle (pretrain/checkpoint_deepspeed.py): each process's
optimizer partition as safetensors + JSON, an exact resume at the same world size, ZeRO-2
and ZeRO-3 partitions re-cut for another, clear refusals of every other resume before compute, and a
teardown that leaves no gloo thread."""

import contextlib
import json
from importlib import resources
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from launch import accelerate_launch, free_port  # tests/launch.py
from test_backends import _no_pickles

from cosmofm.data_cards import InputError
from cosmofm.pretrain.backend import load_backend
from cosmofm.pretrain.checkpoint import save_checkpoint, write_manifest
from cosmofm.pretrain.checkpoint_deepspeed import LAYOUT, check_partitioned_resume, partition_name
from cosmofm.pretrain.recipe import PretrainRecipe
from cosmofm.pretrain.run_folder import claim_run_folder

RUNS = ("zero1", "zero2", "zero3", "zero3-bf16", "zero2async")  # backend[-mixed precision]; zero2async: zero2 + async_checkpoint
STEPS, SAVE_AT = 4, 2

# Every rank: for each run a 4-step run saving at step 2 and the end, then the same run resumed
# from step 2 (in the same processes: DeepSpeed's start-up is paid once); then the CLI's
# teardown. Each rank prints one JSON line.
SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from cosmofm.pretrain.backend import _communication_threads, close_process_group
from cosmofm.pretrain.recipe import PretrainRecipe
from cosmofm.pretrain.train import pretrain

out, steps, save_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rows = {}
for name in sys.argv[4].split(","):
    run, (backend, _, precision) = out / name, name.partition("-")
    backend = str(out / f"{backend}.yaml") if (out / f"{backend}.yaml").is_file() else backend  # a backend file the fixture wrote
    recipe = lambda: PretrainRecipe.load("tiny", [
        f"run.output_dir={run}", f"optim.max_steps={steps}", f"run.save_every={save_at}", "run.progress=false", "run.trackers=[]",
        f"run.backend={backend}", "data.mock_cards=[sdss-like]", "data.mock_counts=[64]", "model.objectives=[masked]",
        *([f"run.mixed_precision={precision}"] if precision else [])])
    pretrain(recipe())
    reference = (run / "metrics.jsonl").read_text()
    pretrain(recipe(), resume_from=save_at)
    rows[name] = [reference, (run / "metrics.jsonl").read_text()]
before = _communication_threads()
after = close_process_group()
print("RESULT " + json.dumps({"rank": int(os.environ["RANK"]), "rows": rows, "before": before, "after": after}), flush=True)
"""


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    env.pop("COSMOFM_DEBUG", None)
    return env


def _rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """One launch of 2 CPU processes (gloo) running SCRIPT; (output folder, each rank's result)."""
    out = tmp_path_factory.mktemp("zero")
    script = out / "script.py"
    script.write_text(SCRIPT)
    shipped = resources.files("cosmofm.pretrain") / "backends" / "zero2.yaml"
    (out / "zero2async.yaml").write_text(shipped.read_text() + "async_checkpoint: true\n")
    cmd = accelerate_launch(2) + [str(script), str(out), str(STEPS), str(SAVE_AT), ",".join(RUNS)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = sorted((json.loads(line.removeprefix("RESULT ")) for line in done.stdout.splitlines() if line.startswith("RESULT ")),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    return out, results


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_a_resumed_zero_run_continues_exactly(zero_runs, name):
    """ZeRO-1, 2 and 3 in fp32, and ZeRO-3 in bf16 (whose checkpoint holds bf16 weights and the fp32
    master partitions)."""
    out, results = zero_runs
    reference, resumed = (_rows(text) for text in results[0]["rows"][name])
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    # bit for bit: the steps after the resume use Adam's moments and the fp32 master weights read back
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in reference]


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_each_rank_writes_its_partition_without_pickle(zero_runs, name):
    out, _ = zero_runs
    run, stage = out / name, int(name[len("zero")])
    _no_pickles(run)  # no pickle anywhere: every checkpoint file is safetensors or JSON
    ckpt = run / "checkpoints" / f"step_{SAVE_AT:08d}"
    meta = json.loads((ckpt / "trainer_state.json").read_text())["metadata"]
    assert meta["optimizer_saved"] is True
    assert {k: meta["optimizer_partitions"][k] for k in ("layout", "stage", "world_size")} == {"layout": LAYOUT, "stage": stage, "world_size": 2}
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    sizes = []
    for rank in (0, 1):
        stem = f"optimizer/{partition_name(rank, 2)}"
        assert f"{stem}.safetensors" in manifest and f"{stem}.json" in manifest  # sha256 of each partition
        tensors = load_file(ckpt / f"{stem}.safetensors")
        skeleton = json.loads((ckpt / f"{stem}.json").read_text())["root"]["items"]
        assert (skeleton["rank"], skeleton["world_size"], skeleton["stage"]) == (rank, 2, stage)
        assert skeleton["engine"]["items"]["global_steps"] == SAVE_AT
        moments = [t for name, t in tensors.items() if name.endswith("/exp_avg_sq")]
        steps = [t for name, t in tensors.items() if name.endswith("/step")]
        # Adam's state after 2 steps, not a fresh one (under ZeRO-1/2 rank 1's share of the small
        # parameter group is the unused modalities' tokenizers alone, whose moments stay 0)
        assert moments and sum(float(m.abs().sum()) for m in moments) > 0
        assert steps and all(float(s) == SAVE_AT for s in steps)
        master = [t for name, t in tensors.items() if "fp32" in name.split("/")[1]]
        sizes.append(sum(t.numel() for t in master))
    # each rank holds half of the fp32 master weights (a partition, not the whole), up to
    # DeepSpeed's padding of each of the 2 parameter groups to a multiple of the world size
    total = sum(t.numel() for t in load_file(ckpt / "model.safetensors").values())
    assert total <= sum(sizes) <= total + 4 and max(sizes) <= total // 2 + 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_partitions_of_two_processes_resume_on_one(zero_runs, name, tmp_path):
    """ZeRO partitions are re-cut for another process count (ZeRO-1/2 `resharded_state`, ZeRO-3
    `resharded_zero3_state`): the 2-process checkpoint of step 2 resumed by one process follows the
    2-process curve (measured: bit for bit at steps 3 and 4; the stated tolerance allows another
    reduction order) and writes a 1-process partition. Measured by hand with the CLI: 1 -> 2
    processes likewise, bit for bit under ZeRO-2 and ZeRO-3."""
    out, results = zero_runs
    run = tmp_path / "run"
    shutil.copytree(out / name, run, ignore=shutil.ignore_patterns(".cosmofm-run.lock"))
    reference = [r["loss"] for r in _rows(results[0]["rows"][name][0])]
    sets = [f"optim.max_steps={STEPS}", f"run.save_every={SAVE_AT}", "run.progress=false", "run.trackers=[]", "data.mock_cards=[sdss-like]",
            "data.mock_counts=[64]", "model.objectives=[masked]"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()), "-m", "cosmofm.cli",
           "pretrain", "--config", "tiny", *(a for kv in sets for a in ("--set", kv)), "--backend", name, "--resume-from", str(SAVE_AT),
           "--output", str(run)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    resumed = [r["loss"] for r in _rows((run / "metrics.jsonl").read_text())]
    assert len(resumed) == STEPS and resumed[:SAVE_AT] == reference[:SAVE_AT]
    np.testing.assert_allclose(resumed, reference, rtol=1e-6, atol=0)
    meta = json.loads((run / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json").read_text())["metadata"]
    assert meta["optimizer_partitions"]["world_size"] == 1
    assert sorted(p.name for p in (run / "checkpoints" / f"step_{STEPS:08d}" / "optimizer").iterdir()) == [
        f"{partition_name(0, 1)}.json", f"{partition_name(0, 1)}.safetensors"]


@pytest.mark.slow
def test_an_async_save_writes_the_synchronous_checkpoint(zero_runs):
    """With the backend's async_checkpoint each process's partition is copied at the save and
    written by a thread while training goes on; the files equal the synchronous run's bit for bit
    (and its resume continues exactly: test_a_resumed_zero_run_continues_exactly[zero2async])."""
    out, _ = zero_runs
    for step in (SAVE_AT, STEPS):
        sync, both = (out / run / "checkpoints" / f"step_{step:08d}" for run in ("zero2", "zero2async"))
        for rank in (0, 1):
            a, b = (load_file(d / "optimizer" / f"{partition_name(rank, 2)}.safetensors") for d in (sync, both))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (step, rank)
        a, b = (load_file(d / "model.safetensors") for d in (sync, both))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
    _no_pickles(out / "zero2async")


@pytest.mark.slow
def test_no_gloo_thread_survives_the_teardown_after_zero(zero_runs):
    """DeepSpeed's engine, ZeRO optimizers and ZeRO-3 parameters keep its groups alive after the
    run; close_process_group drops every reference, so both ranks exit with no gloo thread."""
    _, results = zero_runs
    for result in results:
        assert "gloo_tcp_loop" in result["before"] and "pt_gloo_runloop" in result["before"]
        assert result["after"] == []


# -- refusals before compute -------------------------------------------------------------------

def _checkpoint(tmp_path: Path, meta: dict, partitions: int = 0) -> Path:
    """A step folder with the given trainer metadata and `partitions` empty partition files."""
    step = save_checkpoint(tmp_path, 2, {"model": {}, "scheduler": {}, "rng": {}}, meta)
    for rank in range(partitions):
        for suffix in (".safetensors", ".json"):
            (step / "optimizer").mkdir(exist_ok=True)
            (step / "optimizer" / f"{partition_name(rank, 2)}{suffix}").write_text("{}")
    write_manifest(step)
    return step


ZERO2_META = {"backend": "zero2", "optimizer_saved": True, "global_batch": 8, "grad_accum": 1, "seed": 0,
              "optimizer_partitions": {"layout": LAYOUT, "stage": 2, "world_size": 2}}


def test_a_zero_checkpoint_resumes_only_under_its_own_stage(tmp_path):
    step = _checkpoint(tmp_path, ZERO2_META, partitions=2)
    meta = {**ZERO2_META, "step": 2}
    check_partitioned_resume(meta, step, load_backend("zero2"))  # the same stage: accepted (on any process count, re-cut)
    with pytest.raises(InputError, match="is ZeRO-3, but the checkpoint of step 2 holds ZeRO-2 partitions of 2 processes"):
        check_partitioned_resume(meta, step, load_backend("zero3"))
    with pytest.raises(InputError, match="fsdp2 cannot continue .* DeepSpeed's ZeRO-2 partitions") as other_backend:
        check_partitioned_resume(meta, step, load_backend("fsdp2"))
    assert "--backend zero2" in other_backend.value.fix
    (step / "optimizer" / f"{partition_name(1, 2)}.json").unlink()
    write_manifest(step)  # a manifest without rank 1's skeleton
    with pytest.raises(InputError, match="rank-00001-of-00002.json.*missing from manifest.json"):
        check_partitioned_resume(meta, step, load_backend("zero2"))


def test_deepspeed_refuses_a_torch_layout_checkpoint_before_reading_anything(tmp_path):
    """A DDP or FSDP2 checkpoint's optimizer (torch's layout) does not go into ZeRO: refused while
    the folder is claimed, before the metrics are truncated or a model built."""
    _checkpoint(tmp_path, {**{k: v for k, v in ZERO2_META.items() if k != "optimizer_partitions"}, "backend": "ddp"})
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    recipe = PretrainRecipe.load("tiny", [f"run.output_dir={tmp_path}"])
    with contextlib.ExitStack() as held, pytest.raises(InputError, match="zero2 .*cannot continue the checkpoint of step 2, written under ddp"):
        claim_run_folder(tmp_path, recipe, load_backend("zero2"), True, None, False, held, {})
    assert (tmp_path / "metrics.jsonl").read_text().count("step") == 3


def test_an_optimizer_offloaded_to_nvme_is_refused_when_the_backend_is_read(tmp_path):
    """Its state lives in DeepSpeed's swap files, which these checkpoints do not hold."""
    config = tmp_path / "zero3-nvme.yaml"
    config.write_text("kind: deepspeed\ndeepspeed:\n  zero_optimization:\n    stage: 3\n    offload_optimizer: {device: nvme, nvme_path: /tmp}\n")
    with pytest.raises(InputError) as refused:
        load_backend(str(config))
    assert refused.value.field.endswith("deepspeed.zero_optimization.offload_optimizer.device") and "cpu" in refused.value.fix
    config.write_text("kind: deepspeed\ndeepspeed:\n  zero_optimization:\n    stage: 3\n    offload_optimizer: {device: cpu}\n")
    assert load_backend(str(config)).deepspeed["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
