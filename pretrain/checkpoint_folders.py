"""Checkpoint folders: naming, the atomic publish of a step folder, `latest`, pruning.

The layout and its guarantees are described in pretrain/checkpoint.py (the public
checkpoint API, which re-exports what here is public). This module holds what both the
whole-state writer (checkpoint.py) and the sharded writer (checkpoint_sharded.py) need:
a step folder is built hidden, check-summed, fsynced and renamed into place
(`publish_folder`), then `latest` is pointed at it and older ones beyond keep_last are
deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch

from cosmofm.data_cards.errors import InputError
from cosmofm.pretrain.manifest import (
    MANIFEST_NAME, atomic_write_bytes, atomic_write_json, fsync_dir, fsync_file, honour_umask, read_json, write_manifest,
)
from cosmofm.pretrain.state_tree import flatten_state, unflatten_state

TRAINER_STATE_NAME = "trainer_state.json"
TRAINER_STATE_FORMAT = "cosmofm-checkpoint-1"
CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"
RUN_LOCK_NAME = ".cosmofm-run.lock"


STEP_DIR_RE = re.compile(r"step_(\d{8,})")
STATE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
RESERVED_STATE_NAMES = {"trainer_state", "manifest"}

NO_CHECKPOINT_FIX = (
    "start without --resume, or point to a run directory, its checkpoints/ folder "
    "or one checkpoints/step_XXXXXXXX folder"
)


# ---------------------------------------------------------------------------------
# Checkpoint folders
# ---------------------------------------------------------------------------------


def step_name(step: int) -> str:
    """The folder name of a step's checkpoint: `step_00000042`."""
    return f"step_{step:08d}"


def step_dirs(checkpoints: Path) -> list[tuple[int, Path]]:
    """Complete-looking step folders, oldest first (hidden temp folders never match)."""
    if not checkpoints.is_dir():
        return []
    found = []
    for path in checkpoints.iterdir():
        match = STEP_DIR_RE.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def checkpoints_dir(path: Path) -> Path:
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
    checkpoints = checkpoints_dir(Path(run_dir))
    pointer = checkpoints / LATEST_NAME
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        # Only a bare step name is trusted: `latest` must not point outside the folder.
        if STEP_DIR_RE.fullmatch(name) and (checkpoints / name).is_dir():
            return checkpoints / name
    complete = [path for _, path in step_dirs(checkpoints) if (path / MANIFEST_NAME).is_file()]
    if not complete:
        return None
    if pointer.exists():
        warnings.warn(f"{pointer} does not name an existing checkpoint; using {complete[-1].name}")
    return complete[-1]


