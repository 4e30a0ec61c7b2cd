"""The task seam: head configs, backbone + head models, and the registry that finds them.

A task (spectral classification today; photo-z, deblending, detection, ... next) is one
module in this package that defines, in reading order:

1. its head config, a `TaskHeadConfig` subclass whose `TYPE` names the task. It is stored
   as `config.task` (a dict, with `type` and `schema_version`) in config.json;
2. its model, a `CosmoFMForTask` subclass (backbone `self.cosmofm` + head) decorated with
   `@register_task(TYPE)`; `forward(batch, **targets)` returns a `TaskOutput` subclass with
   `loss` only when targets are given;
3. its `Task` (targets from Samples, metrics, optional calibration, catalogue columns),
   decorated with `@register_task(TYPE)` as well.

Nothing else is edited: on a lookup miss `task_model_class` / `task_class` import every
module of this package once, so their decorators run, and `cosmofm.from_pretrained` finds
the class by config.json's `task.type`. README.md ("Adding a task") shows a whole one.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Mapping, Protocol, Sequence, runtime_checkable

import torch
from transformers.utils import ModelOutput

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample
from cosmofm.pretrain.configuration_cosmofm import CosmoFMConfig
from cosmofm.pretrain.modeling_cosmofm import CosmoFMModel, CosmoFMPreTrainedModel


@dataclass(kw_only=True)
class TaskHeadConfig:
    """A head's settings, stored as `config.task` in config.json; subclasses add their fields.

    Class attributes (not saved): `TYPE`, the task's registry name, and `SCHEMA_VERSION`,
    the newest layout of `config.task` this code reads. A subclass that changes its layout
    raises `SCHEMA_VERSION` and upgrades older dicts in its own `from_dict`.

    Args:
        type (`str`): the task; filled in from `TYPE`, refused when it differs.
        schema_version (`int`, not an argument): always `SCHEMA_VERSION` once loaded.
    """

    TYPE: ClassVar[str] = ""
    SCHEMA_VERSION: ClassVar[int] = 1

    type: str = ""
    schema_version: int = field(default=1, init=False)

    def __post_init__(self):
        self.type = self.type or self.TYPE
        if self.type != self.TYPE:
            raise InputError("task.type", f"is {self.type!r}, not {self.TYPE!r}",
                             "load this model with the class for its task (cosmofm.from_pretrained picks it from task.type)")
        self.schema_version = self.SCHEMA_VERSION

    def check_counts(self, *names: str) -> None:
        """An InputError naming the first of the fields `names` that is not a whole number >= 1
        (layer widths, slot and detection counts): a subclass's `__post_init__` calls it."""
        for name in names:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"task.{name}", f"is {v!r}, not a whole number >= 1", f"e.g. the default, {type(self).__dataclass_fields__[name].default!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "TaskHeadConfig":
        """The head config in `d` (config.json's `task`): type and schema_version checked,
        keys this version does not know dropped. On the base class, the registered task's
        own config class (by `d["type"]`) reads it."""
        if not isinstance(d, Mapping):
            raise InputError("config.task", "is missing", f"this config has no {cls.TYPE or 'task'} head; build the model "
                             "from a backbone config and a head config (from_backbone_config)")
        if not cls.TYPE:
            return task_model_class(d.get("type")).head_config_class.from_dict(d)
        kind = d.get("type", cls.TYPE)
        if kind != cls.TYPE:
            raise InputError("task.type", f"is {kind!r}, not {cls.TYPE!r}",
                             "load this model with the class for its task (cosmofm.from_pretrained picks it from task.type)")
        version = d.get("schema_version", 1)  # heads saved before the field existed are version 1
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InputError("task.schema_version", f"is {version!r}, not a whole number >= 1", "use the config.json written by save_pretrained")
        if version > cls.SCHEMA_VERSION:
            raise InputError("task.schema_version", f"is {version}, newer than this cosmofm understands for {cls.TYPE!r} "
                             f"({cls.SCHEMA_VERSION})", "upgrade cosmofm (pip install -U cosmofm), or load an older revision of the model")
        known = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_card(cls, card, **kwargs) -> "TaskHeadConfig":
        """The head config for fine-tuning on `card`'s data: `kwargs` (a recipe's `head`
        section) plus `card=card.name` when the config records its card. Heads whose
        settings come from the card (classification's class names) override this."""
        unknown = set(kwargs) - {f.name for f in fields(cls) if f.init}
        if unknown:
            raise InputError("head", f"unknown settings {sorted(unknown)} for task {cls.TYPE!r}",
                             f"use fields of {cls.__name__}: {sorted(f.name for f in fields(cls) if f.init and f.name != 'type')}")
        if "card" in {f.name for f in fields(cls)}:
            kwargs = {"card": card.name, **kwargs}
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TaskOutput(ModelOutput):
    """Base of every head's output: `loss` (a scalar) only when targets were given; each
    head adds its predictions (and `backbone`, the `CosmoFMOutput`) after it."""

    loss: torch.Tensor | None = None


