"""Releases and hubs against a hostile or careless publisher (issue 15).

A shared local-directory hub must never make git run anything of its own (hooks,
`core.hooksPath`, smudge filters); a pulled tree must never write outside the cache;
a release whose tensors are missing, renamed, reshaped or unreadable, or whose
config.json is not an object, is a one-line error in every loader and in
`cosmofm inspect` / `classify`, never random weights or a traceback; transformers'
own `AutoModel.from_pretrained` checks the manifest; NaN weights are never released.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import cosmofm
from cosmofm.cli import main
from cosmofm.data_cards import load_card
from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.finetune.hub import pull, push
from cosmofm.finetune.local_hub import LocalHub
from cosmofm.finetune.release_folder import assemble_release
from cosmofm.heads.classification import ClassificationHeadConfig, CosmoFMForSpectralClassification
from cosmofm.pretrain import CosmoFMConfig, CosmoFMModel
from cosmofm.pretrain.checkpoint import write_manifest

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, spectrum_patch_size=128, coord_frequencies=6,
            projection_dim=16, survey_names=["sdss-like"])


def _backbone(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    CosmoFMModel(CosmoFMConfig(**TINY)).save_pretrained(folder)
    write_manifest(folder)
    return folder


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return _backbone(tmp_path_factory.mktemp("backbone") / "model")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier") / "model"
    head = ClassificationHeadConfig.from_card(load_card("sdss-like"), hidden_size=16)
    torch.manual_seed(0)
    CosmoFMForSpectralClassification.from_backbone_config(CosmoFMConfig(**TINY), head).save_pretrained(folder)
    write_manifest(folder)
    return folder


@pytest.fixture(scope="module")
def spectrum(tmp_path_factory):
    from cosmofm.data_cards.io.survey_files import write_sdss_spec

    path = tmp_path_factory.mktemp("spectra") / "spec-4055-55359-0001.fits"
    write_sdss_spec(mock_samples(load_card("sdss-like"), 1, seed=1)[0], path)
    return path


def _copy(release: Path, dest: Path) -> Path:
    return Path(shutil.copytree(release, dest))


def _rewrite_tensors(release: Path, edit) -> None:
    tensors = safetensors.torch.load_file(release / "model.safetensors")
    safetensors.torch.save_file(edit(tensors), release / "model.safetensors", metadata={"format": "pt"})
    write_manifest(release)  # the checksums pass: only the contents are wrong


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    return captured.err


# ---------------------------------------------------------------------------------
# Local-directory hub: nothing from the hub runs, nothing lands outside the cache
# ---------------------------------------------------------------------------------

MARKER = "#!/bin/sh\ntouch '{marker}'\nexit 0\n"


def _plain_git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """git as a user would run it on the hub folder (no cosmofm safeguards)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
    return subprocess.run(["git", f"--git-dir={repo}", *args], capture_output=True, env=env)


def _plant(repo: Path, case: str, markers: Path) -> None:
    markers.mkdir()
    if case == "hooks-dir":  # the repo's own hooks/ folder
        hook = repo / "hooks" / "reference-transaction"
        hook.parent.mkdir(exist_ok=True)
    else:  # core.hooksPath, a gpg program, a smudge filter and an fsmonitor, all from the repo's config
        hook = markers.parent / "evil-hooks" / "reference-transaction"
        hook.parent.mkdir()
        gpg = markers.parent / "evil-gpg"
        gpg.write_text(MARKER.format(marker=markers / "gpg"))
        gpg.chmod(0o755)
        with open(repo / "config", "a") as config:
            config.write(f"[core]\n\thooksPath = {hook.parent}\n\tfsmonitor = touch '{markers / 'fsmonitor'}'\n"
                         f"[commit]\n\tgpgSign = true\n[gpg]\n\tprogram = {gpg}\n"
                         f"[filter \"evil\"]\n\tsmudge = touch '{markers / 'smudge'}'; cat\n"
                         f"\tclean = touch '{markers / 'clean'}'; cat\n")
        (repo / "info").mkdir(exist_ok=True)
        (repo / "info" / "attributes").write_text("* filter=evil\n")
    hook.write_text(MARKER.format(marker=markers / "hook"))
    hook.chmod(0o755)


