"""One fine-tune loop for every task, on Accelerate (the pretraining loop's twin).

    model = CosmoFMForToyRegression.from_backbone_config(backbone_config, head)  # after set_seed(seed)
    result = finetune_loop(model, samples, task.targets, Strategy("lora"), LoopConfig(epochs=5, output_dir="runs/t"))
    result.model, result.epoch_losses

The task enters through three things only: its model (a `CosmoFMForTask`, whose forward
takes the batch and the targets as keyword arguments and returns `loss`), its targets
(`Task.targets(samples)`: one tensor per forward argument, first axis the sample) and,
optionally, a loss of its own (`loss(output, index)`, e.g. a distillation term).

Data: each epoch is a permutation of the samples drawn from numpy's `default_rng(seed)`
(one draw per epoch, in order), cut into `ceil(N / batch_size)` near-equal optimizer
batches (`np.array_split`). `EpochBatchSampler` cuts each of those into `grad_accum`
micro-batches and each micro-batch over the processes, so the batches, and the
gradients up to float rounding, do not depend on the process count or the
accumulation, and a resume restarts at the exact batch (as pretraining's
`GlobalBatchSampler`; the loader is therefore not handed to `accelerator.prepare`).
Micro-batch losses are weighted by their share of the optimizer batch.

State: with `output_dir` and `checkpoint_every`, checkpoints (model, optimizer,
scheduler, every rank's RNG, losses so far) go to `output_dir/checkpoints` through
`pretrain/checkpoint.py`, and `resume=True` continues bit for bit. A non-finite loss or
weight stops the run with `TrainingDiverged` before anything of it is saved.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample
from cosmofm.finetune.strategies import Strategy, apply_strategy, eval_frozen_layers, finish_strategy
from cosmofm.pretrain.data import collate_samples

TRACKER_PROJECT = "cosmofm-finetune"  # TensorBoard writes to <output_dir>/<project>


@dataclass
class LoopConfig:
    """The loop's knobs.

    Args:
        epochs (`int`, 5): passes over the samples.
        batch_size (`int`, 32): samples per optimizer step, over all processes.
        lr (`float`, 1e-3): AdamW peak learning rate of the head (the backbone's follows
            the `Strategy`), reached after `warmup_fraction` of the steps, then a cosine to 0.
        warmup_fraction (`float`, 0.05): fraction of the optimizer steps spent warming up.
        weight_decay (`float`, 0.01): AdamW weight decay on matrices.
        grad_accum (`int`, 1): micro-batches per optimizer batch (memory, not maths).
        max_grad_norm (`float`, 0.0): clip the gradient's global norm to this before each
            optimizer step (pretraining's `optim.grad_clip`), so one outlier batch cannot knock
            the weights and inflate AdamW's second moments for the rest of the run; 0 = off.
        mixed_precision (`str`, "no"): "no" or "bf16" (autocast from the Accelerator).
        seed (`int`, 0): the data order (model init and dropout: seed before building the model).
        output_dir (`str | None`): where checkpoints and tracker logs go.
        checkpoint_every (`int`, 0): optimizer steps between checkpoints; 0 = none.
        keep_last (`int`, 2): checkpoints kept.
        resume (`bool`, False): continue from the newest checkpoint in `output_dir`.
        max_steps (`int | None`, None): stop after this many optimizer steps (the
            schedule still spans all epochs), e.g. to split a run over jobs.
        trackers (`tuple`, ()): "tensorboard" and / or "wandb" (offline unless WANDB_MODE says otherwise).
        progress (`bool`, False): show a progress bar.
        desc (`str`, "finetune"): the progress bar's label.
    """

    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    grad_accum: int = 1
    max_grad_norm: float = 0.0
    mixed_precision: str = "no"
    seed: int = 0
    output_dir: str | None = None
    checkpoint_every: int = 0
    keep_last: int = 2
    resume: bool = False
    max_steps: int | None = None
    trackers: tuple = ()
    progress: bool = False
    desc: str = "finetune"

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise InputError("epochs / batch_size / grad_accum", "must be >= 1", "train for at least one epoch")
        if self.mixed_precision not in ("no", "bf16"):
            raise InputError("mixed_precision", f"is {self.mixed_precision!r}", 'use "no" or "bf16"')
        if not 0 <= self.warmup_fraction < 1:
            raise InputError("warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}", "e.g. 0.05")
        if (self.checkpoint_every or self.resume) and not self.output_dir:
            raise InputError("checkpoint_every / resume", "need an output_dir", "give output_dir for the checkpoints")
        if not (isinstance(self.max_grad_norm, (int, float)) and math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise InputError("max_grad_norm", f"is {self.max_grad_norm!r}", "give a norm >= 0, e.g. 1.0 (0 = no clipping)")
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError("max_steps", f"is {self.max_steps}", "give >= 1, or None for all epochs")


@dataclass
class LoopResult:
    """The fine-tuned model (strategy finished: LoRA merged), the mean training loss of
    each whole epoch, the loss of each optimizer step, the steps taken in all, whether
    this is the main process (the one that saves what follows from the run), and the
    optimizer steps (1-based, this run's) whose gradient `max_grad_norm` clipped."""

    model: torch.nn.Module
    epoch_losses: list[float]
    step_losses: list[float]
    steps: int
    main_process: bool = True
    clipped_steps: list[int] = field(default_factory=list)


class EpochBatchSampler:
    """This rank's micro-batches, from optimizer step `start_step` on, as lists of
    (sample index, optimizer-batch size) keys (the size weights the micro-batch loss)."""

    def __init__(self, n: int, batch_size: int, epochs: int, seed: int, grad_accum: int = 1, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, stop_step: int | None = None):
        self.n, self.epochs, self.seed, self.grad_accum, self.rank, self.world_size = n, epochs, seed, grad_accum, rank, world_size
        self.steps_per_epoch = math.ceil(n / batch_size)
        self.start_step, self.stop_step = start_step, min(stop_step or epochs * self.steps_per_epoch, epochs * self.steps_per_epoch)
        if n // self.steps_per_epoch < grad_accum * world_size:
            raise InputError("batch_size", f"{batch_size} cannot be cut into {grad_accum} micro-batches on each of {world_size} processes",
                             "give a batch_size of at least grad_accum x processes")

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        for epoch in range(self.epochs):
            order = rng.permutation(self.n)  # drawn every epoch, so a resumed run sees the same orders
            for i, batch in enumerate(np.array_split(order, self.steps_per_epoch)):
                if not self.start_step <= epoch * self.steps_per_epoch + i < self.stop_step:
                    continue
                for micro in np.array_split(batch, self.grad_accum):
                    yield [(int(j), len(batch)) for j in np.array_split(micro, self.world_size)[self.rank]]

    def __len__(self) -> int:
        return (self.stop_step - self.start_step) * self.grad_accum


class _Keys:
    """The loader's dataset: a sampler key is handed to the collate as it is."""

    def __getitem__(self, key):
        return key


class _Collate:
    """Keys -> (collated batch, the batch's targets, sample indices (n,), optimizer-batch size).
    With `relabel` (a samples sequence whose labels change with each read, `relabels`) the
    batch's targets are computed from the samples as read, not taken from `targets`."""

    def __init__(self, samples: Sequence[Sample], targets: Mapping[str, torch.Tensor], survey_names: Sequence[str], relabel: Callable | None = None):
        self.samples, self.targets, self.survey_names, self.relabel = samples, targets, survey_names, relabel

    def __call__(self, keys):
        index = torch.tensor([i for i, _ in keys])
        read = [self.samples[i] for i, _ in keys]
        batch = collate_samples(read, self.survey_names)
        if self.relabel is None:
            targets = {k: v[index] for k, v in self.targets.items()}
        else:
            targets = {k: torch.as_tensor(v) for k, v in self.relabel(read).items() if v is not None}
        return batch, targets, index, keys[0][1]


def finetune_loop(model, samples: Sequence[Sample], targets: Callable[[Sequence[Sample]], Mapping[str, torch.Tensor | None]],
                  strategy: Strategy, cfg: LoopConfig, loss: Callable | None = None) -> LoopResult:
    """Fine-tune `model` (a CosmoFMForTask) on `samples` with `strategy`; see the module docstring.

    `targets(samples)` is called once, before any compute (so a missing label is an error
    up front); its None entries are left out. Samples whose labels change with each read
    (an augmentation that sets `relabels = True`, e.g. a redshift stretch) get each batch's
    targets from `targets` of the batch as read. `loss(output, index)`, given, replaces
    `output.loss` (`index`: the micro-batch's sample indices). Seeds nothing but the data
    order: seed (e.g. `accelerate.utils.set_seed`) before building the model.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from cosmofm.pretrain.checkpoint import load_checkpoint, restore_rng_state
    from cosmofm.pretrain.train import flat_dict, new_accelerator, on_main, save_training_state, start_trackers, stop_if_diverged

    all_targets = {k: torch.as_tensor(v) for k, v in targets(samples).items() if v is not None}
    for name, value in all_targets.items():
        if len(value) != len(samples):
            raise InputError(f"targets[{name!r}]", f"has {len(value)} rows for {len(samples)} samples", "return one row per sample")
    optimizer = torch.optim.AdamW(apply_strategy(model, strategy, cfg.lr, cfg.weight_decay))
    steps_per_epoch = math.ceil(len(samples) / cfg.batch_size)
    n_steps = cfg.epochs * steps_per_epoch
    # stepped by hand once per optimizer step, as in pretraining (a prepared one steps once per process)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_fraction * n_steps), n_steps)
    accelerator = new_accelerator(cfg.mixed_precision, cfg.grad_accum, cfg.trackers, cfg.output_dir)
    with contextlib.ExitStack() as held:
        loaded = {}  # the main process's checkpoint, loaded (and verified) while claiming the folder
        found = on_main(accelerator, lambda: _claim(cfg, held, loaded))
        start, meta = 0, {"epoch_losses": [], "step_losses": [], "epoch_total": 0.0}
        if found is not None:
            states, meta = (loaded["states"], loaded["meta"]) if accelerator.is_main_process else load_checkpoint(found)
            _check_resume(meta, cfg, len(samples))
            model.load_state_dict(states["model"])
            optimizer.load_state_dict(states["optimizer"])
            scheduler.load_state_dict(states["scheduler"])
            restore_rng_state(states["rng"][f"rank{accelerator.process_index}"])
            start = int(meta["step"])
        model, optimizer = accelerator.prepare(model, optimizer)
        sampler = EpochBatchSampler(len(samples), cfg.batch_size, cfg.epochs, cfg.seed, cfg.grad_accum, accelerator.process_index,
                                    accelerator.num_processes, start, cfg.max_steps)
        # its own generator: a DataLoader draws a base seed, which must not move the global RNG (dropout)
        loader = DataLoader(_Keys(), batch_sampler=sampler, generator=torch.Generator(),
                            collate_fn=_Collate(samples, all_targets, accelerator.unwrap_model(model).config.survey_names,
                                                   targets if getattr(samples, "relabels", False) else None))
        if cfg.trackers:
            start_trackers(accelerator, TRACKER_PROJECT, flat_dict(asdict(cfg)), cfg.output_dir)
        model.train()
        eval_frozen_layers(accelerator.unwrap_model(model), strategy)
        fix = f"lower lr, or check the data; checkpoints are in {cfg.output_dir}" if cfg.checkpoint_every else "lower lr, or check the data"
        epoch_losses, step_losses, epoch_total = list(meta["epoch_losses"]), list(meta["step_losses"]), float(meta["epoch_total"])
        step, step_total, clipped = start, 0.0, []
        bar = tqdm(total=sampler.stop_step, initial=start, desc=cfg.desc, disable=not (cfg.progress and accelerator.is_main_process))
        for batch, batch_targets, index, n_batch in loader:
            device = accelerator.device
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    out = model(batch.to(device), **{k: v.to(device) for k, v in batch_targets.items()}, **strategy.forward_options())
                value = out.loss if loss is None else loss(out, index)
                if value is None:
                    raise InputError("targets", "gave the model no loss", "return the forward's target arguments from targets(samples)")
                share = len(index) * accelerator.num_processes * cfg.grad_accum / n_batch  # 1 with one process, no accumulation
                accelerator.backward(value if share == 1 else value * share)
                if cfg.max_grad_norm and accelerator.sync_gradients:
                    if float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)) > cfg.max_grad_norm:
                        clipped.append(step + 1)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_total += float(value.detach()) * len(index)
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            if accelerator.num_processes > 1:
                step_total = float(accelerator.reduce(torch.tensor([step_total], dtype=torch.float64, device=device), reduction="sum"))
            row = {"step": step, "loss": step_total / n_batch, "lr": scheduler.get_last_lr()[0]}
            stop_if_diverged(row, fix, check_grad=False)
            step_losses.append(row["loss"])
            epoch_total, step_total = epoch_total + step_total, 0.0
            if step % steps_per_epoch == 0:
                epoch_losses.append(epoch_total / len(samples))
                epoch_total = 0.0
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4g}")
            if cfg.trackers:
                accelerator.log({"loss": row["loss"], "lr": row["lr"]}, step=step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                state = {"step": step, "seed": cfg.seed, "batch_size": cfg.batch_size, "n_samples": len(samples),
                         "world_size": accelerator.num_processes, "epoch_losses": epoch_losses, "step_losses": step_losses,
                         "epoch_total": epoch_total}
                save_training_state(accelerator, model, optimizer, scheduler, cfg.output_dir, step, state, cfg.keep_last, fix)
        bar.close()
        accelerator.end_training()
    return LoopResult(finish_strategy(accelerator.unwrap_model(model), strategy), epoch_losses, step_losses, step,
                      accelerator.is_main_process, clipped)


def _claim(cfg: LoopConfig, held: contextlib.ExitStack, loaded: dict) -> str | None:
    """On the main process: lock the run folder; the checkpoint to resume from (its path,
    its states and metadata put in `loaded`), or None."""
    if not cfg.output_dir:
        return None
    from cosmofm.pretrain.checkpoint import CHECKPOINTS_DIR, resume_checkpoint, run_lock

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    held.enter_context(run_lock(out))
    if not cfg.resume:
        if cfg.checkpoint_every and (out / CHECKPOINTS_DIR).exists():
            raise InputError(str(out), "holds an earlier fine-tune's checkpoints", "continue it with resume, or choose another output_dir")
        return None
    found = resume_checkpoint(out)
    if found is None:
        raise InputError("resume", f"no checkpoint in {out}", "start without resume, or point output_dir to the run to continue")
    loaded["states"], loaded["meta"], path = found
    return str(path)


def _check_resume(meta: Mapping, cfg: LoopConfig, n_samples: int) -> None:
    """The data order depends on these (not on the process count): a resume with others would not continue the run."""
    for key, now in (("seed", cfg.seed), ("batch_size", cfg.batch_size), ("n_samples", n_samples)):
        if meta.get(key) != now:
            raise InputError(key, f"is {now} but the checkpoint was trained with {meta.get(key)}", "resume with the settings the run started with")
