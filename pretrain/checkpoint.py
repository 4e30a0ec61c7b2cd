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

`write_manifest` / `verify_manifest` know nothing about training and are meant to be
reused for model releases and hub downloads.

Only one process should call `save_checkpoint` for a given run (rank 0), and
`run_lock` keeps a second run (a second `--resume` of the same folder) out of it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from cosmofm.data_cards.errors import InputError

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "cosmofm-manifest-1"
SKELETON_FORMAT = "cosmofm-state-1"
TRAINER_STATE_NAME = "trainer_state.json"
TRAINER_STATE_FORMAT = "cosmofm-checkpoint-1"
CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"
RUN_LOCK_NAME = ".cosmofm-run.lock"

# Extensions of formats that torch/pickle read by unpickling (torch.save writes .pt/.bin
# as a zip of pickles). We refuse them outright rather than sniff their contents.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_STEP_DIR_RE = re.compile(r"step_(\d{8,})")
_STATE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_RESERVED_STATE_NAMES = {"trainer_state", "manifest"}
_SHA256_RE = re.compile(r"[0-9a-f]{64}")

_CORRUPT_FIX = "re-download it, or use an earlier checkpoint"
_NO_CHECKPOINT_FIX = (
    "start without --resume, or point to a run directory, its checkpoints/ folder "
    "or one checkpoints/step_XXXXXXXX folder"
)


# ---------------------------------------------------------------------------------
# Atomic writes and hashing
# ---------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    """Make a rename/creation inside `directory` durable (a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) cannot fsync a directory
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    """Flush a file written by someone else's code (e.g. safetensors) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the new one.

    The temporary file lives in the same directory (a rename is only atomic within
    one filesystem), is fsynced before `os.replace`, and the directory is fsynced
    after it so the rename itself survives a power loss.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    # os.open with 0o666 (not mkstemp's 0o600) so the final file honours the umask.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    # Linux shows the umask without changing it; elsewhere set and restore it at once.
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(*paths: str | os.PathLike) -> None:
    """Give files that a library wrote 0600 (safetensors does, through a temporary
    file) the mode the user's umask asks for, as `open` would: 0644 under umask 022."""
    mode = 0o666 & ~_umask()
    for path in paths:
        os.chmod(path, mode)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as strict JSON (no NaN/Infinity, which other parsers reject)."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(str(path), f"cannot be written as JSON: {exc}",
                         "pass only dicts, lists, strings, finite numbers, booleans and None") from exc
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def _hash_and_size(path: Path) -> tuple[str, int]:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256")  # streamed in chunks
        size = os.fstat(f.fileno()).st_size
    return digest.hexdigest(), size


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints can be many GB)."""
    return _hash_and_size(Path(path))[0]


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(str(path), f"{what} is missing", _CORRUPT_FIX) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(str(path), f"{what} is not valid JSON ({exc})", _CORRUPT_FIX) from exc


# ---------------------------------------------------------------------------------
# Manifests (general: also used for model releases and hub downloads)
# ---------------------------------------------------------------------------------


def _files_under(directory: Path) -> list[Path]:
    """Every regular file below `directory`, sorted, without following directory links."""
    found = []
    for root, _dirs, names in os.walk(directory):
        for name in names:
            path = Path(root, name)
            if path.is_file():
                found.append(path)
    return sorted(found)


def _refuse_pickles(directory: Path) -> None:
    for path in _files_under(directory):
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise InputError(
                str(path),
                f"is a pickle-format file ({path.suffix}); cosmofm loads only safetensors "
                "(unpickling can run arbitrary code)",
                "convert the weights to .safetensors (safetensors.torch.save_file) in a "
                "trusted environment, or remove the file",
            )


def write_manifest(directory: str | os.PathLike) -> dict:
    """Write `directory/manifest.json` listing sha256 and size of every file below it.

    Paths are relative, with '/' separators, so a manifest stays valid when the
    folder is moved or uploaded. Returns the manifest that was written.
    """
    directory = Path(directory)
    _refuse_pickles(directory)  # never vouch for a file that verify_manifest would refuse
    files = {}
    for path in _files_under(directory):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST_NAME:
            continue
        digest, size = _hash_and_size(path)
        files[rel] = {"sha256": digest, "bytes": size}
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    atomic_write_json(directory / MANIFEST_NAME, manifest)
    return manifest


def save_release(model, folder: str | os.PathLike) -> Path:
    """Save a model as a release folder: `save_pretrained` (config.json + safetensors), the
    files given the umask's mode, then manifest.json. The one way every run writes `model/`."""
    folder = Path(folder)
    model.save_pretrained(folder)
    honour_umask(*(p for p in folder.iterdir() if p.is_file()))  # safetensors writes 0600
    write_manifest(folder)
    return folder