@pytest.mark.parametrize("case", ["hooks-dir", "repo-config"])
def test_local_hub_push_and_pull_run_nothing_from_the_hub(case, backbone, tmp_path):
    hub_dir = tmp_path / "hub"
    first = push(backbone, "lab/shared", hub_endpoint=hub_dir)
    repo = LocalHub(hub_dir).repo_path("lab/shared")
    markers = tmp_path / "markers"
    _plant(repo, case, markers)

    # the planted programs are live: plain git on the same folder runs them
    assert _plain_git(repo, "update-ref", "refs/heads/probe", first.commit).returncode == 0
    assert (markers / "hook").exists()
    if case == "repo-config":
        assert _plain_git(repo, "archive", "--format=tar", first.commit).returncode == 0
        assert (markers / "smudge").exists()
    for marker in markers.iterdir():
        marker.unlink()

    other = _backbone(tmp_path / "v2" / "model", seed=1)
    second = push(other, "lab/shared", hub_endpoint=hub_dir, revision="dev", tag="v2")  # new branch, commit, tag
    third = push(other, "lab/shared", hub_endpoint=hub_dir)  # moves main
    for revision in ("v2", third.commit, first.commit):
        folder = pull("lab/shared", revision=revision, hub_endpoint=f"file://{hub_dir}", cache_dir=tmp_path / "cache")
        assert isinstance(cosmofm.from_pretrained(folder), CosmoFMModel)
    assert LocalHub(hub_dir).resolve("lab/shared", "v2") == second.commit
    assert sorted(p.name for p in markers.iterdir()) == []


def _bad_tree_repo(hub_dir: Path, case: str) -> str:
    """A hub repo whose main commit could write outside the extraction folder; returns the repo id."""
    hub = LocalHub(hub_dir)
    repo_id = f"lab/{case}"
    repo = hub.create_repo(repo_id)

    def git(*args: str, data: bytes | None = None) -> str:
        return hub._git(repo, *args, input=data)

    blob = git("hash-object", "-w", "--stdin", data=b"escaped\n")
    config = git("hash-object", "-w", "--stdin", data=b"{}\n")
    inner = git("mktree", data=f"100644 blob {blob}\tescaped\n".encode())
    if case == "dotdot":  # a tree entry named '..' (git mktree accepts it): the path '../escaped'
        entries = f"040000 tree {inner}\t..\n"
    elif case == "nested-dotdot":  # 'sub/../../escaped'
        up = git("mktree", data=f"040000 tree {inner}\t..\n".encode())
        sub = git("mktree", data=f"040000 tree {up}\t..\n".encode())
        entries = f"040000 tree {sub}\tsub\n"
    elif case == "symlink":  # a link pointing out of the tree
        target = git("hash-object", "-w", "--stdin", data=str(hub_dir.parent / "outside").encode())
        entries = f"120000 blob {target}\tdata_cards\n"
    else:  # a '.git' folder
        entries = f"040000 tree {inner}\t.git\n"
    tree = git("mktree", data=f"{entries}100644 blob {config}\tconfig.json\n".encode())
    commit = git("commit-tree", tree, "-p", hub.resolve(repo_id), "-m", "hostile")
    git("update-ref", "refs/heads/main", commit)
    return repo_id


def _offline_off(monkeypatch, home: Path) -> None:
    """Online for huggingface_hub, with a fresh HF_HOME (conftest makes the suite offline)."""
    from huggingface_hub import constants

    for key, value in {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": False,
                       "HF_HUB_DISABLE_XET": True}.items():
        monkeypatch.setattr(constants, key, value)


@pytest.mark.parametrize("case", ["dotdot", "nested-dotdot", "symlink", "dotgit"])
def test_pull_refuses_trees_that_leave_the_cache(case, tmp_path, monkeypatch, capsys):
    hub_dir = tmp_path / "area" / "hub"
    repo_id = _bad_tree_repo(hub_dir, case)
    _offline_off(monkeypatch, tmp_path / "area" / "hf-home")  # where the CLI's pull extracts to
    cache = tmp_path / "area" / "cache"
    with pytest.raises(InputError, match=r"(unsafe path|symbolic link).*nothing was extracted"):
        pull(repo_id, hub_endpoint=f"file://{hub_dir}", cache_dir=cache)
    assert main(["pull", repo_id, "--hub-endpoint", str(hub_dir)]) == 2
    assert repo_id in _one_line_error(capsys)
    if case in ("dotdot", "nested-dotdot"):  # the same tree served over HTTP, pulled by huggingface_hub
        with HubServer(hub_dir) as server:
            with pytest.raises(InputError, match="outside the download folder.*'..'"):
                pull(repo_id, hub_endpoint=server.url, cache_dir=cache)
    assert [p for p in tmp_path.rglob("*") if p.name in ("escaped", "outside")] == []
    assert not (cache / repo_id.replace("/", "--")).exists()  # the local hub's extraction never started


# ---------------------------------------------------------------------------------
# Releases whose files do not make the model they claim to
# ---------------------------------------------------------------------------------


def _headless(release: Path) -> None:
    _rewrite_tensors(release, lambda t: {k: v for k, v in t.items() if not k.startswith("head.")})


def _renamed(release: Path) -> None:
    _rewrite_tensors(release, lambda t: {f"model.{k}": v for k, v in t.items()})


def _extra(release: Path) -> None:
    _rewrite_tensors(release, lambda t: {**t, "head.spare.weight": torch.zeros(3)})


def _reshaped(release: Path) -> None:
    config = json.loads((release / "config.json").read_text())
    config["task"]["hidden_size"] = 24  # the head's tensors were saved with 16
    (release / "config.json").write_text(json.dumps(config))
    write_manifest(release)


