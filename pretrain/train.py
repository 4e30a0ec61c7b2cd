"""The pretraining loop: one Accelerate loop for a laptop process or many GPUs.

Device, precision and process group come from the `Accelerator`; the loop is the
minimal prepare -> forward -> backward -> step. Two things are done by hand, on
purpose: the data are sharded by `GlobalBatchSampler` (so a resume restarts at the
exact sample, and 1 or N processes see the same global batches), and training state
is saved by `checkpoint.py` as safetensors + JSON (Accelerate's `save_state` pickles
optimizer and RNG states).

A run owns its folder (run_folder.py), and a run whose loss or gradients stop being
finite stops before it saves anything. The parallel backend (DDP, FSDP2, DeepSpeed
ZeRO; backend.py) is applied to the model from outside, chosen by `run.backend`.

What it writes as it goes: one row per optimizer step in metrics.jsonl (the loss over all
ranks, its parts, the per-modality figures summed over all ranks), and one row per logging
interval in observe.jsonl and the trackers (throughput, MFU, memory per rank; observe.py).
SIGUSR1 makes it save at the next step and go on, SIGTERM save and stop
(checkpoint_signal.py), all ranks at the same step.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs, broadcast, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from cosmofm.data_cards import load_card
from cosmofm.data_cards.errors import InputError
from cosmofm.pretrain.backend import (
    BackendConfig,
    apply,
    autocast,
    check_launch,
    check_modalities,
    check_world_size,
    checkpoint_group,
    deepspeed_plugin,
    drop_unused_gradients,
    full_model_state,
    full_optimizer_state,
    is_sharded,
    load_backend,
    load_optimizer_state,
    load_sharded_states,
    local_tensors,
    mixed_precision,
    pairing_block,
    prepare,
    release_model,
    resolve,
    sharded_states,
)
from cosmofm.pretrain.checkpoint import (
    CHECKPOINTS_DIR,
    PendingSave,
    begin_sharded_save,
    capture_rng_state,
    check_model_state,
    latest_checkpoint,
    load_checkpoint,
    publish_sharded_checkpoint,
    restore_rng_state,
    save_checkpoint,
    save_release,
    sharded_save_dir,
    step_name,
    write_sharded_state,
)
from cosmofm.pretrain.checkpoint_deepspeed import load_partition, partition_state, partitions_metadata, widened_model_state, write_partition
from cosmofm.pretrain.checkpoint_signal import SaveOnSignal
from cosmofm.pretrain.configuration_cosmofm import CosmoFMConfig
from cosmofm.pretrain.corpus import load_corpus
from cosmofm.pretrain.data import Collator, GlobalBatchSampler, SeededSamples
from cosmofm.pretrain.modeling_cosmofm import CosmoFMForPretraining
from cosmofm.pretrain.observe import FlopCount, Observer, means_by_modality, modality_loss_sums, tracker_values
from cosmofm.pretrain.recipe import PretrainRecipe
from cosmofm.pretrain.streaming import build_plan, data_position, resume_position, streaming_loader
from cosmofm.pretrain.run_folder import OBSERVE_NAME, TRACKER_PROJECT, claim_run_folder, truncate_metrics
from cosmofm.pretrain.state_tree import copied_state



class TrainingDiverged(InputError):
    """The loss, gradient norm or weights stopped being finite; nothing of that state was saved."""


def make_accelerator(recipe: PretrainRecipe, backend: BackendConfig | None = None) -> Accelerator:
    run, backend = recipe.run, backend or BackendConfig()
    return new_accelerator(mixed_precision(backend, recipe), recipe.optim.grad_accum, run.trackers, run.output_dir, deepspeed_plugin(backend))


def start_trackers(accelerator: Accelerator, project: str, config: dict, output_dir: str | os.PathLike | None) -> None:
    """Start the Accelerator's trackers; wandb writes into the run's folder (or WANDB_DIR).

    Passed per run, not through os.environ: a notebook or the demo runs several jobs in one
    process, and each must log into its own folder."""
    wandb_dir = os.environ.get("WANDB_DIR") or os.fspath(output_dir or ".")
    accelerator.init_trackers(project, config=config, init_kwargs={"wandb": {"dir": wandb_dir}})


def new_accelerator(mixed_precision: str = "no", grad_accum: int = 1, trackers=(), output_dir: str | None = None,
                    deepspeed_plugin=None) -> Accelerator:
    """The Accelerator of one training job (pretraining or a fine-tune): precision,
    accumulation and trackers (TensorBoard, wandb offline unless WANDB_MODE says otherwise),
    and DeepSpeed when given its plugin (cosmofm.pretrain.backend)."""
    if "wandb" in trackers and importlib.util.find_spec("wandb") is None:
        # the recipes name wandb by default; without it installed, log to the others
        warnings.warn("run.trackers names wandb, which is not installed; logging without it (pip install wandb)")
        trackers = [t for t in trackers if t != "wandb"]
    if "wandb" in trackers:
        os.environ.setdefault("WANDB_MODE", "offline")  # never phone home unless asked to
    cuda = torch.cuda.is_available()
    # Accelerate keeps one global state per process and refuses a second Accelerator
    # with other settings; a notebook or the demo runs several jobs (pretrain, then
    # fine-tune) in one process, so start each job from a clean precision/accumulation
    # state. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    if deepspeed_plugin is None and PartialState._shared_state.get("distributed_type") == DistributedType.DEEPSPEED:
        # A DeepSpeed job marks the process state as DeepSpeed's (the PartialState's type and
        # ACCELERATE_USE_DEEPSPEED), and a later job without it would fail to start
        # ("no attribute 'mixed_precision'"): that job gets a fresh PartialState, which keeps
        # the torch process group already formed.
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        PartialState._reset_state()
    # a batch without, say, cubes leaves the cube tokenizer unused
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    if deepspeed_plugin is not None and not cuda:
        # DeepSpeed on CPU: Accelerate drops the plugin under cpu=True, and without a named
        # backend each process would train alone; DeepSpeed's CPU accelerator runs over gloo.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(
        # Without cpu=True, `accelerate launch --multi_gpu` on a CPU-only machine starts
        # unsynchronised copies; with it, Accelerate forms a gloo process group.
        cpu=not cuda and deepspeed_plugin is None,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        log_with=list(trackers) or None,
        project_dir=output_dir,
        deepspeed_plugin=deepspeed_plugin,
        kwargs_handlers=handlers,
    )


def build_optimizer(model: CosmoFMForPretraining, recipe: PretrainRecipe) -> torch.optim.Optimizer:
    """AdamW over the model's `parameter_groups` (no weight decay on biases, norms, 1-D parameters)."""
    o = recipe.optim
    return torch.optim.AdamW(model.parameter_groups(o.lr, o.weight_decay), lr=o.lr, betas=tuple(o.betas))


