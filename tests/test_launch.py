"""Launchers (pretrain/launch.py, scripts/launch/): the exact commands `cosmofm launch ...
--dry-run` prints for one process, accelerate, torchrun and SLURM, `--resume-if-possible`,
and a live elastic restart: torchrun with 2 gloo CPU processes, one SIGKILLed after a
checkpoint, restarts the group, and the resumed loss curve equals an uninterrupted one."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch import launch_env, sharded_dataset  # tests/launch.py

from cosmofm.cli import main
from cosmofm.data_cards.errors import InputError
from cosmofm.pretrain.launch import LaunchPlan, auto_resume, launch_commands, launch_file

CLI = [sys.executable, "-m", "cosmofm.cli"]
TINY = ["--config", "tiny", "--set", "data.mock_counts=[8,8,4,4]"]  # 24 samples: seconds per run
STEPS, SAVE_EVERY, KILL_AFTER = 12, 3, 3  # the kill comes after the checkpoint of step KILL_AFTER, 9 steps before the end


def _dry_run(capsys, *args: str) -> list[list[str]]:
    """The commands `cosmofm launch ... --dry-run` prints, each split as the shell would."""
    assert main(["launch", *args, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("# ") for line in lines[::2]) and len(lines) % 2 == 0, lines  # "# where" above each command
    return [shlex.split(line) for line in lines[1::2]]


# -- the commands -----------------------------------------------------------------------


def test_local_is_one_cosmofm_pretrain(capsys):
    [cmd] = _dry_run(capsys, "local", *TINY, "--output", "runs/a")
    assert cmd == ["cosmofm", "pretrain", "--resume-if-possible", *TINY, "--output", "runs/a"]


def test_torchrun_one_node_is_standalone_and_elastic(capsys):
    [cmd] = _dry_run(capsys, "torchrun", "--config", "tiny", "--gpus-per-node", "4", "--max-restarts", "2", "--backend", "fsdp2")
    # one TCPStore per restart attempt (see launch.ELASTIC_ENV): without it the restart in the live test below fails
    assert cmd == ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", "torchrun", "--nnodes", "1", "--nproc-per-node", "4", "--max-restarts", "2", "--standalone",
                   "-m", "cosmofm.cli", "pretrain", "--resume-if-possible", "--config", "tiny", "--backend", "fsdp2"]


def test_torchrun_multi_node_uses_a_c10d_rendezvous(capsys):
    [cmd] = _dry_run(capsys, "torchrun", "--config", "demo", "--nodes", "3", "--gpus-per-node", "8", "--main-address", "gpu017",
                     "--main-port", "29600", "--rdzv-id", "job42")
    assert cmd[:cmd.index("-m")] == ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", "torchrun", "--nnodes", "3", "--nproc-per-node", "8", "--max-restarts", "3", "--rdzv-backend", "c10d",
                                     "--rdzv-endpoint", "gpu017:29600", "--rdzv-id", "job42"]


def test_accelerate_one_node_and_one_command_per_machine(capsys):
    [one] = _dry_run(capsys, "accelerate", "--config", "demo", "--gpus-per-node", "8")
    assert one[:6] == ["accelerate", "launch", "--config_file", str(launch_file("accelerate_one_node.yaml")), "--num_processes", "8"]
    many = _dry_run(capsys, "accelerate", "--config", "demo", "--nodes", "2", "--gpus-per-node", "4", "--main-address", "10.0.0.7")
    assert [c[c.index("--machine_rank") + 1] for c in many] == ["0", "1"]
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    # accelerate itself reads the multi-node file with the launcher's values winning over its placeholders
    args = launch_command_parser().parse_args(many[1][2:])
    _validate_launch_command(args)
    assert (args.num_processes, args.num_machines, args.machine_rank, args.main_process_ip, args.main_process_port) == (8, 2, 1, "10.0.0.7", 29500)
    assert args.multi_gpu and args.module and args.training_script == "cosmofm.cli"
    assert args.training_script_args == ["pretrain", "--resume-if-possible", "--config", "demo"]


def test_slurm_submits_the_requeueing_sbatch_script(capsys):
    [cmd] = _dry_run(capsys, "slurm", *TINY, "--nodes", "4", "--gpus-per-node", "8", "--time", "12:00:00", "--partition", "gpu",
                     "--max-restarts", "5", "--output", "runs/big")
    script = launch_file("slurm.sbatch")
    assert cmd == ["sbatch", "--nodes", "4", "--gpus-per-node", "8", "--time", "12:00:00", "--partition", "gpu", "--export",
                   "ALL,COSMOFM_GPUS_PER_NODE=8,COSMOFM_MAX_RESTARTS=5,COSMOFM_RDZV_PORT=29500,COSMOFM_RUN_DIR=runs/big",
                   str(script), *TINY, "--output", "runs/big"]
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # it parses
    for line in ("#SBATCH --requeue", "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", "#SBATCH --signal=B:USR1@300", "trap 'requeue USR1' USR1", "trap 'requeue TERM' TERM",
                 'scontrol requeue "$SLURM_JOB_ID"',
                 'srun --kill-on-bad-exit=1 torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS" --max-restarts "$MAX_RESTARTS"',
                 '--rdzv-backend c10d --rdzv-endpoint "${HEAD}:${PORT}" --rdzv-id "$SLURM_JOB_ID"',
                 '-m cosmofm.cli pretrain --resume-if-possible "$@" &'):
        assert line in text, line


@pytest.mark.parametrize("args, field", [
    (["local", "--gpus-per-node", "2"], "--nodes/--gpus-per-node"),
    (["torchrun", "--nodes", "2"], "--main-address"),
    (["accelerate", "--nodes", "2", "--main-address", "h", "--machine-rank", "2"], "--machine-rank"),
    (["torchrun", "--gpus-per-node", "0"], "--gpus-per-node"),
    (["torchrun", "--max-restarts", "-1"], "--max-restarts"),
    (["torchrun", "--time", "1:00:00"], "--time"),
    (["accelerate", "--max-restarts", "2"], "--max-restarts"),
    (["slurm", "--main-port", "70000"], "--main-port"),
    (["slurm", "--config", "no-such-recipe"], "--config"),
    (["torchrun", "--backend", "zero9"], "--backend"),
])
def test_bad_launches_are_refused_before_anything_starts(args, field, capsys):
    assert main(["launch", *args, "--dry-run"]) == 2
    err = capsys.readouterr()
    assert err.out == "" and err.err.startswith(f"error: {field}"), err.err


def test_plans_check_their_launcher():
    with pytest.raises(InputError, match="not a launcher"):
        launch_commands(LaunchPlan("mpirun", ()))


# -- --resume-if-possible ---------------------------------------------------------------


def test_resume_if_possible_decides_from_the_folder(tmp_path):
    run = tmp_path / "run"
    assert auto_resume(run)[:2] == (False, False)  # nothing there: a fresh start
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # a run killed before its first checkpoint
    assert auto_resume(run)[:2] == (False, True)
    (run / "model").mkdir()  # a released model without checkpoints is not a killed run: the usual refusal
    assert auto_resume(run)[:2] == (False, False)
    step = run / "checkpoints" / "step_00000003"
    step.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000003\n")
    resume, overwrite, message = auto_resume(run)
    assert (resume, overwrite) == (True, False) and "step_00000003" in message


def test_resume_if_possible_conflicts_with_explicit_choices(tmp_path, capsys):
    for flag in (["--resume"], ["--resume-from", "3"], ["--overwrite"]):
        assert main(["pretrain", *TINY, "--output", str(tmp_path), "--resume-if-possible", *flag]) == 2
        assert capsys.readouterr().err.startswith(f"error: {flag[0]}: does not go with --resume-if-possible")


# -- a live elastic restart --------------------------------------------------------------


def _torchrun(out: Path, data: list[str]) -> subprocess.Popen:
    """`cosmofm launch torchrun` (not a dry run): torchrun --standalone, 2 gloo processes, 1 restart."""
    cmd = CLI + ["launch", "torchrun", *data, "--set", f"optim.max_steps={STEPS}", "--set", f"run.save_every={SAVE_EVERY}",
                 "--gpus-per-node", "2", "--max-restarts", "1", "--output", str(out)]
    return subprocess.Popen(cmd, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _worker(launcher: subprocess.Popen, local_rank: str) -> psutil.Process | None:
    """The training process of `local_rank` under the launch (cosmofm launch -> torchrun -> workers)."""
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if p.environ().get("LOCAL_RANK") == local_rank and "pretrain" in p.cmdline():
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _kill_rank_after_checkpoint(launcher: subprocess.Popen, run: Path, step: int, timeout: float = 180) -> int:
    """SIGKILL local rank 1 as soon as the checkpoint of `step` (or a later one) is published;
    the step of the newest checkpoint at the kill."""
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert launcher.poll() is None, launcher.stdout.read()
        name = latest.read_text().strip() if latest.exists() else ""
        if name and int(name.removeprefix("step_")) >= step:
            victim = _worker(launcher, "1")
            assert victim is not None and not (run / "model").exists(), "the run ended before the kill"
            victim.send_signal(signal.SIGKILL)
            return int(name.removeprefix("step_"))
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of step {step} within {timeout} s")


def _streaming(folder: Path) -> list[str]:
    """The tiny recipe on a sharded dataset streamed by 2 DataLoader workers per rank."""
    dataset = sharded_dataset(folder)
    return ["--config", "tiny", "--set", "data.streaming=true", "--set", f"data.datasets=[{dataset}]", "--set", "data.piece_rows=4",
            "--set", "data.shuffle_buffer=8", "--set", "data.num_workers=2", "--set", "data.mixture={sdss-like: 3, image: 1}"]


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_and_the_resumed_run_continues_exactly(tmp_path):
    """A stream over shards (2 workers per rank), whose data position is in the checkpoint:
    after the restart neither rank replays nor skips a sample, so the loss curve is the
    uninterrupted one bit for bit. (Map-style mocks resume through the same checkpoint and
    sampler code in tests/test_signal_ranks.py and the sbatch test below; their elastic
    restart, measured bit for bit too, was dropped from the suite for its ~35 s.)"""
    reference, broken = tmp_path / "reference", tmp_path / "broken"
    args = _streaming(tmp_path / "data")
    ref = _torchrun(reference, args)  # both at once: the 2 cores are shared either way, and the startup overlaps
    run = _torchrun(broken, args)
    try:
        killed_after = _kill_rank_after_checkpoint(run, broken, KILL_AFTER)
        out, _ = run.communicate(timeout=300)
        ref_out, _ = ref.communicate(timeout=300)
    finally:
        for p in (ref, run):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert ref.returncode == 0, ref_out[-3000:]
    assert run.returncode == 0, out[-5000:]
    assert killed_after < STEPS
    # the first start found no checkpoint; torchrun's one restart resumed from one
    assert out.count("no checkpoint; starting fresh") == 1, out[-3000:]
    assert out.count("resuming from the newest checkpoint") == 1, out[-3000:]
    a, b = _metrics(reference), _metrics(broken)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))  # the killed run's tail was dropped and redone
    assert [r["loss"] for r in b] == [r["loss"] for r in a]  # step for step, bit for bit
    assert [r["lr"] for r in b] == [r["lr"] for r in a]
    metadata = json.loads((broken / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json").read_text())["metadata"]
    assert metadata["world_size"] == 2
    assert metadata["data"] == {"mode": "streaming", "batches_per_rank": STEPS, "samples_per_rank": STEPS * 4, "world_size": 2, "num_workers": 2}


def _fake_slurm(bin_dir: Path) -> None:
    """`srun` and `scontrol` stand-ins for running the sbatch script on this machine: srun runs
    its command here (one node), scontrol names this host and records a requeue."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\nif [ "$1" = show ]; then echo 127.0.0.1; else echo "$*" >> "$FAKE_SLURM_LOG"; fi\n')
    for name in ("srun", "scontrol"):
        (bin_dir / name).chmod(0o755)


