"""Atomic, verified files: writes that a crash cannot leave half-done, sha256 sums, and
manifests that list every file of a folder with its sum.

General (nothing here knows about training): used by checkpoints (pretrain/checkpoint.py),
model releases and hub downloads. A folder holding a pickle format is refused outright.
The single-file helpers (atomic writes, sha256, strict JSON) live in
cosmofm.data_cards.io.atomic, so the lowest layer can use them too; they are re-exported here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.io.atomic import (  # noqa: F401 (re-exported: the checkpoint and release API)
    CORRUPT_FIX, _hash_and_size, atomic_write_bytes, atomic_write_json, fsync_dir, fsync_file, honour_umask, read_json, sha256_file,
)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "cosmofm-manifest-1"

# Extensions of formats that torch/pickle read by unpickling (torch.save writes .pt/.bin
# as a zip of pickles). We refuse them outright rather than sniff their contents.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_SHA256_RE = re.compile(r"[0-9a-f]{64}")

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