def pretrain(recipe: PretrainRecipe, resume: bool = False, *, overwrite: bool = False, resume_from: int | None = None) -> dict:
    """Run (or resume) pretraining; returns a summary with paths and final loss.

    A new run needs an empty or new `run.output_dir`; `overwrite` first removes an
    earlier run's outputs there (RUN_OUTPUTS), so two runs' checkpoints never mix.
    `resume` continues from the newest checkpoint that verifies, `resume_from` (which
    implies it) from that step's. The run holds `run_lock` on its folder throughout.
    Raises TrainingDiverged at the first non-finite loss or gradient norm. Under a launcher the
    process group outlives the run: the process closes it at its end
    (`backend.close_process_group`; the CLI does).
    """
    resume = resume or resume_from is not None
    if overwrite and resume:
        raise InputError("--overwrite", "cannot be combined with --resume or --resume-from",
                         "continue the run with --resume, or start it again with --overwrite")
    out_dir = Path(recipe.run.output_dir)
    # Settings that do not fit the launch are refused before the process group forms.
    block = pairing_block(recipe)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_world_size(recipe, world, block)
    backend = resolve(load_backend(recipe.run.backend), recipe, world)
    check_launch(backend)
    if not recipe.data.datasets:
        check_modalities(backend, {load_card(name).modality for name in recipe.data.mock_cards}, world)
    accelerator = make_accelerator(recipe, backend)
    check_world_size(recipe, accelerator.num_processes, block)
    set_seed(recipe.run.seed)
    loaded = {}  # the main process's checkpoint, loaded (and verified) while claiming the folder
    with contextlib.ExitStack() as held:
        claim = on_main(accelerator, lambda: claim_run_folder(out_dir, recipe, backend, resume, resume_from, overwrite, held, loaded))
        return _train(accelerator, recipe, backend, out_dir, claim["checkpoint"], loaded)


