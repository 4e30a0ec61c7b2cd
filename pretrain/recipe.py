"""Pretraining recipes: typed, file-based configuration of a whole run.

A recipe is a YAML file (shipped ones in pretrain/recipes/, package data read through
importlib.resources, so any install finds them) with four sections, `model` (the
CosmoFMConfig arguments), `data`, `optim` and `run`. Command-line overrides use dotted
keys (`--set optim.lr=3e-4`). The resolved recipe is written next to the run's
outputs, so every run records exactly what it did.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cosmofm.data_cards.errors import InputError

FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class DataConfig:
    """Where samples come from.

    datasets: paths written by `cosmofm mock` / `write_dataset` (Arrow dirs or Parquet),
        or survey files as published (SDSS spec, DESI coadd, ESO/4MOST SDP, FITS images
        and cubes, tables; see cosmofm.data_cards.readers). Empty = generate the
        embedded mock corpus below into `<output_dir>/data`.
    mock_cards / mock_counts: shipped card names and how many mocks of each. Spectra and
        images generated with the same seed are the same objects (paired).
    num_workers: DataLoader worker processes (0 = load in the training process).
    pair_block: for `datasets` that store each object's views side by side (e.g. a
        spectrum then its image), the run length to keep together when shuffling.
        The mock corpus is always written in blocks of 2.
    streaming: read the datasets as a `datasets.IterableDataset` (pretrain/streaming.py):
        each file front to back once per epoch, memory bounded by the shuffle buffer
        whatever the corpus size; resume needs the same process and worker counts.
        Only dataset folders / Parquet shards (not survey files).
    mixture: streaming only: weight per card (survey) or modality name, e.g.
        {sdss-like: 2, cube: 1}; a card's own weight wins over its modality's. Empty =
        the corpus's own proportions. Every sample is still seen once per epoch; the
        weights set how the parts are interleaved.
    shuffle_buffer: streaming only: blocks held in the shuffle buffer (0 = no buffer;
        the pieces' order is shuffled anyway). Memory is this many blocks.
    piece_rows: streaming only: rows per piece of an Arrow file (Parquet: its row
        groups); the pieces are the shards datasets splits over processes and workers,
        so each part needs at least processes x workers of them.
    """

    datasets: list[str] = field(default_factory=list)
    mock_cards: list[str] = field(default_factory=lambda: ["sdss-like", "lsst-like", "ska-hi-like", "lightcone-21cm"])
    mock_counts: list[int] = field(default_factory=lambda: [512, 512, 256, 256])
    mock_seed: int = 0
    num_workers: int = 0
    pair_block: int = 1
    streaming: bool = False
    mixture: dict[str, float] = field(default_factory=dict)
    shuffle_buffer: int = 256
    piece_rows: int = 64


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay.

    global_batch: samples per micro-step summed over all processes; the optimizer
        steps every `grad_accum` micro-steps. It must divide by the process count.
    """

    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 20
    max_steps: int = 300
    grad_clip: float = 1.0
    grad_accum: int = 1
    global_batch: int = 32


@dataclass
class RunConfig:
    """output_dir: run folder (checkpoints/, model/, metrics.jsonl, logs).
    mixed_precision: "no" (fp32), "bf16" or "fp16" (CUDA only), via Accelerate autocast.
    trackers: any of "tensorboard", "wandb" (offline unless WANDB_MODE says otherwise).
    backend: how processes share the model: a shipped backend (ddp, fsdp2, zero1, zero2,
        zero3; pretrain/backends/) or a backend YAML path (cosmofm.pretrain.backend).
    peak_tflops: one device's peak TFLOP/s for the MFU in observe.jsonl; 0 = the
        datasheet peak of the GPU by name, or on CPU a matmul measured once per process
        (cosmofm.pretrain.observe).
    """

    output_dir: str = "runs/pretrain"
    seed: int = 0
    save_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    mixed_precision: str = "no"
    trackers: list[str] = field(default_factory=lambda: ["tensorboard", "wandb"])
    progress: bool = True
    backend: str = "ddp"
    peak_tflops: float = 0.0


@dataclass
class PretrainRecipe:
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] = ()) -> "PretrainRecipe":
        """Read a recipe by path or by shipped name (`demo`), then apply `key=value` overrides."""
        raw = {} if path is None else read_recipe(path, _recipes(), "write model:, data:, optim: and run: sections")
        return cls.from_dict(apply_overrides(raw, overrides))

    @classmethod
    def from_dict(cls, raw: dict) -> "PretrainRecipe":
        unknown = set(raw) - {"model", "data", "optim", "run"}
        if unknown:
            raise InputError("recipe", f"unknown sections {sorted(unknown)}", "use model, data, optim and run")
        kwargs = {}
        for name, typ in (("model", dict), ("data", DataConfig), ("optim", OptimConfig), ("run", RunConfig)):
            section = raw.get(name) or {}
            if not isinstance(section, dict):
                raise InputError(f"recipe.{name}", f"is a section of settings, not a value ({section!r})", f"set its keys, e.g. --set {name}.KEY=VALUE")
            if typ is dict:
                kwargs[name] = dict(section)
                continue
            names = {f.name for f in dataclasses.fields(typ)}
            bad = set(section) - names
            if bad:
                raise InputError(f"recipe.{name}", f"unknown keys {sorted(bad)}", f"known keys: {sorted(names)}")
            kwargs[name] = typ(**section)
        recipe = cls(**kwargs)
        recipe.validate()
        return recipe

    def validate(self):
        """Check every setting's type and range (and read YAML 1.1's `3e-4`, a string, as the number)."""
        for name in ("data", "optim", "run"):
            section = getattr(self, name)
            for f in dataclasses.fields(section):
                setattr(section, f.name, _checked(f"{name}.{f.name}", getattr(section, f.name), f.type))
        _check_model(self.model)
        o, r, d = self.optim, self.run, self.data
        if len(o.betas) != 2 or not all(b < 1 for b in o.betas):
            raise InputError("recipe.optim.betas", f"must be two numbers in [0, 1), got {o.betas}", "e.g. [0.9, 0.95]")
        if o.lr / (1 - o.betas[0]) >= FLOAT32_MAX:  # AdamW's first step, which torch takes in float32
            raise InputError("recipe.optim.lr", f"{o.lr} makes AdamW's first step overflow float32", "use a learning rate below 1")
        if r.mixed_precision not in ("no", "bf16", "fp16"):
            raise InputError("recipe.run.mixed_precision", f"{r.mixed_precision!r} is not supported", "use no, bf16 or fp16")
        if not (r.peak_tflops >= 0 and math.isfinite(r.peak_tflops)):
            raise InputError("recipe.run.peak_tflops", f"must be a finite number >= 0, got {r.peak_tflops}", "e.g. 989.4 for an H100 SXM in bf16, or 0 to look it up")
        if set(r.trackers) - {"tensorboard", "wandb"}:
            raise InputError("recipe.run.trackers", f"unknown trackers {r.trackers}", "use tensorboard and/or wandb")
        from cosmofm.pretrain.backend import load_backend

        load_backend(r.backend)  # an unknown name or a bad file: named now, before any compute
        if d.mixture and not d.streaming:
            raise InputError("recipe.data.mixture", "weights the streamed corpus parts, but data.streaming is false", "set data.streaming=true, or remove data.mixture")
        if not d.datasets and len(d.mock_cards) != len(d.mock_counts):
            raise InputError("recipe.data.mock_counts", "must have one count per mock card", "list as many counts as cards")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path):
        write_recipe(self.to_dict(), path)


