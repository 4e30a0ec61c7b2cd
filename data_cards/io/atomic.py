"""Atomic, verified files: writes that a crash cannot leave half-done, sha256 sums, strict JSON.

The lowest layer's copy of these helpers, so that data_cards (mock banks, figures) writes
files the same way as checkpoints and releases do; pretrain/manifest.py builds folder
manifests on top of them and re-exports them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path

from cosmofm.data_cards.errors import InputError

CORRUPT_FIX = "re-download it, or use an earlier checkpoint"


def fsync_dir(directory: Path) -> None:
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


def fsync_file(path: Path) -> None:
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
    fsync_dir(path.parent)


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


def read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(str(path), f"{what} is missing", CORRUPT_FIX) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(str(path), f"{what} is not valid JSON ({exc})", CORRUPT_FIX) from exc