def _load_manifest(path: Path) -> dict:
    manifest = _read_json(path, "manifest")
    bad = InputError(str(path), f"is not a {MANIFEST_FORMAT} manifest", _CORRUPT_FIX)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise bad
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise bad
    for entry in files.values():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and _SHA256_RE.fullmatch(entry["sha256"])
                and isinstance(entry.get("bytes"), int) and entry["bytes"] >= 0):
            raise bad
    return files


def _member_path(directory: Path, rel: str, manifest_path: Path) -> Path:
    """`directory/rel`, refusing names that would escape the folder (hostile manifests)."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise InputError(str(manifest_path), f"lists an unsafe path {rel!r}", _CORRUPT_FIX)
    return directory.joinpath(*parts)


def verify_manifest(directory: str | os.PathLike, required: Iterable[str] = ()) -> dict:
    """Check every file listed in `directory/manifest.json` against its sha256.

    Raises InputError naming the offending file when the folder holds a pickle-format
    file, the manifest is missing or malformed, a listed file is missing or differs,
    or a name in `required` is not listed. Files present but not listed are ignored
    (a README added to a release does not invalidate it). Returns the manifest's
    ``files`` mapping.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(str(directory), "is not a folder", "point to the checkpoint or release folder")
    _refuse_pickles(directory)
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise InputError(
            str(manifest_path), "is missing, so the folder cannot be verified",
            "the folder is incomplete (an interrupted save or partial download): "
            + _CORRUPT_FIX,
        )
    files = _load_manifest(manifest_path)
    if isinstance(required, str):  # a lone name, not its characters
        required = (required,)
    for name in required:
        if name not in files:
            where = "missing" if not (directory / name).exists() else "not listed in manifest.json"
            raise InputError(str(directory / name), f"is required but {where}", _CORRUPT_FIX)
    for rel, entry in files.items():
        path = _member_path(directory, rel, manifest_path)
        if not path.is_file():
            raise InputError(str(path), "is listed in manifest.json but missing", _CORRUPT_FIX)
        digest, size = _hash_and_size(path)
        if size != entry["bytes"] or digest != entry["sha256"]:
            raise InputError(
                str(path),
                "is corrupt or was changed after writing (its sha256 does not match manifest.json)",
                _CORRUPT_FIX,
            )
    return files


# ---------------------------------------------------------------------------------
# Nested state <-> (tensors, JSON skeleton)
# ---------------------------------------------------------------------------------
#
# Skeleton encoding: None/bool/int/str and finite floats are stored as themselves
# (JSON keeps 1 and 1.0 apart); a JSON array is a Python list; every JSON object is
# a tagged node {"type": ...}: "dict" (str keys in "items", any other keys as
# encoded [key, value] "pairs"), "tuple", "float" (nan/inf), "tensor", "ndarray",
# "npscalar". Tensors are named by their path, e.g. "state/0/exp_avg".


@functools.lru_cache(maxsize=None)
def _safetensors_supports(dtype: torch.dtype) -> bool:
    """Ask safetensors itself (its dtype list grows between versions)."""
    try:
        safetensors.torch.save({"x": torch.empty(0, dtype=dtype)})
    except Exception:
        return False
    return True


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _escape(component: str) -> str:
    # '/' separates path components in tensor names, so escape it (and '%', the escape).
    return component.replace("%", "%25").replace("/", "%2F")


def _display(path: tuple[str, ...]) -> str:
    return "/".join(path) or "<root>"


