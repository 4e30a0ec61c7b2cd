"""DeepSpeed ZeRO's optimizer partitions as safetensors + JSON: resumable without pickle.

DeepSpeed writes a ZeRO optimizer's state only with torch.save (`*_optim_states.pt`, a
pickle; loading one runs arbitrary code, pretrain/checkpoint.py says why we never do). The
state itself is plain: the ZeRO optimizer's `state_dict()` is this process's fp32 master
partition (ZeRO-1/2 `single_partition_of_fp32_groups`, ZeRO-3 `fp32_flat_groups`), the base
optimizer's state over those flat partitions (torch AdamW's exp_avg, exp_avg_sq and step),
the loss scaler, the clipping and padding figures, and DeepSpeed's version. So each process
writes its own partition through the nested-state encoding every checkpoint uses
(pretrain/state_tree.py: tensors in ``optimizer/rank-RRRRR-of-WWWWW.safetensors``, the rest in
the ``.json`` beside it), into the hidden folder of a sharded save; the main process adds the
gathered model, scheduler and RNG states and the manifest (a sha256 per partition file) and
renames the folder into place (`checkpoint_sharded.publish_sharded_checkpoint`).

Two entries are not data: the loss scaler is an object (its plain attributes are stored, and
set on a copy of the resuming optimizer's own scaler, built from the same config), and
`param_slice_mappings` (where each parameter sits in the flat partition, rebuilt by
DeepSpeed when the engine forms; only its universal checkpoints read it) is left out.

Resume loads each process's file into its ZeRO optimizer with DeepSpeed's own
`load_state_dict` (`load_from_fp32_weights`, as `engine.load_checkpoint` does), at the same
world size and stage only: a partition is a slice of flat buffers whose bounds depend on the
process count, and DeepSpeed itself refuses a new data-parallel size for these checkpoints.
`check_partitioned_resume` refuses any other combination before compute is spent; the
checkpoint's model.safetensors is whole and loads at any size.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.pretrain.checkpoint_folders import read_state, write_state
from cosmofm.pretrain.manifest import CORRUPT_FIX, MANIFEST_NAME, read_json
from cosmofm.pretrain.state_tree import flatten_state, skeleton_tensors

PARTITIONS_DIR = "optimizer"  # the folder of the partition files in a step folder
PARTITION_FORMAT = "cosmofm-zero-partition-1"
LAYOUT = "deepspeed-zero"  # the metadata's optimizer_partitions.layout
_SCALER_KEY, _SLICES_KEY = "loss_scaler", "param_slice_mappings"  # deepspeed.checkpoint.constants
_ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


def partition_name(rank: int, world_size: int) -> str:
    """The file stem of one process's partition: `rank-00001-of-00002`."""
    return f"rank-{rank:05d}-of-{world_size:05d}"


def _zero(engine):
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None or not hasattr(optimizer, "load_state_dict") or not hasattr(engine, "zero_optimization_stage"):
        raise ValueError("not a DeepSpeed engine with a ZeRO optimizer (call after accelerator.prepare)")
    return optimizer


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def partitions_metadata(engine) -> dict:
    """What the trainer metadata records of a partitioned optimizer: layout, ZeRO stage, world size."""
    _, world = _world()
    return {"layout": LAYOUT, "stage": int(engine.zero_optimization_stage()), "world_size": world,
            "files": f"{PARTITIONS_DIR}/rank-*-of-{world:05d}.{{safetensors,json}}"}


def _plain(obj) -> dict:
    """An object's attributes that JSON holds (a loss scaler's scale, counters, window)."""
    return {k: v for k, v in vars(obj).items() if v is None or isinstance(v, (bool, int, float, str))}