def _train(accelerator: Accelerator, recipe: PretrainRecipe, backend: BackendConfig, out_dir: Path, checkpoint: str | None, loaded: dict) -> dict:
    main = accelerator.is_main_process
    with accelerator.main_process_first():  # rank 0 generates the mock corpus, others read it
        if recipe.data.streaming:  # shards scanned and checked now, before a model exists
            plan = build_plan(recipe.data, out_dir, accelerator.num_processes, recipe.data.num_workers)
            card_names, modalities = plan.cards, plan.modalities
        else:
            dataset, card_names, pair_block = load_corpus(recipe.data, out_dir)
            modalities = {m for part in dataset.parts for m in (part.modalities if hasattr(part, "modalities") else (x.modality for x in part))}
    check_modalities(backend, modalities, accelerator.num_processes)
    config = CosmoFMConfig(**{"survey_names": card_names, **recipe.model})
    model = CosmoFMForPretraining(config)
    precision = {"no": "fp32"}.get(mixed_precision(backend, recipe), mixed_precision(backend, recipe))
    observer = Observer(FlopCount.of(model), accelerator.device, precision, recipe.run.peak_tflops, accelerator.process_index, accelerator.num_processes)
    start_step = 0
    if checkpoint is not None:
        # a sharded checkpoint's model and optimizer are read after sharding, each process its part
        states, meta = (loaded["states"], loaded["meta"]) if main else load_checkpoint(checkpoint, full_sharded=False)
        sharded = bool(meta.get("sharded"))
        if not sharded:
            saved = widened_model_state(states["model"], model.state_dict(), meta)  # a bf16 ZeRO run's bf16 weights
            check_model_state(saved, model.state_dict(), f"{checkpoint}/model.safetensors")
            model.load_state_dict(saved)
        start_step = int(meta["step"])
        rng = states["rng"].get(f"rank{accelerator.process_index}")
        if rng is not None:
            restore_rng_state(rng)
    # the backend from outside (activation checkpointing, FSDP2 sharding), then the optimizer
    # over the parameters as sharded
    model = apply(model, backend)
    optimizer = build_optimizer(model, recipe)
    # The scheduler is stepped by hand, once per optimizer step: a prepared scheduler
    # would step once per process and make the LR schedule depend on the process count.
    scheduler = get_cosine_schedule_with_warmup(optimizer, recipe.optim.warmup_steps, recipe.optim.max_steps)
    if checkpoint is not None:
        if sharded:
            load_sharded_states(checkpoint, model, optimizer)
        elif "optimizer_partitions" not in meta:  # DeepSpeed's partitions are loaded into its engine, below
            load_optimizer_state(backend, model, optimizer, states["optimizer"])
        scheduler.load_state_dict(states["scheduler"])
    model, optimizer = prepare(accelerator, backend, model, optimizer)
    if checkpoint is not None and "optimizer_partitions" in meta:
        load_partition(checkpoint, model, meta["optimizer_partitions"]["world_size"])  # its ZeRO partition (checkpoint_deepspeed.py)

    o = recipe.optim
    if recipe.data.streaming:
        consumed = resume_position(meta, recipe, accelerator.num_processes, start_step) if checkpoint is not None else 0
        stream = streaming_loader(plan, recipe, accelerator.process_index, accelerator.num_processes, consumed, config.survey_names)
        loader = itertools.islice(stream, (o.max_steps - start_step) * o.grad_accum)  # the stream is endless
    else:
        sampler = GlobalBatchSampler(
            len(dataset), o.global_batch, accelerator.process_index, accelerator.num_processes,
            seed=recipe.run.seed, start_step=start_step * o.grad_accum, n_steps=(o.max_steps - start_step) * o.grad_accum, block=pair_block,
        )
        loader = DataLoader(
            SeededSamples(dataset), batch_sampler=sampler, collate_fn=Collator(config.survey_names),
            num_workers=recipe.data.num_workers, persistent_workers=False,
        )
    metrics_path, observe_path = out_dir / "metrics.jsonl", out_dir / OBSERVE_NAME
    if main:  # an interval row belongs to the timeline being continued, as metrics.jsonl's do
        if checkpoint is None:
            observe_path.unlink(missing_ok=True)
        else:
            truncate_metrics(observe_path, start_step)
    if recipe.run.trackers:
        start_trackers(accelerator, TRACKER_PROJECT, flat_dict(recipe.to_dict()), out_dir)

    step, last_saved = start_step, start_step if checkpoint is not None else None
    bar = tqdm(total=o.max_steps, initial=start_step, desc="pretrain", disable=not (main and recipe.run.progress), dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    history = []
    grad_norm = None
    pending = None  # an asynchronous save still being written
    log_loss = config.masked_loss == "log_chi2"
    step_sums = None  # this step's per-modality loss sums, over its micro-batches
    stopped = None  # the signal that stopped the run, if one did
    with SaveOnSignal() as signals, _awaited(lambda: pending):
        for batch in loader:
            batch = batch.to(accelerator.device)
            with accelerator.accumulate(model):
                with autocast(accelerator, backend):
                    out = model(batch)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    drop_unused_gradients(backend, model)  # FSDP2: as DDP leaves them
                if accelerator.sync_gradients and o.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), o.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            seen += len(batch) * accelerator.num_processes
            observer.add_batch(out)
            sums = modality_loss_sums(out, log_loss)
            step_sums = sums if step_sums is None else step_sums + sums
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            row, global_sums, requests = _step_metrics(accelerator, out, grad_norm, step, scheduler.get_last_lr()[0],
                                                       seen / (time.perf_counter() - t0), step_sums, signals.take())
            step_sums = None
            observer.add_step(global_sums)
            # fp16's loss scaler makes overflowing gradients on purpose and skips their steps
            stop_if_diverged(row, _diverged_fix(out_dir, last_saved), check_grad=accelerator.scaler is None)
            history.append(row["loss"])
            if main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4g}")
            if step % recipe.run.log_every == 0 or step == o.max_steps:
                interval = observer.interval_row(step)  # a collective: every rank, the same steps
                if main:
                    with observe_path.open("a") as f:
                        f.write(json.dumps(interval) + "\n")
                accelerator.log({**{k: v for k, v in flat_dict(row).items() if k != "step"}, **tracker_values(interval)}, step=step)
            # a signal's save: at this step boundary, on every rank (the requests were all-reduced)
            if step % recipe.run.save_every == 0 or step == o.max_steps or requests["save"]:
                if pending is not None:
                    pending.wait()
                pending = _save(accelerator, model, optimizer, scheduler, recipe, backend, step, last_saved)
                last_saved = step
            if requests["stop"]:
                stopped = "SIGTERM"
                break
    bar.close()
    if pending is not None:
        pending.wait()
        accelerator.wait_for_everyone()  # the last checkpoint is published before the run ends
    summary = {"output_dir": str(out_dir), "model_dir": str(out_dir / "model"), "steps": step, "losses": history,
               "metrics": str(metrics_path), "observe": str(observe_path), "signals": signals.received}
    if stopped is not None:  # saved and stopped early: no release of an unfinished model
        if main:
            print(f"{stopped}: checkpoint of step {step} saved in {out_dir / CHECKPOINTS_DIR}; stopping (continue with --resume)", flush=True)
        accelerator.wait_for_everyone()
        _end_trackers(accelerator)
        return {**summary, "stopped": stopped, "checkpoint": str(out_dir / CHECKPOINTS_DIR / step_name(step))}

    model_dir = Path(summary["model_dir"])
    check_finite_weights(accelerator, model, step, _diverged_fix(out_dir, last_saved))
    release = release_model(accelerator, backend, model, CosmoFMForPretraining, config)  # gathered under FSDP2 / ZeRO-3
    if main:
        save_release(release.cosmofm, model_dir)
    accelerator.wait_for_everyone()
    _end_trackers(accelerator)
    return summary


