"""Fine-tune recipes: one YAML file names the task, its data, its starting point and its knobs.

    recipe = FinetuneRecipe.load("photoz", ["finetune.strategy=lora", "n_labelled=500"])
    result = run_recipe(recipe)

A recipe (shipped ones in finetune/recipes/, read through importlib.resources) has:
`task` (a registered task type), `card` (the data card whose mocks are the labelled
data), `n_labelled`, `mock_seed`, `select` (label -> shell pattern, e.g.
`{spectral_class: "GALAXY*"}`: only those mocks), `mocks` (settings of the task's own
labelled-mock generator, for tasks whose labelled data are not single objects of the
card: blends for deblending, survey-cube tiles for 3D detection; see `Task.labelled_mocks`
in heads/base.py), `backbone` (a release folder or repo
id; null = a fresh backbone shaped by `backbone_recipe`, a pretraining recipe) and
`finetune` (the knobs of the task's config class, `finetune.run.runner_for`). The
command line sets any entry with `--set KEY=VALUE`, as for pretraining.

Everything is checked before any compute: the task is registered, the card is of the
task's modality, every knob exists and has the right type, and a `backbone` release of
another task is refused (its weights were tuned for that task).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any


from cosmofm.data_cards.errors import InputError
from cosmofm.pretrain.recipe import apply_overrides, read_recipe, recipe_names, set_entry, write_recipe


def _recipes():
    """The folder of shipped fine-tune recipes (a Traversable)."""
    return resources.files(__package__) / "recipes"


def shipped_recipes() -> list[str]:
    """Names of the fine-tune recipes shipped with the package."""
    return recipe_names(_recipes())


@dataclass
class FinetuneRecipe:
    task: str
    card: str
    n_labelled: int = 1000
    mock_seed: int = 0
    select: dict[str, str] = field(default_factory=dict)
    mocks: dict[str, Any] = field(default_factory=dict)
    backbone: str | None = None
    backbone_recipe: str | None = None
    finetune: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = (), entries: dict[str, Any] | None = None) -> "FinetuneRecipe":
        """Read a recipe by path or shipped name (`photoz`), apply `key=value` overrides (values
        read as YAML), then set `entries` ({dotted key: value}, as given: paths and names)."""
        raw = apply_overrides(read_recipe(path, _recipes(), "write task:, card: and finetune: entries"), list(overrides))
        for key, value in (entries or {}).items():
            set_entry(raw, key, value)
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> "FinetuneRecipe":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise InputError("recipe", f"unknown entries {sorted(unknown)}", f"known entries: {sorted(names)}")
        for key in ("task", "card"):
            if not isinstance(raw.get(key), str):
                raise InputError(f"recipe.{key}", f"is {raw.get(key)!r}, not a name", f"set it, e.g. --set {key}=NAME")
        for key in ("select", "mocks", "finetune"):
            if not isinstance(raw.get(key) or {}, dict):
                raise InputError(f"recipe.{key}", f"is {raw[key]!r}, not a section", f"set its keys, e.g. --set {key}.KEY=VALUE")
        n = raw.get("n_labelled", 1000)
        if isinstance(n, bool) or not isinstance(n, int) or n < 10:
            raise InputError("recipe.n_labelled", f"is {n!r}", "give at least 10 labelled mocks (train, calibration and test blocks)")
        recipe = cls(**{**raw, "select": dict(raw.get("select") or {}), "mocks": dict(raw.get("mocks") or {}),
                        "finetune": dict(raw.get("finetune") or {})})
        recipe.config()  # every knob checked now
        return recipe

    def config(self, **overrides):
        """The task's config object (`runner_for(task)`'s class) from the `finetune` section."""
        from cosmofm.finetune.run import config_fields, runner_for
        from cosmofm.pretrain.recipe import _checked

        config_class, _ = runner_for(self.task)
        knobs = {**self.finetune, **overrides}
        known = config_fields(config_class)
        unknown = set(knobs) - known
        if unknown:
            raise InputError("recipe.finetune", f"unknown knobs {sorted(unknown)} for task {self.task!r}", f"known knobs: {sorted(known)}")
        types = {f.name: str(f.type) for f in dataclasses.fields(config_class)}
        for key, value in knobs.items():
            kind = types[key].removesuffix(" | None")
            if kind in ("int", "float", "str", "bool") and not (value is None and types[key].endswith("| None")):
                knobs[key] = _checked(f"finetune.{key}", value, kind)
        if "trackers" in knobs:
            knobs["trackers"] = tuple(knobs["trackers"] or ())
        return config_class(**knobs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path):
        write_recipe(self.to_dict(), path)


def check_backbone_task(recipe: FinetuneRecipe) -> None:
    """Refuse, before any compute, a `backbone` release fine-tuned for another task."""
    if recipe.backbone in (None, "", "none", "None"):
        return
    from cosmofm.finetune.release import check_schema_version, model_class, resolve_release
    from cosmofm.finetune.run import refuse_other_task

    folder = resolve_release(recipe.backbone)
    config = check_schema_version(folder)
    other = config["task"].get("type") if isinstance(config.get("task"), dict) else None
    refuse_other_task(f"backbone {recipe.backbone}", other, recipe.task)
    model_class(folder, config)  # its class and head config (task.schema_version newer than this cosmofm: upgrade)


def labelled_mocks(card, n: int, seed: int = 0, select: dict[str, str] | None = None, workers: int = 1, progress: bool = False) -> list:
    """The first `n` mocks of `card` (universe `seed`) whose labels match every `select`
    pattern (shell-style, e.g. GALAXY*); all of them when `select` is empty."""
    from cosmofm.data_cards.mocks.generators import generate

    if not select:
        return list(generate(card, n, seed=seed, workers=workers, progress=progress))
    out, limit = [], 50 * n
    for sample in generate(card, limit, seed=seed, workers=workers):
        labels = sample.meta.get("labels") or {}
        if all(fnmatch.fnmatchcase(str(labels.get(k)), pattern) for k, pattern in select.items()):
            out.append(sample)
            if len(out) == n:
                return out
    raise InputError("recipe.select", f"{select} matched {len(out)} of {limit} mocks of {card.name}, fewer than n_labelled {n}",
                     "loosen the patterns or ask for fewer labelled mocks")


def task_mocks(recipe: FinetuneRecipe, card, workers: int = 1, progress: bool = False) -> list:
    """The recipe's labelled samples: the task's own generator (`Task.labelled_mocks`, with the
    recipe's `mocks` settings) where it has one, else the card's object mocks (`labelled_mocks`)."""
    from cosmofm.heads.base import task_class

    own = getattr(task_class(recipe.task), "labelled_mocks", None)
    if own is None:
        if recipe.mocks:
            raise InputError("recipe.mocks", f"{sorted(recipe.mocks)} given, but task {recipe.task!r} has no mock generator of its own",
                             "drop the mocks section; the card's object mocks are used (narrow them with select)")
        return labelled_mocks(card, recipe.n_labelled, recipe.mock_seed, recipe.select, workers, progress)
    if recipe.select:
        raise InputError("recipe.select", f"task {recipe.task!r} makes its own labelled mocks", "set the generator's settings in the mocks section instead")
    return list(own(card, recipe.n_labelled, recipe.mock_seed, workers=workers, progress=progress, **recipe.mocks))


def run_recipe(recipe: FinetuneRecipe, workers: int = 1, progress: bool = True) -> dict:
    """Check everything, make the labelled mocks, fine-tune with the task's runner, and save the
    resolved recipe beside the run (`output_dir/finetune_recipe.yaml`). Returns the runner's result."""
    from cosmofm.data_cards.schema import load_card
    from cosmofm.finetune.run import runner_for
    from cosmofm.heads.base import task_class, task_model_class

    _, runner = runner_for(recipe.task)
    cfg = recipe.config(progress=progress)
    card = load_card(recipe.card)
    modality = getattr(task_class(recipe.task), "modality", card.modality)
    if card.modality != modality:
        raise InputError("recipe.card", f"{card.name} is a {card.modality} card and {recipe.task!r} reads {modality} data",
                         f"use a {modality} card")
    backbone = None if recipe.backbone in (None, "", "none", "None") else recipe.backbone
    if backbone is not None and recipe.backbone_recipe:
        raise InputError("backbone_recipe", "shapes a fresh backbone, so it cannot be combined with a backbone", "drop one of the two")
    check_backbone_task(recipe)
    if cfg.tuning.name == "student":
        from cosmofm.finetune.run import student_teacher

        student_teacher(recipe.task, backbone, cfg.head)  # before the mocks are made
    task_model_class(recipe.task).head_config_class.from_card(card, **cfg.head)  # the head's settings, checked
    backbone_config = None
    if recipe.backbone_recipe:
        from cosmofm.pretrain.recipe import PretrainRecipe

        backbone_config = {**PretrainRecipe.load(recipe.backbone_recipe).model, "survey_names": [card.name]}
    samples = task_mocks(recipe, card, workers, progress)
    result = runner(samples, card, cfg, backbone=backbone, backbone_config=backbone_config)
    if cfg.output_dir and "model_dir" in result:
        recipe.save(Path(cfg.output_dir) / "finetune_recipe.yaml")
    return result
