"""Checkpoints as safetensors + JSON: atomic, verified, and never pickled.

A checkpoint is one folder, ``run_dir/checkpoints/step_XXXXXXXX/``, holding for each
named state (model, optimizer, scheduler, rng, data, ...) a ``<name>.safetensors``
file with its tensors and a ``<name>.json`` "skeleton" with everything else (numbers,
strings, nesting, int-vs-str keys, tuples), plus ``trainer_state.json`` and a
``manifest.json`` of sha256 sums. ``checkpoints/latest`` names the newest folder.

Why not ``accelerate``'s ``save_state``/``load_state``: it writes the optimizer,
scheduler, sampler and RNG states with ``torch.save``, i.e. pickle. Loading a pickle
runs arbitrary code, so a checkpoint shared between people or pulled from the hub
would be a code-execution vector, and pickles also break when classes move. Here
only tensors and JSON ever touch the disk, and loading never executes anything.

Why the care about atomicity: jobs on clusters are killed at arbitrary moments (wall
time, pre-emption, OOM). A save is therefore built in a hidden temporary folder,
check-summed, fsynced and only then renamed into place, and ``latest`` is replaced
atomically afterwards, so a crash at any point leaves the previous checkpoint
loadable and ``latest`` pointing at a complete folder.

Atomic writes and manifests (`write_manifest` / `verify_manifest`) live in
pretrain/manifest.py, the nested-state encoding in pretrain/state_tree.py; both are
re-exported here, and neither knows about training.

Only one process should call `save_checkpoint` for a given run (rank 0), and
`run_lock` keeps a second run (a second `--resume` of the same folder) out of it.

Sharded states (FSDP2). A state that is split over processes is not gathered: every
process writes its part with `torch.distributed.checkpoint` (DCP) and its Hugging Face
safetensors storage (`HuggingFaceStorageWriter(save_distributed=True)`), into
``<name>/shard-<rank+1>-model-00001-of-00001.safetensors``, next to ``<name>.json``, the
skeleton of everything that is not a tensor (step counters stay tensors; learning rates,
betas, nesting are JSON). Where each part sits in the whole tensor is JSON in the
safetensors header ("DCP_SHARDING_INFO"); DCP's own ``.metadata`` file, a pickle, is
never written (`HuggingFaceStorageReader` rebuilds the layout from those headers). The
save goes into the hidden ``.step_XXXXXXXX.tmp-sharded`` folder; after every process has
written (DCP's closing collective), rank 0 adds the whole states (scheduler, RNG), the
skeletons, trainer_state.json (which lists the sharded states) and the manifest with a
sha256 per shard, then renames, points `latest` and prunes as above
(`begin_sharded_save` -> `write_sharded_state` on every process -> `publish_sharded_checkpoint`).
With ``asynchronous=True`` DCP copies the tensors to memory and writes them from a thread
(`dcp.async_save`, each state on its own gloo group), and `PendingSave` publishes once all
processes are done, while training goes on.

Loading reads each process's part into the tensors of the state as it is sharded now
(`load_sharded_state`), so a checkpoint of 2 processes resumes on 1 or 4 (DCP reshards);
`load_checkpoint` reads a sharded state whole in one process (`read_full_sharded_state`),
and `consolidate_model` writes one ``model.safetensors`` that
``AutoModel.from_pretrained`` loads. The tensors named in the skeleton must be exactly
those in the shards and whole, and the names, shapes and dtypes those of the model being
resumed, or an InputError names the tensor before anything is read.

Whole states (DDP, one process, fine-tuning) stay in the single-file layout above: every
process holds the whole state, so rank 0 writing it is no gather, and
``safetensors.torch.load_file`` reads it. Both layouts resume under either backend.
DeepSpeed's optimizer partitions are written by DeepSpeed only with torch.save, so its
checkpoints hold the gathered model alone and cannot be resumed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.pretrain.manifest import (  # noqa: F401 (re-exported: the checkpoint API)
    CORRUPT_FIX as _CORRUPT_FIX, MANIFEST_NAME, PICKLE_SUFFIXES, atomic_write_bytes, atomic_write_json, fsync_dir, fsync_file,
    honour_umask, read_json, save_release, sha256_file, verify_manifest, write_manifest,
)
from cosmofm.pretrain.state_tree import (  # noqa: F401 (re-exported)
    flatten_state, reference_state, skeleton_tensors, unflatten_state,
)

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None

TRAINER_STATE_NAME = "trainer_state.json"
TRAINER_STATE_FORMAT = "cosmofm-checkpoint-1"
CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"
RUN_LOCK_NAME = ".cosmofm-run.lock"


_STEP_DIR_RE = re.compile(r"step_(\d{8,})")
_STATE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_RESERVED_STATE_NAMES = {"trainer_state", "manifest"}

_NO_CHECKPOINT_FIX = (
    "start without --resume, or point to a run directory, its checkpoints/ folder "
    "or one checkpoints/step_XXXXXXXX folder"
)


# ---------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """Python `random`, numpy's global RNG, torch CPU and (if present) every CUDA device."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping) -> None:
    """Inverse of `capture_rng_state`; accepts its output after flatten/unflatten + JSON."""
    fix = "pass the 'rng' state saved by capture_rng_state"
    if not isinstance(state, Mapping) or not {"python", "numpy", "torch"} <= set(state):
        raise InputError("rng", "needs the keys 'python', 'numpy' and 'torch'", fix)
    try:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError("rng", f"could not be restored ({exc})", fix) from exc
    cuda_states = state.get("cuda")
    if not cuda_states:
        return
    if not torch.cuda.is_available():
        # Resuming a GPU run on a CPU box is legitimate (debugging); say what is lost.
        warnings.warn("the checkpoint holds CUDA RNG states but CUDA is not available; they are not restored")
        return
    n_devices = torch.cuda.device_count()
    if len(cuda_states) != n_devices:
        warnings.warn(f"the checkpoint holds {len(cuda_states)} CUDA RNG states but {n_devices} devices "
                      "are visible; restoring the first min(both)")
    for index, device_state in enumerate(cuda_states[:n_devices]):
        torch.cuda.set_rng_state(device_state, index)