@contextlib.contextmanager
def _awaited(current):
    """Leaving the loop by an error: first let the asynchronous save `current()` still being
    written finish (its thread runs collectives on a group of its own, which every rank joined
    at the same step), so that the process group is not closed under it; the error goes on."""
    try:
        yield
    except BaseException:
        pending = current()
        if pending is not None:
            with contextlib.suppress(Exception):  # the loop's error is the one to report
                pending.wait()
        raise


def _end_trackers(accelerator: Accelerator) -> None:
    """Accelerate's end_training without its destroy_process_group: the model and optimizer
    still hold the group here (FSDP2's device meshes), so destroying it now cannot join gloo's
    threads. The process that formed the group closes it once the run's objects are gone
    (`backend.close_process_group`, called by the CLI), and a notebook or the demo keeps it for
    its next job."""
    for tracker in accelerator.trackers:
        tracker.finish()


def on_main(accelerator: Accelerator, fn) -> dict:
    """Run `fn` on the main process only and hand its JSON-able result, or its error,
    to every process, so that all ranks go on or all stop with the same message.

    Sent as UTF-8 JSON in a byte tensor (torch's broadcast_object_list would pickle).
    """
    if accelerator.num_processes == 1:
        return fn()
    payload, error = b"", None
    if accelerator.is_main_process:
        try:
            payload = json.dumps({"result": fn()}).encode()
        except Exception as exc:  # every rank must hear of it, or the others wait forever
            error = exc
            parts = [exc.field, exc.problem, exc.fix] if isinstance(exc, InputError) else ["main process", f"{type(exc).__name__}: {exc}", ""]
            payload = json.dumps({"error": parts}).encode()
    size = broadcast(torch.tensor([len(payload)], device=accelerator.device))
    data = torch.zeros(int(size.item()), dtype=torch.uint8, device=accelerator.device)
    if accelerator.is_main_process:
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(accelerator.device)
    message = json.loads(bytes(broadcast(data).cpu().tolist()))
    if error is not None:
        raise error
    if "error" in message:
        raise InputError(*message["error"])
    return message["result"]


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