def write_recipe(raw: dict, path: str | Path) -> None:
    """A recipe's resolved entries as YAML, written atomically (beside a run's outputs)."""
    from cosmofm.pretrain.checkpoint import atomic_write_bytes

    atomic_write_bytes(Path(path), yaml.safe_dump(raw, sort_keys=False).encode())


def recipe_names(shipped) -> list[str]:
    """Names of the recipes in a folder of shipped recipes (a Traversable)."""
    return sorted(q.name.removesuffix(".yaml") for q in shipped.iterdir() if q.name.endswith(".yaml"))


def read_recipe(path: str | Path, shipped, sections: str) -> dict:
    """The mapping in a recipe YAML: `path`, or a name without suffix from the folder of
    shipped recipes `shipped` (a Traversable)."""
    p = Path(path)
    if not p.suffix:
        p = shipped / f"{path}.yaml"
    if not p.is_file():
        raise InputError("--config", f"no recipe at {p}", f"give a YAML path or one of {recipe_names(shipped)}")
    raw = _yaml(p.read_text(), str(p), "fix the YAML syntax") or {}
    if not isinstance(raw, dict):
        raise InputError(str(p), f"must be a mapping of sections, got {type(raw).__name__}", sections)
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`raw` with each `dotted.key=value` override (the value read as YAML) set in place."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError("--set", f"{item!r} is not key=value", "write e.g. --set optim.lr=3e-4")
        set_entry(raw, key, _yaml(value, f"--set {item}", "quote strings and close brackets, e.g. --set data.mock_counts=[8,8,4,4]"), item)
    return raw