# ---------------------------------------------------------------------------------
# Checkpoint folders
# ---------------------------------------------------------------------------------


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def _step_dirs(checkpoints: Path) -> list[tuple[int, Path]]:
    """Complete-looking step folders, oldest first (hidden temp folders never match)."""
    if not checkpoints.is_dir():
        return []
    found = []
    for path in checkpoints.iterdir():
        match = _STEP_DIR_RE.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _checkpoints_dir(path: Path) -> Path:
    """Accept a run dir or its checkpoints/ dir."""
    if (path / CHECKPOINTS_DIR).is_dir():
        return path / CHECKPOINTS_DIR
    if path.name == CHECKPOINTS_DIR or (path / LATEST_NAME).is_file():
        return path
    return path / CHECKPOINTS_DIR


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The step folder named by `checkpoints/latest`, or None when there is none.

    `run_dir` may also be the checkpoints/ folder. If `latest` is missing or names a
    folder that is gone (a crash between the two renames of a same-step re-save, or
    before `latest` was first written), fall back, with a warning, to the
    highest-numbered step folder that has a manifest.
    """
    checkpoints = _checkpoints_dir(Path(run_dir))
    pointer = checkpoints / LATEST_NAME
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        # Only a bare step name is trusted: `latest` must not point outside the folder.
        if _STEP_DIR_RE.fullmatch(name) and (checkpoints / name).is_dir():
            return checkpoints / name
    complete = [path for _, path in _step_dirs(checkpoints) if (path / MANIFEST_NAME).is_file()]
    if not complete:
        return None
    if pointer.exists():
        warnings.warn(f"{pointer} does not name an existing checkpoint; using {complete[-1].name}")
    return complete[-1]


def _check_save_arguments(step, states, metadata, keep_last) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise InputError("step", f"must be a non-negative int, got {step!r}", "pass the global optimizer step")
    if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
        raise InputError("keep_last", f"must be an int >= 1, got {keep_last!r}", "keep at least one checkpoint")
    if not isinstance(states, Mapping):
        raise InputError("states", f"must be a dict of name -> state, got {type(states).__name__}",
                         "pass e.g. {'model': model.state_dict(), 'optimizer': optimizer.state_dict()}")
    for key in states:
        if not isinstance(key, str) or not _STATE_NAME_RE.fullmatch(key) or key in _RESERVED_STATE_NAMES:
            raise InputError(f"states[{key!r}]", "is not a usable file name (letters, digits, '_', '.', '-'; "
                             f"not {sorted(_RESERVED_STATE_NAMES)})", "rename the state")
    if not isinstance(metadata, Mapping):
        raise InputError("metadata", f"must be a dict, got {type(metadata).__name__}", "pass a JSON-able dict")
    if "step" in metadata and metadata["step"] != step:
        raise InputError("metadata", f"has step={metadata['step']!r} but step={step}", "drop 'step' from metadata")
    try:  # fail before writing gigabytes of tensors, not after
        json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError("metadata", f"is not JSON-able: {exc}",
                         "pass only dicts, lists, strings, finite numbers, booleans and None") from exc


def _write_state(directory: Path, key: str, obj) -> None:
    try:
        tensors, skeleton = flatten_state(obj)
    except InputError as exc:
        raise InputError(f"states[{key!r}]/{exc.field}", exc.problem, exc.fix) from None
    path = directory / f"{key}.safetensors"
    # Always write the tensor file, even when empty, so every state has the same two files.
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    honour_umask(path)
    fsync_file(path)
    atomic_write_json(directory / f"{key}.json", skeleton)


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished temp folder to `final`, replacing an existing one safely."""
    old = None
    if final.exists():
        # A directory cannot be renamed over a non-empty one: move the old copy aside
        # first, and delete it only once the new one is in place.
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)  # put the previous copy back
        raise
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prune(checkpoints: Path, current_step: int, keep_last: int) -> None:
    """Keep the current checkpoint and the keep_last-1 newest older ones.

    Folders with a higher step than the one just written (left by a run that was
    resumed from an earlier checkpoint) are not "older" and are left alone; they are
    replaced when the run reaches their step again.
    """
    older = [path for step, path in _step_dirs(checkpoints) if step < current_step]
    doomed = older[: max(0, len(older) - (keep_last - 1))]
    for path in doomed:
        # Rename first so a half-deleted folder never looks like a checkpoint.
        trash = checkpoints / f".{path.name}.del-{os.getpid()}"
        try:
            os.replace(path, trash)
            shutil.rmtree(trash)
        except OSError as exc:  # the checkpoint itself is safe; do not fail the save
            warnings.warn(f"could not delete old checkpoint {path}: {exc}")