def partition_state(engine) -> dict:
    """This process's part of the ZeRO optimizer and the engine's step counters, encodable by
    `state_tree.flatten_state` (no objects, no pickle)."""
    optimizer = _zero(engine)
    if engine.zero_nvme_offload_optimizer():  # the state then lives in swap files, which DeepSpeed copies beside its pickles
        raise InputError("deepspeed.zero_optimization.offload_optimizer", "is on NVMe, whose swapped optimizer state these "
                         "checkpoints do not hold", "offload the optimizer to the CPU (device: cpu) or not at all")
    if hasattr(optimizer, "checkpoint_event_prologue"):  # ZeRO-3: every parameter partitioned, as DeepSpeed saves
        optimizer.checkpoint_event_prologue()
    try:
        state = dict(optimizer.state_dict())
    finally:
        if hasattr(optimizer, "checkpoint_event_epilogue"):
            optimizer.checkpoint_event_epilogue()
    state[_SCALER_KEY] = _plain(state[_SCALER_KEY])
    state.pop(_SLICES_KEY, None)
    rank, world = _world()
    return {"format": PARTITION_FORMAT, "stage": int(engine.zero_optimization_stage()), "rank": rank, "world_size": world,
            "engine": {k: int(getattr(engine, k)) for k in _ENGINE_COUNTERS}, "optimizer": state}


def write_partition(tmp: str | os.PathLike, engine) -> Path:
    """On every process: its partition into `tmp/optimizer/rank-R-of-W.{safetensors,json}` (the
    hidden folder of a sharded save, which the main process then publishes with a manifest)."""
    rank, world = _world()
    folder = Path(tmp) / PARTITIONS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_state(folder, partition_name(rank, world), partition_state(engine))
    return folder / f"{partition_name(rank, world)}.safetensors"


def check_partitioned_resume(meta: dict, step_dir: str | os.PathLike, backend, world_size: int) -> None:
    """Before any compute: the checkpoint's optimizer layout against the backend and world size
    of this launch. A DeepSpeed checkpoint resumes under the same ZeRO stage on as many
    processes, with every partition file in its manifest; torch's layout (DDP, FSDP2) does
    not go into ZeRO, nor ZeRO's partitions into torch's optimizer."""
    parts, step = meta.get("optimizer_partitions"), meta.get("step")
    deepspeed = backend.kind == "deepspeed"
    if parts is None:
        if deepspeed:
            raise InputError("--backend", f"{backend.name} (DeepSpeed ZeRO) cannot continue the checkpoint of step {step}, written under "
                             f"{meta.get('backend')}: its optimizer state is in torch's layout, not ZeRO's partitions",
                             f"resume with --backend {meta.get('backend')}, or start again with --overwrite")
        return
    if not isinstance(parts, dict) or parts.get("layout") != LAYOUT:
        raise InputError(f"{step_dir}/trainer_state.json: optimizer_partitions", f"is not a {LAYOUT} layout ({parts!r})", CORRUPT_FIX)
    saved = f"ZeRO-{parts.get('stage')} partitions of {parts.get('world_size')} processes"
    if not deepspeed:
        raise InputError("--backend", f"{backend.name} cannot continue the checkpoint of step {step}: its optimizer state is "
                         f"DeepSpeed's {saved}", f"resume with --backend {meta.get('backend')} on {parts.get('world_size')} processes, "
                         "or start again with --overwrite")
    stage = (backend.deepspeed.get("zero_optimization") or {}).get("stage")
    if stage != parts.get("stage"):
        raise InputError("--backend", f"is ZeRO-{stage}, but the checkpoint of step {step} holds {saved}",
                         f"resume with --backend {meta.get('backend')} (ZeRO-{parts.get('stage')})")
    if world_size != parts.get("world_size"):
        raise InputError("world size", f"this launch has {world_size} processes, but the checkpoint of step {step} holds {saved}: "
                         "a partition is a slice of ZeRO's flat buffers whose bounds depend on the process count, so it cannot be re-split",
                         f"launch {parts.get('world_size')} processes to resume; to go on with {world_size}, start again with "
                         "--overwrite (the checkpoint's model.safetensors is whole and loads at any size; the optimizer starts afresh)")
    files = read_json(Path(step_dir) / MANIFEST_NAME, "manifest")["files"]  # verified by the caller's load
    for rank in range(world_size):
        for suffix in (".safetensors", ".json"):
            rel = f"{PARTITIONS_DIR}/{partition_name(rank, world_size)}{suffix}"
            if rel not in files:
                raise InputError(str(Path(step_dir) / rel), "is missing from manifest.json (a partition of the optimizer)", CORRUPT_FIX)