class _Flattener:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[tuple[str, int]] = set()
        self._open_containers: set[int] = set()

    def _unique_name(self, path: tuple[str, ...]) -> str:
        # Distinct keys can print alike ({0: a, "0": b}); the skeleton records the
        # real name, so any unique suffix will do.
        base = "/".join(_escape(p) for p in path) or "_"
        name, n = base, 0
        while name in self.tensors:
            n += 1
            name = f"{base}#{n}"
        return name

    def _add_tensor(self, t: torch.Tensor, path: tuple[str, ...]) -> str:
        t = t.detach()
        if t.layout != torch.strided:
            raise InputError(_display(path), f"is a {t.layout} tensor; safetensors stores only dense tensors",
                             "convert it with .to_dense() in the state_dict()")
        if not _safetensors_supports(t.dtype):
            raise InputError(_display(path), f"has dtype {t.dtype}, which safetensors cannot store",
                             "cast it to a supported dtype in the state_dict()")
        t = t.to("cpu").contiguous()
        # safetensors refuses tensors that share memory (tied weights, views of one
        # buffer); copy every tensor after the first one on a given storage.
        if t.numel() == 0:
            t = t.clone()  # an empty view may still point into a shared buffer
        else:
            key = (str(t.device), t.untyped_storage().data_ptr())
            if key in self._storages:
                t = t.clone()
                key = (str(t.device), t.untyped_storage().data_ptr())
            self._storages.add(key)
        name = self._unique_name(path)
        self.tensors[name] = t
        return name

    def _array_node(self, arr: np.ndarray, path: tuple[str, ...], kind: str) -> dict:
        if arr.dtype.hasobject or arr.dtype.fields is not None:
            raise InputError(_display(path), f"is a numpy array of dtype {arr.dtype}, which cannot be stored "
                             "without pickle", "store plain numeric arrays")
        arr = np.array(arr, order="C", copy=True)  # writable, contiguous, owns its memory
        try:
            tensor = torch.from_numpy(arr)
            encoding = "tensor" if _safetensors_supports(tensor.dtype) else "bytes"
        except TypeError:  # strings, datetimes, non-native byte order, ...
            encoding = "bytes"
        if encoding == "bytes":
            # Raw bytes + numpy dtype string round-trip any fixed-size dtype bit-exactly.
            tensor = torch.from_numpy(np.frombuffer(arr.tobytes(), dtype=np.uint8).copy())
        name = self._add_tensor(tensor, path)
        return {"type": kind, "name": name, "dtype": arr.dtype.str, "shape": list(arr.shape),
                "encoding": encoding}

    def _float(self, x: float):
        return x if math.isfinite(x) else {"type": "float", "value": repr(float(x))}

    def encode_key(self, key, path: tuple[str, ...]):
        if key is None or isinstance(key, (bool, str)) or type(key) is int:
            return key
        if isinstance(key, int):
            return int(key)
        if isinstance(key, float) and not isinstance(key, np.floating):
            return self._float(key)
        if isinstance(key, tuple):
            return {"type": "tuple", "items": [self.encode_key(k, path) for k in key]}
        raise InputError(_display(path), f"has a dict key of type {type(key).__name__} ({key!r})",
                         "use str, int, float, bool, None or tuples of these as keys")

    def encode(self, obj, path: tuple[str, ...]):
        # Order matters: np.float64 subclasses float and bool subclasses int.
        if isinstance(obj, torch.Tensor):
            return {"type": "tensor", "name": self._add_tensor(obj, path),
                    "dtype": _dtype_name(obj.dtype), "shape": list(obj.shape)}
        if isinstance(obj, np.ndarray):
            return self._array_node(obj, path, "ndarray")
        if isinstance(obj, np.generic):
            return self._array_node(np.asarray(obj), path, "npscalar")
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return self._float(obj)
        if isinstance(obj, (Mapping, list, tuple)):
            return self._encode_container(obj, path)
        raise InputError(_display(path), f"holds a {type(obj).__name__}, which a checkpoint cannot store",
                         "make state_dict() return only tensors, numpy arrays, numbers, strings, "
                         "None, and dicts/lists/tuples of these")

    def _encode_container(self, obj, path: tuple[str, ...]):
        if id(obj) in self._open_containers:
            raise InputError(_display(path), "contains itself (a reference cycle)", "break the cycle")
        self._open_containers.add(id(obj))
        try:
            if isinstance(obj, list):
                return [self.encode(v, path + (str(i),)) for i, v in enumerate(obj)]
            if isinstance(obj, tuple):
                return {"type": "tuple", "items": [self.encode(v, path + (str(i),)) for i, v in enumerate(obj)]}
            if all(type(k) is str for k in obj):
                return {"type": "dict", "items": {k: self.encode(v, path + (k,)) for k, v in obj.items()}}
            return {"type": "dict", "pairs": [[self.encode_key(k, path), self.encode(v, path + (str(k),))]
                                              for k, v in obj.items()]}
        finally:
            self._open_containers.discard(id(obj))