def save_checkpoint(run_dir: str | os.PathLike, step: int, states: Mapping[str, object],
                    metadata: Mapping, keep_last: int = 3) -> Path:
    """Write `run_dir/checkpoints/step_{step:08d}/` atomically and return its path.

    Each entry of `states` becomes `<key>.safetensors` (its tensors, possibly none)
    plus `<key>.json` (its skeleton); `metadata` (JSON-able) goes into
    trainer_state.json together with `step`. The folder is built as
    `.step_XXXXXXXX.tmp-<pid>`, check-summed into manifest.json, fsynced, renamed into
    place, and only then is `checkpoints/latest` updated and are older checkpoints
    beyond `keep_last` deleted.
    """
    _check_save_arguments(step, states, metadata, keep_last)
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    checkpoints.mkdir(parents=True, exist_ok=True)
    tmp = checkpoints / f".{_step_name(step)}.tmp-{os.getpid()}"
    if tmp.exists():  # left over from an earlier save in a process with our pid
        shutil.rmtree(tmp)
    tmp.mkdir()
    return _publish(tmp, step, states, {}, metadata, keep_last)


def _publish(tmp: Path, step: int, states: Mapping[str, object], sharded: Mapping[str, dict], metadata: Mapping,
             keep_last: int) -> Path:
    """Finish the folder `tmp` (its sharded states' shards already written into it): the
    rank-0 states, the sharded states' skeletons, trainer_state.json and the manifest; then
    rename it into place, point `latest` at it and prune."""
    checkpoints, name = tmp.parent, _step_name(step)
    final = checkpoints / name
    try:
        for key, obj in states.items():
            _write_state(tmp, key, obj)
        for key, skeleton in sharded.items():
            atomic_write_json(tmp / f"{key}.json", skeleton)
        trainer_state = {"format": TRAINER_STATE_FORMAT, "step": step, "states": list(states),
                         "metadata": dict(metadata)}
        if sharded:
            trainer_state["sharded"] = list(sharded)
        atomic_write_json(tmp / TRAINER_STATE_NAME, trainer_state)
        write_manifest(tmp)
        fsync_dir(tmp)
        _swap_into_place(tmp, final)
    except BaseException:
        # A half-written folder is useless; the previous checkpoint and `latest` are untouched.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_latest(checkpoints, name)
    _prune(checkpoints, step, keep_last)
    return final


