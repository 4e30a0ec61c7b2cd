"""Atomic, verified files: writes that a crash cannot leave half-done, sha256 sums, and
manifests that list every file of a folder with its sum.

General (nothing here knows about training): used by checkpoints (pretrain/checkpoint.py),
model releases and hub downloads. A folder holding a pickle format is refused outright.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterable
from pathlib import Path

from cosmofm.data_cards.errors import InputError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "cosmofm-manifest-1"

# Extensions of formats that torch/pickle read by unpickling (torch.save writes .pt/.bin
# as a zip of pickles). We refuse them outright rather than sniff their contents.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
CORRUPT_FIX = "re-download it, or use an earlier checkpoint"

# ---------------------------------------------------------------------------------
# Atomic writes and hashing
# ---------------------------------------------------------------------------------


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
    manifest = read_json(path, "manifest")
    bad = InputError(str(path), f"is not a {MANIFEST_FORMAT} manifest", CORRUPT_FIX)
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
        raise InputError(str(manifest_path), f"lists an unsafe path {rel!r}", CORRUPT_FIX)
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
            + CORRUPT_FIX,
        )
    files = _load_manifest(manifest_path)
    if isinstance(required, str):  # a lone name, not its characters
        required = (required,)
    for name in required:
        if name not in files:
            where = "missing" if not (directory / name).exists() else "not listed in manifest.json"
            raise InputError(str(directory / name), f"is required but {where}", CORRUPT_FIX)
    for rel, entry in files.items():
        path = _member_path(directory, rel, manifest_path)
        if not path.is_file():
            raise InputError(str(path), "is listed in manifest.json but missing", CORRUPT_FIX)
        digest, size = _hash_and_size(path)
        if size != entry["bytes"] or digest != entry["sha256"]:
            raise InputError(
                str(path),
                "is corrupt or was changed after writing (its sha256 does not match manifest.json)",
                CORRUPT_FIX,
            )
    return files


