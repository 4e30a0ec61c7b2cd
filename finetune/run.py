"""Fine-tune any registered task: the split, the model, the loop, calibration, evaluation, the release.

    result = finetune_task("photoz", samples, card, TaskFinetuneConfig(strategy="lora", output_dir="runs/pz"),
                           backbone="outputs/demo/pretrain/model")
    result["metrics"], result["model_dir"]

Every task goes through here by its registry name (`heads.base.task_model_class` /
`task_class`), so a new task needs no code in this package: the labelled samples are
split by index into train / calibration / test blocks (`split_indices`), the task's
model is built on a pretrained backbone or a fresh one (`build_task_model`), trained by
the shared loop (`finetune/loop.py`) with a `Strategy` (after `Task.prepare` on the
training block), calibrated on the calibration block (`Task.calibrate`), scored on the test block (`Task.metrics`) and saved as a
release with `eval_results.json` (`save_task_run`).

A task whose fine-tune does more (classification: distillation, conformal sets, scan
redshifts, figures) registers its own runner with `@register_runner(TYPE, ConfigClass)`
in a module its `Task` names as `finetune_module` (a string: heads do not import
finetune); `runner_for` imports it, so the command line still finds every task by name
(`cosmofm finetune --task TYPE`).
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample
from cosmofm.finetune.loop import LoopConfig, finetune_loop
from cosmofm.finetune.strategies import Strategy, StrategyKnobs
from cosmofm.heads.base import CosmoFMForTask, TaskHeadConfig, task_class, task_model_class
from cosmofm.pretrain.configuration_cosmofm import CosmoFMConfig


@dataclass
class TaskFinetuneConfig(LoopConfig, StrategyKnobs):
    """Fine-tuning knobs of any task: the loop's (`finetune.loop.LoopConfig`: epochs,
    batch_size, lr, warmup_fraction, weight_decay, grad_accum, mixed_precision, seed,
    output_dir, checkpoint_every, keep_last, resume, max_steps, trackers, progress) and these.

    Args:
        strategy (`str`, "frozen"): "frozen" (head only), "last-n" (the last n_blocks
            blocks and the head), "lora", "full" or "student" (the head's fast path alone,
            distilled from a fine-tuned release: `build_student_model`) (`finetune.strategies`), with the
            `StrategyKnobs` (n_blocks, layer_decay, backbone_lr_scale, lora_rank, lora_alpha).
        label_fraction (`float`, 1.0): fraction of the training block whose labels are used.
        calibration_fraction (`float`, 0.2): fraction of all samples held out for calibration.
        test_fraction (`float`, 0.2): fraction of all samples held out for the test metrics.
        eval_batch_size (`int`, 128): samples per forward pass when calibrating and scoring.
        head (`dict`, {}): the head config's settings (`TaskHeadConfig.from_card(card, **head)`).
    """

    strategy: str = "frozen"
    label_fraction: float = 1.0
    calibration_fraction: float = 0.2
    test_fraction: float = 0.2
    eval_batch_size: int = 128
    head: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        self.tuning  # building the Strategy checks its knobs
        if not 0 < self.label_fraction <= 1:
            raise InputError("label_fraction", f"must be in (0, 1], got {self.label_fraction}", "e.g. 0.1 for 10% of the labels")
        if not (0 < self.calibration_fraction < 1 and 0 < self.test_fraction < 1 and self.calibration_fraction + self.test_fraction < 1):
            raise InputError("calibration_fraction / test_fraction", "must be positive and sum to less than 1", "e.g. 0.2 and 0.2")
        if self.eval_batch_size < 1:
            raise InputError("eval_batch_size", f"must be >= 1, got {self.eval_batch_size}", "e.g. 128")
        if not isinstance(self.head, dict):
            raise InputError("head", f"is {self.head!r}, not a mapping of head settings", "e.g. head: {hidden_size: 128}")

    @property
    def tuning(self) -> Strategy:
        """The fine-tuning strategy these knobs name."""
        return Strategy(self.strategy, **self.knobs())


def split_indices(n: int, cfg: TaskFinetuneConfig) -> dict[str, np.ndarray]:
    """Contiguous blocks by index: train (first), calibration, test (last); label_fraction of train kept."""
    n_test = max(1, int(round(cfg.test_fraction * n)))
    n_cal = max(1, int(round(cfg.calibration_fraction * n)))
    n_train_all = n - n_test - n_cal
    n_train = int(math.floor(cfg.label_fraction * n_train_all))
    if n_train < 1:
        raise InputError("samples", f"{n} samples leave no training labels (label_fraction {cfg.label_fraction})", "give more samples or a larger label_fraction")
    return {
        "train": np.arange(n_train),
        "calibration": np.arange(n_train_all, n_train_all + n_cal),
        "test": np.arange(n_train_all + n_cal, n),
    }


def build_task_model(task: str, head: TaskHeadConfig, seed: int, backbone=None, backbone_config: dict | None = None) -> CosmoFMForTask:
    """The `task` model with `head`: the backbone's weights from `backbone` (a release folder,
    repo id or CosmoFMModel; a release of this task continues from its backbone) or fresh
    from `backbone_config` (CosmoFMConfig arguments), not both. The head is initialised
    from `seed`. A release of another task is refused: its backbone was tuned for that task."""
    from cosmofm.pretrain.modeling_cosmofm import CosmoFMModel

    model_class = task_model_class(task)
    if backbone is not None and backbone_config is not None:
        raise InputError("backbone / backbone_config", "both given", "start from a pretrained backbone or from a fresh config, not both")
    if backbone is None:
        config = CosmoFMConfig(**{"survey_names": [head.card] if getattr(head, "card", "") else [], **(backbone_config or {})})
        torch.manual_seed(seed)
        return model_class.from_backbone_config(config, head)
    if not isinstance(backbone, CosmoFMModel):
        from cosmofm.finetune.release import from_pretrained

        loaded = from_pretrained(backbone)
        refuse_other_task(str(backbone), getattr(loaded, "task_type", ""), task)
        loaded = getattr(loaded, "cosmofm", loaded)
        if not isinstance(loaded, CosmoFMModel):
            raise InputError(str(backbone), "holds no CosmoFM backbone", "give a release folder written by `cosmofm pretrain`")
        backbone = loaded
    torch.manual_seed(seed)
    model = model_class.from_backbone_config(backbone.config, head)
    model.cosmofm.load_state_dict(backbone.state_dict())
    return model


def student_teacher(task: str, release, head_settings: dict) -> Path:
    """The verified release folder a strategy "student" fine-tune of `task` starts from (its
    teacher), checked before any compute from its config and weight headers: given, of
    `task`, and with `head_settings` (the student's) giving its head a student while every
    tensor of the teacher keeps its shape. Anything else is an InputError."""
    from cosmofm.finetune.release import check_release, resolve_release
    from cosmofm.finetune.release_folder import weight_tensors

    if release is None:
        raise InputError("backbone", f'is not given, and strategy "student" distils a fine-tuned {task!r} model',
                         f"give the release of a {task!r} fine-tune (its output_dir/model) as the backbone (--backbone)")
    folder = resolve_release(release)
    cls, config, _ = check_release(folder, expect_task=task)
    config.task = {**config.task, **head_settings}
    with torch.device("meta"):  # shapes only: nothing allocated or initialised
        model = cls(config)
    if getattr(model, "student", None) is None:
        raise InputError("head", f"settings {head_settings} give the {task!r} head no student",
                         "give it one (deblending: head.student_widths=[16, 32, 48, 64])")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    changed = sorted(key for _path, key, tensor in weight_tensors(folder)
                     if not key.startswith("student.") and ours.get(key) != tuple(tensor.get_shape()))
    if changed:
        raise InputError("head", f"settings {sorted(head_settings)} change the teacher's tensors ({', '.join(changed[:3])})",
                         "set only the student's settings (deblending: student_widths, student_refine_channels, distill_weight, student_peak_threshold)")
    return folder


def build_student_model(task: str, release, head_settings: dict, seed: int) -> CosmoFMForTask:
    """The start of a strategy "student" fine-tune: the fine-tuned `task` release whole
    (backbone and head: the frozen teacher), its head config updated with `head_settings`
    (the student's, e.g. deblending's student_widths and distill_weight; checked by
    `student_teacher`), and its student: the release's own where the settings keep its
    shape (a distillation continued), else a fresh one initialised from `seed`."""
    from cosmofm.finetune.release import from_pretrained

    teacher = from_pretrained(student_teacher(task, release, head_settings), expect_task=task)
    config = CosmoFMConfig.from_dict(teacher.config.to_dict())
    config.task = {**teacher.config.task, **head_settings}
    torch.manual_seed(seed)
    model = type(teacher)(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict({k: v for k, v in teacher.state_dict().items() if shapes.get(k) == v.shape}, strict=False)
    return model


def refuse_other_task(where: str, other: str | None, task: str) -> None:
    """An InputError at `where` when a release fine-tuned for task `other` would start a
    `task` fine-tune: its backbone was tuned for that task."""
    if other and other != task:
        raise InputError(where, f"is a fine-tuned {other!r} model, and this is a {task!r} fine-tune",
                         f"fine-tune {task!r} from a pretrained backbone (cosmofm pretrain / the demo's pretrain/model), "
                         f"or use the {other!r} recipe with this model")


@torch.no_grad()
def collect_outputs(model: CosmoFMForTask, samples: Sequence[Sample], batch_size: int = 128, **forward) -> dict[str, torch.Tensor]:
    """The model's outputs on `samples` (eval mode, in order): every tensor field of its
    TaskOutput except `loss`, concatenated over batches, on the CPU in float32. `forward`:
    keyword arguments of the forward (a strategy's `forward_options`, e.g. student=True)."""
    from cosmofm.pretrain.data import collate_samples

    model.eval()
    device = next(model.parameters()).device
    task = task_class(model.task_type)(model.head_config)
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(samples), batch_size):
        part = list(samples[start:start + batch_size])
        inputs = {k: v.to(device) for k, v in task.inputs(part).items()}  # how they were observed (`Task.inputs`)
        out = model(collate_samples(part, model.config.survey_names).to(device), **inputs, **forward)
        for name, value in out.items():
            if name != "loss" and isinstance(value, torch.Tensor):
                parts.setdefault(name, []).append(value.detach().float().cpu())
    return {name: torch.cat(values) for name, values in parts.items()}


def finetune_task(task: str, samples: Sequence[Sample], card, cfg: TaskFinetuneConfig | None = None, backbone=None,
                  backbone_config: dict | None = None, loss: Callable | None = None) -> dict:
    """Fine-tune `task` on labelled `samples`, calibrate on the calibration block, score the test block, save.

    Returns a dict: model, metrics (test block; "calibration": what `Task.calibrate`
    fitted), history (loss per epoch), splits, and with `cfg.output_dir` the paths
    (output_dir, model_dir, eval_results). `loss(output, index)`: see `finetune_loop`.
    Only the main process of a multi-process run saves.
    """
    from accelerate.utils import set_seed

    cfg = cfg or TaskFinetuneConfig()
    strategy = cfg.tuning
    if len(samples) < 10:
        raise InputError("samples", f"only {len(samples)} labelled samples", "give at least 10 (train, calibration and test blocks)")
    student = strategy.name == "student"  # the release's whole model is the start, and its head config the head's
    if student:
        if backbone_config is not None:
            raise InputError("backbone_recipe", 'shapes a fresh backbone, and strategy "student" starts from a fine-tuned release', "drop it")
        set_seed(cfg.seed)
        model = build_student_model(task, backbone, cfg.head, cfg.seed)
        head = model.head_config
        if getattr(head, "card", card.name) != card.name:
            raise InputError("card", f"is {card.name}, and the teacher was fine-tuned on {head.card}", f"distil on {head.card}'s mocks")
    else:
        head = task_model_class(task).head_config_class.from_card(card, **cfg.head)
    job = task_class(task)(head)
    splits = split_indices(len(samples), cfg)
    block = {name: [samples[int(i)] for i in index] for name, index in splits.items()}
    targets = {name: job.targets(part) for name, part in block.items()}  # every label checked before any compute
    if not student:  # a student keeps its teacher's preparation: it learns to copy that model
        set_seed(cfg.seed)
        model = build_task_model(task, head, cfg.seed, backbone, backbone_config)
        job.prepare(model, block["train"])
    run = finetune_loop(model, block["train"], job.targets, strategy, replace(cfg, desc=f"finetune {task} ({cfg.strategy})"), loss)
    model, forward = run.model, strategy.forward_options()  # calibrated and scored as it was trained (the student's path)
    fitted = job.calibrate(model, collect_outputs(model, block["calibration"], cfg.eval_batch_size, **forward), targets["calibration"], **forward)
    job = task_class(task)(model.head_config)  # the calibrated head
    metrics = {"n_train": len(block["train"]), "n_calibration": len(block["calibration"]), "n_test": len(block["test"]),
               **job.metrics(collect_outputs(model, block["test"], cfg.eval_batch_size, **forward), targets["test"]), "calibration": fitted}
    result = {"model": model, "metrics": metrics, "history": run.epoch_losses, "splits": {k: v.tolist() for k, v in splits.items()}}
    if cfg.output_dir and run.main_process:
        result.update(save_task_run(model, task_eval_results(metrics, task, card.name), cfg, run.epoch_losses))
    return result


def task_eval_results(metrics: dict, task: str, card_name: str) -> dict:
    """The model-card evaluation JSON (`finetune/model_card.load_eval_results` format): every
    finite top-level number of `metrics` as a result on the test block; all of them under "details"."""
    entries = [{"type": k, "name": k.replace("_", " "), "value": float(v)} for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return {"results": [{"task": {"type": task, "name": task}, "dataset": {"type": "mock", "name": f"{card_name} mocks", "split": "test"},
                         "metrics": entries}],
            "details": metrics}


def save_task_run(model: CosmoFMForTask, results: dict, cfg: TaskFinetuneConfig, history: list[float]) -> dict:
    """Write `output_dir/model/` (the release, with `results` as eval_results.json), the same
    `eval_results.json` and `finetune_config.json` (the knobs and the loss per epoch); returns their paths."""
    from cosmofm.pretrain.checkpoint import atomic_write_bytes, save_release

    out = Path(cfg.output_dir)
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    # json.dumps, not the strict atomic_write_json: a metric undefined on a small test block is written as NaN
    results = json.dumps(results, indent=2).encode()
    atomic_write_bytes(model_dir / "eval_results.json", results)
    save_release(model, model_dir)
    atomic_write_bytes(out / "eval_results.json", results)
    atomic_write_bytes(out / "finetune_config.json", json.dumps({**asdict(cfg), "history": history}, indent=2).encode())
    return {"output_dir": str(out), "model_dir": str(model_dir), "eval_results": str(out / "eval_results.json")}


# task type -> (its config class, its runner): tasks whose fine-tune does more than `finetune_task`
RUNNERS: dict[str, tuple[type[TaskFinetuneConfig], Callable]] = {}


def register_runner(task: str, config_class: type[TaskFinetuneConfig]):
    """Decorator: `fn(samples, card, cfg, backbone=None, backbone_config=None) -> dict` (as
    `finetune_task`'s result) fine-tunes `task`, with knobs of `config_class`."""

    def register(fn: Callable) -> Callable:
        RUNNERS[task] = (config_class, fn)
        return fn

    return register


def runner_for(task: str) -> tuple[type[TaskFinetuneConfig], Callable]:
    """The config class and runner of a registered task: its own (registered in the module its
    Task names as `finetune_module`) or `finetune_task`'s. An unregistered task is an InputError."""
    module = getattr(task_class(task), "finetune_module", None)  # refuses an unregistered task, naming the known ones
    if task not in RUNNERS and module:
        importlib.import_module(module)
    if task in RUNNERS:
        return RUNNERS[task]

    def run(samples, card, cfg, backbone=None, backbone_config=None):
        return finetune_task(task, samples, card, cfg, backbone, backbone_config)

    return TaskFinetuneConfig, run


def config_fields(config_class: type) -> set[str]:
    """The knobs a config class takes (for recipes and error messages)."""
    return {f.name for f in fields(config_class) if f.init}


__all__ = [
    "RUNNERS",
    "TaskFinetuneConfig",
    "build_student_model",
    "build_task_model",
    "collect_outputs",
    "config_fields",
    "finetune_task",
    "refuse_other_task",
    "register_runner",
    "runner_for",
    "save_task_run",
    "split_indices",
    "student_teacher",
    "task_eval_results",
]
