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
`load_state_dict` (`load_from_fp32_weights`, as `engine.load_checkpoint` does), under the same
stage. On another process count, ZeRO-1 and ZeRO-2 partitions are re-cut (`resharded_state`):
a group's partitions, in rank order and without the last one's padding, are the group's flat
buffer, which DeepSpeed's own `flatten_dense_tensors_aligned` pads for the new count and its
`get_data_parallel_partitions` splits, as its elastic loader does with its pickles. ZeRO-3
partitions each parameter on its own (`resharded_zero3_state`): a process's flat group is
each of its parameters' partitions in turn, ceil(numel / world) elements, the last rank's
padded; DeepSpeed re-splits them only through its pickle-based universal checkpoints, so the
pieces are joined per parameter here and cut again for the new count, in the order of this
launch's groups. `check_partitioned_resume` refuses any other combination before compute is
spent; the checkpoint's model.safetensors is whole and loads at any size.
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
_FP32_KEY, _BASE_KEY, _PADDING_KEY, _COUNT_KEY = "single_partition_of_fp32_groups", "base_optimizer_state", "group_paddings", "partition_count"
_FP32_Z3_KEY, _BASE_Z3_KEY = "fp32_flat_groups", "optimizer_state_dict"  # ZeRO-3's names of the same two entries
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


def write_partition(tmp: str | os.PathLike, state: dict) -> Path:
    """On every process: its partition (`partition_state`) into
    `tmp/optimizer/rank-R-of-W.{safetensors,json}` (the hidden folder of a sharded save, which
    the main process then publishes with a manifest). Touches no engine, so a thread may write
    a copy taken at the save while training goes on."""
    folder = Path(tmp) / PARTITIONS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    name = partition_name(state["rank"], state["world_size"])
    write_state(folder, name, state)
    return folder / f"{name}.safetensors"


def check_partitioned_resume(meta: dict, step_dir: str | os.PathLike, backend) -> None:
    """Before any compute: the checkpoint's optimizer layout against the backend of this launch.
    A DeepSpeed checkpoint resumes under the same ZeRO stage on any process count (its
    partitions re-cut), with every partition file in its manifest; torch's layout (DDP, FSDP2)
    does not go into ZeRO, nor ZeRO's partitions into torch's optimizer."""
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
                         f"DeepSpeed's {saved}", f"resume with --backend {meta.get('backend')}, or start again with --overwrite")
    stage = (backend.deepspeed.get("zero_optimization") or {}).get("stage")
    if stage != parts.get("stage"):
        raise InputError("--backend", f"is ZeRO-{stage}, but the checkpoint of step {step} holds {saved}",
                         f"resume with --backend {meta.get('backend')} (ZeRO-{parts.get('stage')})")
    files = read_json(Path(step_dir) / MANIFEST_NAME, "manifest")["files"]  # verified by the caller's load
    for rank in range(int(parts.get("world_size"))):
        for suffix in (".safetensors", ".json"):
            rel = f"{PARTITIONS_DIR}/{partition_name(rank, int(parts.get('world_size')))}{suffix}"
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


def _recut(optimizer, pieces: list[torch.Tensor], group: int) -> torch.Tensor:
    """This process's partition of parameter group `group`, from the group's flat buffer given
    as the saved partitions' lean `pieces` in rank order: DeepSpeed's own alignment and split."""
    dp_group = optimizer.real_dp_process_group[group]
    world, rank = torch.distributed.get_world_size(group=dp_group), torch.distributed.get_rank(group=dp_group)
    flat = optimizer.flatten_dense_tensors_aligned([p.reshape(-1) for p in pieces], optimizer.nccl_start_alignment_factor * world)
    return optimizer.get_data_parallel_partitions(flat, group)[rank].clone()


def resharded_state(saved: list[dict], optimizer) -> dict:
    """ZeRO-1/2: the optimizer states of every saved process (rank order, as `partition_state`
    wrote them) re-cut into this process's partition of this launch's optimizer. The fp32
    partitions are saved without padding; the moments are cut to the saved partition's
    length less its padding (the last rank's). Step counts and other scalars are the same on
    every rank and are kept."""
    if getattr(optimizer, "round_robin_gradients", False):
        raise InputError("deepspeed.zero_optimization.round_robin_gradients", "orders each group's parameters by the process count, "
                         "so a partition cannot be re-cut for another count", "resume on the saved process count, or set it to false")
    first = saved[0]
    base = first[_BASE_KEY]
    fp32 = [_recut(optimizer, [s[_FP32_KEY][g] for s in saved], g) for g in range(len(first[_FP32_KEY]))]
    state = {**first, _FP32_KEY: [t[: t.numel() - pad] for t, pad in zip(fp32, optimizer.groups_padding)]}  # lean, as state_dict() gives
    moments = {}
    for g, param_group in enumerate(base["param_groups"]):
        (param_id,) = param_group["params"]  # ZeRO-1/2: one flat fp32 partition per group
        lean = [{k: v[: v.numel() - s[_PADDING_KEY][g]] for k, v in s[_BASE_KEY]["state"][param_id].items() if torch.is_tensor(v) and v.dim()}
                for s in saved]
        moments[param_id] = {k: _recut(optimizer, [piece[k] for piece in lean], g) if k in lean[0] else v
                             for k, v in base["state"][param_id].items()}
    state[_BASE_KEY] = {**base, "state": moments}
    state[_PADDING_KEY], state[_COUNT_KEY] = list(optimizer.groups_padding), list(optimizer.partition_count)
    return state


