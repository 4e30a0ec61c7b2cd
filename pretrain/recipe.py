"""Pretraining recipes: typed, file-based configuration of a whole run.

A recipe is a YAML file (see scripts/configs/) with four sections, `model` (the
CosmoFMConfig arguments), `data`, `optim` and `run`. Command-line overrides use dotted
keys (`--set optim.lr=3e-4`). The resolved recipe is written next to the run's
outputs, so every run records exactly what it did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cosmofm.data_cards.errors import InputError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "scripts" / "configs"


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
    """

    datasets: list[str] = field(default_factory=list)
    mock_cards: list[str] = field(default_factory=lambda: ["sdss-like", "lsst-like", "ska-hi-like", "lightcone-21cm"])
    mock_counts: list[int] = field(default_factory=lambda: [512, 512, 256, 256])
    mock_seed: int = 0
    num_workers: int = 0
    pair_block: int = 1


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
    """

    output_dir: str = "runs/pretrain"
    seed: int = 0
    save_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    mixed_precision: str = "no"
    trackers: list[str] = field(default_factory=lambda: ["tensorboard", "wandb"])
    progress: bool = True


@dataclass
class PretrainRecipe:
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] = ()) -> "PretrainRecipe":
        """Read a recipe by path or by shipped name (`demo`), then apply `key=value` overrides."""
        raw: dict = {}
        if path is not None:
            p = Path(path)
            if not p.suffix:
                p = CONFIGS_DIR / f"{path}.yaml"
            if not p.exists():
                shipped = sorted(q.stem for q in CONFIGS_DIR.glob("*.yaml"))
                raise InputError("--config", f"no recipe at {p}", f"give a YAML path or one of {shipped}")
            raw = yaml.safe_load(p.read_text()) or {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise InputError("--set", f"{item!r} is not key=value", "write e.g. --set optim.lr=3e-4")
            node = raw
            *parents, leaf = key.split(".")
            for k in parents:
                node = node.setdefault(k, {})
            node[leaf] = yaml.safe_load(value)
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> "PretrainRecipe":
        unknown = set(raw) - {"model", "data", "optim", "run"}
        if unknown:
            raise InputError("recipe", f"unknown sections {sorted(unknown)}", "use model, data, optim and run")
        kwargs = {"model": dict(raw.get("model") or {})}
        for name, typ in (("data", DataConfig), ("optim", OptimConfig), ("run", RunConfig)):
            section = raw.get(name) or {}
            names = {f.name for f in dataclasses.fields(typ)}
            bad = set(section) - names
            if bad:
                raise InputError(f"recipe.{name}", f"unknown keys {sorted(bad)}", f"known keys: {sorted(names)}")
            kwargs[name] = typ(**section)
        recipe = cls(**kwargs)
        recipe.validate()
        return recipe

    def validate(self):
        o, r, d = self.optim, self.run, self.data
        for name, value in (("optim.lr", o.lr), ("optim.max_steps", o.max_steps), ("optim.global_batch", o.global_batch), ("optim.grad_accum", o.grad_accum), ("run.save_every", r.save_every), ("run.log_every", r.log_every)):
            if not isinstance(value, (int, float)) or value <= 0:
                raise InputError(f"recipe.{name}", f"must be a positive number, got {value!r}", "fix the recipe or the --set override")
        if r.mixed_precision not in ("no", "bf16", "fp16"):
            raise InputError("recipe.run.mixed_precision", f"{r.mixed_precision!r} is not supported", "use no, bf16 or fp16")
        if set(r.trackers) - {"tensorboard", "wandb"}:
            raise InputError("recipe.run.trackers", f"unknown trackers {r.trackers}", "use tensorboard and/or wandb")
        if not d.datasets and len(d.mock_cards) != len(d.mock_counts):
            raise InputError("recipe.data.mock_counts", "must have one count per mock card", "list as many counts as cards")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path):
        from cosmofm.pretrain.checkpoint import atomic_write_bytes

        atomic_write_bytes(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False).encode())