def _step_metrics(accelerator, out, grad_norm, step: int, lr: float, samples_per_s: float, modality_sums: torch.Tensor,
                  requests: list[float]) -> tuple[dict, torch.Tensor, dict]:
    """(row, per-modality loss sums over all ranks, {"save": bool, "stop": bool}) of one step, from
    one all-reduce: the loss averaged over processes (the global-batch loss) with its parts and
    the gradient norm; per modality the mean loss and reduced chi-square over every rank's
    samples (observe.modality_loss_sums); and the save / stop requests of any rank's signals."""
    parts = {"loss": out.loss.detach().float()}
    if out.masked_loss is not None:
        parts["masked"] = out.masked_loss.detach().float()
        parts["masked_chi2"] = out.per_sample_chi2.float().mean()
    if out.contrastive_loss is not None:
        parts["contrastive"] = out.contrastive_loss.detach().float()
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    if grad_norm is not None:
        parts["grad_norm"] = torch.as_tensor(grad_norm, device=parts["loss"].device).detach().float()
    names = sorted(parts)
    local = torch.cat([torch.stack([parts[k] for k in names]), modality_sums.to(parts["loss"].device).flatten(),
                       torch.tensor(requests, dtype=torch.float32, device=parts["loss"].device)])
    # summed, then the parts divided by the process count: what reduction="mean" computes
    reduced = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
    means = reduced[: len(names)] / accelerator.num_processes if accelerator.num_processes > 1 else reduced[: len(names)]
    global_sums = reduced[len(names): -2].reshape(modality_sums.shape)
    row = {"step": step, **{k: float(v) for k, v in zip(names, means)}, "lr": lr, "samples_per_s": samples_per_s}
    row["per_modality_loss"], row["per_modality_chi2"] = means_by_modality(global_sums)  # a modality with no measured hidden pixel: left out
    save, stop = (float(v) > 0 for v in reduced[-2:])
    return row, global_sums, {"save": save, "stop": stop}


