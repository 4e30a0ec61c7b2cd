"""Helpers of the multi-process tests: `accelerate launch` on CPU (gloo) with a free port, several
pretraining runs in one launch, and a small sharded pretraining dataset to stream."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

N_SPECTRA, N_IMAGES = 40, 24


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(num_processes: int = 2) -> list[str]:
    """The command that starts `num_processes` copies of a script (append the script or `-m module`)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
    ]


def sharded_dataset(folder: Path) -> Path:
    """N_SPECTRA + N_IMAGES = 64 samples of two cards in several Arrow shard files."""
    from cosmofm.data_cards import load_card
    from cosmofm.data_cards.io.hf_io import write_dataset
    from cosmofm.data_cards.mocks.generators import mock_samples

    samples = mock_samples(load_card("sdss-like"), N_SPECTRA, seed=7) + mock_samples(load_card("lsst-like"), N_IMAGES, seed=7)
    write_dataset(samples, folder, ["sdss-like", "lsst-like"], shard_size="700KB")
    assert len(list(folder.glob("data-*.arrow"))) >= 3, "the test needs a sharded dataset"
    return folder


# Every rank: each run of runs.json (a tiny-recipe pretraining with its backend and overrides),
# then, where asked, the same run (or a run folder already there, "fresh": false) resumed from a step (in the same processes: the launcher's,
# torch.distributed's and DeepSpeed's start-up is paid once for all runs); then the CLI's
# teardown. Each rank prints one JSON line.
RUNS_SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from cosmofm.pretrain.backend import _communication_threads, close_process_group
from cosmofm.pretrain.recipe import PretrainRecipe
from cosmofm.pretrain.train import pretrain

out = Path(sys.argv[1])
rows = {}
for spec in json.loads((out / "runs.json").read_text()):
    run = out / spec["name"]
    recipe = lambda: PretrainRecipe.load("tiny", [f"run.output_dir={run}", "run.progress=false", "run.trackers=[]",
                                                  f"run.backend={spec['backend']}", *spec["sets"]])
    rows[spec["name"]] = []
    if spec.get("fresh", True):
        pretrain(recipe())
        rows[spec["name"]].append((run / "metrics.jsonl").read_text())
    if spec.get("resume_from"):
        pretrain(recipe(), resume_from=spec["resume_from"])
        rows[spec["name"]].append((run / "metrics.jsonl").read_text())
before = _communication_threads()
after = close_process_group()
print("RESULT " + json.dumps({"rank": int(os.environ["RANK"]), "rows": rows, "before": before, "after": after}), flush=True)
"""


def launch_env() -> dict:
    """One thread per process, offline trackers, no debug mode."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    env.pop("COSMOFM_DEBUG", None)
    return env


def launch_runs(out: Path, runs: list[dict], num_processes: int = 2) -> list[dict]:
    """Pretraining runs of the tiny recipe in one launch of `num_processes` CPU processes (gloo).
    `runs`: {"name": its folder under `out`, "backend": a backend name or file, "sets": recipe
    overrides, "resume_from": a step to resume the finished run from (optional), "fresh": false to
    only resume a run folder put there before}. Returns each rank's result, by rank: "rows" {name:
    [metrics.jsonl text of the run, of its resume]}, "before" / "after": the communication threads
    alive before and after the teardown. One process starts with torchrun (a process group of one;
    `accelerate launch --multi_gpu` wants two)."""
    (out / "runs.json").write_text(json.dumps(runs))
    (out / "runs.py").write_text(RUNS_SCRIPT)
    start = accelerate_launch(num_processes) if num_processes > 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port())]
    cmd = start + [str(out / "runs.py"), str(out)]
    done = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=900, cwd=out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = sorted((json.loads(line.removeprefix("RESULT ")) for line in done.stdout.splitlines() if line.startswith("RESULT ")),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == list(range(num_processes))
    return results