class CosmoFMForTask(CosmoFMPreTrainedModel):
    """Backbone (`self.cosmofm`) + a task head; the head's settings are `self.head_config`
    (kept equal to `config.task`, so save_pretrained -> from_pretrained restores them).

    A subclass sets `head_config_class`, builds its head in `__init__` after
    `super().__init__(config)`, ends with `self.post_init()`, and is decorated with
    `@register_task(TYPE)`. The backbone's tensors keep the prefix `cosmofm.`.
    """

    head_config_class: ClassVar[type[TaskHeadConfig]] = TaskHeadConfig
    task_type: ClassVar[str] = ""  # set by register_task

    def __init__(self, config: CosmoFMConfig):
        super().__init__(config)
        self.head_config = self.head_config_class.from_dict(getattr(config, "task", None))
        config.task = self.head_config.to_dict()
        self.cosmofm = CosmoFMModel(config)

    @classmethod
    def from_backbone_config(cls, backbone: CosmoFMConfig, head: TaskHeadConfig):
        """A fresh model: a copy of the backbone's config with `head` as its task."""
        config = CosmoFMConfig.from_dict(backbone.to_dict())
        config.task = head.to_dict()
        config.architectures = [cls.__name__]
        return cls(config)

    def _set_task(self, **values) -> None:
        """Change fields of the head config, check them, and keep config.task in step."""
        for name, value in values.items():
            setattr(self.head_config, name, value)
        self.head_config.__post_init__()
        self.config.task = self.head_config.to_dict()


@dataclass(frozen=True)
class CatalogueColumn:
    """One column a task's predictions become: its name, astropy unit string ("" =
    dimensionless, None = not a quantity, e.g. a class name) and a one-line description."""

    name: str
    unit: str | None = None
    description: str = ""