def _param_pieces(flats: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
    """One process's ZeRO-3 flat groups (in order) as the partition of each parameter, in order."""
    joined = torch.cat([f.reshape(-1) for f in flats])
    if joined.numel() != sum(sizes):
        raise InputError("optimizer partitions", f"hold {joined.numel()} elements per process, but this model's parameters "
                         f"cut for that process count need {sum(sizes)}", "resume with the model and recipe the run was saved with")
    return list(torch.split(joined, sizes))


def _recut_zero3(optimizer, saved_flats: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """This process's flat groups of this launch's ZeRO-3 optimizer from every saved process's
    flat groups (rank order): each parameter's pieces joined, cut to its numel, padded to a
    multiple of this launch's count and split as DeepSpeed's `_partition_param` does."""
    numels = [[int(p.ds_numel) for p in group] for group in optimizer.fp16_groups]
    old_world, world, rank = len(saved_flats), torch.distributed.get_world_size(), torch.distributed.get_rank()
    old_sizes = [-(-n // old_world) for group in numels for n in group]
    pieces = [_param_pieces(flats, old_sizes) for flats in saved_flats]  # [saved rank][parameter]
    whole = iter(torch.cat([ranks[i] for ranks in pieces]) for i in range(len(old_sizes)))
    groups = []
    for group in numels:
        parts = []
        for n in group:
            size = -(-n // world)
            full = torch.zeros(size * world, dtype=pieces[0][0].dtype)
            full[:n] = next(whole)[:n]
            parts.append(full[rank * size:(rank + 1) * size])
        groups.append(torch.cat(parts))
    return groups


def resharded_zero3_state(saved: list[dict], optimizer) -> dict:
    """ZeRO-3: every saved process's optimizer state (rank order) re-cut into this process's flat
    groups (`_recut_zero3`), the fp32 master weights and Adam's moments alike; the step counts
    and hyperparameters, equal on every rank, are the first process's."""
    if any(count != torch.distributed.get_world_size() for count in optimizer.sub_group_partition_counts):
        raise InputError("deepspeed.zero_optimization", "partitions parameters over a sub-group of the processes (ZeRO++ hpZ or "
                         "MiCS), whose checkpoints do not re-split", "resume on the saved process count")
    first, groups = saved[0], len(optimizer.fp16_groups)
    if len(first[_FP32_Z3_KEY]) != groups:
        raise InputError("deepspeed.zero_optimization.sub_group_size", f"cuts this model into {groups} sub-groups on this "
                         f"process count, but the checkpoint holds {len(first[_FP32_Z3_KEY])}", "resume on the saved process count, "
                         "or raise sub_group_size above the model's parameter count")
    base = first[_BASE_Z3_KEY]
    state = {**first, _FP32_Z3_KEY: _recut_zero3(optimizer, [s[_FP32_Z3_KEY] for s in saved]), _COUNT_KEY: optimizer.partition_count}
    ids = [param_id for group in base["param_groups"] for param_id in group["params"]]  # one flat fp32 group each
    if not all(i in base["state"] for i in ids):  # saved before the first step: no moments yet
        return state
    moments = [k for k, v in base["state"][ids[0]].items() if torch.is_tensor(v) and v.dim()]
    recut = {k: _recut_zero3(optimizer, [[s[_BASE_Z3_KEY]["state"][i][k] for i in ids] for s in saved]) for k in moments}
    state[_BASE_Z3_KEY] = {**base, "state": {i: {**base["state"][i], **{k: recut[k][g] for k in moments}} for g, i in enumerate(ids)}}
    return state


def load_partition(step_dir: str | os.PathLike, engine, saved_world: int | None = None) -> None:
    """On every process, after accelerator.prepare: its partition back into the engine's ZeRO
    optimizer (and the engine's step counters). `saved_world`: the process count the checkpoint
    was written by (default: this launch's); on another count, ZeRO-1/2 partitions are re-cut
    (`resharded_state`). The fp32 partitions must then have the shapes of this model's
    (another model, or other padding, is an InputError naming the tensor)."""
    optimizer = _zero(engine)
    rank, world = _world()
    saved_world = world if saved_world is None else int(saved_world)
    stage = int(engine.zero_optimization_stage())
    ranks = [rank] if saved_world == world else range(saved_world)
    parts = [read_partition(step_dir, r, saved_world) for r in ranks]
    for r, saved in zip(ranks, parts):
        where = f"{step_dir}/{PARTITIONS_DIR}/{partition_name(r, saved_world)}.json"
        if saved.get("rank") != r or saved.get("world_size") != saved_world or saved.get("stage") != stage:
            raise InputError(where, f"is the ZeRO-{saved.get('stage')} partition of rank {saved.get('rank')} of {saved.get('world_size')}, "
                             f"not of rank {r} of {saved_world} under ZeRO-{stage}", CORRUPT_FIX)
    saved = parts[0]  # this process's own, or (re-cut) the first: the engine counters agree on every rank
    reshard = resharded_zero3_state if stage == 3 else resharded_state
    state = saved["optimizer"] if saved_world == world else reshard([p["optimizer"] for p in parts], optimizer)
    where = f"{step_dir}/{PARTITIONS_DIR}/{partition_name(saved['rank'], saved_world)}.json"
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