def stop_if_diverged(row: dict, fix: str, check_grad: bool):
    """Stop at the first non-finite loss or gradient norm.

    Checked on the numbers `_step_metrics` has already brought to the host for the log,
    so it adds no device sync; they are all-reduced, so every rank stops together. The
    optimizer has already stepped on this step's gradients, so the weights may be bad,
    but nothing was saved from them: this runs before any save, and every save and the
    release check the weights themselves (`check_finite_weights`).
    """
    keys = ("loss", "grad_norm") if check_grad else ("loss",)
    bad = {k: row[k] for k in keys if k in row and not math.isfinite(row[k])}
    if bad:
        what = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in bad.items())
        raise TrainingDiverged(f"step {row['step']}", f"{what}; training stopped and saved nothing of this state", fix)


def check_finite_weights(accelerator, model, step: int, fix: str):
    """Never save non-finite weights: one device sync per save (which syncs anyway)."""
    # each process checks its own shard (FSDP2); the reduction below combines them
    tensors = {k: t for k, t in local_tensors(accelerator.unwrap_model(model).state_dict()).items() if t.is_floating_point()}
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).all()
    # a collective, so that all ranks agree even if their replicas differed
    if accelerator.reduce((~finite).float().reshape(1), reduction="sum").item() > 0:
        names = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
        raise TrainingDiverged(f"step {step}", f"the weights are not finite ({', '.join(names[:3])}, ...); training stopped and saved nothing of this state",
                               fix)


def _diverged_fix(out_dir: Path, last_saved: int | None) -> str:
    kept = f"the last good checkpoint, step {last_saved}, is kept in {out_dir / CHECKPOINTS_DIR}" if last_saved is not None else "no checkpoint was saved"
    return f"{kept}; lower optim.lr or optim.grad_clip, or check the data, then start again with --overwrite"


def _save(accelerator, model, optimizer, scheduler, recipe: PretrainRecipe, backend: BackendConfig, step: int, last_saved: int | None):
    meta = {
        "step": step,
        "backend": backend.name,
        "optimizer_saved": True,
        "world_size": accelerator.num_processes,
        "global_batch": recipe.optim.global_batch,
        "grad_accum": recipe.optim.grad_accum,
        "seed": recipe.run.seed,
        "samples_seen": step * recipe.optim.global_batch * recipe.optim.grad_accum,
    }
    if recipe.data.streaming:  # the map-style sampler needs only the step; a stream needs its position
        meta["data"] = data_position(recipe, step, accelerator.num_processes)
    if backend.kind == "deepspeed":  # each process writes its ZeRO partition (checkpoint_deepspeed.py)
        meta["optimizer_partitions"] = partitions_metadata(model)
    return save_training_state(accelerator, model, optimizer, scheduler, recipe.run.output_dir, step, meta, recipe.run.keep_last,
                               _diverged_fix(Path(recipe.run.output_dir), last_saved), backend)


def save_training_state(accelerator, model, optimizer, scheduler, run_dir, step: int, meta: dict, keep_last: int, fix: str,
                        backend: BackendConfig | None = None) -> PendingSave | None:
    """A checkpoint of a training job: model, optimizer, scheduler and every rank's RNG state,
    after checking that the weights are finite.

    FSDP2: every process writes its shards (`_save_sharded`). DeepSpeed: the model gathered
    onto the main process, and every process's ZeRO optimizer partition as safetensors + JSON
    (`checkpoint_deepspeed.write_partition`; DeepSpeed's own save would pickle it). With the
    backend's `async_checkpoint` both write from a thread and the returned `PendingSave` must be
    waited for before the next save. DDP: the main process writes the whole state
    (`checkpoint.save_checkpoint`)."""
    check_finite_weights(accelerator, model, step, fix)
    # every rank's RNG state, so dropout and friends continue exactly after a resume
    rng = accelerator.gather_for_metrics([capture_rng_state()], use_gather_object=True) if accelerator.num_processes > 1 else [capture_rng_state()]
    if is_sharded(backend):
        return _save_sharded(accelerator, model, optimizer, scheduler, run_dir, step, meta, keep_last, backend, rng)
    model_state = full_model_state(accelerator, backend, model)  # ZeRO-3: a collective, every rank takes part
    if "optimizer_partitions" in meta:
        return _save_partitioned(accelerator, model, scheduler, run_dir, step, meta, keep_last, model_state, rng, backend.async_checkpoint)
    optim_state = full_optimizer_state(accelerator, backend, model, optimizer)
    if accelerator.is_main_process:
        states = {"model": model_state, **({"optimizer": optim_state} if optim_state is not None else {}),
                  "scheduler": scheduler.state_dict(), "rng": {f"rank{i}": r for i, r in enumerate(rng)}}
        save_checkpoint(run_dir, step, states, meta, keep_last=keep_last)
    accelerator.wait_for_everyone()
    return None


