"""DeepSpeed ZeRO checkpoints without pickle (pretrain/checkpoint_deepspeed.py): each process's
optimizer partition as safetensors + JSON, an exact resume at the same world size, ZeRO-2
and ZeRO-3 partitions re-cut for another, clear refusals of every other resume before compute, and a
teardown that leaves no gloo thread; ZeRO-1/2/3's loss curves against DDP's (fp32 and bf16)."""

import contextlib
import json
from importlib import resources
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from launch import launch_runs  # tests/launch.py
from test_backends import _no_pickles

from cosmofm.cli import main
from cosmofm.data_cards import InputError
from cosmofm.pretrain.backend import load_backend
from cosmofm.pretrain.checkpoint import save_checkpoint, write_manifest
from cosmofm.pretrain.checkpoint_deepspeed import LAYOUT, check_partitioned_resume, partition_name
from cosmofm.pretrain.recipe import PretrainRecipe
from cosmofm.pretrain.run_folder import claim_run_folder

RUNS = ("zero1", "zero2", "zero3", "zero3-bf16", "zero2async")  # backend[-mixed precision]; zero2async: zero2 + async_checkpoint
STEPS, SAVE_AT = 4, 2

# ZeRO reduces gradients in arrival order and needs every process to use the same parameters:
# a one-modality corpus (see check_modalities)
SPECTRA_ONLY = ["data.mock_cards=[sdss-like]", "data.mock_counts=[64]", "model.objectives=[masked]"]
DDP_RUNS = ("ddp", "ddp-bf16")  # the references ZeRO's curves are compared with
RTOL = 1e-5  # ZeRO's losses vs DDP's; measured over 5 steps: ZeRO-1, ZeRO-2 and ZeRO-3 bit-equal to DDP
WEIGHTS = dict(rtol=1e-4, atol=1e-6)  # final weights vs DDP's
BF16_RTOL = 1e-3  # ZeRO-3 bf16 vs bf16 DDP; measured over 5 steps: 7e-5 (bf16 weights vs autocast over fp32)
UNUSED_DECAY = STEPS * 3e-3 * 0.05  # tiny's lr * weight decay per step: see test_deepspeed_zero_loss_curve_equals_ddp


def _sets(name: str) -> list[str]:
    precision = name.partition("-")[2]
    return [f"optim.max_steps={STEPS}", f"run.save_every={SAVE_AT}", *SPECTRA_ONLY, *([f"run.mixed_precision={precision}"] if precision else [])]


def _rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """One launch of 2 CPU processes (gloo): for each run (RUNS, then DDP_RUNS) a 4-step run saving at
    step 2 and the end, then the same run resumed from step 2 (DeepSpeed's start-up is paid once);
    then the CLI's teardown. (output folder, each rank's result.)"""
    out = tmp_path_factory.mktemp("zero")
    shipped = resources.files("cosmofm.pretrain") / "backends" / "zero2.yaml"
    (out / "zero2async.yaml").write_text(shipped.read_text() + "async_checkpoint: true\n")
    backend = lambda name: str(out / "zero2async.yaml") if name == "zero2async" else name.partition("-")[0]
    return out, launch_runs(out, [{"name": name, "backend": backend(name), "sets": _sets(name), "resume_from": SAVE_AT}
                                  for name in RUNS + DDP_RUNS])  # DDP after DeepSpeed: train.new_accelerator resets its mark


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


@pytest.fixture(scope="module")
def one_process(zero_runs, tmp_path_factory):
    """One launch of 1 process: the ZeRO-2 and ZeRO-3 runs of 2 processes (copies) resumed from step 2."""
    out, _ = zero_runs
    here = tmp_path_factory.mktemp("zero-one")
    for name in RESHARDED:
        shutil.copytree(out / name, here / name, ignore=shutil.ignore_patterns(".cosmofm-run.lock"))
    launch_runs(here, [{"name": name, "backend": name, "sets": _sets(name), "resume_from": SAVE_AT, "fresh": False} for name in RESHARDED],
                num_processes=1)
    return here


RESHARDED = ("zero2", "zero3")


