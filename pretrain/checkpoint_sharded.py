"""Sharded checkpoint states: torch.distributed.checkpoint with its Hugging Face safetensors storage.

Every process writes its part of a sharded state (FSDP2) into the hidden step folder
(`begin_sharded_save` -> `write_sharded_state` -> `publish_sharded_checkpoint`); reading
reshards onto the world size of now (`load_sharded_state`) or reads the whole in one
process (`read_full_sharded_state`); `consolidate_model` writes one `model.safetensors`.
The layout and why no `.metadata` pickle is ever written: pretrain/checkpoint.py, which
re-exports this module's API.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.pretrain.checkpoint_folders import (
    CHECKPOINTS_DIR, RESERVED_STATE_NAMES, STATE_NAME_RE, TRAINER_STATE_NAME, check_save_arguments, publish_folder,
    resolve_step_dir, step_name, swap_into_place,
)
from cosmofm.pretrain.manifest import CORRUPT_FIX, fsync_file, honour_umask, read_json, verify_manifest, write_manifest
from cosmofm.pretrain.state_tree import reference_state, skeleton_tensors, unflatten_state

# ---------------------------------------------------------------------------------
# Sharded states: torch.distributed.checkpoint with its Hugging Face safetensors storage
# ---------------------------------------------------------------------------------

SHARDED_FIX = ("resume with the model and recipe the run was saved with (recipe.yaml in the run folder), "
               "or start again with --overwrite")


def sharded_save_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The hidden folder every process of a sharded save writes into. One name on every
    process (no pid in it), so no process has to send it to the others; `run_lock` keeps
    a second run out of it."""
    return Path(run_dir) / CHECKPOINTS_DIR / f".{step_name(step)}.tmp-sharded"


def begin_sharded_save(run_dir: str | os.PathLike, step: int) -> Path:
    """On the main process, before any process writes (then a barrier): an empty `sharded_save_dir`."""
    tmp = sharded_save_dir(run_dir, step)
    if tmp.exists():  # a save killed part-way
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_sharded_state(tmp: str | os.PathLike, key: str, state, process_group=None, asynchronous: bool = False):
    """On every process: its part of `state` into `tmp/<key>/`; returns (skeleton, future or None).

    The tensors (DTensor shards under FSDP2; a replicated tensor is written by one process)
    go through `torch.distributed.checkpoint` with `HuggingFaceStorageWriter(save_distributed=True)`:
    one `shard-<rank+1>-model-00001-of-00001.safetensors` per process, each tensor's place in
    the whole recorded as JSON in the safetensors header ("DCP_SHARDING_INFO"), and no
    `.metadata` pickle. Everything else (step counters, hyper-parameters, nesting) is in the
    skeleton, which the main process writes as `<key>.json` (`publish_sharded_checkpoint`).
    With `asynchronous`, the tensors are copied to memory now and written by a thread
    (`dcp.async_save`); the future is done when every process has written.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    if not isinstance(key, str) or not STATE_NAME_RE.fullmatch(key) or key in RESERVED_STATE_NAMES:
        raise InputError(f"states[{key!r}]", "is not a usable folder name", "rename the state")
    tensors, skeleton = reference_state(state)
    writer = HuggingFaceStorageWriter(str(Path(tmp) / key), save_distributed=True)
    if asynchronous:
        return skeleton, dcp.async_save(tensors, storage_writer=writer, process_group=process_group)
    with _alone_is_meant():
        dcp.save(tensors, storage_writer=writer, process_group=process_group)
    return skeleton, None


@contextlib.contextmanager
def _alone_is_meant():
    """DCP warns whenever one process saves or loads without a process group; a one-process
    run (or reading a checkpoint whole) means to."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def publish_sharded_checkpoint(tmp: str | os.PathLike, step: int, states: Mapping[str, object],
                               sharded: Mapping[str, dict], metadata: Mapping, keep_last: int = 3) -> Path:
    """On the main process, once every process's shards are in `tmp`: the whole states (scheduler,
    RNG, ...), the sharded states' skeletons, trainer_state.json, manifest.json (sha256 of every
    shard); then the same atomic rename, `latest` and pruning as `save_checkpoint`."""
    check_save_arguments(step, {**states, **sharded}, metadata, keep_last)
    return publish_folder(Path(tmp), step, states, sharded, metadata, keep_last)


