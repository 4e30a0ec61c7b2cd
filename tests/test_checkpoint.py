"""Tests for cosmofm.pretrain.checkpoint: safetensors + JSON checkpoints, no pickle."""

from __future__ import annotations

import json
import math
import random
import struct

import numpy as np
import pytest
import safetensors.torch
import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.pretrain import checkpoint_folders
from cosmofm.pretrain.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    capture_rng_state,
    flatten_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    sha256_file,
    unflatten_state,
    verify_manifest,
    write_manifest,
)

pytestmark = pytest.mark.timeout(60)


# --- helpers -----------------------------------------------------------------------


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a, b, path="root"):
    """Deep equality that also checks container/key types and tensor dtypes bit-exactly."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert torch.equal(_raw_bytes(a), _raw_bytes(b)), path  # bit-exact, so nan == nan too
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), path
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), path
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert type(k) is type(next(kk for kk in b if kk == k)), f"{path}: key type of {k!r}"
            assert_same(a[k], b[k], f"{path}/{k!r}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def json_round_trip(tensors, skeleton, tmp_path, name="state"):
    """Push through the real file formats, as save/load does."""
    safetensors.torch.save_file(tensors, tmp_path / f"{name}.safetensors")
    (tmp_path / f"{name}.json").write_text(json.dumps(skeleton, allow_nan=False))
    return unflatten_state(safetensors.torch.load_file(tmp_path / f"{name}.safetensors"),
                           json.loads((tmp_path / f"{name}.json").read_text()))


def train_steps(model, optimizer, n, seed, scheduler=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def make_model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)


def assert_no_pickles(root):
    """Every file is JSON, a safetensors file or the `latest` pointer; none is pickle/zip.

    (Checking only b'\\x80' is not enough: torch.save writes zip archives, and a
    safetensors file may legitimately start with 0x80 as the low byte of its header size.)
    """
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    for path in files:
        head = path.read_bytes()[:16]
        assert not head.startswith(b"PK\x03\x04"), f"{path} is a zip (torch.save)"
        if path.suffix == ".safetensors":
            (header_len,) = struct.unpack("<Q", head[:8])
            assert head[8:9] == b"{" and header_len < path.stat().st_size, path
            safetensors.torch.load_file(path)
        elif path.suffix == ".json":
            assert not head.startswith(b"\x80"), f"{path} looks like a pickle"
            json.loads(path.read_text())
        else:
            assert path.name == "latest", f"unexpected file {path}"
            assert not head.startswith(b"\x80")


# --- atomic writes and hashing ------------------------------------------------------


def test_atomic_writes_leave_no_temp_files_and_sha256_streams(tmp_path):
    import hashlib

    atomic_write_bytes(tmp_path / "a.bin.txt", b"old")
    atomic_write_bytes(tmp_path / "a.bin.txt", b"new" * 1000)
    atomic_write_json(tmp_path / "b.json", {"x": [1, 2.5, None]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin.txt", "b.json"]
    assert (tmp_path / "a.bin.txt").read_bytes() == b"new" * 1000
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": [1, 2.5, None]}
    assert sha256_file(tmp_path / "a.bin.txt") == hashlib.sha256(b"new" * 1000).hexdigest()
    with pytest.raises(InputError, match="JSON"):
        atomic_write_json(tmp_path / "c.json", {"x": float("nan")})
    assert not (tmp_path / "c.json").exists()


# --- flatten / unflatten ------------------------------------------------------------


def test_flatten_round_trip_of_awkward_state(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    obj = {
        "ints": {0: torch.tensor(1.0), 1: "one", "0": torch.tensor([2], dtype=torch.int64)},  # 0 vs "0"
        "tuple": (0.9, 0.999),
        "nested": [None, True, 3, 3.0, float("inf"), float("nan"), "s", (1, [2, (3,)])],
        "slash/key": {"a/b": torch.zeros(2), "a": {"b": torch.ones(2)}},  # would collide as "a/b"
        "bf16": torch.randn(3, dtype=torch.bfloat16),
        "tied": base, "view": base[1], "transposed": base.t(), "again": base,  # shared memory
        "empty": torch.empty(0, 5),
        "np_u32": np.arange(5, dtype=np.uint32),
        "np_str": np.array(["ab", "c"]),
        "np_scalar": np.float32(1.5),
        "np_f64_0d": np.array(2.0),
        (1, "t"): "tuple key",
        2.5: None,
        None: False,
    }
    tensors, skeleton = flatten_state(obj)
    json.dumps(skeleton, allow_nan=False)  # strict JSON
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in tensors.values())
    back = json_round_trip(tensors, skeleton, tmp_path)
    assert_same(obj, back)


def test_model_state_keeps_its_names(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    tensors, skeleton = flatten_state(model.state_dict())
    assert list(tensors) == list(model.state_dict())  # the .safetensors file is a plain state dict
    back = json_round_trip(tensors, skeleton, tmp_path)
    torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).load_state_dict(back, strict=True)


def test_flatten_refuses_unstorable_objects():
    with pytest.raises(InputError, match=r"opt/fn.*function"):
        flatten_state({"opt": {"fn": lambda: 0}})
    with pytest.raises(InputError, match="key"):
        flatten_state({object(): 1})
    loop = []
    loop.append(loop)
    with pytest.raises(InputError, match="cycle"):
        flatten_state(loop)


def test_unflatten_detects_mismatched_files():
    tensors, skeleton = flatten_state({"a": torch.zeros(2)})
    with pytest.raises(InputError, match="not in the tensor file"):
        unflatten_state({}, skeleton)
    with pytest.raises(InputError, match="does not mention"):
        unflatten_state({**tensors, "b": torch.ones(1)}, skeleton)
    with pytest.raises(InputError, match="expected float32"):
        unflatten_state({"a": torch.zeros(2, dtype=torch.float64)}, skeleton)


# --- optimizer, scheduler, RNG --------------------------------------------------------


def test_adamw_resume_is_bit_identical(tmp_path):
    model, optimizer = make_model_and_optimizer(seed=0)
    train_steps(model, optimizer, 3, seed=1)
    assert optimizer.state_dict()["state"][0]["step"].dtype == torch.float32
    save_checkpoint(tmp_path, 3, {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, {"epoch": 0})

    states, metadata = load_checkpoint(tmp_path)
    assert metadata == {"epoch": 0, "step": 3}
    assert_same(optimizer.state_dict(), states["optimizer"])

    resumed_model, resumed_optimizer = make_model_and_optimizer(seed=123)  # different init on purpose
    resumed_model.load_state_dict(states["model"], strict=True)
    resumed_optimizer.load_state_dict(states["optimizer"])
    assert_same(optimizer.state_dict(), resumed_optimizer.state_dict())

    train_steps(model, optimizer, 1, seed=7)
    train_steps(resumed_model, resumed_optimizer, 1, seed=7)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert_same(optimizer.state_dict(), resumed_optimizer.state_dict())
    assert_no_pickles(tmp_path)


def test_cosine_scheduler_state_round_trip(tmp_path):
    from transformers import get_cosine_schedule_with_warmup

    model, optimizer = make_model_and_optimizer(seed=0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=10)
    train_steps(model, optimizer, 3, seed=1, scheduler=scheduler)
    save_checkpoint(tmp_path, 3, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, {})

    states, _ = load_checkpoint(tmp_path)
    assert_same(scheduler.state_dict(), states["scheduler"])
    model2, optimizer2 = make_model_and_optimizer(seed=0)
    scheduler2 = get_cosine_schedule_with_warmup(optimizer2, num_warmup_steps=2, num_training_steps=10)
    optimizer2.load_state_dict(states["optimizer"])
    scheduler2.load_state_dict(states["scheduler"])
    assert_same(scheduler.state_dict(), scheduler2.state_dict())
    scheduler.step()
    scheduler2.step()
    assert scheduler.get_last_lr() == scheduler2.get_last_lr()


def test_rng_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leave numpy with a cached gaussian (has_gauss=1)
    save_checkpoint(tmp_path, 0, {"rng": capture_rng_state()}, {})

    def draw():
        return (random.random(), random.getrandbits(64), np.random.standard_normal(3).tolist(),
                np.random.randint(0, 2**31), torch.rand(3).tolist(), torch.randint(0, 10**6, (2,)).tolist())

    expected = draw()
    draw()  # move every generator further
    states, _ = load_checkpoint(tmp_path)
    restore_rng_state(states["rng"])
    assert draw() == expected
    with pytest.raises(InputError, match="rng"):
        restore_rng_state({"python": random.getstate()})


def test_a_copied_state_keeps_the_values_of_the_moment_it_was_taken():
    """`copied_state`, what an asynchronous save writes from a thread: parameters and views with a
    graph (which copy.deepcopy refuses) are copied, and later in-place updates do not reach the copy."""
    from cosmofm.pretrain.state_tree import copied_state

    layer = torch.nn.Linear(3, 2)
    state = {"weights": [layer.weight, layer.weight * 2], "rng": capture_rng_state(), "lr": 1e-3, "half": torch.ones(2, dtype=torch.bfloat16)}
    before = [layer.weight.detach().clone(), layer.weight.detach() * 2]
    copy = copied_state(state)
    with torch.no_grad():
        layer.weight.add_(1.0)
        state["half"].mul_(3)
    assert all(torch.equal(c, b) for c, b in zip(copy["weights"], before))
    assert torch.equal(copy["half"], torch.ones(2, dtype=torch.bfloat16)) and copy["lr"] == 1e-3
    restore_rng_state(copy["rng"])  # the RNG state survives the copy intact


def test_cuda_rng_states_are_restored_per_device(monkeypatch):
    # No GPU here: fake the torch.cuda calls to check the bookkeeping.
    state = capture_rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(3)]
    with pytest.warns(UserWarning, match="CUDA is not available"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        restore_rng_state(state)
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.__setitem__(device, s))
    with pytest.warns(UserWarning, match="3 CUDA RNG states but 2 devices"):
        restore_rng_state(state)
    assert sorted(restored) == [0, 1] and torch.equal(restored[1], state["cuda"][1])


# --- manifests ----------------------------------------------------------------------


def _release(tmp_path):
    folder = tmp_path / "release"
    (folder / "sub").mkdir(parents=True)
    safetensors.torch.save_file({"w": torch.arange(64, dtype=torch.float32)}, folder / "model.safetensors")
    (folder / "sub" / "config.json").write_text('{"d": 1}')
    manifest = write_manifest(folder)
    return folder, manifest


def test_manifest_lists_files_and_verifies(tmp_path):
    folder, manifest = _release(tmp_path)
    assert manifest["format"] == "cosmofm-manifest-1"
    assert sorted(manifest["files"]) == ["model.safetensors", "sub/config.json"]
    assert manifest["files"]["sub/config.json"]["bytes"] == 8
    assert verify_manifest(folder, required=["model.safetensors"]) == manifest["files"]
    (folder / "README.md").write_text("added later")  # unlisted files are ignored
    verify_manifest(folder)


def test_manifest_detects_a_corrupted_byte(tmp_path):
    folder, _ = _release(tmp_path)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"model\.safetensors.*corrupt.*changed after writing.*earlier checkpoint"):
        verify_manifest(folder)


def test_manifest_detects_missing_files(tmp_path):
    folder, _ = _release(tmp_path)
    (folder / "sub" / "config.json").unlink()
    with pytest.raises(InputError, match=r"config\.json.*missing"):
        verify_manifest(folder)
    with pytest.raises(InputError, match=r"tokenizer\.json.*required"):
        verify_manifest(_release(tmp_path / "other")[0], required=["tokenizer.json"])
    (folder / "manifest.json").unlink()
    with pytest.raises(InputError, match=r"manifest\.json.*missing"):
        verify_manifest(folder)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.PT", "sub/opt.pkl", "x.ckpt"])
def test_pickle_files_are_refused(tmp_path, name):
    folder, _ = _release(tmp_path)
    (folder / name).write_bytes(b"\x80\x04not really")
    with pytest.raises(InputError, match=r"only safetensors") as info:
        verify_manifest(folder)
    assert name.split("/")[-1] in str(info.value)
    with pytest.raises(InputError, match="only safetensors"):
        write_manifest(folder)


def test_manifest_refuses_paths_outside_the_folder(tmp_path):
    folder, manifest = _release(tmp_path)
    manifest["files"]["../secret"] = manifest["files"]["model.safetensors"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="unsafe path"):
        verify_manifest(folder)


# --- checkpoint folders ---------------------------------------------------------------


def test_latest_pointer_layout_and_path_forms(tmp_path):
    run = tmp_path / "run"
    assert latest_checkpoint(run) is None
    path = save_checkpoint(run, 5, {"model": {"w": torch.ones(2)}, "data": {"epoch": 1, "index": 7}}, {"lr": 0.1})
    assert path == run / "checkpoints" / "step_00000005"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    assert sorted(p.name for p in path.iterdir()) == [
        "data.json", "data.safetensors", "manifest.json", "model.json", "model.safetensors", "trainer_state.json"]
    assert latest_checkpoint(run) == path == latest_checkpoint(run / "checkpoints")
    for where in (run, run / "checkpoints", path):
        states, metadata = load_checkpoint(where)
        assert metadata == {"lr": 0.1, "step": 5}
        assert states["data"] == {"epoch": 1, "index": 7}
        assert torch.equal(states["model"]["w"], torch.ones(2))
    assert_no_pickles(run)


def test_keep_last_prunes_older_checkpoints(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step * 10, {"model": {"w": torch.full((2,), float(step))}}, {}, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000040", "step_00000050"]
    # Resumed from step 40 and saved step 45: newer step_50 (other timeline) is not "older".
    save_checkpoint(tmp_path, 45, {"model": {"w": torch.zeros(2)}}, {}, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000040", "step_00000045", "step_00000050"]
    assert latest_checkpoint(tmp_path).name == "step_00000045"
    save_checkpoint(tmp_path, 45, {"model": {"w": torch.zeros(2)}}, {}, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000045",
                                                                           "step_00000050"]


def test_resaving_the_same_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 7, {"model": {"w": torch.zeros(2)}}, {"try": 1})
    save_checkpoint(tmp_path, 7, {"model": {"w": torch.ones(2)}}, {"try": 2})
    states, metadata = load_checkpoint(tmp_path)
    assert metadata["try"] == 2 and torch.equal(states["model"]["w"], torch.ones(2))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000007"]


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"model": {"w": torch.zeros(2)}}, {})

    def crash(directory):
        raise RuntimeError("simulated crash while writing the manifest")

    monkeypatch.setattr(checkpoint_folders, "write_manifest", crash)  # where the step folder is published
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, {"model": {"w": torch.ones(2)}}, {})
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()
    states, metadata = load_checkpoint(tmp_path)
    assert metadata["step"] == 1 and torch.equal(states["model"]["w"], torch.zeros(2))
    monkeypatch.undo()
    save_checkpoint(tmp_path, 2, {"model": {"w": torch.ones(2)}}, {})
    assert load_checkpoint(tmp_path)[1]["step"] == 2


def test_a_stale_temp_folder_is_not_a_checkpoint(tmp_path):
    # A process killed mid-save leaves `.step_XXXXXXXX.tmp-<pid>` with no manifest.
    save_checkpoint(tmp_path, 1, {"model": {"w": torch.zeros(2)}}, {})
    stale = tmp_path / "checkpoints" / ".step_00000002.tmp-99999"
    stale.mkdir()
    (stale / "model.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    # `latest` names a folder that vanished: fall back to the newest complete one.
    (tmp_path / "checkpoints" / "latest").write_text("step_00000009\n")
    with pytest.warns(UserWarning, match="step_00000001"):
        assert latest_checkpoint(tmp_path).name == "step_00000001"


def test_load_errors_name_the_folder_and_the_fix(tmp_path):
    with pytest.raises(InputError, match=r"nothing.*does not exist.*--resume"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "runs" / "x").mkdir(parents=True)
    with pytest.raises(InputError, match=r"runs/x.*no checkpoint.*start without --resume"):
        load_checkpoint(tmp_path / "runs" / "x")
    path = save_checkpoint(tmp_path / "run", 3, {"model": {"w": torch.zeros(2)}}, {})
    (path / "model.safetensors").unlink()
    with pytest.raises(InputError, match=r"model\.safetensors.*missing"):
        load_checkpoint(tmp_path / "run")


def test_save_rejects_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="step"):
        save_checkpoint(tmp_path, -1, {}, {})
    with pytest.raises(InputError, match="manifest"):
        save_checkpoint(tmp_path, 1, {"manifest": {}}, {})
    with pytest.raises(InputError, match="metadata"):
        save_checkpoint(tmp_path, 1, {}, {"path": tmp_path})
    with pytest.raises(InputError, match=r"states\['optimizer'\]/bad"):
        save_checkpoint(tmp_path, 1, {"optimizer": {"bad": {1, 2}}}, {})
    assert latest_checkpoint(tmp_path) is None
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == []
