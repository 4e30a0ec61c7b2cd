"""Parallel backends, applied to the model from outside: DDP, FSDP2, DeepSpeed ZeRO 1-3.

The model code stays single-device (DESIGN.md section 7). A backend is a YAML file
(the shipped ones in pretrain/backends/, package data read through importlib.resources
like the recipes), chosen by `run.backend` in the recipe or `cosmofm pretrain --backend`:

- ddp: DistributedDataParallel through Accelerate (the default; one process without a
  launcher trains the plain model).
- fsdp2: `torch.distributed.fsdp.fully_shard` on each transformer block, then on the
  whole model: parameters, gradients and optimizer state sharded over the processes.
  Applied here rather than through Accelerate's FSDP plugin, because Accelerate (1.15)
  enables its FSDP path only for GPU-type process groups: with `Accelerator(cpu=True)`
  on gloo it ignores `fsdp_plugin` and wraps the model in DDP, silently. `fully_shard`
  itself runs on gloo and NCCL alike, so one path serves these CPU tests and a cluster.
- deepspeed (zero1, zero2, zero3): DeepSpeed through Accelerate's DeepSpeedPlugin, from
  the DeepSpeed config in the file, whose `auto` entries are filled from the recipe. On
  a machine without CUDA, DeepSpeed's CPU accelerator runs ZeRO over gloo, provided the
  Accelerator is built with cpu=False and an explicit gloo process group (with cpu=True
  Accelerate drops the plugin; without the explicit backend every process trains alone).

Order of application (torchtitan's): weights loaded -> activation checkpointing ->
sharding -> optimizer built over the (sharded) parameters -> optimizer state loaded.

Parameters a batch does not use (the tokenizer of a modality absent from it) are where
backends differ. DDP (find_unused_parameters) and FSDP2 (zeros reduce-scattered, then
`drop_unused_gradients`) give what one process gives: a gradient over the processes that
used it, None where none did. DeepSpeed ZeRO reduces gradients in arrival order and needs
every process to produce the same ones, so it is refused for a corpus that mixes
modalities (`check_modalities`); and it steps parameters no process used as if their
gradient were zero (weight decay shrinks them), where torch's AdamW skips them.

Checkpoints keep checkpoint.py's format (safetensors + JSON, a manifest of sha256 sums, no
pickle). DDP: the whole state, written by rank 0. FSDP2: every process writes its shards
of the model and optimizer through torch.distributed.checkpoint (`sharded_states`), keyed
by parameter name as torch.optim keys them, so a DDP checkpoint resumes under FSDP2 and
back, on another process count too. DeepSpeed: the model gathered onto rank 0 (ZeRO-3: a
collective) and every process's ZeRO optimizer partition in DeepSpeed's own flat layout
(pretrain/checkpoint_deepspeed.py; DeepSpeed's own save would pickle it), which resumes
exactly under the same stage on as many processes; any other resume of it is refused
before compute, as is a DDP / FSDP2 checkpoint resumed under DeepSpeed.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from cosmofm.data_cards.errors import InputError

KINDS = ("ddp", "fsdp2", "deepspeed")
AC_PREFIX = "_checkpoint_wrapped_module."  # what checkpoint_wrapper adds to parameter names
_FSDP_KEYS = {"reshard_after_forward"}
_COMPILE_KEYS = {"backend", "mode", "dynamic", "fullgraph"}  # torch.compile's own arguments
SHARDED_KINDS = ("fsdp2",)  # checkpoints written one file per process (torch.distributed.checkpoint)


@dataclass
class BackendConfig:
    """How the training loop distributes one model.

    kind: "ddp", "fsdp2" or "deepspeed".
    mixed_precision: None (the recipe's run.mixed_precision), "no", "bf16" or "fp16" (CUDA).
    activation_checkpointing: recompute each transformer block's activations in the
        backward pass (torch's checkpoint_wrapper): memory traded for about a third more compute.
    torch_compile: false, true (torch.compile's defaults: inductor) or a mapping of
        torch.compile's arguments (backend, mode, dynamic, fullgraph): each transformer block
        compiled on its own, after activation checkpointing and before FSDP2 sharding, as
        torchtitan does; tokenizers and heads stay eager.
    fsdp: fully_shard options (reshard_after_forward: bool, default true).
    async_checkpoint: FSDP2 and DeepSpeed: write checkpoints from a thread while training goes
        on (the state is copied to memory at the save; FSDP2 through
        torch.distributed.checkpoint.async_save, DeepSpeed's partitions by our writer).
    deepspeed: a DeepSpeed config; "auto" entries are filled from the recipe (`resolve`).
    name: the shipped name or path it was read from.
    """

    kind: str = "ddp"
    mixed_precision: str | None = None
    activation_checkpointing: bool = False
    torch_compile: bool | dict = False
    async_checkpoint: bool = False
    fsdp: dict = field(default_factory=dict)
    deepspeed: dict = field(default_factory=dict)
    name: str = "ddp"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _shipped():
    return resources.files(__package__) / "backends"


def backend_names() -> list[str]:
    """Names of the backends shipped with the package."""
    return sorted(q.name.removesuffix(".yaml") for q in _shipped().iterdir() if q.name.endswith(".yaml"))


def load_backend(name: str, where: str = "recipe.run.backend") -> BackendConfig:
    """A backend by shipped name (`fsdp2`) or YAML path, checked; `where` names the setting in errors."""
    from cosmofm.pretrain.recipe import _yaml

    p = Path(name)
    if not p.suffix:
        p = _shipped() / f"{name}.yaml"
    if not p.is_file():
        raise InputError(where, f"no backend {name!r}", f"use one of {backend_names()} or the path of a backend YAML")
    raw = _yaml(p.read_text(), str(p), "fix the YAML syntax") or {}
    if not isinstance(raw, dict):
        raise InputError(str(p), f"must be a mapping, got {type(raw).__name__}", "write kind: and its options")
    known = {f.name for f in dataclasses.fields(BackendConfig)} - {"name"}
    if set(raw) - known:
        raise InputError(str(p), f"unknown keys {sorted(set(raw) - known)}", f"known keys: {sorted(known)}")
    backend = BackendConfig(**raw, name=name)
    _check(backend, str(p))
    return backend


def _check(b: BackendConfig, where: str):
    if b.kind not in KINDS:
        raise InputError(f"{where}: kind", f"{b.kind!r} is not a backend kind", f"use one of {list(KINDS)}")
    if b.mixed_precision not in (None, "no", "bf16", "fp16"):
        raise InputError(f"{where}: mixed_precision", f"{b.mixed_precision!r} is not supported", "use null (the recipe's), no, bf16 or fp16")
    if not isinstance(b.activation_checkpointing, bool):
        raise InputError(f"{where}: activation_checkpointing", f"must be true or false, got {b.activation_checkpointing!r}", "")
    if not isinstance(b.torch_compile, (bool, dict)) or set(compile_options(b)) - _COMPILE_KEYS:
        raise InputError(f"{where}: torch_compile", f"{b.torch_compile!r} is not true, false or a mapping of torch.compile's arguments",
                         f"write true, or a mapping with keys among {sorted(_COMPILE_KEYS)}")
    if not isinstance(b.async_checkpoint, bool):
        raise InputError(f"{where}: async_checkpoint", f"must be true or false, got {b.async_checkpoint!r}", "")
    if b.async_checkpoint and b.kind == "ddp":
        raise InputError(f"{where}: async_checkpoint", "needs a backend whose processes each write their part (fsdp2 or "
                         "deepspeed); DDP's checkpoint is written whole by the main process", "remove it, or use kind: fsdp2")
    if isinstance(b.fsdp, dict) and "async_checkpoint" in b.fsdp:  # where it was before session 9
        raise InputError(f"{where}: fsdp.async_checkpoint", "is a setting of the backend, not of fully_shard",
                         "write async_checkpoint: true at the top level, beside kind:")
    if not isinstance(b.fsdp, dict) or set(b.fsdp) - _FSDP_KEYS or (b.fsdp and b.kind != "fsdp2"):
        raise InputError(f"{where}: fsdp", f"{b.fsdp!r} is not a set of fully_shard options of an fsdp2 backend", f"known keys: {sorted(_FSDP_KEYS)}")
    if b.kind == "deepspeed":
        zero = b.deepspeed.get("zero_optimization") if isinstance(b.deepspeed, dict) else None
        stage = zero.get("stage") if isinstance(zero, dict) else None
        if stage not in (0, 1, 2, 3):
            raise InputError(f"{where}: deepspeed.zero_optimization.stage", f"must be 0, 1, 2 or 3, got {stage!r}", "")
        offload = zero.get("offload_optimizer")
        if isinstance(offload, dict) and offload.get("device") == "nvme":  # checkpoint_deepspeed.py cannot hold swapped state
            raise InputError(f"{where}: deepspeed.zero_optimization.offload_optimizer.device", "is nvme, whose swapped optimizer "
                             "state the checkpoints (safetensors + JSON) do not hold", "offload the optimizer to cpu, or not at all")
    elif b.deepspeed:
        raise InputError(f"{where}: deepspeed", f"is a DeepSpeed config, but kind is {b.kind}", "set kind: deepspeed or remove it")


def compile_options(backend: BackendConfig) -> dict:
    """torch.compile's arguments of `torch_compile` (true: its defaults)."""
    return backend.torch_compile if isinstance(backend.torch_compile, dict) else {}


def mixed_precision(backend: BackendConfig, recipe) -> str:
    return backend.mixed_precision or recipe.run.mixed_precision


def resolve(backend: BackendConfig, recipe, world_size: int) -> BackendConfig:
    """The backend as it runs with `recipe` on `world_size` processes: its mixed precision set, and
    its "auto" DeepSpeed entries filled from the recipe."""
    out = copy.deepcopy(backend)
    out.mixed_precision = mp = mixed_precision(backend, recipe)
    if out.kind != "deepspeed":
        return out
    o = recipe.optim
    auto = {("train_micro_batch_size_per_gpu",): o.global_batch // world_size, ("gradient_accumulation_steps",): o.grad_accum,
            ("gradient_clipping",): o.grad_clip, ("bf16", "enabled"): mp == "bf16", ("fp16", "enabled"): mp == "fp16"}
    for path, value in auto.items():
        node = out.deepspeed
        for k in path[:-1]:
            node = node.get(k) if isinstance(node.get(k), dict) else {}
        if node.get(path[-1]) == "auto":
            node[path[-1]] = value
    return out


def check_world_size(recipe, world_size: int, block: int):
    """The global batch must split evenly over the processes (and each share into whole pairing blocks)."""
    gb = recipe.optim.global_batch
    if gb % world_size or (gb // world_size) % block:
        unit = world_size * block
        raise InputError("recipe.optim.global_batch", f"{gb} does not split into {world_size} equal per-process batches"
                         + (f" of whole pairing blocks of {block}" if block > 1 else ""),
                         f"use a multiple of {unit} (e.g. --set optim.global_batch={max(unit, gb // unit * unit)}) or another process count")


def check_launch(backend: BackendConfig):
    """FSDP2 and DeepSpeed need a process group, which a launcher sets up (LOCAL_RANK)."""
    if backend.kind != "ddp" and int(os.environ.get("LOCAL_RANK", "-1")) < 0:
        raise InputError("recipe.run.backend", f"{backend.name} ({backend.kind}) needs a process group, but this process was started without a launcher",
                         "start it with `accelerate launch --multi_gpu --num_processes N -m cosmofm.cli pretrain ...` (N >= 2) or "
                         "`torchrun --nproc_per_node N -m cosmofm.cli pretrain ...` (N may be 1), or use --backend ddp")


def check_modalities(backend: BackendConfig, modalities: set[str], world_size: int):
    """DeepSpeed ZeRO reduces gradients in the order they arrive and assumes every process has the
    same ones; a process whose batch lacks a modality leaves that tokenizer without gradients, and
    the processes' reductions no longer match (gloo aborts: "Received data size doesn't match
    expected size"). DDP (find_unused_parameters) and FSDP2 (reduce-scatter of zeros) handle it."""
    if backend.kind == "deepspeed" and world_size > 1 and len(modalities) > 1:
        raise InputError("recipe.run.backend", f"{backend.name} (DeepSpeed ZeRO) cannot train on a corpus that mixes modalities "
                         f"({', '.join(sorted(modalities))}) over {world_size} processes: a process whose batch lacks one has no gradients "
                         "for its tokenizer, and ZeRO's gradient reductions then differ between processes",
                         "use --backend fsdp2 (or ddp) for mixed-modality pretraining, or a single-modality corpus")


def deepspeed_plugin(backend: BackendConfig):
    if backend.kind != "deepspeed":
        return None
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=copy.deepcopy(backend.deepspeed))


def apply(model: torch.nn.Module, backend: BackendConfig) -> torch.nn.Module:
    """Activation checkpointing, torch.compile, then FSDP2 sharding, applied to the model's
    transformer blocks (`base_model.encoder.layers`) and, for FSDP2, to the whole model."""
    blocks = model.base_model.encoder.layers
    if backend.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block)  # non-reentrant; dropout masks replayed (RNG state kept)
    if backend.torch_compile:
        for block in blocks:
            block.compile(**compile_options(backend))  # in place: parameter names and checkpoints stay those of the eager model
    if backend.kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        reshard = backend.fsdp.get("reshard_after_forward", True)
        for block in blocks:
            fully_shard(block, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
        # A batch without, say, cubes leaves the cube tokenizer without gradients on that rank:
        # reduce-scatter zeros for it, so all ranks take part in the same collectives (DDP's
        # find_unused_parameters).
        model.set_reduce_scatter_unused_params(True)
    return model


def prepare(accelerator, backend: BackendConfig, model, optimizer):
    """Accelerate's prepare; an FSDP2 model is already sharded, so only its optimizer is prepared
    (prepare would wrap it in DDP)."""
    if backend.kind == "fsdp2":
        return model, accelerator.prepare(optimizer)
    return accelerator.prepare(model, optimizer)


def drop_unused_gradients(backend: BackendConfig, model):
    """FSDP2: give back "no gradient" to the parameters no process used this step.

    FSDP2 reduce-scatters zeros for a parameter unused on one process (see `apply`), so one
    unused on every process (a modality absent from the whole global batch) ends with a zero
    gradient, and AdamW would still decay it and move it by its running moments. Torch's AdamW
    skips a parameter whose gradient is None, which is what one process and DDP give it; a
    gradient that is exactly zero on every process is taken for that (one small all-reduce).
    Call at the optimizer step's micro-step, after the backward pass.
    """
    if backend.kind != "fsdp2":
        return
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return
    used = torch.stack([p.grad.to_local().ne(0).any() for p in params]).float()  # (P,)
    torch.distributed.all_reduce(used)
    for p, u in zip(params, used.tolist()):
        if u == 0:
            p.grad = None


def autocast(accelerator, backend: BackendConfig):
    """The forward pass's autocast: Accelerate's, except under DeepSpeed with bf16, where
    DeepSpeed holds the weights in bf16 and Accelerate's autocast is off, so float32 inputs
    would meet bf16 weights ("mat1 and mat2 must have the same dtype"): torch's autocast then."""
    if backend.kind == "deepspeed" and backend.mixed_precision == "bf16":
        return torch.autocast(accelerator.device.type, dtype=torch.bfloat16)
    return accelerator.autocast()


def _raw_optimizer(optimizer):
    return optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer


def _param_names(model, optimizer) -> list[str]:
    """The state-dict name of each parameter, in the optimizer's order (its state-dict indices)."""
    names = {id(p): n.replace(AC_PREFIX, "") for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _clean(state: dict) -> dict:
    return {k.replace(AC_PREFIX, ""): v for k, v in state.items()}


def full_model_state(accelerator, backend: BackendConfig | None, model) -> dict | None:
    """The model's full state dict on the main process (None elsewhere); a collective under
    FSDP2 and ZeRO-3."""
    kind = "ddp" if backend is None else backend.kind
    if kind == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif kind == "deepspeed":
        state = accelerator.get_state_dict(model)  # ZeRO-3: gathered onto rank 0
    else:
        state = accelerator.unwrap_model(model).state_dict() if accelerator.is_main_process else None
    return _clean(state) if accelerator.is_main_process else None


def full_optimizer_state(accelerator, backend: BackendConfig | None, model, optimizer) -> dict | None:
    """The optimizer's state on the main process in torch.optim's layout (integer keys in the
    optimizer's parameter order), for the backends that hold it whole on every process (DDP);
    None elsewhere, and under DeepSpeed (each process writes its ZeRO partition:
    checkpoint_deepspeed.write_partition). FSDP2 saves its shards instead (`sharded_states`)."""
    kind = "ddp" if backend is None else backend.kind
    if kind in SHARDED_KINDS:
        raise ValueError(f"{kind} saves sharded states (sharded_states), not a gathered optimizer state")
    if kind == "deepspeed":
        return None
    return _raw_optimizer(optimizer).state_dict() if accelerator.is_main_process else None


def is_sharded(backend: BackendConfig | None) -> bool:
    """Whether checkpoints of this backend are written in shards, one file per process (checkpoint.py)."""
    return backend is not None and backend.kind in SHARDED_KINDS


def sharded_states(model, optimizer) -> dict:
    """Each process's part of the model and optimizer states, keyed by parameter name
    (`torch.distributed.checkpoint.state_dict`: DTensor shards under FSDP2, no gathering;
    activation-checkpointing wrappers' names removed), for `checkpoint.write_sharded_state`."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, _raw_optimizer(optimizer))}


def load_sharded_states(step_dir, model, optimizer):
    """Read a sharded checkpoint (any world size, FSDP2 or not) into the model as `apply` left it
    and its optimizer, each process its own part; a checkpoint of another model is an InputError
    before anything is read. Every process calls it."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
    )
    from cosmofm.pretrain.checkpoint import load_sharded_state

    raw = _raw_optimizer(optimizer)
    # the optimizer's layout first: get_optimizer_state_dict creates empty Adam moments (a
    # zero-learning-rate step) that the loaded ones then replace
    target = get_optimizer_state_dict(model, raw)
    set_model_state_dict(model, load_sharded_state(step_dir, "model", get_model_state_dict(model)))
    set_optimizer_state_dict(model, raw, load_sharded_state(step_dir, "optimizer", target))


_CHECKPOINT_GROUPS: dict[str, object] = {}


def checkpoint_group(key: str):
    """A gloo process group of its own for one state's asynchronous save: the thread that writes
    it runs collectives while training runs its own, and two threads must never share a group
    (their collectives would pair up wrongly). Created on first use, on every process at the
    same save. None without a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if key not in _CHECKPOINT_GROUPS:
        _CHECKPOINT_GROUPS[key] = torch.distributed.new_group(backend="gloo")
    return _CHECKPOINT_GROUPS[key]


def close_process_group() -> list[str]:
    """Tear down this process's torch.distributed state before the interpreter exits; returns
    the names of the communication threads still alive after it (none when it worked).

    `destroy_process_group` only drops torch's own references to the groups; a gloo group is
    destroyed, and its worker threads joined, when the last reference goes, and others remain:
    each FSDP2 DeviceMesh keeps its groups (`_pg_registry`; DTensor's sharding and
    redistribution caches keep the meshes), and functions defined with `group=group.WORLD`
    hold the default group in their default arguments when their module was imported after
    the group formed (torch.distributed.nn.functional, imported lazily with dynamo; DeepSpeed's
    TorchBackend.barrier). DeepSpeed keeps its groups in objects that outlive the run: the
    module global `deepspeed.utils.groups._WORLD_GROUP`, the engine (`data_parallel_group`,
    `seq_data_parallel_group`), the ZeRO-3 optimizer (`dp_process_group`,
    `sub_group_process_groups`) and every ZeRO-3 parameter (`ds_process_group`); the engine
    and its optimizer are not freed after the run, as its gradient hooks, held by autograd's
    C++ nodes, close reference cycles that the garbage collector cannot see. Left to
    interpreter shutdown, a gloo worker still releasing its last collective (whose tensors
    Python owns) takes the GIL while the interpreter is finalizing, is ended by pthread_exit
    inside a noexcept destructor, and the process aborts after a complete run: "terminate
    called without an active exception" (SIGABRT), rarely and under load (issue 19). So: the
    checkpoint groups are dropped and the FSDP2 modules' reference cycles collected; torch's
    own references go with destroy_process_group; then every reference left to a group (in an
    object's or a module's attributes, a list, a mesh's registry, a function's default
    arguments) becomes None, "the default group" (a destroyed group is unusable anyway), which
    destroys the groups and joins their threads while Python is whole. Every process calls it
    once, after its last collective and after every asynchronous save was waited for."""
    import gc
    import sys

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return _communication_threads()
    _CHECKPOINT_GROUPS.clear()
    gc.collect()  # FSDP2 modules, their states and hooks are reference cycles
    group_type = dist.ProcessGroup
    mesh_type = getattr(sys.modules.get("torch.distributed.device_mesh"), "DeviceMesh", None)
    dist.destroy_process_group()  # first, so that torch's own registries no longer hold a group when the rest are dropped
    with warnings.catch_warnings():  # isinstance on torch's deprecated reduce_op objects warns
        warnings.simplefilter("ignore", FutureWarning)
        _drop_group_references(gc.get_objects(), group_type, mesh_type)
    gc.collect()
    return _communication_threads()


def _drop_group_references(objects, group_type, mesh_type) -> None:
    """Every reference to a process group left in a Python object becomes None: values of dicts
    (module globals such as `deepspeed.utils.groups._WORLD_GROUP`, an FSDP2 mesh's registry),
    attributes of objects (DeepSpeed's engine, ZeRO optimizers and parameters; Python 3.11 keeps
    most attributes inline, without a dict that gc lists, so each object whose referents hold
    a group is asked for its `vars`), items of lists, closure cells and functions' default
    arguments. Call after destroy_process_group, when no group is usable any more."""
    import gc

    def holds(value) -> bool:
        return isinstance(value, group_type) or (type(value) in (list, tuple) and any(isinstance(v, group_type) for v in value))

    def dropped(value):
        return None if isinstance(value, group_type) else type(value)(None if isinstance(v, group_type) else v for v in value)

    def forget(attributes: dict):
        for key in [k for k, v in attributes.items() if holds(v)]:
            attributes[key] = dropped(attributes[key])

    for obj in objects:
        if mesh_type is not None and isinstance(obj, mesh_type) and isinstance(getattr(obj, "_pg_registry", None), dict):
            obj._pg_registry.clear()  # a mesh is unusable after destroy_process_group anyway
        if type(obj) is dict:  # a tuple of groups in a dict is replaced whole
            forget(obj)
        elif type(obj) is types.FunctionType:  # defaults sit in a tuple: not the function's own referents
            if obj.__defaults__ and holds(obj.__defaults__):
                obj.__defaults__ = dropped(obj.__defaults__)
            if obj.__kwdefaults__:
                forget(obj.__kwdefaults__)
        elif not any(isinstance(r, group_type) for r in gc.get_referents(obj)):
            continue
        elif type(obj) is list:
            obj[:] = dropped(obj)
        elif type(obj) is types.CellType:
            obj.cell_contents = None
        elif isinstance(getattr(obj, "__dict__", None), dict):
            forget(vars(obj))


def _communication_threads() -> list[str]:
    """Names of this process's gloo threads (Linux: /proc/self/task; elsewhere none known)."""
    names = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return names
    for task in tasks:
        try:
            name = Path(f"/proc/self/task/{task}/comm").read_text().strip()
        except OSError:  # a thread that ended meanwhile
            continue
        if "gloo" in name:
            names.append(name)
    return sorted(names)


def load_optimizer_state(backend: BackendConfig, model, optimizer, state: dict):
    """Load a full optimizer state (torch.optim's layout, from `full_optimizer_state`) into the
    optimizer of the model as `apply` left it; every process passes the whole state."""
    if backend.kind != "fsdp2":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    by_name = {"state": {names[int(i)]: v for i, v in state["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def release_model(accelerator, backend: BackendConfig, model, model_class, config):
    """The model to save as the release, on the main process (None elsewhere): the trained model
    itself under plain DDP, else a single-device `model_class(config)` holding the gathered weights."""
    if backend.kind == "ddp" and not backend.activation_checkpointing:
        return accelerator.unwrap_model(model) if accelerator.is_main_process else None
    state = full_model_state(accelerator, backend, model)
    if not accelerator.is_main_process:
        return None
    plain = model_class(config)
    plain.load_state_dict(state)
    return plain


def local_tensors(state: dict) -> dict:
    """This process's part of each tensor (a DTensor's local shard; other tensors as they are)."""
    return {k: t.to_local() if hasattr(t, "to_local") else t for k, t in state.items()}


def pairing_block(recipe) -> int:
    """The run of samples the batch sampler keeps together (the mock corpus pairs views in twos)."""
    from cosmofm.pretrain.corpus import PAIR_BLOCK

    return recipe.data.pair_block if recipe.data.datasets else PAIR_BLOCK


def resolved_config(recipe, world_size: int = 1) -> dict:
    """The recipe and its backend, resolved for `world_size` processes (`--print-config`)."""
    check_world_size(recipe, world_size, pairing_block(recipe))
    return {**recipe.to_dict(), "backend": resolve(load_backend(recipe.run.backend), recipe, world_size).to_dict()}
