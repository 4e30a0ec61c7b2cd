"""The pretraining loop: one Accelerate loop for a laptop process or many GPUs.

Device, precision and process group come from the `Accelerator`; the loop is the
minimal prepare -> forward -> backward -> step. Two things are done by hand, on
purpose: the data are sharded by `GlobalBatchSampler` (so a resume restarts at the
exact sample, and 1 or N processes see the same global batches), and training state
is saved by `checkpoint.py` as safetensors + JSON (Accelerate's `save_state` pickles
optimizer and RNG states).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from cosmofm.data_cards.errors import InputError
from cosmofm.pretrain.checkpoint import (
    atomic_write_bytes,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    write_manifest,
)
from cosmofm.pretrain.configuration_cosmofm import CosmoFMConfig
from cosmofm.pretrain.corpus import load_corpus
from cosmofm.pretrain.data import Collator, GlobalBatchSampler, SeededSamples
from cosmofm.pretrain.modeling_cosmofm import CosmoFMForPretraining
from cosmofm.pretrain.recipe import PretrainRecipe


def make_accelerator(recipe: PretrainRecipe) -> Accelerator:
    run = recipe.run
    if "wandb" in run.trackers:
        os.environ.setdefault("WANDB_MODE", "offline")  # never phone home unless asked to
        os.environ.setdefault("WANDB_DIR", run.output_dir)
    cuda = torch.cuda.is_available()
    # Accelerate keeps one global state per process and refuses a second Accelerator
    # with other settings; a notebook or the demo runs several jobs (pretrain, then
    # fine-tune) in one process, so start each job from a clean precision/accumulation
    # state. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(
        # Without cpu=True, `accelerate launch --multi_gpu` on a CPU-only machine starts
        # unsynchronised copies; with it, Accelerate forms a gloo process group.
        cpu=not cuda,
        mixed_precision=run.mixed_precision,
        gradient_accumulation_steps=recipe.optim.grad_accum,
        log_with=list(run.trackers) or None,
        project_dir=run.output_dir,
        kwargs_handlers=[
            # a batch without, say, cubes leaves the cube tokenizer unused
            DistributedDataParallelKwargs(find_unused_parameters=True),
        ],
    )


def build_optimizer(model: torch.nn.Module, recipe: PretrainRecipe) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings' 1D parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    o = recipe.optim
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=tuple(o.betas),
    )


def pretrain(recipe: PretrainRecipe, resume: bool = False) -> dict:
    """Run (or resume) pretraining; returns a summary with paths and final loss."""
    out_dir = Path(recipe.run.output_dir)
    accelerator = make_accelerator(recipe)
    set_seed(recipe.run.seed)
    main = accelerator.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        recipe.save(out_dir / "recipe.yaml")

    with accelerator.main_process_first():  # rank 0 generates the mock corpus, others read it
        dataset, card_names, pair_block = load_corpus(recipe.data, out_dir)
    config = CosmoFMConfig(**{"survey_names": card_names, **recipe.model})
    model = CosmoFMForPretraining(config)
    optimizer = build_optimizer(model, recipe)
    # The scheduler is stepped by hand, once per optimizer step: a prepared scheduler
    # would step once per process and make the LR schedule depend on the process count.
    scheduler = get_cosine_schedule_with_warmup(optimizer, recipe.optim.warmup_steps, recipe.optim.max_steps)

    start_step = 0
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            raise InputError("--resume", f"no checkpoint in {out_dir}", "start without --resume, or point --output to the run to continue")
        states, meta = load_checkpoint(ckpt)
        model.load_state_dict(states["model"])
        optimizer.load_state_dict(states["optimizer"])
        scheduler.load_state_dict(states["scheduler"])
        start_step = int(meta["step"])
        _check_resume_layout(meta, recipe, accelerator)
        rng = states["rng"].get(f"rank{accelerator.process_index}")
        if rng is not None:
            restore_rng_state(rng)
    model, optimizer = accelerator.prepare(model, optimizer)

    o = recipe.optim
    sampler = GlobalBatchSampler(
        len(dataset), o.global_batch, accelerator.process_index, accelerator.num_processes,
        seed=recipe.run.seed, start_step=start_step * o.grad_accum, n_steps=(o.max_steps - start_step) * o.grad_accum, block=pair_block,
    )
    loader = DataLoader(
        SeededSamples(dataset), batch_sampler=sampler, collate_fn=Collator(config.survey_names),
        num_workers=recipe.data.num_workers, persistent_workers=False,
    )
    metrics_path = out_dir / "metrics.jsonl"
    if main:
        _truncate_metrics(metrics_path, start_step)
    if recipe.run.trackers:
        accelerator.init_trackers("cosmofm-pretrain", config={k: v for k, v in _flat(recipe.to_dict()).items()})

    step = start_step
    bar = tqdm(total=o.max_steps, initial=start_step, desc="pretrain", disable=not (main and recipe.run.progress), dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    history = []
    for batch in loader:
        batch = batch.to(accelerator.device)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                out = model(batch)
            accelerator.backward(out.loss)
            if accelerator.sync_gradients and o.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), o.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seen += len(batch) * accelerator.num_processes
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        step += 1
        row = _step_metrics(accelerator, out, step, scheduler.get_last_lr()[0], seen / (time.perf_counter() - t0))
        history.append(row["loss"])
        if main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4g}")
        if step % recipe.run.log_every == 0 or step == o.max_steps:
            accelerator.log({k: v for k, v in _flat(row).items() if k != "step"}, step=step)
        if step % recipe.run.save_every == 0 or step == o.max_steps:
            _save(accelerator, model, optimizer, scheduler, recipe, step)
    bar.close()

    model_dir = out_dir / "model"
    if main:
        release = accelerator.unwrap_model(model).cosmofm
        release.save_pretrained(model_dir)
        write_manifest(model_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"output_dir": str(out_dir), "model_dir": str(model_dir), "steps": step, "losses": history, "metrics": str(metrics_path)}


def load_pretraining_model(run_dir: str | Path) -> CosmoFMForPretraining:
    """Backbone + objective heads from a run's latest checkpoint (the release has only the backbone)."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise InputError(str(run_dir), "has no checkpoint", "point to a run folder written by `cosmofm pretrain`")
    states, _ = load_checkpoint(ckpt)
    config = CosmoFMConfig.from_pretrained(Path(run_dir) / "model")
    model = CosmoFMForPretraining(config)
    model.load_state_dict(states["model"])
    return model.eval()