def check_save_arguments(step, states, metadata, keep_last) -> None:
    """An InputError for a bad step, keep_last, state name or non-JSON metadata, before anything is written."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise InputError("step", f"must be a non-negative int, got {step!r}", "pass the global optimizer step")
    if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
        raise InputError("keep_last", f"must be an int >= 1, got {keep_last!r}", "keep at least one checkpoint")
    if not isinstance(states, Mapping):
        raise InputError("states", f"must be a dict of name -> state, got {type(states).__name__}",
                         "pass e.g. {'model': model.state_dict(), 'optimizer': optimizer.state_dict()}")
    for key in states:
        if not isinstance(key, str) or not STATE_NAME_RE.fullmatch(key) or key in RESERVED_STATE_NAMES:
            raise InputError(f"states[{key!r}]", "is not a usable file name (letters, digits, '_', '.', '-'; "
                             f"not {sorted(RESERVED_STATE_NAMES)})", "rename the state")
    if not isinstance(metadata, Mapping):
        raise InputError("metadata", f"must be a dict, got {type(metadata).__name__}", "pass a JSON-able dict")
    if "step" in metadata and metadata["step"] != step:
        raise InputError("metadata", f"has step={metadata['step']!r} but step={step}", "drop 'step' from metadata")
    try:  # fail before writing gigabytes of tensors, not after
        json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError("metadata", f"is not JSON-able: {exc}",
                         "pass only dicts, lists, strings, finite numbers, booleans and None") from exc


def write_state(directory: Path, key: str, obj) -> None:
    """One whole state as `<key>.safetensors` (its tensors) + `<key>.json` (its skeleton), fsynced."""
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


def read_state(directory: Path, key: str, what: str):
    """`write_state`'s inverse: `<key>.safetensors` (CPU tensors) + `<key>.json` back into the
    state; a skeleton that does not fit its tensors is an InputError naming the .json. `what`
    names the skeleton in read errors (e.g. "skeleton of 'model'")."""
    tensors = safetensors.torch.load_file(directory / f"{key}.safetensors", device="cpu")
    skeleton = read_json(directory / f"{key}.json", what)
    try:
        return unflatten_state(tensors, skeleton)
    except InputError as exc:
        raise InputError(str(directory / f"{key}.json"), exc.problem, exc.fix) from None


def swap_into_place(tmp: Path, final: Path) -> None:
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


def prune(checkpoints: Path, current_step: int, keep_last: int) -> None:
    """Keep the current checkpoint and the keep_last-1 newest older ones.

    Folders with a higher step than the one just written (left by a run that was
    resumed from an earlier checkpoint) are not "older" and are left alone; they are
    replaced when the run reaches their step again.
    """
    older = [path for step, path in step_dirs(checkpoints) if step < current_step]
    doomed = older[: max(0, len(older) - (keep_last - 1))]
    for path in doomed:
        # Rename first so a half-deleted folder never looks like a checkpoint.
        trash = checkpoints / f".{path.name}.del-{os.getpid()}"
        try:
            os.replace(path, trash)
            shutil.rmtree(trash)
        except OSError as exc:  # the checkpoint itself is safe; do not fail the save
            warnings.warn(f"could not delete old checkpoint {path}: {exc}")

def publish_folder(tmp: Path, step: int, states: Mapping[str, object], sharded: Mapping[str, dict], metadata: Mapping,
             keep_last: int) -> Path:
    """Finish the folder `tmp` (its sharded states' shards already written into it): the
    rank-0 states, the sharded states' skeletons, trainer_state.json and the manifest; then
    rename it into place, point `latest` at it and prune."""
    checkpoints, name = tmp.parent, step_name(step)
    final = checkpoints / name
    try:
        for key, obj in states.items():
            write_state(tmp, key, obj)
        for key, skeleton in sharded.items():
            atomic_write_json(tmp / f"{key}.json", skeleton)
        trainer_state = {"format": TRAINER_STATE_FORMAT, "step": step, "states": list(states),
                         "metadata": dict(metadata)}
        if sharded:
            trainer_state["sharded"] = list(sharded)
        atomic_write_json(tmp / TRAINER_STATE_NAME, trainer_state)
        write_manifest(tmp)
        fsync_dir(tmp)
        swap_into_place(tmp, final)
    except BaseException:
        # A half-written folder is useless; the previous checkpoint and `latest` are untouched.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    point_latest(checkpoints, name)
    prune(checkpoints, step, keep_last)
    return final


def point_latest(checkpoints: Path, name: str) -> None:
    """Atomically make `checkpoints/latest` name the step folder `name`."""
    atomic_write_bytes(checkpoints / LATEST_NAME, (name + "\n").encode("utf-8"))


def resolve_step_dir(path: Path) -> Path:
    """A step folder from a step folder, a run folder or its checkpoints/ folder (`latest`); an InputError if none."""
    if not path.exists():
        raise InputError(str(path), "does not exist", NO_CHECKPOINT_FIX)
    if not path.is_dir():
        raise InputError(str(path), "is a file, not a checkpoint folder", NO_CHECKPOINT_FIX)
    if (path / MANIFEST_NAME).exists() or (path / TRAINER_STATE_NAME).exists() or STEP_DIR_RE.fullmatch(path.name):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise InputError(str(path), "holds no checkpoint", NO_CHECKPOINT_FIX)
    return found
