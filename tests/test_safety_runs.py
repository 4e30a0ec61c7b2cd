"""Training runs a careless or hostile user can break (issue 15): a second run into a run
folder, two runs on one folder at once, a diverging loss, a corrupt newest checkpoint,
`--set` abuse, bad mock arguments, and the modes of the files a run writes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import launch_env  # tests/launch.py

from cosmofm.cli import main
from cosmofm.data_cards.errors import InputError
from cosmofm.pretrain.checkpoint import run_lock
from cosmofm.pretrain.recipe import PretrainRecipe

CLI = [sys.executable, "-m", "cosmofm.cli"]
SMALL = ["--set", "data.mock_counts=[8,8,4,4]"]  # 24 samples: a tiny run takes seconds


def _pretrain(run: Path, *extra: str) -> int:
    return main(["pretrain", "--config", "tiny", "--output", str(run), *SMALL, *extra])


def _metrics(run: Path) -> list[dict]:
    """The complete rows (a run killed while writing one leaves it without its newline)."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().split("\n")[:-1] if line.strip()]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


# --- a second run into a run folder ------------------------------------------------


def test_second_run_into_a_run_folder_is_refused_unless_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()  # an empty folder is fine
    assert _pretrain(run, "--set", "optim.max_steps=3", "--set", "run.save_every=1") == 0
    assert _steps(run) == ["step_00000002", "step_00000003"]
    before = (run / "model" / "model.safetensors").read_bytes(), (run / "metrics.jsonl").read_text()
    capsys.readouterr()

    assert _pretrain(run, "--set", "optim.max_steps=2") == 2
    line = _one_error_line(capsys)
    assert str(run) in line and "--resume" in line and "--overwrite" in line
    assert ((run / "model" / "model.safetensors").read_bytes(), (run / "metrics.jsonl").read_text()) == before

    # --overwrite: the earlier run's checkpoints go, none of them beside the new ones
    assert _pretrain(run, "--set", "optim.max_steps=2", "--set", "run.save_every=2", "--overwrite") == 0
    assert "removed the earlier run's" in capsys.readouterr().out
    assert _steps(run) == ["step_00000002"]
    assert [r["step"] for r in _metrics(run)] == [1, 2]
    assert (run / "model" / "model.safetensors").read_bytes() != before[0]

    assert _pretrain(run, "--resume", "--overwrite") == 2
    assert "--overwrite" in _one_error_line(capsys)


@pytest.mark.slow
def test_demo_runs_twice_into_one_folder(tmp_path, monkeypatch):
    """The demo replaces its own earlier pretraining run (and only that) when run again."""
    from huggingface_hub import constants

    from cosmofm.demo import run_demo

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf-home"))
    run_demo(output=tmp_path / "demo", steps=3, n_labelled=120)
    report = run_demo(output=tmp_path / "demo", steps=2, n_labelled=120)
    assert report["reload_identical"] is True
    assert _steps(tmp_path / "demo" / "pretrain") == ["step_00000002"]


# --- two runs on one folder at once -----------------------------------------------


def test_a_running_run_locks_its_folder_and_a_kill_releases_it(tmp_path, capsys):
    """A second `--resume` while the first run still trains stops, naming the holder;
    the lock dies with its holder, so a SIGKILLed run leaves none behind."""
    run = tmp_path / "run"
    args = ["pretrain", "--config", "tiny", "--output", str(run), *SMALL, "--set", "optim.max_steps=100000", "--set", "run.save_every=2"]
    first = subprocess.Popen(CLI + args, env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ((run / "checkpoints" / "latest").exists() and len(_metrics(run)) >= 3):
            assert first.poll() is None and time.time() < deadline, first.stderr.read()
            time.sleep(0.1)
        capsys.readouterr()
        assert main(args + ["--resume"]) == 2
        line = _one_error_line(capsys)
        assert "in use by another run" in line and f"pid {first.pid} on {socket.gethostname()}" in line
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with run_lock(run):  # no stale lock after a SIGKILL
        pass
    steps = [r["step"] for r in _metrics(run)]
    assert steps == list(range(1, len(steps) + 1))  # written by one run only


@pytest.mark.slow
def test_every_process_of_a_refused_multi_process_run_stops(tmp_path):
    """accelerate launch with 2 processes into a run folder: all ranks stop with the
    main process's message (none waits forever for the others)."""
    run = tmp_path / "run"
    assert _pretrain(run, "--set", "optim.max_steps=2") == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "cosmofm.cli"]
    done = subprocess.run(launch + ["pretrain", "--config", "tiny", "--output", str(run), *SMALL, "--set", "optim.max_steps=2"],
                          env=launch_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert (done.stdout + done.stderr).count("holds an earlier run") == 2, done.stderr[-3000:]


# --- a diverging run ------------------------------------------------------------


def test_diverging_run_stops_and_keeps_only_finite_state(tmp_path, capsys):
    run = tmp_path / "run"
    code = _pretrain(run, "--set", "optim.lr=1.0e+30", "--set", "optim.warmup_steps=0", "--set", "optim.max_steps=8", "--set", "run.save_every=1")
    assert code == 2
    line = _one_error_line(capsys)
    assert "training stopped" in line and "the last good checkpoint" in line
    assert not (run / "model").exists()  # no release of a diverged model
    assert _steps(run), "the last good checkpoint is kept"
    for step in _steps(run):
        for name in ("model", "optimizer"):
            for key, t in load_file(run / "checkpoints" / step / f"{name}.safetensors").items():
                assert not t.is_floating_point() or torch.isfinite(t).all(), (step, name, key)
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) != float("inf") for r in _metrics(run))


