"""Loading released models: checksums first, then the class config.json names.

`from_pretrained` takes a local release folder or a hub repo id (`org/name`, fetched
by `cosmofm.finetune.hub.pull` from an HTTP hub or a local-directory hub). Either
way every file listed in manifest.json is checked against its sha256 and pickle-format
files are refused before anything is parsed. Then the class: a backbone
(`CosmoFMModel`, `CosmoFMForPretraining`) by `config.architectures[0]`, a task model
(backbone + head) by `config.task["type"]` from the heads registry
(`cosmofm.heads.base.task_model_class`), so no loader code changes when a head arrives.
An unregistered task, a task config from a newer schema, or (with `expect_task`) a
model of another task is an error before any weights are read.

The weights must then be exactly the model's tensors (`check_weights`): transformers
fills a missing tensor with fresh random values and drops an unexpected one with only a
log report, so a release without its head, or with renamed tensors, would otherwise
load and predict noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedModel

from cosmofm.data_cards.errors import InputError
from cosmofm.finetune.hub import pull
from cosmofm.finetune.local_hub import DEFAULT_REVISION, is_repo_id
from cosmofm.finetune.release_folder import CONFIG_NAME, verify_release, weight_tensors
from cosmofm.heads.base import task_model_class
from cosmofm.pretrain import CosmoFMForPretraining, CosmoFMModel
from cosmofm.pretrain.configuration_cosmofm import SCHEMA_VERSION

# Backbones, by the name transformers writes into config.json's architectures; task
# models come from the heads registry by config.task["type"].
BACKBONE_CLASSES: dict[str, type[PreTrainedModel]] = {cls.__name__: cls for cls in (CosmoFMModel, CosmoFMForPretraining)}


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
    if not isinstance(config, dict):
        raise InputError(str(path), f"holds a JSON {type(config).__name__}, not an object of config fields",
                         "use the config.json written by save_pretrained with the weights")
    version = config.get("schema_version", 1)  # releases from before the field existed are version 1
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise InputError(f"{path}: schema_version", f"is {version!r}, newer than this cosmofm understands ({SCHEMA_VERSION})",
                         "upgrade cosmofm (pip install -U cosmofm), or load an older revision of the model")
    return config


def model_class(folder: Path, config: dict) -> type[PreTrainedModel]:
    """The backbone class `config.architectures[0]` names, or the task model registered for
    `config.task["type"]` with its head config checked (type, schema_version, fields)."""
    where = folder / CONFIG_NAME
    names = config.get("architectures") or ["CosmoFMModel"]
    name = names[0] if isinstance(names, list) else names
    if isinstance(name, str) and name in BACKBONE_CLASSES:
        return BACKBONE_CLASSES[name]
    task = config.get("task")
    if not isinstance(task, dict):
        raise InputError(f"{where}: architectures", f"{name!r} is not a cosmofm backbone, and config.json names no task",
                         f"backbones: {sorted(BACKBONE_CLASSES)}; a task model's config.json holds its head as `task`; "
                         "upgrade cosmofm if the model is newer")
    try:
        cls = task_model_class(task.get("type"))
        cls.head_config_class.from_dict(task)
    except InputError as exc:
        raise InputError(f"{where}: {exc.field}", exc.problem, exc.fix) from None
    if name != cls.__name__:
        raise InputError(f"{where}: architectures", f"names {name!r}, but task {task['type']!r} is loaded by {cls.__name__}",
                         "use the config.json written by save_pretrained with the weights")
    return cls


def check_task(folder: Path, cls: type, expect_task: str | None) -> None:
    """Refuse a model of another task than `expect_task` (None: any model)."""
    loaded = getattr(cls, "task_type", None)
    if expect_task is not None and loaded != expect_task:
        what = f"a {loaded!r} model" if loaded else "a backbone without a task head"
        raise InputError(str(folder), f"is a {cls.__name__} ({what}), not a {expect_task.replace('-', ' ')} model",
                         f"give a model fine-tuned for {expect_task!r} (its config.json's task.type)")


def _few(keys) -> str:
    keys = sorted(map(str, keys))
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def _key_problems(folder: Path, cls: type, missing, unexpected, mismatched) -> None:
    """Raise when the release's tensors are not exactly the model's (see the module docstring)."""
    problems = [f"{what} {_few(keys)}" for what, keys in (("missing tensors:", missing), ("unexpected tensors:", unexpected),
                                                          ("tensors whose shape differs from config.json:", mismatched)) if keys]
    if problems:
        raise InputError(str(folder), f"does not hold the weights of a {cls.__name__} as its config.json describes it "
                         f"({'; '.join(problems)})", "use the release exactly as save_pretrained / cosmofm push wrote it: "
                         "weights and config.json of the same model, tensor names unchanged")


def check_weights(folder: Path, cls: type[PreTrainedModel], config) -> int:
    """Check the weights' tensor names and shapes against `cls(config)`, reading only headers.

    The model is built on the meta device (no memory, no initialisation); tied weights,
    which save_pretrained stores once, are not required. Returns the number of tensors.
    """
    found = {key: tuple(tensor.get_shape()) for _path, key, tensor in weight_tensors(folder)}
    try:
        with torch.device("meta"):
            model = cls(config)
    except InputError as exc:
        raise InputError(f"{folder / CONFIG_NAME}: {exc.field}", exc.problem, exc.fix) from None
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    _key_problems(folder, cls, missing=set(expected) - set(found) - tied, unexpected=set(found) - set(expected),
                  mismatched={f"{k} {list(found[k])} vs {list(expected[k])}" for k in set(found) & set(expected)
                              if found[k] != expected[k]})
    return len(found)


def check_release(folder: Path, expect_task: str | None = None) -> tuple[type[PreTrainedModel], object, int]:
    """(class, config, number of tensors) of a verified release folder whose weights fit its config."""
    cls = model_class(folder, check_schema_version(folder))
    check_task(folder, cls, expect_task)
    try:
        config = AutoConfig.from_pretrained(folder)
    except InputError:
        raise
    except (ValueError, TypeError, KeyError) as exc:  # transformers' and the config class's own checks
        raise InputError(str(folder / CONFIG_NAME), f"is not a usable config ({type(exc).__name__}: {str(exc).splitlines()[0]})",
                         "use the config.json written by save_pretrained with the weights") from None
    return cls, config, check_weights(folder, cls, config)


def from_pretrained(name_or_path: str | Path, *, expect_task: str | None = None, revision: str = DEFAULT_REVISION,
                    hub_endpoint: str | None = None, token: str | None = None, **kwargs) -> PreTrainedModel:
    """Load a cosmofm release, verified, as the class its config names.

    Every file's sha256 is checked, and the weights must hold exactly the model's
    tensors with the shapes its config.json gives (`check_weights`); anything else is
    an InputError naming the tensors, never a model with random weights.

    Args:
        name_or_path: a release folder, or a repo id `org/name` on the hub.
        expect_task: the task type the caller needs (e.g. "spectral-classification");
            a backbone or another task's model is then an InputError before any weights
            are read. This is where "a recipe for task A with a model of task B" is
            refused: the fine-tune CLI passes its recipe's task.
        revision: branch, tag or commit id (repo ids only).
        hub_endpoint: HTTP(S) hub URL, `file:///dir` or a folder (a local-directory
            hub); default `HF_ENDPOINT`.
        token: hub token; default `HF_TOKEN` / the stored login.
        kwargs: passed to `PreTrainedModel.from_pretrained` (e.g. `dtype`).
    """
    folder = resolve_release(name_or_path, revision=revision, hub_endpoint=hub_endpoint, token=token)
    cls, config, _ = check_release(folder, expect_task)
    # verify_manifest=False: resolve_release has just hashed every file (the model
    # class's own hook would hash them again).
    model, info = cls.from_pretrained(folder, config=config, use_safetensors=True, output_loading_info=True,
                                      verify_manifest=False, **kwargs)
    _key_problems(folder, cls, info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"])  # transformers' own view
    return model