def _save_partitioned(accelerator, engine, scheduler, run_dir, step: int, meta: dict, keep_last: int, model_state, rng: list,
                      asynchronous: bool = False) -> PendingSave | None:
    """DeepSpeed: every process writes its ZeRO partition into the hidden step folder; then the
    main process adds the gathered model, scheduler, RNG and manifest and renames it into place.
    `asynchronous`: the states are copied now and written by a thread, which waits on a gloo
    group of its own (`checkpoint_group`) for every process's partition before publishing."""
    main = accelerator.is_main_process
    if main:
        begin_sharded_save(run_dir, step)
    accelerator.wait_for_everyone()  # the folder is empty and there before anyone writes
    tmp = sharded_save_dir(run_dir, step)
    partition = partition_state(engine)  # ZeRO-3: a collective, in the training thread
    whole = {"model": model_state, "scheduler": scheduler.state_dict(), "rng": {f"rank{i}": r for i, r in enumerate(rng)}} if main else None
    group = checkpoint_group("deepspeed-partitions") if asynchronous else None
    if asynchronous:  # copies: training goes on changing the weights (ZeRO-1/2 hands out its own), moments and scheduler
        partition, whole = copied_state(partition), copied_state(whole)

    def finish():
        write_partition(tmp, partition)
        if not asynchronous:
            accelerator.wait_for_everyone()  # every partition written
        elif group is not None:  # in the writing thread: the same wait on a group of its own
            torch.distributed.barrier(group=group)
        if main:
            publish_sharded_checkpoint(tmp, step, whole, {}, meta, keep_last)

    if asynchronous:
        return PendingSave([], finish)
    finish()
    accelerator.wait_for_everyone()
    return None


def _save_sharded(accelerator, model, optimizer, scheduler, run_dir, step: int, meta: dict, keep_last: int, backend: BackendConfig,
                  rng: list) -> PendingSave | None:
    """Every process writes its shards of the model and optimizer into the hidden step folder;
    then the main process adds scheduler, RNG, skeletons and manifest and renames it into place."""
    if accelerator.is_main_process:
        begin_sharded_save(run_dir, step)
    accelerator.wait_for_everyone()  # the folder is empty and there before anyone writes
    tmp = sharded_save_dir(run_dir, step)
    asynchronous = backend.async_checkpoint
    skeletons, futures = {}, []
    for key, state in sharded_states(model, optimizer).items():
        skeletons[key], future = write_sharded_state(tmp, key, state, checkpoint_group(key) if asynchronous else None, asynchronous)
        futures.append(future)
    # copies: training goes on changing the scheduler while an asynchronous save is written
    whole = copy.deepcopy({"scheduler": scheduler.state_dict(), "rng": {f"rank{i}": r for i, r in enumerate(rng)}})

    def publish():
        if accelerator.is_main_process:
            publish_sharded_checkpoint(tmp, step, whole, skeletons, meta, keep_last)

    if asynchronous:
        return PendingSave([f for f in futures if f is not None], publish)
    publish()
    accelerator.wait_for_everyone()
    return None


def flat_dict(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_dict(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) and not (isinstance(v, float) and math.isnan(v)):
            out[key] = v
        else:
            out[key] = str(v)
    return out