def _point_latest(checkpoints: Path, name: str) -> None:
    atomic_write_bytes(checkpoints / LATEST_NAME, (name + "\n").encode("utf-8"))


def _resolve_step_dir(path: Path) -> Path:
    if not path.exists():
        raise InputError(str(path), "does not exist", _NO_CHECKPOINT_FIX)
    if not path.is_dir():
        raise InputError(str(path), "is a file, not a checkpoint folder", _NO_CHECKPOINT_FIX)
    if (path / MANIFEST_NAME).exists() or (path / TRAINER_STATE_NAME).exists() or _STEP_DIR_RE.fullmatch(path.name):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise InputError(str(path), "holds no checkpoint", _NO_CHECKPOINT_FIX)
    return found


def load_checkpoint(path: str | os.PathLike, full_sharded: bool = True) -> tuple[dict[str, object], dict]:
    """Load a checkpoint written by `save_checkpoint` or a sharded save; returns (states, metadata).

    `path` may be a run dir, its checkpoints/ dir (both resolve `latest`) or a step
    dir. The manifest is verified before anything is parsed. Tensors come back on the
    CPU; states["model"] is the flat dict that `model.load_state_dict` takes, and
    metadata is the saved metadata with "step" added, and with "sharded" (the names of the
    states written in shards, `write_sharded_state`) if there are any. Those come back whole (every shard
    read by this one process) unless `full_sharded` is False: then they are left out, for
    `load_sharded_state` to read each process's part.
    """
    step_dir = _resolve_step_dir(Path(path))
    files = verify_manifest(step_dir, required=(TRAINER_STATE_NAME,))
    trainer_state = read_json(step_dir / TRAINER_STATE_NAME, "trainer state")
    if not (isinstance(trainer_state, dict) and trainer_state.get("format") == TRAINER_STATE_FORMAT
            and isinstance(trainer_state.get("states"), list) and isinstance(trainer_state.get("metadata"), dict)
            and isinstance(trainer_state.get("sharded", []), list)):
        raise InputError(str(step_dir / TRAINER_STATE_NAME), f"is not a {TRAINER_STATE_FORMAT} file", _CORRUPT_FIX)
    sharded = trainer_state.get("sharded", [])
    for key in sharded:
        if f"{key}.json" not in files or not any(rel.startswith(f"{key}/") for rel in files):
            raise InputError(str(step_dir / key), "is a sharded state missing from manifest.json", _CORRUPT_FIX)
    states = {key: read_full_sharded_state(step_dir, key) for key in sharded} if full_sharded else {}
    for key in trainer_state["states"]:
        for suffix in (".safetensors", ".json"):
            if f"{key}{suffix}" not in files:
                raise InputError(str(step_dir / f"{key}{suffix}"), "is missing from manifest.json", _CORRUPT_FIX)
        tensors = safetensors.torch.load_file(step_dir / f"{key}.safetensors", device="cpu")
        skeleton = read_json(step_dir / f"{key}.json", f"skeleton of {key!r}")
        try:
            states[key] = unflatten_state(tensors, skeleton)
        except InputError as exc:
            raise InputError(str(step_dir / f"{key}.json"), exc.problem, exc.fix) from None
    metadata = dict(trainer_state["metadata"])
    metadata["step"] = trainer_state["step"]
    if sharded:
        metadata["sharded"] = list(sharded)
    return states, metadata