@pytest.mark.slow
def test_sbatch_script_waits_for_a_checkpoint_on_usr1_then_requeues_and_the_requeued_job_resumes(tmp_path):
    """The sbatch script as SLURM runs it, with srun / scontrol stand-ins and one process: on
    USR1 (the time-limit warning) it lets the run write its next checkpoint, stops it and
    requeues the job; the script run again (the requeued job) continues from that checkpoint."""
    from launch import free_port  # tests/launch.py

    _fake_slurm(tmp_path / "bin")
    run, log, steps = tmp_path / "run", tmp_path / "slurm.log", 100  # ~10 steps/s: the script looks for a new checkpoint each second
    env = dict(launch_env(), PATH=os.pathsep.join([str(tmp_path / "bin"), str(Path(sys.executable).parent), os.environ["PATH"]]),
               SLURM_JOB_ID="4242", SLURM_NNODES="1", SLURM_JOB_NODELIST="node1", COSMOFM_GPUS_PER_NODE="1", COSMOFM_MAX_RESTARTS="0",
               COSMOFM_RDZV_PORT=str(free_port()), COSMOFM_RUN_DIR=str(run), COSMOFM_SAVE_GRACE="60", FAKE_SLURM_LOG=str(log))
    job = ["bash", str(launch_file("slurm.sbatch")), *TINY, "--set", f"optim.max_steps={steps}", "--set", "run.save_every=10", "--output", str(run)]
    first = subprocess.Popen(job, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        latest, deadline = run / "checkpoints" / "latest", time.time() + 180
        while not latest.exists():
            assert first.poll() is None and time.time() < deadline, first.stdout.read()
            time.sleep(0.02)
        at_signal = int(latest.read_text().strip().removeprefix("step_"))
        first.send_signal(signal.SIGUSR1)  # to the batch shell only, as --signal=B:USR1 does
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, out[-3000:]
    assert log.read_text() == "requeue 4242\n", out[-3000:]
    saved = int(latest.read_text().strip().removeprefix("step_"))
    assert at_signal < saved < steps and not (run / "model").exists(), (at_signal, saved, out[-3000:])  # stopped after a new checkpoint

    second = subprocess.run(job, env=dict(env, SLURM_RESTART_COUNT="1"), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming from the newest checkpoint that verifies (latest: step_{saved:08d})" in second.stdout
    assert [r["step"] for r in _metrics(run)] == list(range(1, steps + 1)) and (run / "model").is_dir()
    assert log.read_text() == "requeue 4242\n"  # no second requeue: the job ended
