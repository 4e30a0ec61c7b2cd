"""Save on a signal delivered to ONE rank of a 2-process run (pretrain/checkpoint_signal.py), as a
cluster scheduler may deliver it: every rank still saves the same step's checkpoint (each
rank's request travels in that step's metrics all-reduce, so no rank waits in a collective
while another saves), a resume from it continues exactly, and SIGTERM to one rank makes all
ranks save and exit cleanly (exit code 0). FSDP2, so that each rank writes its own shard file.
(One process: test_signal_save.py; the all-reduced requests alone: test_observe.py.)"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launch import accelerate_launch, launch_env  # tests/launch.py

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS = 10


def _cmd(run: Path, *extra: str) -> list[str]:
    return accelerate_launch(2) + ["-m", "cosmofm.cli", "pretrain", "--config", "tiny", "--backend", "fsdp2",
                                   "--set", f"optim.max_steps={STEPS}", "--set", "run.save_every=100", "--output", str(run), *extra]


def _rows(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]


def _steps_saved(run: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in (run / "checkpoints").glob("step_*"))


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of the worker process of `rank` among the launcher's descendants (its environment's RANK)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo, found = [launcher], []
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            found.append(pid)
    assert len(found) == 1, f"rank {rank}: found worker pids {found} under launcher {launcher}"
    return found[0]


def _signal_one_rank(run: Path, extra: list[str], rows_before: int, signum: int, rank: int = 1):
    """Start a 2-process run, and once metrics.jsonl has more than `rows_before` rows, send `signum`
    to the worker of `rank` alone; wait for the run. (its result, the rows logged when the signal went)"""
    proc = subprocess.Popen(_cmd(run, *extra), env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, deadline = run / "metrics.jsonl", time.time() + 400
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) > rows_before):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.01)
        logged = len(metrics.read_text().splitlines())
        os.kill(_rank_pid(proc.pid, rank), signum)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, ""), logged


def _check_every_rank_saved(run: Path, step: int):
    """The checkpoint of `step` holds both ranks' shards, both ranks' RNG states and that step."""
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == step and state["metadata"]["world_size"] == 2
    for key in ("model", "optimizer"):
        assert sorted(p.name for p in (ckpt / key).glob("shard-*.safetensors")) == [
            f"shard-{i:05d}-model-00001-of-00001.safetensors" for i in (1, 2)], key
    from cosmofm.pretrain.checkpoint import load_checkpoint

    states, meta = load_checkpoint(ckpt)  # manifest verified, every shard read
    assert sorted(states["rng"]) == ["rank0", "rank1"] and meta["step"] == step


def test_a_signal_to_one_rank_makes_every_rank_save_the_same_step_and_resume_exactly(tmp_path):
    run = tmp_path / "run"
    # SIGUSR1 to rank 1 only, after 2 steps: every rank saves at the next step boundary and trains on
    done, logged = _signal_one_rank(run, [], 2, signal.SIGUSR1)
    assert done.returncode == 0, done.stdout[-4000:]
    saved = _steps_saved(run)
    assert len(saved) == 2 and saved[1] == STEPS and logged < saved[0] < STEPS, (logged, saved, done.stdout[-2000:])
    k = saved[0]
    _check_every_rank_saved(run, k)
    reference = _rows(run)
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))

    # resumed from it, and SIGTERM to rank 1 only after a step: every rank saves that step and exits 0.
    # metrics.jsonl cut to the rows the resume keeps (as it does itself), so that the wait below
    # sees the resumed run's own rows
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[:k]))
    done, logged = _signal_one_rank(run, ["--resume-from", str(k)], k + 1, signal.SIGTERM)
    assert done.returncode == 0, done.stdout[-4000:]
    [j] = [s for s in _steps_saved(run) if k < s < STEPS]  # (the first run's step-10 checkpoint is still there)
    assert f"SIGTERM: checkpoint of step {j} saved" in done.stdout, done.stdout[-3000:]  # printed by rank 0
    assert k < logged < j < STEPS, (k, logged, j)
    _check_every_rank_saved(run, j)
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, j + 1))  # stopped at the checkpoint
    assert rows == reference[:j]  # steps k+1..j recomputed from the signal's checkpoint: bit for bit