def set_entry(raw: dict, key: str, value, item: str | None = None) -> dict:
    """`raw` with the entry at the dotted `key` set to `value` as it is (sections made as
    needed); `item` names the override in errors."""
    item = item or f"{key}={value}"
    *parents, leaf = key.split(".")
    if not all(parents + [leaf]):
        raise InputError("--set", f"{key!r} is not a dotted key", "write e.g. --set optim.lr=3e-4")
    node = raw
    for depth, k in enumerate(parents):
        if node.get(k) is None:
            node[k] = {}
        node = node[k]
        if not isinstance(node, dict):
            where = ".".join(parents[: depth + 1])
            raise InputError("--set", f"{item!r}: {where} is a value ({node!r}), not a section", f"set {where}=VALUE itself")
    node[leaf] = value
    return raw


def _recipes():
    """The folder of shipped recipes (a Traversable: a directory, or a zip member)."""
    return resources.files(__package__) / "recipes"


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped with the package (`PretrainRecipe.load(name)`)."""
    return recipe_names(_recipes())


# Numeric settings that must be > 0; every other one must be >= 0. All must be finite.
_POSITIVE = {
    "data.mock_counts", "data.pair_block", "data.piece_rows", "optim.lr", "optim.max_steps", "optim.grad_accum", "optim.global_batch",
    "run.save_every", "run.keep_last", "run.log_every", "model.hidden_size", "model.num_hidden_layers",
    "model.num_attention_heads", "model.spectrum_patch_size", "model.image_patch_size", "model.projection_dim",
    "model.layer_norm_eps",
}


def _checked(name: str, value, kind: str):
    """`value` as a setting of type `kind` (a dataclass annotation such as "int" or "list[float]")."""
    def bad(problem: str) -> InputError:
        return InputError(f"recipe.{name}", f"{problem}, got {value!r}", "fix the recipe or the --set override")

    if kind.startswith("dict[str, "):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad("must be a mapping of names to values")
        return {k: _checked(f"{name}.{k}", v, kind[10:-1]) for k, v in value.items()}
    if kind.startswith("list["):
        if not isinstance(value, list):
            raise bad("must be a list")
        return [_checked(name, v, kind[5:-1]) for v in value]
    if kind in ("str", "bool"):
        if not isinstance(value, str if kind == "str" else bool):
            raise bad(f"must be a {'string' if kind == 'str' else 'boolean (true or false)'}")
        return value
    if isinstance(value, str) and kind == "float":
        try:  # YAML 1.1 reads a number without a dot, like 3e-4, as a string
            value = float(value)
        except ValueError:
            raise bad("must be a number") from None
    # bool is an int to Python, but `lr: true` is a typo, not 1.0
    if isinstance(value, bool) or not isinstance(value, int if kind == "int" else (int, float)):
        raise bad("must be a whole number" if kind == "int" else "must be a number")
    if kind == "float":
        value = float(value)
    if not math.isfinite(value):
        raise bad("must be finite")
    positive = name in _POSITIVE
    if value < 0 or (positive and value == 0):
        raise bad("must be positive" if positive else "must not be negative")
    return value


def _check_model(model: dict):
    """The `model` section: CosmoFMConfig's own arguments, with its numbers' types checked."""
    from cosmofm.pretrain.configuration_cosmofm import CosmoFMConfig

    params = {k: p for k, p in inspect.signature(CosmoFMConfig.__init__).parameters.items() if k not in ("self", "kwargs")}
    unknown = set(model) - set(params)
    if unknown:
        raise InputError("recipe.model", f"unknown keys {sorted(unknown)}", f"known keys: {sorted(params)}")
    for key, value in model.items():
        if params[key].annotation in ("int", "float"):
            model[key] = _checked(f"model.{key}", value, params[key].annotation)
    try:
        CosmoFMConfig(**model)
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise InputError("recipe.model", str(exc), "fix the recipe or the --set override") from None


def _yaml(text: str, where: str, fix: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        raise InputError(where, f"is not valid YAML ({problem})", fix) from None
