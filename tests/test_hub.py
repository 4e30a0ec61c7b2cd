"""Publishing to and downloading from a model hub, offline, against servers on 127.0.0.1.

Uploads go to `tests/hub_server.py` (the upload API huggingface_hub calls: create_repo,
preupload, LFS batch + PUT, NDJSON commit, branches, tags), which stores each commit
in a bare git repository. Downloads go through **olah**, a real hub-compatible server,
serving those same git repositories (its `mirrors-path`) in offline mode, with the
real `snapshot_download` / `from_pretrained`. Nothing here contacts huggingface.co:
olah is offline with its upstream pointed at a closed local port, and every test sets
HF_ENDPOINT, HF_HOME and HF_TOKEN itself.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import cosmofm
from cosmofm.data_cards.errors import InputError
from cosmofm.finetune.hub import pull, push
from cosmofm.finetune.local_hub import LocalHub
from cosmofm.finetune.model_card import load_eval_results
from cosmofm.finetune.release_folder import assemble_release, verify_release
from cosmofm.pretrain import CosmoFMConfig, CosmoFMModel
from cosmofm.pretrain.checkpoint import sha256_file, write_manifest

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer  # noqa: E402

TOKEN = "hf_cosmofm_test_token"
CARDS = ["sdss-like", "lsst-like", "ska-hi-like", "lightcone-21cm"]
EVAL = {"results": [{"task": {"type": "masked-modelling", "name": "Masked-token reconstruction"},
                     "dataset": {"type": "sdss-like+lsst-like", "name": "held-out mocks", "split": "test"},
                     "metrics": [{"type": "chi2_per_dof", "name": "masked chi2/dof", "value": 1.25}]}]}


# ---------------------------------------------------------------------------------
# Fixtures: a tiny training run, the upload server, olah
# ---------------------------------------------------------------------------------


def _make_run(run: Path, seed: int) -> Path:
    """What `cosmofm pretrain` leaves behind, minus the training: model/, recipe, data cards."""
    from cosmofm.data_cards import load_card
    from cosmofm.pretrain.recipe import PretrainRecipe

    config = CosmoFMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, spectrum_patch_size=128,
                           cube_patch_size=[16, 16, 16], field_patch_size=[16, 16, 16], coord_frequencies=6,
                           projection_dim=16, survey_names=CARDS)
    torch.manual_seed(seed)
    CosmoFMModel(config).save_pretrained(run / "model")
    write_manifest(run / "model")
    PretrainRecipe.load("tiny", [f"run.output_dir={run}"]).save(run / "recipe.yaml")
    cards = run / "data" / "mock-test" / "data_cards"
    cards.mkdir(parents=True)
    for name in CARDS:
        (cards / f"{name}.yaml").write_text(yaml.safe_dump(load_card(name).to_dict(), sort_keys=False))
    (run / "eval_results.json").write_text(json.dumps(EVAL))
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("run-v1"), seed=0)


@pytest.fixture(scope="module")
def run_v2(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("run-v2"), seed=1)


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hub")


@pytest.fixture(scope="module")
def upload_server(hub_root):
    with HubServer(hub_root, token=TOKEN) as server:
        yield server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def olah(hub_root, tmp_path_factory):
    """olah serving the hub's git repositories on 127.0.0.1, offline, stopped at the end."""
    pytest.importorskip("olah", reason="olah is in the test extra: pip install -c constraints.txt -e '.[test]'")
    work = tmp_path_factory.mktemp("olah")
    port = _free_port()
    (work / "olah.toml").write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f'repos-path = "{work / "cache"}"\nmirrors-path = ["{hub_root}"]\n'
        # offline = never ask upstream; upstream also points at a closed local port
        'hf-scheme = "http"\nhf-netloc = "127.0.0.1:9"\nhf-lfs-netloc = "127.0.0.1:9"\n'
        f'mirror-scheme = "http"\nmirror-netloc = "127.0.0.1:{port}"\nmirror-lfs-netloc = "127.0.0.1:{port}"\n'
        "metadata-cache-ttl = 0\n"  # branches move between tests
        "[accessibility]\noffline = true\n"
    )
    log = open(work / "olah.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "olah.server", "-c", str(work / "olah.toml"), "--log-path", str(work / "logs")],
                            cwd=work, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"olah did not start:\n{(work / 'olah.log').read_text()[-2000:]}")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def hf_env(monkeypatch, tmp_path, olah):
    """What a user's shell sets: HF_ENDPOINT (olah), HF_HOME (fresh), HF_TOKEN, online.

    huggingface_hub reads these once at import (and conftest made the whole suite
    offline), so the same values go into its constants for this test's duration.
    """
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    for key, value in {"HF_ENDPOINT": olah, "HF_HOME": str(home), "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
                       "HF_HUB_DISABLE_XET": "1"}.items():
        monkeypatch.setenv(key, value)
    for key, value in {"ENDPOINT": olah, "HUGGINGFACE_CO_URL_TEMPLATE": olah + "/{repo_id}/resolve/{revision}/{filename}",
                       "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
                       "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
                       "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True}.items():
        monkeypatch.setattr(constants, key, value)
    return home


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _weights_equal(model, run: Path) -> bool:
    reference = CosmoFMModel.from_pretrained(run / "model").state_dict()
    state = model.state_dict()
    return state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


def _publish_tampered(hub_root: Path, run: Path, repo_id: str, tamper) -> None:
    """Put a release on the hub that was changed after its manifest was written."""
    release = assemble_release(run, hub_root.parent / f"tampered-{repo_id.replace('/', '-')}")
    tamper(release)
    hub = LocalHub(hub_root)
    hub.create_repo(repo_id)
    files = {p.relative_to(release).as_posix(): p for p in release.rglob("*") if p.is_file()}
    hub.commit(repo_id, add=files, replace=True)


# ---------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------


def test_push_then_pull_round_trip_is_bit_exact(run_dir, upload_server, olah, hf_env, tmp_path):
    pushed = push(run_dir, "lab/roundtrip", hub_endpoint=upload_server.url)
    assert upload_server.stats["lfs_uploads"] >= 1  # the weights took the LFS upload path
    folder = pull("lab/roundtrip", revision="main", hub_endpoint=olah)
    assert folder.name == pushed.commit and folder.is_relative_to(hf_env / "hub")  # the HF cache under HF_HOME
    expected = assemble_release(run_dir, tmp_path / "expected", repo_id="lab/roundtrip")
    got = _files(folder)
    assert got == _files(expected)
    assert {"config.json", "model.safetensors", "README.md", "manifest.json", "recipe.yaml", "eval_results.json",
            *(f"data_cards/{c}.yaml" for c in CARDS)} == set(got)
    assert got["model.safetensors"] == (run_dir / "model" / "model.safetensors").read_bytes()
    # the upload server serves the same bytes back (the README's one-server walk-through)
    assert _files(pull("lab/roundtrip", hub_endpoint=upload_server.url, cache_dir=tmp_path / "c2")) == got
    assert _weights_equal(cosmofm.from_pretrained("lab/roundtrip", hub_endpoint=olah), run_dir)


def test_revisions_are_pinned_and_old_ones_keep_working(run_dir, run_v2, upload_server, olah, hf_env):
    v1 = push(run_dir, "lab/versions", hub_endpoint=upload_server.url, tag="v1")
    v2 = push(run_v2, "lab/versions", hub_endpoint=upload_server.url)
    dev = push(run_dir, "lab/versions", hub_endpoint=upload_server.url, revision="dev")
    assert len({v1.commit, v2.commit, dev.commit}) == 3

    def weights(revision):
        return sha256_file(pull("lab/versions", revision=revision, hub_endpoint=olah) / "model.safetensors")

    old, new = (sha256_file(r / "model" / "model.safetensors") for r in (run_dir, run_v2))
    assert old != new
    assert weights("main") == new
    assert weights("v1") == weights(v1.commit) == weights("dev") == old
    assert _weights_equal(cosmofm.from_pretrained("lab/versions", revision="v1", hub_endpoint=olah), run_dir)
    with pytest.raises(InputError):  # tags never move
        push(run_v2, "lab/versions", hub_endpoint=upload_server.url, tag="v1")
    assert weights("v1") == old


def test_sharded_release_needs_its_index_and_loads(run_dir, tmp_path):
    from transformers import AutoModel

    release = assemble_release(run_dir, tmp_path / "sharded", max_shard_size="1MB", repo_id="lab/sharded")
    shards = sorted(p.name for p in release.glob("model-*.safetensors"))
    assert len(shards) >= 2 and not (release / "model.safetensors").exists()
    files = verify_release(release)
    assert {"model.safetensors.index.json", *shards} <= set(files)
    assert _weights_equal(cosmofm.from_pretrained(release), run_dir)
    assert _weights_equal(AutoModel.from_pretrained(release), run_dir)

    hub = tmp_path / "dir-hub"
    pushed = push(release, "lab/sharded", hub_endpoint=hub, max_shard_size="1MB")
    pulled = pull("lab/sharded", revision=pushed.commit, hub_endpoint=f"file://{hub}", cache_dir=tmp_path / "cache")
    assert _files(pulled) == _files(release)

    broken = tmp_path / "broken"
    shutil.copytree(release, broken)
    (broken / shards[-1]).unlink()
    with pytest.raises(InputError, match=shards[-1]):
        cosmofm.from_pretrained(broken)


@pytest.mark.parametrize("case", ["corrupt", "missing", "pickle"])
def test_broken_hub_revisions_are_refused(case, run_dir, hub_root, olah, hf_env):
    def corrupt(release):
        data = bytearray((release / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF  # same size, one bit pattern changed
        (release / "model.safetensors").write_bytes(bytes(data))

    def missing(release):
        (release / "data_cards" / "sdss-like.yaml").unlink()

    def pickle(release):
        (release / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")

    _publish_tampered(hub_root, run_dir, f"lab/{case}", {"corrupt": corrupt, "missing": missing, "pickle": pickle}[case])
    expected = {"corrupt": r"model\.safetensors.*sha256", "missing": r"sdss-like\.yaml.*missing",
                "pickle": r"pytorch_model\.bin.*pickle"}[case]
    with pytest.raises(InputError, match=expected):
        cosmofm.from_pretrained(f"lab/{case}", hub_endpoint=olah)


def test_corrupted_cache_is_detected_and_force_download_repairs_it(run_dir, upload_server, olah, hf_env):
    push(run_dir, "lab/cache", hub_endpoint=upload_server.url)
    folder = pull("lab/cache", hub_endpoint=olah)
    blob = (folder / "model.safetensors").resolve()  # the cache's blob behind the snapshot link
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")
    with pytest.raises(InputError, match="sha256") as err:
        pull("lab/cache", hub_endpoint=olah)
    assert "--force-download" in str(err.value)
    assert sha256_file(pull("lab/cache", hub_endpoint=olah, force_download=True) / "model.safetensors") == \
        sha256_file(run_dir / "model" / "model.safetensors")


def test_push_refuses_a_source_with_pickle_files(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "model" / "optimizer.pt").write_bytes(b"pickle")
    with pytest.raises(InputError, match="pickle"):
        push(run, "lab/never", hub_endpoint=tmp_path / "hub")
    assert not (tmp_path / "hub" / "models" / "lab" / "never").exists()


def test_model_card_is_generated_and_its_metadata_parses(run_dir, tmp_path):
    from huggingface_hub import ModelCard

    release = assemble_release(run_dir, tmp_path / "rel", repo_id="lab/card")
    text = (release / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.library_name == "cosmofm" and card.data.license == "bsd-3-clause"
    assert {"astronomy", "cosmofm", "spectrum", "image", "cube", "field"} <= set(card.data.tags)
    assert card.data.datasets == CARDS
    [result] = card.data.eval_results
    assert (result.task_type, result.dataset_name, result.metric_name, result.metric_value) == \
        ("masked-modelling", "held-out mocks", "masked chi2/dof", 1.25)
    for section in ("## Intended use", "## Limitations", "## Sim-to-data caveats", "## Training recipe"):
        assert section in text
    assert "Trained only on simulated or mock data" in text and "| hidden size | 32 |" in text
    # generated, not hand-written: the same inputs give the same card, other metrics another one
    assert (assemble_release(run_dir, tmp_path / "again", repo_id="lab/card") / "README.md").read_text() == text
    other = {"results": [{**EVAL["results"][0], "metrics": [{"type": "chi2_per_dof", "value": 2.5}]}]}
    assert "2.5" in (assemble_release(run_dir, tmp_path / "other", repo_id="lab/card", eval_results=other) / "README.md").read_text()
    with pytest.raises(InputError, match=r"results\[0\]\.metrics\[0\]\.value"):
        load_eval_results({"results": [{**EVAL["results"][0], "metrics": [{"type": "x", "value": "high"}]}]})


def test_offline_mode_uses_the_prefilled_cache(run_dir, upload_server, olah, hf_env, monkeypatch):
    from huggingface_hub import constants

    push(run_dir, "lab/offline", hub_endpoint=upload_server.url, tag="v1")
    online = pull("lab/offline", revision="v1", hub_endpoint=olah)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    assert pull("lab/offline", revision="v1", hub_endpoint=dead) == online
    assert _weights_equal(cosmofm.from_pretrained("lab/offline", revision="v1", hub_endpoint=dead), run_dir)
    with pytest.raises(InputError, match="not in the local cache"):
        pull("lab/offline", revision="main", hub_endpoint=dead)


def test_local_directory_hub_is_servable_by_olah(run_dir, hub_root, olah, hf_env, tmp_path):
    pushed = push(run_dir, "lab/dirhub", hub_endpoint=hub_root)  # a plain folder: git commit, no server
    assert (hub_root / "models" / "lab" / "dirhub" / "HEAD").is_file()
    local = pull("lab/dirhub", revision=pushed.commit, hub_endpoint=f"file://{hub_root}")
    served = pull("lab/dirhub", revision=pushed.commit, hub_endpoint=olah)
    assert _files(local) == _files(served)
    with pytest.raises(InputError, match="not a repository"):
        pull("lab/nothing", hub_endpoint=hub_root)


def test_newer_schema_version_asks_for_an_upgrade_and_older_loads(run_dir, tmp_path):
    release = assemble_release(run_dir, tmp_path / "rel")
    config = json.loads((release / "config.json").read_text())
    config["schema_version"] = 99
    (release / "config.json").write_text(json.dumps(config))
    write_manifest(release)
    with pytest.raises(InputError, match="upgrade cosmofm"):
        cosmofm.from_pretrained(release)
    del config["schema_version"]  # written before the field existed
    (release / "config.json").write_text(json.dumps(config))
    write_manifest(release)
    assert _weights_equal(cosmofm.from_pretrained(release), run_dir)


def test_cli_errors_are_one_line_with_the_fix(run_dir, upload_server, olah, hf_env, monkeypatch, capsys):
    from cosmofm.cli import main

    assert main(["push", str(run_dir), "--repo-id", "lab/cli", "--hub-endpoint", upload_server.url]) == 0
    assert "commit" in capsys.readouterr().out
    assert main(["pull", "lab/cli", "--revision", "no-such-branch", "--hub-endpoint", upload_server.url]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.delenv("HF_TOKEN")
    assert main(["push", str(run_dir), "--repo-id", "lab/notoken", "--hub-endpoint", upload_server.url]) == 2
    err = capsys.readouterr().err
    assert "HF_TOKEN" in err and err.count("\n") == 1 and "Traceback" not in err
    assert main(["pull", "lab/absent", "--hub-endpoint", olah]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["pull", "not a repo id"]) == 2


def test_cli_and_auto_model_honour_the_hf_environment(run_dir, upload_server, olah, tmp_path):
    """A real process configured only by environment variables, as a user's would be:
    HF_TOKEN for the push, HF_ENDPOINT (olah) and HF_HOME for the pull and for
    transformers' AutoModel.from_pretrained."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "COSMOFM_"))}
    env.update(HF_ENDPOINT=olah, HF_HOME=str(tmp_path / "hf-home"), HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    script = (
        "import json, sys\n"
        "from cosmofm.cli import main\n"
        f"assert main(['push', {str(run_dir)!r}, '--repo-id', 'lab/env', '--tag', 'v1', '--hub-endpoint', {upload_server.url!r}]) == 0\n"
        "assert main(['pull', 'lab/env', '--revision', 'v1']) == 0\n"
        "import cosmofm, cosmofm.pretrain  # cosmofm.pretrain registers the Auto classes\n"
        "from transformers import AutoModel\n"
        "a = AutoModel.from_pretrained('lab/env', revision='v1')\n"
        "b = cosmofm.from_pretrained('lab/env', revision='v1')\n"
        "same = all((a.state_dict()[k] == v).all().item() for k, v in b.state_dict().items())\n"
        "print(json.dumps({'auto': type(a).__name__, 'cosmofm': type(b).__name__, 'same': same}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    commit = lines[0].split("commit ")[1].split(",")[0]
    folder = Path(lines[2])
    assert folder.name == commit and folder.is_relative_to(tmp_path / "hf-home" / "hub")
    assert json.loads(lines[-1]) == {"auto": "CosmoFMModel", "cosmofm": "CosmoFMModel", "same": True}
    assert _weights_equal(cosmofm.from_pretrained(folder), run_dir)