@runtime_checkable
class Task(Protocol):
    """What the shared fine-tune loop, evaluation and predict path need from a task.

    An implementation is built from the model's head config (`task_class(type)(head_config)`)
    and registered with `@register_task(TYPE)`. Classification, for example:
    `targets` = `labels_from_samples` as {"class_labels", "redshift"} (the forward's
    arguments); `metrics` = `classification_metrics` + `redshift_metrics` on the
    temperature-scaled probabilities; `calibrate` = temperature scaling + conformal
    threshold (`heads.calibration`), stored with `model.set_calibration`;
    `catalogue_columns` = CLASS, P_<class> per class, CONFORMAL_SET, Z and Z_ERR ("").
    Subclass `Task` explicitly to inherit the no-op `prepare` and `calibrate`.

    `modality` is the kind of Sample the task reads ("spectrum", "image", "cube",
    "field"); `catalogue_rows` turns one batch's outputs into its catalogue columns, which
    is all the shared predictor (`cosmofm predict`) needs from a task. Optional:
    `finetune_module`, the module that registers a fine-tune runner of the task's own
    (`cosmofm.finetune.run.register_runner`) where the shared `finetune_task` is not enough;
    `labelled_mocks(card, n, seed, *, workers, progress, **settings) -> list[Sample]`, a
    static method making the task's labelled data where it is not the card's single-object
    mocks (blends for deblending, survey-cube tiles for 3D detection): a fine-tune recipe's
    `mocks` section gives the settings (`finetune.recipe.task_mocks`).
    """

    type: ClassVar[str]
    modality: ClassVar[str]
    catalogue_columns: Sequence[CatalogueColumn]

    def targets(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """The forward's target arguments from `Sample.meta["labels"]`; an InputError naming
        the sample and label when one is missing (before any compute)."""
        ...

    def metrics(self, outputs: Mapping[str, Any], targets: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Figures of merit (floats; per-class tables may nest) of predictions against targets."""
        ...

    def inputs(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """Forward arguments that say how the samples were observed rather than what they hold
        (deblending: each band's PSF FWHM), one row per sample, passed by evaluation and the
        predict path; `targets` includes them too, as training needs them. Optional: none by default."""
        return {}

    def prepare(self, model: CosmoFMForTask, samples: Sequence[Sample]) -> None:
        """Set up `model`'s head from the training samples before the first step (e.g. the
        photo-z photometry branch's input standardisation). Optional: a no-op by default."""
        return None

    def calibrate(self, model: CosmoFMForTask, outputs: Mapping[str, Any], targets: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Fit calibration on a held-out split and store it in `model`'s head config; returns
        what was fitted. Optional: tasks without calibration keep this no-op."""
        return {}

    def catalogue_rows(self, outputs: Mapping[str, Any]) -> dict[str, Any]:
        """{column name: (N,) numpy values} of one batch's outputs, for the columns in
        `catalogue_columns` it can fill."""
        ...


TASK_MODELS: dict[str, type[CosmoFMForTask]] = {}  # task type -> backbone + head model class
TASKS: dict[str, type] = {}  # task type -> Task implementation
_AUTO_OWNERS: dict[type, str] = {}  # transformers Auto class -> the task registered with it


def register_task(name: str, *, auto_class: type | None = None):
    """Class decorator: register a task's model class (a `CosmoFMForTask`) or its `Task`
    under `name`, which must equal the head config's `TYPE`. `auto_class` (model classes
    only, e.g. `AutoModelForSequenceClassification`) also registers the model with that
    transformers Auto class; each Auto class maps the one CosmoFMConfig to one task."""

    def register(cls: type) -> type:
        if isinstance(cls, type) and issubclass(cls, CosmoFMForTask):
            if cls.head_config_class.TYPE != name:
                raise TypeError(f"{cls.__name__} is registered as {name!r} but its head_config_class "
                                f"{cls.head_config_class.__name__} has TYPE {cls.head_config_class.TYPE!r}")
            _claim(TASK_MODELS, name, cls)
            cls.task_type = name
            if auto_class is not None:
                if _AUTO_OWNERS.setdefault(auto_class, name) != name:
                    raise TypeError(f"{auto_class.__name__} already loads task {_AUTO_OWNERS[auto_class]!r}; "
                                    f"register {name!r} without auto_class or with another Auto class")
                auto_class.register(CosmoFMConfig, cls, exist_ok=True)
            return cls
        missing = [m for m in ("targets", "metrics") if not callable(getattr(cls, m, None))]
        if missing or auto_class is not None:
            raise TypeError(f"register_task takes a CosmoFMForTask subclass or a Task; {cls!r} "
                            + (f"lacks {missing}" if missing else "is a Task: auto_class is for model classes"))
        _claim(TASKS, name, cls)
        cls.type = name
        return cls

    return register


def _claim(registry: dict[str, type], name: str, cls: type) -> None:
    """Add `cls`; the same class defined again (a module reloaded) replaces itself, another one is refused."""
    old = registry.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"task {name!r} is already registered by {old.__module__}.{old.__qualname__}")
    registry[name] = cls


@functools.cache
def _import_task_modules() -> None:
    """Import every module of cosmofm.heads once, so their @register_task decorators have run."""
    package = importlib.import_module(__name__.rpartition(".")[0])
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def _lookup(registry: dict[str, type], task_type) -> type:
    if isinstance(task_type, str) and task_type not in registry:
        _import_task_modules()
    if not isinstance(task_type, str) or task_type not in registry:
        raise InputError("task.type", f"{task_type!r} is not a registered task",
                         f"known tasks: {sorted(registry) or 'none'}; upgrade cosmofm if the model is newer")
    return registry[task_type]


def task_model_class(task_type: str) -> type[CosmoFMForTask]:
    """The model class registered for `task_type` (config.json's `task.type`)."""
    return _lookup(TASK_MODELS, task_type)


def task_class(task_type: str) -> type:
    """The `Task` implementation registered for `task_type`."""
    return _lookup(TASKS, task_type)


__all__ = [
    "CatalogueColumn",
    "CosmoFMForTask",
    "TASKS",
    "TASK_MODELS",
    "Task",
    "TaskHeadConfig",
    "TaskOutput",
    "register_task",
    "task_class",
    "task_model_class",
]
