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
pretrain/manifest.py, the nested-state encoding in pretrain/state_tree.py, the step
folders (naming, atomic publish, `latest`, pruning) in pretrain/checkpoint_folders.py and
the sharded states in pretrain/checkpoint_sharded.py; all are re-exported here, the one
checkpoint API.

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

DeepSpeed ZeRO (pretrain/checkpoint_deepspeed.py): DeepSpeed writes its optimizer partitions
only with torch.save, so every process writes its own partition instead, as a whole state
of this format (``optimizer/rank-RRRRR-of-WWWWW.safetensors`` + ``.json``), into the same
hidden folder as a sharded save; rank 0 adds the gathered model, scheduler and RNG states,
the manifest (a sha256 per partition) and `optimizer_partitions` in the metadata, then
publishes it as above. They resume under the same ZeRO stage on as many processes.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.pretrain.checkpoint_folders import (  # noqa: F401 (re-exported)
    CHECKPOINTS_DIR, LATEST_NAME, NO_CHECKPOINT_FIX, RUN_LOCK_NAME, STEP_DIR_RE, TRAINER_STATE_FORMAT, TRAINER_STATE_NAME,
    check_save_arguments, checkpoints_dir, latest_checkpoint, point_latest, publish_folder, read_state, resolve_step_dir,
    step_dirs, step_name,
)
from cosmofm.pretrain.checkpoint_sharded import (  # noqa: F401 (re-exported)
    SHARDED_FIX, PendingSave, begin_sharded_save, check_model_state, consolidate_model, load_sharded_state,
    publish_sharded_checkpoint, read_full_sharded_state, sharded_save_dir, write_sharded_state,
)
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
    check_save_arguments(step, states, metadata, keep_last)
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    checkpoints.mkdir(parents=True, exist_ok=True)
    tmp = checkpoints / f".{step_name(step)}.tmp-{os.getpid()}"
    if tmp.exists():  # left over from an earlier save in a process with our pid
        shutil.rmtree(tmp)
    tmp.mkdir()
    return publish_folder(tmp, step, states, {}, metadata, keep_last)


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
    step_dir = resolve_step_dir(Path(path))
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
        states[key] = read_state(step_dir, key, f"skeleton of {key!r}")
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
    checkpoints = checkpoints_dir(Path(run_dir))
    if step is not None:
        path = checkpoints / step_name(step)
        if not path.is_dir():
            have = [s for s, _ in step_dirs(checkpoints)]
            raise InputError("--resume-from", f"{checkpoints} has no checkpoint of step {step}",
                             f"pick one of the steps {have}" if have else NO_CHECKPOINT_FIX)
        candidates = [path]
    else:
        newest = latest_checkpoint(run_dir)
        if newest is None:
            return None
        newest_step = int(STEP_DIR_RE.fullmatch(newest.name).group(1))
        candidates = [newest] + [p for s, p in reversed(step_dirs(checkpoints)) if s < newest_step]
    for i, path in enumerate(candidates):
        try:
            states, metadata = load_checkpoint(path, full_sharded)
        except InputError as exc:
            if step is not None or i == len(candidates) - 1:
                raise
            warnings.warn(f"checkpoint {path} is unusable ({exc}); left in place, trying {candidates[i + 1].name}")
            continue
        point_latest(checkpoints, path.name)
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