def flatten_state(obj) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a nested state into safetensors-ready tensors and a JSON-able skeleton.

    Accepts nested dict/list/tuple of None, bool, int, float (incl. nan/inf), str,
    torch tensors, numpy arrays and numpy scalars. Returned tensors are on the CPU,
    contiguous and never share memory (safetensors needs both); they may alias the
    input's CPU tensors, so write them before changing the input. Dict subclasses
    (OrderedDict) come back as dict and tuple subclasses (torch.Size) as tuple.
    """
    flattener = _Flattener()
    root = flattener.encode(obj, ())
    return flattener.tensors, {"format": SKELETON_FORMAT, "root": root}


class _Unflattener:
    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors
        self.used: set[str] = set()

    def _bad(self, problem: str) -> InputError:
        return InputError("skeleton", problem, "the checkpoint is damaged or its files come from different saves; "
                          "use an earlier checkpoint")

    def _tensor(self, node: dict) -> torch.Tensor:
        name = node.get("name")
        if name not in self.tensors:
            raise self._bad(f"tensor {name!r} is in the skeleton but not in the tensor file")
        self.used.add(name)
        return self.tensors[name]

    def _array(self, node: dict) -> np.ndarray:
        tensor = self._tensor(node)
        dtype, shape = np.dtype(node["dtype"]), tuple(node["shape"])
        if node.get("encoding") == "bytes":
            arr = np.frombuffer(tensor.numpy().tobytes(), dtype=dtype).reshape(shape).copy()
        else:
            arr = tensor.numpy()
        if arr.dtype != dtype or arr.shape != shape:
            raise self._bad(f"array {node['name']!r} has dtype/shape {arr.dtype}/{arr.shape}, "
                            f"expected {dtype}/{shape}")
        return arr

    def decode(self, node):
        if isinstance(node, list):
            return [self.decode(v) for v in node]
        if not isinstance(node, dict):
            return node
        kind = node.get("type")
        if kind == "dict" and "items" in node:
            return {k: self.decode(v) for k, v in node["items"].items()}
        if kind == "dict":
            return {self.decode(k): self.decode(v) for k, v in node["pairs"]}
        if kind == "tuple":
            return tuple(self.decode(v) for v in node["items"])
        if kind == "float":
            return float(node["value"])
        if kind == "tensor":
            tensor = self._tensor(node)
            if _dtype_name(tensor.dtype) != node["dtype"] or list(tensor.shape) != node["shape"]:
                raise self._bad(f"tensor {node['name']!r} is {_dtype_name(tensor.dtype)}{list(tensor.shape)}, "
                                f"expected {node['dtype']}{node['shape']}")
            return tensor
        if kind == "ndarray":
            return self._array(node)
        if kind == "npscalar":
            return self._array(node)[()]
        raise self._bad(f"unknown node type {kind!r}")


def unflatten_state(tensors: Mapping[str, torch.Tensor], skeleton: dict):
    """Inverse of `flatten_state`: rebuild the nested object bit-exactly."""
    if not isinstance(skeleton, dict) or skeleton.get("format") != SKELETON_FORMAT or "root" not in skeleton:
        raise InputError("skeleton", f"is not a {SKELETON_FORMAT} skeleton",
                         "pass the JSON written next to the tensors by save_checkpoint")
    unflattener = _Unflattener(tensors)
    try:
        obj = unflattener.decode(skeleton["root"])
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise unflattener._bad(f"is malformed ({type(exc).__name__}: {exc})") from exc
    extra = sorted(set(tensors) - unflattener.used)
    if extra:
        raise unflattener._bad(f"the tensor file has tensors the skeleton does not mention: {extra[:5]}")
    return obj


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
    _fsync_file(path)
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
    _fsync_dir(final.parent)
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
        _fsync_dir(tmp)
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
    trainer_state = _read_json(step_dir / TRAINER_STATE_NAME, "trainer state")
    if not (isinstance(trainer_state, dict) and trainer_state.get("format") == TRAINER_STATE_FORMAT
            and isinstance(trainer_state.get("states"), list) and isinstance(trainer_state.get("metadata"), dict)):
        raise InputError(str(step_dir / TRAINER_STATE_NAME), f"is not a {TRAINER_STATE_FORMAT} file", _CORRUPT_FIX)
    states = {}
    for key in trainer_state["states"]:
        for suffix in (".safetensors", ".json"):
            if f"{key}{suffix}" not in files:
                raise InputError(str(step_dir / f"{key}{suffix}"), "is missing from manifest.json", _CORRUPT_FIX)
        tensors = safetensors.torch.load_file(step_dir / f"{key}.safetensors", device="cpu")
        skeleton = _read_json(step_dir / f"{key}.json", f"skeleton of {key!r}")
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
