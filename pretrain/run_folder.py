"""A run's folder: what a run writes there, and claiming it for a new or resumed run.

A run owns its folder (pretrain/train.py): it holds `run_lock` on it throughout; a new
run refuses a folder with an earlier run's outputs unless told to resume or to overwrite
them; a resume checks that the recipe fits the checkpoint and drops the metric rows
logged after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from cosmofm.data_cards.errors import InputError
from cosmofm.pretrain.backend import BackendConfig
from cosmofm.pretrain.checkpoint import CHECKPOINTS_DIR, atomic_write_bytes, resume_checkpoint, run_lock
from cosmofm.pretrain.checkpoint_deepspeed import check_partitioned_resume
from cosmofm.pretrain.recipe import PretrainRecipe, write_recipe

TRACKER_PROJECT = "cosmofm-pretrain"  # TensorBoard writes to <run>/<project>
# What a run writes into its folder (eval_results.json: evaluations such as the demo's,
# which `cosmofm push` publishes with the model). A new run refuses a folder holding any
# of them; --overwrite removes exactly these. data/, the mock corpus cached under a hash
# of its recipe, is not one run's output and is kept.
OBSERVE_NAME = "observe.jsonl"  # one row per logging interval (observe.py)
RUN_OUTPUTS = ("model", CHECKPOINTS_DIR, "metrics.jsonl", OBSERVE_NAME, "recipe.yaml", "backend.yaml", TRACKER_PROJECT, "wandb", "eval_results.json")


def claim_run_folder(out_dir: Path, recipe: PretrainRecipe, backend: BackendConfig, resume: bool, resume_from: int | None, overwrite: bool,
                     held: contextlib.ExitStack, loaded: dict) -> dict:
    """On the main process: lock the run folder, then make sure it holds what this run expects."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        held.enter_context(run_lock(out_dir))
    except OSError as exc:
        raise InputError(str(out_dir), f"cannot be used as a run folder ({exc.strerror or exc})", "give --output a folder you can write to") from None
    checkpoint = None
    if resume:
        # sharded states are verified here (manifest) and read later by every process, its own part
        found = resume_checkpoint(out_dir, resume_from, full_sharded=False)
        if found is None:
            raise InputError("--resume", f"no checkpoint in {out_dir}", "start without --resume, or point --output to the run to continue")
        loaded["states"], loaded["meta"], checkpoint = found
        check_resume_layout(loaded["meta"], recipe)
        check_partitioned_resume(loaded["meta"], checkpoint, backend)  # DeepSpeed's partitions
        truncate_metrics(out_dir / "metrics.jsonl", int(loaded["meta"]["step"]))
    else:
        previous = [name for name in RUN_OUTPUTS if (out_dir / name).exists()]
        if previous and not overwrite:
            raise InputError(str(out_dir), f"holds an earlier run ({', '.join(previous)})",
                             "continue it with --resume, replace it with --overwrite, or choose another --output")
        if previous:
            remove_outputs(out_dir, previous)
            print(f"{out_dir}: removed the earlier run's {', '.join(previous)} (--overwrite)")
    recipe.save(out_dir / "recipe.yaml")
    write_recipe(backend.to_dict(), out_dir / "backend.yaml")  # as resolved for this launch
    return {"checkpoint": None if checkpoint is None else str(checkpoint)}


def remove_outputs(out_dir: Path, names: list[str]):
    """Move them into one hidden folder, then delete that: a crash part-way leaves no
    half-deleted checkpoint or model where a run would look for one."""
    trash = out_dir / ".overwritten"
    shutil.rmtree(trash, ignore_errors=True)  # an earlier --overwrite killed while deleting
    trash.mkdir()
    for name in names:
        os.replace(out_dir / name, trash / name)
    shutil.rmtree(trash)


def check_resume_layout(meta: dict, recipe: PretrainRecipe):
    if meta.get("optimizer_saved") is False:
        raise InputError("--resume", f"the checkpoint of step {meta['step']} was written under {meta.get('backend')} and holds no optimizer state",
                         "it was written before DeepSpeed checkpoints held their optimizer partitions (pretrain/checkpoint_deepspeed.py); "
                         "start again with --overwrite")
    for key, now in (("global_batch", recipe.optim.global_batch), ("grad_accum", recipe.optim.grad_accum), ("seed", recipe.run.seed)):
        if meta.get(key) != now:
            raise InputError(
                f"recipe.{'run' if key == 'seed' else 'optim'}.{key}",
                f"is {now} but the checkpoint was trained with {meta.get(key)}",
                "resume with the recipe the run started with (recipe.yaml in the run folder)",
            )


def truncate_metrics(path: Path, step: int):
    """Drop metric rows logged after the checkpoint we resume from (a killed run's tail)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_bytes(path, ("\n".join(rows) + "\n" if rows else "").encode())