def _truncated(release: Path) -> None:
    data = (release / "model.safetensors").read_bytes()
    (release / "model.safetensors").write_bytes(data[: len(data) // 2])
    write_manifest(release)  # the checksum passes, so it is the parse that fails


def _config_not_object(release: Path) -> None:
    (release / "config.json").write_text("[1, 2]\n")
    write_manifest(release)


def _config_invalid(release: Path) -> None:
    config = json.loads((release / "config.json").read_text())
    config["num_attention_heads"] = 5  # 32 is not divisible by 5
    (release / "config.json").write_text(json.dumps(config))
    write_manifest(release)


BAD_RELEASES = {
    "headless": (_headless, r"missing tensors: head\.\S+, head\."),
    "renamed": (_renamed, r"missing tensors: cosmofm\.embeddings.*and \d+ more; unexpected tensors: model\.cosmofm\."),
    "extra": (_extra, r"unexpected tensors: head\.spare\.weight"),
    "reshaped": (_reshaped, r"shape differs from config\.json: head\.classifier\.weight \[13, 16\] vs \[13, 24\]"),
    "truncated": (_truncated, r"model\.safetensors: is not a readable safetensors file"),
    "config-not-object": (_config_not_object, r"config\.json: holds a JSON list, not an object"),
    "config-invalid": (_config_invalid, r"config\.json: is not a usable config \(ValueError: .*divisible"),
}


@pytest.mark.parametrize("case", sorted(BAD_RELEASES))
def test_bad_release_is_a_one_line_error_everywhere(case, classifier, spectrum, tmp_path, capsys):
    tamper, expected = BAD_RELEASES[case]
    release = _copy(classifier, tmp_path / "release")
    tamper(release)
    with pytest.raises(InputError, match=expected):
        cosmofm.from_pretrained(release)

    out = tmp_path / "catalogue.fits"
    assert main(["classify", str(spectrum), "--model", str(release), "--output", str(out)]) == 2
    assert str(release) in _one_line_error(capsys) and not out.exists()

    assert main(["inspect", str(release)]) == 2
    assert "NOT VERIFIED" in capsys.readouterr().out  # main printed the error line, as above

    if case in ("headless", "renamed"):  # and as a backbone to fine-tune from
        from cosmofm.finetune.classification import FinetuneConfig, build_model

        with pytest.raises(InputError, match="missing tensors"):
            build_model(load_card("sdss-like"), FinetuneConfig(), backbone=release)


def test_good_release_still_loads_and_inspects(classifier, capsys):
    model = cosmofm.from_pretrained(classifier)
    reference = safetensors.torch.load_file(classifier / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    assert main(["inspect", str(classifier)]) == 0
    out = capsys.readouterr().out
    assert "manifest ok" in out and f"{len(reference)} tensors of a CosmoFMForSpectralClassification" in out


def test_inspect_exits_nonzero_for_a_release_that_fails_verification(backbone, tmp_path, capsys):
    release = _copy(backbone, tmp_path / "release")
    data = bytearray((release / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (release / "model.safetensors").write_bytes(bytes(data))
    assert main(["inspect", str(release)]) == 2
    captured = capsys.readouterr()
    assert "NOT VERIFIED" in captured.out and "hidden_size: 32" in captured.out  # still says what it can
    assert "sha256" in captured.err and captured.err.count("\n") == 1


# ---------------------------------------------------------------------------------
# transformers' own loader, and diverged weights
# ---------------------------------------------------------------------------------


def test_auto_model_verifies_the_manifest(backbone, classifier, tmp_path):
    from transformers import AutoModel, AutoModelForSequenceClassification

    assert type(AutoModel.from_pretrained(backbone)) is CosmoFMModel  # untouched: loads
    for source, auto in ((backbone, AutoModel), (classifier, AutoModelForSequenceClassification)):
        release = _copy(source, tmp_path / source.parent.name)
        data = bytearray((release / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF  # one weight changed, manifest kept
        (release / "model.safetensors").write_bytes(bytes(data))
        with pytest.raises(InputError, match=r"model\.safetensors: is corrupt.*sha256"):
            auto.from_pretrained(release)
        with pytest.raises(InputError, match="sha256"):
            CosmoFMModel.from_pretrained(release)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_release_refuses_non_finite_weights(value, tmp_path):
    model = CosmoFMModel(CosmoFMConfig(**TINY))
    with torch.no_grad():
        model.encoder.layers[1].mlp.fc.weight[3, 5] = value
    source = tmp_path / "diverged"
    model.save_pretrained(source)
    write_manifest(source)
    with pytest.raises(InputError, match=r"encoder\.layers\.1\.mlp\.fc\.weight: holds NaN or infinite values: the training run diverged"):
        assemble_release(source, tmp_path / "release")
    assert not (tmp_path / "release").exists()
    with pytest.raises(InputError, match="diverged"):
        push(source, "lab/diverged", hub_endpoint=tmp_path / "hub")
    assert not (tmp_path / "hub" / "models" / "lab" / "diverged").exists()