def _sharded_layout(step_dir: Path, key: str):
    """(reader, skeleton, name -> (dtype, shape)) of a sharded state, after checking that its
    shard files hold exactly the skeleton's tensors, each whole (no shard file missing)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    skeleton = read_json(step_dir / f"{key}.json", f"skeleton of {key!r}")
    try:
        expected = skeleton_tensors(skeleton)
    except InputError as exc:
        raise InputError(str(step_dir / f"{key}.json"), exc.problem, exc.fix) from None
    folder = step_dir / key
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        raise InputError(str(folder), "holds no shard files", CORRUPT_FIX)
    reader = HuggingFaceStorageReader(str(folder))
    try:
        saved = reader.read_metadata().state_dict_metadata
    except Exception as exc:  # a truncated or foreign file: safetensors' own error says which
        raise InputError(str(folder), f"has an unreadable shard file ({type(exc).__name__}: {exc})", CORRUPT_FIX) from exc
    for name, (_dtype, shape) in expected.items():
        meta = saved.get(name)
        covered = {tuple(c.offsets): math.prod(c.sizes) for c in meta.chunks} if meta is not None else {}
        if meta is None or list(meta.size) != list(shape) or sum(covered.values()) != math.prod(shape):
            raise InputError(f"{folder}: {name}", f"is not whole in the shard files (a shard file of {key!r} is missing "
                             "or from another save)", CORRUPT_FIX)
    extra = sorted(set(saved) - set(expected))
    if extra:
        raise InputError(str(folder), f"has tensors that {key}.json does not name: {extra[:3]}", CORRUPT_FIX)
    return reader, skeleton, expected


def read_full_sharded_state(step_dir: str | os.PathLike, key: str):
    """A sharded state read whole by this one process (any world size wrote it): CPU tensors."""
    import torch.distributed.checkpoint as dcp

    reader, skeleton, expected = _sharded_layout(Path(step_dir), key)
    tensors = {name: torch.empty(shape, dtype=getattr(torch, dtype)) for name, (dtype, shape) in expected.items()}
    with _alone_is_meant():
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    return unflatten_state(tensors, skeleton)


def load_sharded_state(step_dir: str | os.PathLike, key: str, target, process_group=None):
    """On every process: read a sharded state into the tensors of `target`, the same state as
    laid out now (e.g. `get_optimizer_state_dict` of the freshly sharded model: its DTensors say
    which part each process reads, so a checkpoint of 2 processes loads onto 1 or 4); returns
    the saved state (the skeleton's numbers, `target`'s tensors, filled).

    A checkpoint of another model (other tensor names, shapes or dtypes) is an InputError
    naming the tensor, raised on every process before anything is read.
    """
    import torch.distributed.checkpoint as dcp

    step_dir = Path(step_dir)
    reader, skeleton, expected = _sharded_layout(step_dir, key)
    tensors, _ = reference_state(target)
    missing, unknown = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
    if missing or unknown:
        raise InputError(str(step_dir / f"{key}.json"), f"is the {key} of another model: this one has {missing[:3]} that "
                         f"it lacks, and it has {unknown[:3]} that this one lacks", SHARDED_FIX)
    for name, (dtype, shape) in expected.items():
        now = tensors[name]
        if list(now.shape) != list(shape) or str(now.dtype).removeprefix("torch.") != dtype:
            raise InputError(f"{step_dir / key}: {name}", f"is {dtype}{list(shape)} in the checkpoint but "
                             f"{str(now.dtype).removeprefix('torch.')}{list(now.shape)} in this model", SHARDED_FIX)
    with _alone_is_meant():
        dcp.load(tensors, storage_reader=reader, process_group=process_group)
    return unflatten_state(tensors, skeleton)


class PendingSave:
    """An asynchronous sharded save: a thread waits until every process's shards are written
    (`futures`, from `write_sharded_state(asynchronous=True)`), then runs `publish` (the main
    process's `publish_sharded_checkpoint`), so the checkpoint appears while training goes
    on. `wait` before the next save and before the run ends; it re-raises a failed save."""

    def __init__(self, futures: list, publish):
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._finish, args=(futures, publish), name="cosmofm-checkpoint")
        self._thread.start()

    def _finish(self, futures, publish):
        try:
            for future in futures:
                future.result()
            publish()
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def check_model_state(saved: Mapping[str, torch.Tensor], now: Mapping[str, torch.Tensor], where: str) -> None:
    """A whole model state from a checkpoint against the model built now: the same names,
    shapes and dtypes, or an InputError naming the first difference (before any compute)."""
    missing, unknown = sorted(set(now) - set(saved)), sorted(set(saved) - set(now))
    if missing or unknown:
        raise InputError(where, f"is the state of another model: this one has {missing[:3]} that it lacks, "
                         f"and it has {unknown[:3]} that this one lacks", SHARDED_FIX)
    for name, tensor in now.items():
        if saved[name].shape != tensor.shape or saved[name].dtype != tensor.dtype:
            raise InputError(f"{where}: {name}", f"is {saved[name].dtype}{list(saved[name].shape)} in the checkpoint "
                             f"but {tensor.dtype}{list(tensor.shape)} in this model", SHARDED_FIX)


def consolidate_model(step_dir: str | os.PathLike, out_dir: str | os.PathLike, config, key: str = "model") -> Path:
    """One `model.safetensors` (+ config.json, manifest.json) in `out_dir` from a sharded
    checkpoint's `key` state, by torch's `consolidate_safetensors_files` (bytes copied from the
    shards, so bit-exact). The names are the training model's ("cosmofm.encoder...", plus the
    objective heads): `AutoModel.from_pretrained(out_dir)` loads the backbone from it, as from
    any checkpoint of a model with heads. The checkpoint's manifest is verified first; the
    folder is built hidden and renamed into place."""
    from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files

    step_dir, out_dir = resolve_step_dir(Path(step_dir)), Path(out_dir)
    verify_manifest(step_dir, required=(TRAINER_STATE_NAME, f"{key}.json"))
    _reader, _skeleton, expected = _sharded_layout(step_dir, key)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        consolidate_safetensors_files(str(step_dir / key), str(tmp), dict.fromkeys(expected, 1))
        os.replace(tmp / "model-00001-of-00001.safetensors", tmp / "model.safetensors")
        (tmp / "model.safetensors.index.json").unlink()  # one file: transformers needs no index
        config.save_pretrained(tmp)
        honour_umask(*(p for p in tmp.iterdir()))
        fsync_file(tmp / "model.safetensors")
        write_manifest(tmp)
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