def _step_metrics(accelerator, out, step: int, lr: float, samples_per_s: float) -> dict:
    """Loss averaged over processes (the global-batch loss) plus its parts."""
    parts = {"loss": out.loss.detach().float()}
    if out.masked_loss is not None:
        parts["masked"] = out.masked_loss.detach().float()
        parts["masked_chi2"] = out.per_sample_chi2.float().mean()
    if out.contrastive_loss is not None:
        parts["contrastive"] = out.contrastive_loss.detach().float()
    names = sorted(parts)
    reduced = accelerator.reduce(torch.stack([parts[k] for k in names]), reduction="mean")
    row = {"step": step, **{k: float(v) for k, v in zip(names, reduced)}, "lr": lr, "samples_per_s": samples_per_s}
    row["per_modality_chi2"] = {k: float(v) for k, v in (out.per_modality or {}).items()}
    return row


def _save(accelerator, model, optimizer, scheduler, recipe: PretrainRecipe, step: int):
    # every rank's RNG state, so dropout and friends continue exactly after a resume
    rng = accelerator.gather_for_metrics([capture_rng_state()], use_gather_object=True) if accelerator.num_processes > 1 else [capture_rng_state()]
    if accelerator.is_main_process:
        states = {
            "model": accelerator.unwrap_model(model).state_dict(),
            "optimizer": optimizer.optimizer.state_dict() if hasattr(optimizer, "optimizer") else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {f"rank{i}": r for i, r in enumerate(rng)},
        }
        meta = {
            "step": step,
            "world_size": accelerator.num_processes,
            "global_batch": recipe.optim.global_batch,
            "grad_accum": recipe.optim.grad_accum,
            "seed": recipe.run.seed,
            "samples_seen": step * recipe.optim.global_batch * recipe.optim.grad_accum,
        }
        save_checkpoint(recipe.run.output_dir, step, states, meta, keep_last=recipe.run.keep_last)
    accelerator.wait_for_everyone()


def _check_resume_layout(meta: dict, recipe: PretrainRecipe, accelerator):
    for key, now in (("global_batch", recipe.optim.global_batch), ("grad_accum", recipe.optim.grad_accum), ("seed", recipe.run.seed)):
        if meta.get(key) != now:
            raise InputError(
                f"recipe.{'run' if key == 'seed' else 'optim'}.{key}",
                f"is {now} but the checkpoint was trained with {meta.get(key)}",
                "resume with the recipe the run started with (recipe.yaml in the run folder)",
            )


def _truncate_metrics(path: Path, step: int):
    """Drop metric rows logged after the checkpoint we resume from (a killed run's tail)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_bytes(path, ("\n".join(rows) + "\n" if rows else "").encode())


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) and not (isinstance(v, float) and math.isnan(v)):
            out[key] = v
        else:
            out[key] = str(v)
    return out
