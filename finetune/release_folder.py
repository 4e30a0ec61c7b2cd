"""Release folders: the file set a hub repository holds, built and verified on disk.

A **release folder** holds, one file set per revision:

    config.json                  the model config (architectures, schema_version)
    model.safetensors            the weights; above `max_shard_size` instead
    model.safetensors.index.json   an index and model-0000k-of-0000n.safetensors shards
    README.md                    the model card, rendered by `cosmofm.finetune.model_card`
                                 from the config, the data cards and the evaluation JSON
    data_cards/<name>.yaml       the data cards of every survey the model was trained on
    recipe.yaml                  the training recipe (when the run recorded one)
    eval_results.json            measured metrics per task (when there are any)
    manifest.json                sha256 and size of every other file

`assemble_release` builds one from a training run folder (`<run>/model`,
`<run>/recipe.yaml`, the data cards of the run's datasets) or from an existing
release folder; `verify_release` checks every checksum before anything is parsed, and
`weight_tensors` / `check_finite_weights` read the verified weights.

This is apart from the hub client (`cosmofm.finetune.hub`: push, pull): a release
folder is only files on disk, made and checked the same way whichever hub, if any, it
goes to, and the loader (`cosmofm.finetune.release`) and `cosmofm inspect` verify
local folders without the hub client.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from cosmofm.data_cards.errors import InputError
from cosmofm.pretrain.checkpoint import MANIFEST_NAME, verify_manifest, write_manifest

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CARD_NAME = "README.md"
CARDS_DIR = "data_cards"
RECIPE_NAME = "recipe.yaml"
EVAL_NAME = "eval_results.json"
# The Hub's recommended shard size: big enough for few files, small enough that one
# failed transfer does not cost a whole multi-GB download.
DEFAULT_MAX_SHARD_SIZE = "5GB"


def release_weight_files(folder: str | os.PathLike, listed: dict | None = None) -> list[str]:
    """The weight files a release must hold, in the order transformers looks for them.

    `model.safetensors` when the folder (or its manifest, `listed`) has it; otherwise
    the index and every shard it names. Shard names come from the index, which
    `verify_manifest` checks against its sha256 in the same call that needs them.
    """
    folder = Path(folder)
    listed = listed or {}
    if WEIGHTS_NAME in listed or (folder / WEIGHTS_NAME).is_file():
        return [WEIGHTS_NAME]
    index = folder / WEIGHTS_INDEX_NAME
    if WEIGHTS_INDEX_NAME not in listed and not index.is_file():
        return [WEIGHTS_NAME]  # neither: let the check name the usual file as missing
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted({str(v) for v in weight_map.values()})
    except FileNotFoundError:
        raise InputError(str(index), "is listed in manifest.json but missing", "re-download the release") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(str(index), f"is not a safetensors index ({exc})", "re-download the release") from exc
    return [WEIGHTS_INDEX_NAME, *shards]


def verify_release(folder: str | os.PathLike) -> dict:
    """Check a release folder before anything in it is parsed; returns the manifest files.

    Refuses pickle-format files anywhere in the folder, requires config.json and the
    weights (`release_weight_files`) to be listed in manifest.json, and checks every
    listed file's sha256. Errors are InputErrors naming the file.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST_NAME
    listed = {}
    if manifest.is_file():
        with contextlib.suppress(ValueError, OSError, AttributeError):  # verify_manifest reports a bad manifest
            listed = json.loads(manifest.read_text(encoding="utf-8")).get("files") or {}
    required = (CONFIG_NAME, *release_weight_files(folder, listed if isinstance(listed, dict) else {}))
    return verify_manifest(folder, required=required)


def weight_tensors(folder: str | os.PathLike):
    """Yield (file, tensor name, slice) for every tensor of a verified release's weights.

    Only the headers are read up front: `slice.get_shape()` costs nothing, `slice[:]`
    loads that one tensor. A file that safetensors cannot parse (truncated, not
    safetensors at all) is an InputError naming it, not a SafetensorError traceback.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    for name in release_weight_files(folder):
        if name == WEIGHTS_INDEX_NAME:
            continue
        path = folder / name
        try:
            with safe_open(path, framework="pt", device="cpu") as weights:
                for key in weights.keys():
                    yield path, key, weights.get_slice(key)
        except SafetensorError as exc:
            raise InputError(str(path), f"is not a readable safetensors file ({exc})",
                             "the file was written broken (a matching checksum only means it was not changed since): "
                             "use another revision, or save the model again") from None


def check_finite_weights(folder: str | os.PathLike) -> None:
    """Refuse weights holding NaN or inf: a diverged run must never become a release."""
    for path, key, tensor in weight_tensors(folder):
        values = tensor[:]
        if (values.is_floating_point() or values.is_complex()) and not bool(values.isfinite().all()):
            raise InputError(f"{path}: {key}", "holds NaN or infinite values: the training run diverged",
                             "do not publish it; train again (e.g. with a lower optim.lr) or publish the weights "
                             "of an earlier, finite checkpoint")


@dataclass
class _Source:
    model_dir: Path
    recipe: Path | None
    card_files: list[Path]
    eval_file: Path | None


def _locate_source(source: Path) -> _Source:
    """Accept a training run folder (`<run>/model`) or a release folder."""
    if (source / "model" / CONFIG_NAME).is_file():  # a training run
        cards = sorted(source.glob(f"data/*/{CARDS_DIR}/*.yaml"))
        recipe = source / RECIPE_NAME
        if recipe.is_file():
            try:
                datasets = (yaml.safe_load(recipe.read_text()) or {}).get("data", {}).get("datasets") or []
            except yaml.YAMLError as exc:
                raise InputError(str(recipe), f"is not valid YAML ({exc})", "fix or remove it") from exc
            for path in datasets:  # user datasets live outside the run folder
                cards += sorted(Path(path).glob(f"{CARDS_DIR}/*.yaml"))
        return _Source(source / "model", recipe if recipe.is_file() else None, cards,
                       source / EVAL_NAME if (source / EVAL_NAME).is_file() else None)
    if (source / CONFIG_NAME).is_file():  # a release folder
        return _Source(source, source / RECIPE_NAME if (source / RECIPE_NAME).is_file() else None,
                       sorted(source.glob(f"{CARDS_DIR}/*.yaml")),
                       source / EVAL_NAME if (source / EVAL_NAME).is_file() else None)
    what = "does not exist" if not source.exists() else "is neither a training run folder (with model/) nor a release folder (with config.json)"
    raise InputError(str(source), what, "give the run folder written by `cosmofm pretrain` or a release folder")


def _training_cards(source: _Source, survey_names: list[str]):
    """The data cards of the surveys the model was trained on (config.survey_names)."""
    from cosmofm.data_cards.schema import load_card

    found = {}
    for path in source.card_files:
        card = load_card(path)
        found.setdefault(card.name, card)
    cards = []
    for name in survey_names:
        if name not in found:
            try:  # the mock corpus uses the shipped cards
                found[name] = load_card(name)
            except InputError:
                raise InputError(f"config.json: survey_names[{name!r}]", "has no data card in the run's datasets, "
                                 "the release's data_cards/ or the shipped cards",
                                 f"add {CARDS_DIR}/{name}.yaml to the release folder") from None
        cards.append(found[name])
    return cards


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB" (decimal, as the Hub counts) or "512MiB"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if isinstance(size, bool) or not match or match.group(2) not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise InputError("max_shard_size", f"{size!r} is not a positive size", 'give bytes or e.g. "5GB", "500MB"')
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def _copy_weights(model_dir: Path, staged: Path, max_shard_size: int | str) -> None:
    """Copy the weights byte for byte, or re-shard them when a file exceeds max_shard_size."""
    from huggingface_hub.serialization import save_torch_state_dict

    files = release_weight_files(model_dir)
    limit = parse_size(max_shard_size)
    shards = [f for f in files if f != WEIGHTS_INDEX_NAME]
    if files == [WEIGHTS_NAME] and (model_dir / WEIGHTS_NAME).stat().st_size <= limit:
        shutil.copyfile(model_dir / WEIGHTS_NAME, staged / WEIGHTS_NAME)
        return
    import safetensors.torch

    tensors = {}
    for name in shards:  # already verified against the source manifest
        tensors.update(safetensors.torch.load_file(model_dir / name, device="cpu"))
    save_torch_state_dict(tensors, staged, max_shard_size=limit, metadata={"format": "pt"})


def assemble_release(source: str | os.PathLike, dest: str | os.PathLike, *, eval_results: str | os.PathLike | dict | None = None,
                     max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, repo_id: str | None = None) -> Path:
    """Build a verified release folder at `dest` (which must not exist) and return it.

    Weights holding NaN or inf (a diverged run) are refused, naming the tensor.

    Args:
        source: a training run folder (its `model/`, `recipe.yaml` and the data cards of
            its datasets are used) or a release folder.
        dest: where to write the release; built next to it and renamed into place.
        eval_results: an evaluation JSON (path or dict, format in
            `cosmofm.finetune.model_card.load_eval_results`); default: the source's
            `eval_results.json` if it has one.
        max_shard_size: weights files above this size (bytes or "5GB") are split into
            shards plus `model.safetensors.index.json`.
        repo_id: named in the model card's usage example.
    """
    from cosmofm.finetune.model_card import count_parameters, load_eval_results, render_model_card

    source_path, dest = Path(source), Path(dest)
    src = _locate_source(source_path)
    verify_release(src.model_dir)
    check_finite_weights(src.model_dir)
    if dest.exists():
        raise InputError(str(dest), "already exists", "choose a new folder for the release")
    config = json.loads((src.model_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    cards = _training_cards(src, list(config.get("survey_names") or []))
    recipe = None
    if src.recipe is not None:
        recipe = yaml.safe_load(src.recipe.read_text(encoding="utf-8"))
    if eval_results is None and src.eval_file is not None:
        eval_results = src.eval_file
    results = load_eval_results(eval_results) if eval_results is not None else []

    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    staged.mkdir()
    try:
        shutil.copyfile(src.model_dir / CONFIG_NAME, staged / CONFIG_NAME)
        _copy_weights(src.model_dir, staged, max_shard_size)
        (staged / CARDS_DIR).mkdir()
        for card in cards:
            text = yaml.safe_dump(card.to_dict(), sort_keys=False, allow_unicode=True)
            (staged / CARDS_DIR / f"{card.name}.yaml").write_text(text, encoding="utf-8")
        if src.recipe is not None:
            shutil.copyfile(src.recipe, staged / RECIPE_NAME)
        if results:
            (staged / EVAL_NAME).write_text(json.dumps({"results": results}, indent=2) + "\n", encoding="utf-8")
        card_text = render_model_card(config, cards, results, recipe, n_parameters=count_parameters(staged), repo_id=repo_id)
        (staged / CARD_NAME).write_text(card_text, encoding="utf-8")
        write_manifest(staged)
        verify_release(staged)
        os.replace(staged, dest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return dest