def widened_model_state(saved: dict, now: dict, meta: dict) -> dict:
    """A DeepSpeed checkpoint's gathered model with each floating tensor in the dtype of the model
    built now: a bf16 (fp16) ZeRO run holds, and so saves, its weights in bf16; the resumed engine
    casts the fp32 model back to bf16, which gives the saved values exactly, and the fp32 master
    weights come from the partitions. Other checkpoints, and other tensors, are left as they are
    (`check_model_state` then compares them)."""
    if "optimizer_partitions" not in meta:
        return saved
    return {k: v.to(now[k].dtype) if k in now and v.is_floating_point() and now[k].is_floating_point() else v for k, v in saved.items()}


def read_partition(step_dir: str | os.PathLike, rank: int, world_size: int) -> dict:
    """One process's saved partition (CPU tensors), as `partition_state` returned it."""
    stem = Path(step_dir) / PARTITIONS_DIR / partition_name(rank, world_size)
    if not stem.with_suffix(".safetensors").is_file():
        raise InputError(str(stem.with_suffix(".safetensors")), "is missing (a partition of the optimizer)", CORRUPT_FIX)
    state = read_state(stem.parent, stem.name, "skeleton of an optimizer partition")
    if not isinstance(state, dict) or state.get("format") != PARTITION_FORMAT:
        raise InputError(str(stem.with_suffix(".json")), f"is not a {PARTITION_FORMAT} partition", CORRUPT_FIX)
    return state


def load_partition(step_dir: str | os.PathLike, engine) -> None:
    """On every process, after accelerator.prepare: its partition back into the engine's ZeRO
    optimizer (and the engine's step counters). The saved fp32 partitions must have the shapes
    of this model's (another model, or other padding, is an InputError naming the tensor)."""
    optimizer = _zero(engine)
    rank, world = _world()
    saved = read_partition(step_dir, rank, world)
    where = f"{step_dir}/{PARTITIONS_DIR}/{partition_name(rank, world)}.json"
    if saved.get("rank") != rank or saved.get("world_size") != world or saved.get("stage") != int(engine.zero_optimization_stage()):
        raise InputError(where, f"is the ZeRO-{saved.get('stage')} partition of rank {saved.get('rank')} of {saved.get('world_size')}, "
                         f"not of rank {rank} of {world} under ZeRO-{engine.zero_optimization_stage()}", CORRUPT_FIX)
    state = saved["optimizer"]
    # the tensors a fresh optimizer has (its fp32 partitions; Adam's moments come at the first step)
    now, _ = flatten_state({k: v for k, v in optimizer.state_dict().items() if k not in (_SCALER_KEY, _SLICES_KEY)})
    _, skeleton = flatten_state({k: v for k, v in state.items() if k != _SCALER_KEY})
    have = skeleton_tensors(skeleton)
    for name, tensor in now.items():
        dtype, shape = have.get(name, (None, None))
        if dtype != str(tensor.dtype).removeprefix("torch.") or list(shape) != list(tensor.shape):
            raise InputError(f"{where}: {name}", f"is {dtype}{shape} in the checkpoint but "
                             f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)} in this model's optimizer",
                             "resume with the model and recipe the run was saved with (recipe.yaml in the run folder)")
    scaler = copy.copy(optimizer.loss_scaler)  # of the same config; its saved scale, counters and window set on it
    for key, value in state[_SCALER_KEY].items():
        setattr(scaler, key, value)
    state[_SCALER_KEY] = scaler
    states = [None] * world
    states[torch.distributed.get_rank(group=optimizer.dp_process_group) if world > 1 else 0] = state
    if hasattr(optimizer, "checkpoint_event_prologue"):
        optimizer.checkpoint_event_prologue()
    optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
    if hasattr(optimizer, "checkpoint_event_epilogue"):
        optimizer.checkpoint_event_epilogue()
    for key, value in saved["engine"].items():
        setattr(engine, key, value)
