"""Save on a signal (pretrain/checkpoint_signal.py): a real `cosmofm pretrain` process sent
SIGUSR1 mid-run writes a checkpoint at the next step and trains on; sent SIGTERM, it writes
one and exits cleanly; a resume from either continues exactly (the loss curve of the
uninterrupted run, bit for bit). (The same requests reaching every rank: test_observe.py; a
2-process run signalled on one rank only: test_signal_ranks.py.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 10


def _cmd(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cosmofm.cli", "pretrain", "--config", "tiny", "--set", "data.mock_counts=[8,8,4,4]",
            "--set", f"optim.max_steps={STEPS}", "--set", "run.save_every=100", "--output", str(run), *extra]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("COSMOFM_DEBUG", None)
    return env


def _rows(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]


def _signalled(run: Path, signum: int) -> tuple[subprocess.CompletedProcess, int]:
    """Start a run, send `signum` once it has logged 2 steps, wait for it; (its result, the steps
    logged when the signal went)."""
    proc = subprocess.Popen(_cmd(run), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, deadline = run / "metrics.jsonl", time.time() + 240
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.01)
        logged = len(metrics.read_text().splitlines())
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, ""), logged


def _steps_saved(run: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in (run / "checkpoints").glob("step_*"))


@pytest.fixture(scope="module")
def usr1_run(tmp_path_factory):
    """A run sent SIGUSR1 after its second step: (run folder, step of the signal's checkpoint)."""
    run = tmp_path_factory.mktemp("usr1") / "run"
    done, logged = _signalled(run, signal.SIGUSR1)
    assert done.returncode == 0, done.stdout[-3000:]
    saved = _steps_saved(run)
    # the signal's checkpoint, at a step boundary after it arrived, and the final one; none else (save_every=100)
    assert len(saved) == 2 and saved[1] == STEPS and logged < saved[0] < STEPS, (logged, saved, done.stdout[-2000:])
    assert [r["step"] for r in _rows(run)] == list(range(1, STEPS + 1)) and (run / "model").is_dir()  # it trained on
    return run, saved[0]


def test_sigusr1_saves_at_the_next_step_and_a_resume_from_it_continues_exactly(usr1_run):
    run, k = usr1_run
    reference = _rows(run)
    state = json.loads((run / "checkpoints" / f"step_{k:08d}" / "trainer_state.json").read_text())
    assert state["step"] == k and state["metadata"]["samples_seen"] == k * 8
    done = subprocess.run(_cmd(run, "--resume-from", str(k)), env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert _rows(run) == reference  # steps 1..k kept, k+1.. recomputed: loss, parts, lr, per modality, bit for bit


def test_sigterm_saves_and_stops_cleanly_and_a_resume_continues_exactly(usr1_run, tmp_path):
    reference = _rows(usr1_run[0])
    run = tmp_path / "run"
    done, logged = _signalled(run, signal.SIGTERM)
    assert done.returncode == 0, done.stdout[-3000:]
    [j] = _steps_saved(run)
    assert logged < j < STEPS and f"SIGTERM: checkpoint of step {j} saved" in done.stdout, (logged, j, done.stdout[-2000:])
    assert not (run / "model").exists()  # an unfinished run is not released
    assert [r["step"] for r in _rows(run)] == list(range(1, j + 1))  # it stopped at the checkpoint
    again = subprocess.run(_cmd(run, "--resume"), env=_env(), capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert _rows(run) == reference