def resume_checkpoint(run_dir: str | os.PathLike, step: int | None = None,
                      full_sharded: bool = True) -> tuple[dict[str, object], dict, Path] | None:
    """Load the checkpoint a run resumes from: (states, metadata, folder), or None if there is none.

    With `step`, that checkpoint (an InputError if it is missing or fails verification).
    Without, the newest that verifies: `latest`, then older step folders, newest first;
    each one that fails is named in a warning and left in place (evidence; the run
    replaces it when it reaches that step again). `full_sharded` as in `load_checkpoint`
    (the manifest, and so every shard, is verified either way). Folders newer than `latest` hold a
    timeline that an earlier resume abandoned and are never chosen. `latest` is then
    pointed at the chosen folder, so a crash before the next save resumes from the
    same place. Call it from one process (rank 0) holding `run_lock`.
    """
    checkpoints = _checkpoints_dir(Path(run_dir))
    if step is not None:
        path = checkpoints / _step_name(step)
        if not path.is_dir():
            have = [s for s, _ in _step_dirs(checkpoints)]
            raise InputError("--resume-from", f"{checkpoints} has no checkpoint of step {step}",
                             f"pick one of the steps {have}" if have else _NO_CHECKPOINT_FIX)
        candidates = [path]
    else:
        newest = latest_checkpoint(run_dir)
        if newest is None:
            return None
        newest_step = int(_STEP_DIR_RE.fullmatch(newest.name).group(1))
        candidates = [newest] + [p for s, p in reversed(_step_dirs(checkpoints)) if s < newest_step]
    for i, path in enumerate(candidates):
        try:
            states, metadata = load_checkpoint(path, full_sharded)
        except InputError as exc:
            if step is not None or i == len(candidates) - 1:
                raise
            warnings.warn(f"checkpoint {path} is unusable ({exc}); left in place, trying {candidates[i + 1].name}")
            continue
        _point_latest(checkpoints, path.name)
        return states, metadata, path


# ---------------------------------------------------------------------------------
# Sharded states: torch.distributed.checkpoint with its Hugging Face safetensors storage
# ---------------------------------------------------------------------------------

SHARDED_FIX = ("resume with the model and recipe the run was saved with (recipe.yaml in the run folder), "
               "or start again with --overwrite")


def sharded_save_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The hidden folder every process of a sharded save writes into. One name on every
    process (no pid in it), so no process has to send it to the others; `run_lock` keeps
    a second run out of it."""
    return Path(run_dir) / CHECKPOINTS_DIR / f".{_step_name(step)}.tmp-sharded"


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

    if not isinstance(key, str) or not _STATE_NAME_RE.fullmatch(key) or key in _RESERVED_STATE_NAMES:
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
    _check_save_arguments(step, {**states, **sharded}, metadata, keep_last)
    return _publish(Path(tmp), step, states, sharded, metadata, keep_last)


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
        raise InputError(str(folder), "holds no shard files", _CORRUPT_FIX)
    reader = HuggingFaceStorageReader(str(folder))
    try:
        saved = reader.read_metadata().state_dict_metadata
    except Exception as exc:  # a truncated or foreign file: safetensors' own error says which
        raise InputError(str(folder), f"has an unreadable shard file ({type(exc).__name__}: {exc})", _CORRUPT_FIX) from exc
    for name, (_dtype, shape) in expected.items():
        meta = saved.get(name)
        covered = {tuple(c.offsets): math.prod(c.sizes) for c in meta.chunks} if meta is not None else {}
        if meta is None or list(meta.size) != list(shape) or sum(covered.values()) != math.prod(shape):
            raise InputError(f"{folder}: {name}", f"is not whole in the shard files (a shard file of {key!r} is missing "
                             "or from another save)", _CORRUPT_FIX)
    extra = sorted(set(saved) - set(expected))
    if extra:
        raise InputError(str(folder), f"has tensors that {key}.json does not name: {extra[:3]}", _CORRUPT_FIX)
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

    step_dir, out_dir = _resolve_step_dir(Path(step_dir)), Path(out_dir)
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
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike):
    """Hold an exclusive lock on a run folder for the life of the block.

    A second run on the folder (say a second `--resume`) gets an InputError naming the
    holder (pid, host, start time). The lock is `flock` on `run_dir/.cosmofm-run.lock`,
    so the kernel drops it when the holder exits however it exits (SIGKILL, OOM): a
    crashed run never leaves a stale lock. The file itself is never deleted (a run
    that locked a fresh file while another held the old one would not see it). On NFS
    Linux turns flock into POSIX locks that the server arbitrates between nodes;
    Lustre needs its `flock` mount option. Take it in one process per run (rank 0):
    two processes of one run would lock each other out.
    """
    if fcntl is None:
        yield
        return
    path = Path(run_dir) / RUN_LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1024, 0).decode("utf-8", "replace").strip() or "a process that has not said who it is yet"
            raise InputError(str(run_dir), f"is in use by another run ({holder})",
                             "wait for that run to end or stop it, or give this run another --output") from None
        holder = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S %z')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode("utf-8"), 0)
        yield
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock
