"""Loading released models: checksums first, then the class named in config.json.

`from_pretrained` takes a local release folder or a hub repo id (`org/name`, fetched
by `cosmofm.finetune.hub.pull` from an HTTP hub or a local-directory hub). Either
way every file listed in manifest.json is checked against its sha256 and pickle-format
files are refused before anything is parsed; then the class is looked up in
`MODEL_CLASSES` by `config.architectures[0]`. Task models (backbone + head) add
themselves with `register_model_class`, so no loader code changes when heads arrive.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, PreTrainedModel

from cosmofm.data_cards.errors import InputError
from cosmofm.finetune.hub import CONFIG_NAME, DEFAULT_REVISION, is_repo_id, pull, verify_release
from cosmofm.heads.classification import CosmoFMForSpectralClassification
from cosmofm.pretrain import CosmoFMForPretraining, CosmoFMModel
from cosmofm.pretrain.configuration_cosmofm import SCHEMA_VERSION

# Architectures cosmofm can load, by the name transformers writes into config.json.
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {cls.__name__: cls for cls in (CosmoFMModel, CosmoFMForPretraining)}


def register_model_class(cls: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """Make `cosmofm.from_pretrained` load configs whose architectures name `cls` (usable as a decorator)."""
    MODEL_CLASSES[cls.__name__] = cls
    return cls


register_model_class(CosmoFMForSpectralClassification)


def resolve_release(name_or_path: str | Path, *, revision: str = DEFAULT_REVISION, hub_endpoint: str | None = None,
                    token: str | None = None) -> Path:
    """The verified local folder of a release folder path or a hub repo id."""
    folder = Path(name_or_path)
    if folder.is_dir():
        verify_release(folder)
        return folder
    if is_repo_id(name_or_path) and not folder.exists():
        return pull(name_or_path, revision=revision, hub_endpoint=hub_endpoint, token=token)  # verified
    raise InputError(str(name_or_path), "is neither a release folder nor a hub repo id (ORG/NAME)",
                     "give the folder written by save_pretrained / cosmofm pull, or a repo id")


def check_schema_version(folder: Path) -> dict:
    """Read config.json and stop with an upgrade message when it is newer than this cosmofm."""
    path = folder / CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(str(path), f"is not valid JSON ({exc})", "re-download the release") from exc
    version = config.get("schema_version", 1)  # releases from before the field existed are version 1
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise InputError(f"{path}: schema_version", f"is {version!r}, newer than this cosmofm understands ({SCHEMA_VERSION})",
                         "upgrade cosmofm (pip install -U cosmofm), or load an older revision of the model")
    return config


def from_pretrained(name_or_path: str | Path, *, revision: str = DEFAULT_REVISION, hub_endpoint: str | None = None,
                    token: str | None = None, **kwargs) -> PreTrainedModel:
    """Load a cosmofm release, verified, as the class its config names.

    Args:
        name_or_path: a release folder, or a repo id `org/name` on the hub.
        revision: branch, tag or commit id (repo ids only).
        hub_endpoint: HTTP(S) hub URL, `file:///dir` or a folder (a local-directory
            hub); default `HF_ENDPOINT`.
        token: hub token; default `HF_TOKEN` / the stored login.
        kwargs: passed to `PreTrainedModel.from_pretrained` (e.g. `dtype`).
    """
    folder = resolve_release(name_or_path, revision=revision, hub_endpoint=hub_endpoint, token=token)
    raw = check_schema_version(folder)
    names = raw.get("architectures") or ["CosmoFMModel"]
    cls = MODEL_CLASSES.get(names[0])
    if cls is None:
        raise InputError(f"{folder / CONFIG_NAME}: architectures", f"{names[0]!r} is not a cosmofm model",
                         f"known: {sorted(MODEL_CLASSES)}; upgrade cosmofm if the model is newer")
    config = AutoConfig.from_pretrained(folder)
    return cls.from_pretrained(folder, config=config, use_safetensors=True, **kwargs)