def test_no_release_with_non_finite_weights(tmp_path, capsys):
    """Weights that went bad in a step whose loss was still finite are caught before the
    release: here a checkpoint of NaN weights, resumed with nothing left to train."""
    from cosmofm.pretrain.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    assert _pretrain(run, "--set", "optim.max_steps=2") == 0
    states, meta = load_checkpoint(run / "checkpoints" / "step_00000002")
    next(iter(states["model"].values())).fill_(float("nan"))
    save_checkpoint(run, 2, states, {k: v for k, v in meta.items() if k != "step"})
    (run / "model" / "model.safetensors").unlink()
    capsys.readouterr()
    assert _pretrain(run, "--set", "optim.max_steps=2", "--resume") == 2
    assert "the weights are not finite" in _one_error_line(capsys)
    assert not (run / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("override", [
    "optim.lr=true", "optim.lr=.inf", "optim.lr=.nan", "optim.lr=1.0e+38", "optim.max_steps=2.5", "optim.max_steps=true",
    "optim.global_batch=true", "optim.weight_decay=-0.1", "optim.grad_clip=.nan", "optim.warmup_steps=-1",
    "optim.betas=[0.9, 1.0]", "data.mock_seed=-1", "data.mock_counts=[8, 0, 4, 4]", "run.seed=-1", "run.keep_last=0",
    "run.progress=2", "run.output_dir=3", "model.hidden_size=2.5", "model.num_attention_heads=0",
])
def test_recipe_numbers_and_types_are_checked(override):
    with pytest.raises(InputError, match="recipe." + override.split("=")[0]):
        PretrainRecipe.load("tiny", [override])


def test_unknown_model_key_is_refused():
    with pytest.raises(InputError, match="hiden_size"):
        PretrainRecipe.load("tiny", ["model.hiden_size=64"])


def test_recipe_reads_numbers_as_yaml_1_1_writes_them():
    # YAML 1.1 reads 3e-4 (no dot) as a string; the help's own example must work
    assert PretrainRecipe.load("tiny", ["optim.lr=3e-4"]).optim.lr == 3e-4


# --- one-line errors -------------------------------------------------------------


@pytest.mark.parametrize("args, field", [
    (["pretrain", "--config", "tiny", "--set", "optim=3"], "recipe.optim"),
    (["pretrain", "--config", "tiny", "--set", "model=3"], "recipe.model"),
    (["pretrain", "--config", "tiny", "--set", "optim.lr.x=1"], "optim.lr is a value"),
    (["pretrain", "--config", "tiny", "--set", "optim.lr=[1"], "not valid YAML"),
    (["pretrain", "--config", "tiny", "--set", "model.hidden_size=abc"], "recipe.model.hidden_size"),
    (["pretrain", "--config", "tiny", "--set", "optim.=1"], "not a dotted key"),
    (["mock", "spectra", "--n", "2", "--seed", "-1"], "--seed"),
])
def test_bad_arguments_are_one_line_errors(args, field, tmp_path, capsys):
    out = ["--output", str(tmp_path / "run")] if args[0] == "pretrain" else ["--out", str(tmp_path / "mocks")]
    assert main(args + out) == 2
    assert field in _one_error_line(capsys)


def test_mock_fits_into_an_existing_file_is_a_one_line_error(tmp_path, capsys):
    existing = tmp_path / "catalogue.fits"
    existing.write_bytes(b"keep me")
    assert main(["mock", "images", "--n", "2", "--format", "fits", "--out", str(existing)]) == 2
    assert "--out" in _one_error_line(capsys) and existing.read_bytes() == b"keep me"


def test_bad_config_file_is_a_one_line_error(tmp_path, capsys):
    for text in ("optim: [1", "- a list\n- of things\n"):
        (tmp_path / "bad.yaml").write_text(text)
        assert main(["pretrain", "--config", str(tmp_path / "bad.yaml"), "--output", str(tmp_path / "run")]) == 2
        assert "bad.yaml" in _one_error_line(capsys)


# --- a corrupt newest checkpoint -------------------------------------------------


def test_resume_falls_back_past_a_corrupt_newest_checkpoint_bit_exactly(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--set", "optim.max_steps=10", "--set", "run.save_every=5"]
    assert _pretrain(run, *common) == 0
    reference, weights = _metrics(run), load_file(run / "model" / "model.safetensors")
    newest = run / "checkpoints" / "step_00000010" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))

    with pytest.warns(UserWarning, match="step_00000010"):
        assert _pretrain(run, *common, "--resume") == 0
    def timeless(rows):
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]

    assert timeless(_metrics(run)) == timeless(reference)  # steps 1..10, loss and lr bit for bit
    again = load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(again[k], weights[k]) for k in weights)

    # an explicit choice, and a step that is not there
    assert _pretrain(run, *common, "--resume-from", "5") == 0
    assert [r["loss"] for r in _metrics(run)] == [r["loss"] for r in reference]
    capsys.readouterr()
    assert _pretrain(run, *common, "--resume-from", "7") == 2
    assert "[5, 10]" in _one_error_line(capsys)


# --- file modes ------------------------------------------------------------------


def test_release_and_checkpoint_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert _pretrain(tmp_path / "run", "--set", "optim.max_steps=2") == 0
    finally:
        os.umask(old)
    run = tmp_path / "run"
    written = [run / "model" / "model.safetensors", run / "model" / "config.json", run / "model" / "manifest.json",
               run / "checkpoints" / "step_00000002" / "model.safetensors", run / "metrics.jsonl", run / "recipe.yaml"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: "0o644" for p in written}
