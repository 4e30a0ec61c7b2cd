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
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import socket
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
from cosmofm.pretrain.state_tree import flatten_state, unflatten_state  # noqa: F401 (re-exported)

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
    name = _step_name(step)
    final = checkpoints / name
    tmp = checkpoints / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():  # left over from an earlier save in a process with our pid
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        for key, obj in states.items():
            _write_state(tmp, key, obj)
        trainer_state = {"format": TRAINER_STATE_FORMAT, "step": step, "states": list(states),
                         "metadata": dict(metadata)}
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


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, object], dict]:
    """Load a checkpoint written by `save_checkpoint`; returns (states, metadata).

    `path` may be a run dir, its checkpoints/ dir (both resolve `latest`) or a step
    dir. The manifest is verified before anything is parsed. Tensors come back on the
    CPU; states["model"] is the flat dict that `model.load_state_dict` takes, and
    metadata is the saved metadata with "step" added.
    """
    step_dir = _resolve_step_dir(Path(path))
    files = verify_manifest(step_dir, required=(TRAINER_STATE_NAME,))
    trainer_state = read_json(step_dir / TRAINER_STATE_NAME, "trainer state")
    if not (isinstance(trainer_state, dict) and trainer_state.get("format") == TRAINER_STATE_FORMAT
            and isinstance(trainer_state.get("states"), list) and isinstance(trainer_state.get("metadata"), dict)):
        raise InputError(str(step_dir / TRAINER_STATE_NAME), f"is not a {TRAINER_STATE_FORMAT} file", _CORRUPT_FIX)
    states = {}
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
    return states, metadata


def resume_checkpoint(run_dir: str | os.PathLike, step: int | None = None) -> tuple[dict[str, object], dict, Path] | None:
    """Load the checkpoint a run resumes from: (states, metadata, folder), or None if there is none.

    With `step`, that checkpoint (an InputError if it is missing or fails verification).
    Without, the newest that verifies: `latest`, then older step folders, newest first;
    each one that fails is named in a warning and left in place (evidence; the run
    replaces it when it reaches that step again). Folders newer than `latest` hold a
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
            states, metadata = load_checkpoint(path)
        except InputError as exc:
            if step is not None or i == len(candidates) - 1:
                raise
            warnings.warn(f"checkpoint {path} is unusable ({exc}); left in place, trying {candidates[i + 1].name}")
            continue
        _point_latest(checkpoints, path.name)
        return states, metadata, path


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