@pytest.mark.slow
@pytest.mark.parametrize("name", RESHARDED)
def test_partitions_of_two_processes_resume_on_one(zero_runs, one_process, name):
    """ZeRO partitions are re-cut for another process count (ZeRO-1/2 `resharded_state`, ZeRO-3
    `resharded_zero3_state`): the 2-process checkpoint of step 2 resumed by one process follows the
    2-process curve (measured: bit for bit at steps 3 and 4; the stated tolerance allows another
    reduction order) and writes a 1-process partition. Measured by hand with the CLI: 1 -> 2
    processes likewise, bit for bit under ZeRO-2 and ZeRO-3."""
    _, results = zero_runs
    run = one_process / name
    reference = [r["loss"] for r in _rows(results[0]["rows"][name][0])]
    resumed = [r["loss"] for r in _rows((run / "metrics.jsonl").read_text())]
    assert len(resumed) == STEPS and resumed[:SAVE_AT] == reference[:SAVE_AT]
    np.testing.assert_allclose(resumed, reference, rtol=1e-6, atol=0)
    meta = json.loads((run / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json").read_text())["metadata"]
    assert meta["optimizer_partitions"]["world_size"] == 1
    assert sorted(p.name for p in (run / "checkpoints" / f"step_{STEPS:08d}" / "optimizer").iterdir()) == [
        f"{partition_name(0, 1)}.json", f"{partition_name(0, 1)}.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_loss_curve_equals_ddp(zero_runs, stage, tmp_path, capsys):
    out, results = zero_runs
    run, ddp = out / f"zero{stage}", out / "ddp"
    losses = lambda name: [r["loss"] for r in _rows(results[0]["rows"][name][0])]  # the first run, before its resume
    np.testing.assert_allclose(losses(f"zero{stage}"), losses("ddp"), rtol=RTOL)
    a, b = load_file(run / "model" / "model.safetensors"), load_file(ddp / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        # ZeRO steps the parameters no process used (the image, cube and field tokenizers of a
        # spectra-only corpus) as if their gradient were zero, so weight decay shrinks them by
        # lr * wd a step; torch's AdamW under DDP skips them. Measured: 3.7e-4 relative after 5 steps.
        unused = any(f"tokenizers.{m}." in k for m in ("image", "cube", "field"))
        torch.testing.assert_close(a[k], b[k], **(dict(rtol=1.1 * UNUSED_DECAY, atol=0) if unused else WEIGHTS))
    # the release (DeepSpeed's 16-bit state gathered in memory, written by us as safetensors) loads
    # with AutoModel bit for bit equal to the checkpoint's model
    from transformers import AutoModel

    ckpt = load_file(run / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")
    released = AutoModel.from_pretrained(run / "model").state_dict()
    assert released and all(torch.equal(v, ckpt[f"cosmofm.{k}"]) for k, v in released.items())
    # its checkpoint holds ZeRO's optimizer partitions, which DDP's optimizer cannot take: resuming under DDP is refused
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".cosmofm-run.lock"))
    spectra = [a for kv in SPECTRA_ONLY for a in ("--set", kv)]
    assert main(["pretrain", "--config", "tiny", "--backend", "ddp", *spectra, "--output", str(copy), "--resume"]) == 2
    assert f"its optimizer state is DeepSpeed's ZeRO-{stage} partitions of 2 processes" in capsys.readouterr().err


@pytest.mark.slow
def test_bf16_under_zero3_follows_bf16_ddp(zero_runs):
    """ZeRO-3 under bf16 (DeepSpeed's bf16 weights and fp32 master copy, with torch's autocast)
    against DDP under the same autocast."""
    out, results = zero_runs
    losses = lambda name: [r["loss"] for r in _rows(results[0]["rows"][name][0])]
    np.testing.assert_allclose(losses("zero3-bf16"), losses("ddp-bf16"), rtol=BF16_RTOL)
    assert losses("ddp-bf16") != losses("ddp")  # autocast did run (on spectra alone it moves the first loss by ~7e-6)
    assert yaml.safe_load((out / "zero3-bf16" / "backend.yaml").read_text())["mixed_precision"] == "bf16"


@pytest.mark.slow
def test_an_async_save_writes_the_synchronous_checkpoint(zero_runs):
    """With the backend's async_checkpoint each process's partition is copied at the save and
    written by a thread while training goes on. The first save equals the synchronous run's bit
    for bit (the runs are the same up to there); so does its resume
    (test_a_resumed_zero_run_continues_exactly[zero2async]). After it the two runs' weights may
    part by float round-off while the writer thread works (seen under load: 1e-9 at step 4, same
    losses), so the last save is checked against its own run's final weights bit for bit and
    against the synchronous run's partitions to round-off; a partition left at step 2 would
    differ from them by far more."""
    out, _ = zero_runs
    checkpoint = lambda run, step: out / run / "checkpoints" / f"step_{step:08d}"  # noqa: E731
    for step, same in ((SAVE_AT, torch.equal), (STEPS, _equal_to_round_off)):
        for rank in (0, 1):
            a, b = (load_file(checkpoint(run, step) / "optimizer" / f"{partition_name(rank, 2)}.safetensors") for run in ("zero2", "zero2async"))
            assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a), (step, rank)
    a, b = (load_file(checkpoint(run, SAVE_AT) / "model.safetensors") for run in ("zero2", "zero2async"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = load_file(out / "zero2async" / "model" / "model.safetensors")  # the backbone, without the "cosmofm." prefix
    last = load_file(checkpoint("zero2async", STEPS) / "model.safetensors")
    backbone = {k.removeprefix("cosmofm."): v for k, v in last.items() if k.startswith("cosmofm.")}
    assert backbone.keys() == final.keys() and all(torch.equal(backbone[k], final[k]) for k in final)
    for rank in (0, 1):  # the last save moved on from the first
        a, b = (load_file(checkpoint("zero2async", step) / "optimizer" / f"{partition_name(rank, 2)}.safetensors") for step in (SAVE_AT, STEPS))
        assert not all(_equal_to_round_off(a[k], b[k]) for k in a), rank
    _no_pickles(out / "zero2async")


def _equal_to_round_off(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to 1e-6 of the tensor's largest value (round-off of a few float32 steps; a
    weight near zero can differ in sign); integers exactly."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    return a.shape == b.shape and bool((a - b).abs().max() <= 1e-6 * b.abs().max())


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
