"""Publishing releases to a model hub and downloading them back, verified.

A **release folder** is what a hub repository holds, one file set per revision:

    config.json                  the model config (architectures, schema_version)
    model.safetensors            the weights; above `max_shard_size` instead
    model.safetensors.index.json   an index and model-0000k-of-0000n.safetensors shards
    README.md                    the model card, rendered by `cosmofm.finetune.model_card`
                                 from the config, the data cards and the evaluation JSON
    data_cards/<name>.yaml       the data cards of every survey the model was trained on
    recipe.yaml                  the training recipe (when the run recorded one)
    eval_results.json            measured metrics per task (when there are any)
    manifest.json                sha256 and size of every other file

`assemble_release` builds one from a training run folder (`<run>/model`,
`<run>/recipe.yaml`, the data cards of the run's datasets) or from an existing
release folder. `push` assembles and uploads; `pull` downloads and verifies every
checksum before anything is parsed. Loading (`cosmofm.from_pretrained`) goes through
`pull` for repo ids.

Hubs. `hub_endpoint` (or, when it is not given, `HF_ENDPOINT`) names one of:

* an HTTP(S) hub (the Hugging Face Hub or anything speaking its API): the real
  `huggingface_hub` client does the work (`HfApi.create_repo`, `upload_folder`,
  `create_branch`, `create_tag`, `snapshot_download`), so `HF_TOKEN`, `HF_HOME`, the
  download cache and offline mode (`HF_HUB_OFFLINE=1`: only the cache is read)
  behave exactly as they do for transformers;
* a **local-directory hub**, `file:///path` or a plain path: one bare git repository
  per model at `<dir>/models/<org>/<name>`, a revision being a git commit, branches
  and tags git refs. Git gives immutable, content-addressed revisions for free, and
  it is the layout that `olah` (a hub-compatible server) serves from its
  `mirrors-path`, so the same folder can be published over HTTP unchanged. Pulled
  revisions are extracted once to `$HF_HOME/cosmofm/local-hub/<org>--<name>/<commit>`.
  This needs the `git` program. The folder may be shared, so it is never trusted to
  run anything: its hooks and config cannot make a push or pull execute a program,
  and a tree holding links or paths that leave the cache is refused (`LocalHub`).

Versioning: a push adds a commit on a branch (default `main`) and never rewrites
history, so every earlier commit and tag still resolves; pin one with `revision=`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from urllib.parse import unquote, urlparse

import yaml

from cosmofm.data_cards.errors import InputError
from cosmofm.pretrain.checkpoint import MANIFEST_NAME, verify_manifest, write_manifest

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CARD_NAME = "README.md"
CARDS_DIR = "data_cards"
RECIPE_NAME = "recipe.yaml"
EVAL_NAME = "eval_results.json"
# The Hub's recommended shard size: big enough for few files, small enough that one
# failed transfer does not cost a whole multi-GB download.
DEFAULT_MAX_SHARD_SIZE = "5GB"
DEFAULT_REVISION = "main"

_REPO_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*")
_SHA1_RE = re.compile(r"[0-9a-f]{40}")


# ---------------------------------------------------------------------------------
# Release folders
# ---------------------------------------------------------------------------------


def release_weight_files(folder: str | os.PathLike, listed: dict | None = None) -> list[str]:
    """The weight files a release must hold, in the order transformers looks for them.

    `model.safetensors` when the folder (or its manifest, `listed`) has it; otherwise
    the index and every shard it names. Shard names come from the index, which
    `verify_manifest` checks against its sha256 in the same call that needs them.
    """
    folder = Path(folder)
    listed = listed or {}
    if WEIGHTS_NAME in listed or (folder / WEIGHTS_NAME).is_file():
        return [WEIGHTS_NAME]
    index = folder / WEIGHTS_INDEX_NAME
    if WEIGHTS_INDEX_NAME not in listed and not index.is_file():
        return [WEIGHTS_NAME]  # neither: let the check name the usual file as missing
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted({str(v) for v in weight_map.values()})
    except FileNotFoundError:
        raise InputError(str(index), "is listed in manifest.json but missing", "re-download the release") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(str(index), f"is not a safetensors index ({exc})", "re-download the release") from exc
    return [WEIGHTS_INDEX_NAME, *shards]


def verify_release(folder: str | os.PathLike) -> dict:
    """Check a release folder before anything in it is parsed; returns the manifest files.

    Refuses pickle-format files anywhere in the folder, requires config.json and the
    weights (`release_weight_files`) to be listed in manifest.json, and checks every
    listed file's sha256. Errors are InputErrors naming the file.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST_NAME
    listed = {}
    if manifest.is_file():
        with contextlib.suppress(ValueError, OSError, AttributeError):  # verify_manifest reports a bad manifest
            listed = json.loads(manifest.read_text(encoding="utf-8")).get("files") or {}
    required = (CONFIG_NAME, *release_weight_files(folder, listed if isinstance(listed, dict) else {}))
    return verify_manifest(folder, required=required)


def weight_tensors(folder: str | os.PathLike):
    """Yield (file, tensor name, slice) for every tensor of a verified release's weights.

    Only the headers are read up front: `slice.get_shape()` costs nothing, `slice[:]`
    loads that one tensor. A file that safetensors cannot parse (truncated, not
    safetensors at all) is an InputError naming it, not a SafetensorError traceback.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    for name in release_weight_files(folder):
        if name == WEIGHTS_INDEX_NAME:
            continue
        path = folder / name
        try:
            with safe_open(path, framework="pt", device="cpu") as weights:
                for key in weights.keys():
                    yield path, key, weights.get_slice(key)
        except SafetensorError as exc:
            raise InputError(str(path), f"is not a readable safetensors file ({exc})",
                             "the file was written broken (a matching checksum only means it was not changed since): "
                             "use another revision, or save the model again") from None


def check_finite_weights(folder: str | os.PathLike) -> None:
    """Refuse weights holding NaN or inf: a diverged run must never become a release."""
    for path, key, tensor in weight_tensors(folder):
        values = tensor[:]
        if (values.is_floating_point() or values.is_complex()) and not bool(values.isfinite().all()):
            raise InputError(f"{path}: {key}", "holds NaN or infinite values: the training run diverged",
                             "do not publish it; train again (e.g. with a lower optim.lr) or publish the weights "
                             "of an earlier, finite checkpoint")


@dataclass
class _Source:
    model_dir: Path
    recipe: Path | None
    card_files: list[Path]
    eval_file: Path | None


def _locate_source(source: Path) -> _Source:
    """Accept a training run folder (`<run>/model`) or a release folder."""
    if (source / "model" / CONFIG_NAME).is_file():  # a training run
        cards = sorted(source.glob(f"data/*/{CARDS_DIR}/*.yaml"))
        recipe = source / RECIPE_NAME
        if recipe.is_file():
            try:
                datasets = (yaml.safe_load(recipe.read_text()) or {}).get("data", {}).get("datasets") or []
            except yaml.YAMLError as exc:
                raise InputError(str(recipe), f"is not valid YAML ({exc})", "fix or remove it") from exc
            for path in datasets:  # user datasets live outside the run folder
                cards += sorted(Path(path).glob(f"{CARDS_DIR}/*.yaml"))
        return _Source(source / "model", recipe if recipe.is_file() else None, cards,
                       source / EVAL_NAME if (source / EVAL_NAME).is_file() else None)
    if (source / CONFIG_NAME).is_file():  # a release folder
        return _Source(source, source / RECIPE_NAME if (source / RECIPE_NAME).is_file() else None,
                       sorted(source.glob(f"{CARDS_DIR}/*.yaml")),
                       source / EVAL_NAME if (source / EVAL_NAME).is_file() else None)
    what = "does not exist" if not source.exists() else "is neither a training run folder (with model/) nor a release folder (with config.json)"
    raise InputError(str(source), what, "give the run folder written by `cosmofm pretrain` or a release folder")


def _training_cards(source: _Source, survey_names: list[str]):
    """The data cards of the surveys the model was trained on (config.survey_names)."""
    from cosmofm.data_cards.schema import load_card

    found = {}
    for path in source.card_files:
        card = load_card(path)
        found.setdefault(card.name, card)
    cards = []
    for name in survey_names:
        if name not in found:
            try:  # the mock corpus uses the shipped cards
                found[name] = load_card(name)
            except InputError:
                raise InputError(f"config.json: survey_names[{name!r}]", "has no data card in the run's datasets, "
                                 "the release's data_cards/ or the shipped cards",
                                 f"add {CARDS_DIR}/{name}.yaml to the release folder") from None
        cards.append(found[name])
    return cards


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB" (decimal, as the Hub counts) or "512MiB"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if isinstance(size, bool) or not match or match.group(2) not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise InputError("max_shard_size", f"{size!r} is not a positive size", 'give bytes or e.g. "5GB", "500MB"')
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def _copy_weights(model_dir: Path, staged: Path, max_shard_size: int | str) -> None:
    """Copy the weights byte for byte, or re-shard them when a file exceeds max_shard_size."""
    from huggingface_hub.serialization import save_torch_state_dict

    files = release_weight_files(model_dir)
    limit = parse_size(max_shard_size)
    shards = [f for f in files if f != WEIGHTS_INDEX_NAME]
    if files == [WEIGHTS_NAME] and (model_dir / WEIGHTS_NAME).stat().st_size <= limit:
        shutil.copyfile(model_dir / WEIGHTS_NAME, staged / WEIGHTS_NAME)
        return
    import safetensors.torch

    tensors = {}
    for name in shards:  # already verified against the source manifest
        tensors.update(safetensors.torch.load_file(model_dir / name, device="cpu"))
    save_torch_state_dict(tensors, staged, max_shard_size=limit, metadata={"format": "pt"})


def assemble_release(source: str | os.PathLike, dest: str | os.PathLike, *, eval_results: str | os.PathLike | dict | None = None,
                     max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, repo_id: str | None = None) -> Path:
    """Build a verified release folder at `dest` (which must not exist) and return it.

    Weights holding NaN or inf (a diverged run) are refused, naming the tensor.

    Args:
        source: a training run folder (its `model/`, `recipe.yaml` and the data cards of
            its datasets are used) or a release folder.
        dest: where to write the release; built next to it and renamed into place.
        eval_results: an evaluation JSON (path or dict, format in
            `cosmofm.finetune.model_card.load_eval_results`); default: the source's
            `eval_results.json` if it has one.
        max_shard_size: weights files above this size (bytes or "5GB") are split into
            shards plus `model.safetensors.index.json`.
        repo_id: named in the model card's usage example.
    """
    from cosmofm.finetune.model_card import count_parameters, load_eval_results, render_model_card

    source_path, dest = Path(source), Path(dest)
    src = _locate_source(source_path)
    verify_release(src.model_dir)
    check_finite_weights(src.model_dir)
    if dest.exists():
        raise InputError(str(dest), "already exists", "choose a new folder for the release")
    config = json.loads((src.model_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    cards = _training_cards(src, list(config.get("survey_names") or []))
    recipe = None
    if src.recipe is not None:
        recipe = yaml.safe_load(src.recipe.read_text(encoding="utf-8"))
    if eval_results is None and src.eval_file is not None:
        eval_results = src.eval_file
    results = load_eval_results(eval_results) if eval_results is not None else []

    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    staged.mkdir()
    try:
        shutil.copyfile(src.model_dir / CONFIG_NAME, staged / CONFIG_NAME)
        _copy_weights(src.model_dir, staged, max_shard_size)
        (staged / CARDS_DIR).mkdir()
        for card in cards:
            text = yaml.safe_dump(card.to_dict(), sort_keys=False, allow_unicode=True)
            (staged / CARDS_DIR / f"{card.name}.yaml").write_text(text, encoding="utf-8")
        if src.recipe is not None:
            shutil.copyfile(src.recipe, staged / RECIPE_NAME)
        if results:
            (staged / EVAL_NAME).write_text(json.dumps({"results": results}, indent=2) + "\n", encoding="utf-8")
        card_text = render_model_card(config, cards, results, recipe, n_parameters=count_parameters(staged), repo_id=repo_id)
        (staged / CARD_NAME).write_text(card_text, encoding="utf-8")
        write_manifest(staged)
        verify_release(staged)
        os.replace(staged, dest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return dest


# ---------------------------------------------------------------------------------
# Where a hub is
# ---------------------------------------------------------------------------------


def is_repo_id(text) -> bool:
    """Whether `text` has the form of a hub repo id, ORG/NAME."""
    return isinstance(text, str) and _REPO_ID_RE.fullmatch(text) is not None


def check_repo_id(repo_id: str) -> str:
    """`org/name` as the Hub spells it; anything else is an InputError."""
    if not isinstance(repo_id, str) or not _REPO_ID_RE.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id \
            or repo_id.endswith((".git", ".")):
        raise InputError("repo id", f"{repo_id!r} is not of the form ORG/NAME",
                         "use letters, digits, '-', '_' and '.', e.g. my-lab/cosmofm-small")
    return repo_id


def _check_revision(revision: str) -> str:
    if not isinstance(revision, str) or not (_SHA1_RE.fullmatch(revision) or _REF_RE.fullmatch(revision)) or ".." in revision:
        raise InputError("revision", f"{revision!r} is not a branch, tag or full commit id", "e.g. main, v1.0 or a 40-hex commit")
    return revision


def local_hub_root(hub_endpoint: str | os.PathLike | None) -> Path | None:
    """The folder of a local-directory hub, or None when the endpoint is an HTTP(S) hub.

    `hub_endpoint` None means `HF_ENDPOINT` (as huggingface_hub read it). `file://`
    URLs and plain paths are local-directory hubs.
    """
    if hub_endpoint is None:
        from huggingface_hub import constants

        hub_endpoint = constants.ENDPOINT
    text = os.fspath(hub_endpoint)
    parsed = urlparse(text)
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InputError("hub endpoint", f"{text!r} names a remote host", "use file:///absolute/path")
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # not a Windows drive letter
        raise InputError("hub endpoint", f"{text!r} has an unsupported scheme {parsed.scheme!r}",
                         "use http(s)://host[:port], file:///path or a folder path")
    return Path(text)


def _http_endpoint(hub_endpoint) -> str:
    from huggingface_hub import constants

    return str(hub_endpoint).rstrip("/") if hub_endpoint is not None else constants.ENDPOINT


# ---------------------------------------------------------------------------------
# The local-directory hub (git)
# ---------------------------------------------------------------------------------

# Settings passed with `git -c`, which outranks every config file, including the hub
# repository's own `config` (GIT_CONFIG_NOSYSTEM / GIT_CONFIG_GLOBAL only drop the
# system and user files). Each one closes a way for a shared hub folder to make git
# run a program as whoever pushes or pulls.
_GIT_SAFE_CONFIG = {
    "safe.directory": "*",  # the hub may belong to another user; nothing below runs its code
    "core.hooksPath": os.devnull,  # hooks/reference-transaction runs on every update-ref
    "core.fsmonitor": "false",  # a program asked about file changes by index commands
    "commit.gpgSign": "false",  # would run gpg.program from the repo config on commit-tree
    "gc.auto": "0",  # auto-gc runs the pre-auto-gc hook
    "maintenance.auto": "false",
    "core.pager": "cat",
}


class LocalHub:
    """A hub in a folder: `<root>/models/<org>/<name>` is a bare git repository per model.

    Every method is a few git plumbing commands run with a fixed identity and no user
    or system git configuration. The hub folder may be shared, so nothing in it is
    trusted to run: the repository's own hooks and `core.hooksPath` are overridden
    (`_GIT_SAFE_CONFIG`), and revisions are extracted blob by blob with `cat-file`,
    never through `git archive` (which runs the smudge filters a repository's config
    and attributes name). Branch updates are compare-and-swap (`git update-ref NEW
    OLD`), so two concurrent pushes cannot silently drop a commit; tags never move
    once created.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # -- plumbing ---------------------------------------------------------------
    def repo_path(self, repo_id: str) -> Path:
        org, name = check_repo_id(repo_id).split("/")
        return self.root / "models" / org / name

    def _git_command(self, repo: Path, *args: str) -> tuple[list[str], dict]:
        git = shutil.which("git")
        if git is None:
            raise InputError("git", "is not installed; the local-directory hub stores revisions as git commits",
                             "install git, or publish to an HTTP hub with --hub-endpoint http(s)://...")
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, GIT_TERMINAL_PROMPT="0",
                   GIT_AUTHOR_NAME="cosmofm", GIT_AUTHOR_EMAIL="cosmofm@localhost",
                   GIT_COMMITTER_NAME="cosmofm", GIT_COMMITTER_EMAIL="cosmofm@localhost")
        safe = [arg for key, value in _GIT_SAFE_CONFIG.items() for arg in ("-c", f"{key}={value}")]
        return [git, "--no-pager", *safe, f"--git-dir={repo}", *args], env

    def _git(self, repo: Path, *args: str, input: bytes | None = None, env: dict | None = None, check: bool = True) -> str:
        cmd, full_env = self._git_command(repo, *args)
        out = subprocess.run(cmd, input=input, capture_output=True, env={**full_env, **(env or {})}, timeout=600)
        if check and out.returncode != 0:
            raise InputError(str(repo), f"git {args[0]} failed: {out.stderr.decode(errors='replace').strip()}",
                             "check that the hub folder is a cosmofm local hub and writable")
        return out.stdout.decode(errors="surrogateescape").strip()

    def exists(self, repo_id: str) -> bool:
        return (self.repo_path(repo_id) / "HEAD").is_file()

    def create_repo(self, repo_id: str) -> Path:
        repo = self.repo_path(repo_id)
        if not self.exists(repo_id):
            repo.mkdir(parents=True, exist_ok=True)
            self._git(repo, "init", "--quiet", "--bare")
            self._git(repo, "symbolic-ref", "HEAD", f"refs/heads/{DEFAULT_REVISION}")
            # Like the Hub, a new repo starts with one commit on main, so that branches
            # can always be made from it.
            with tempfile.TemporaryDirectory(prefix="cosmofm-index-") as tmp:
                env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
                self._git(repo, "read-tree", "--empty", env=env)
                tree = self._git(repo, "write-tree", env=env)
            commit = self._git(repo, "commit-tree", "--no-gpg-sign", tree, "-m", "initial commit")
            self._git(repo, "update-ref", f"refs/heads/{DEFAULT_REVISION}", commit, "0" * 40)
        return repo

    def _require(self, repo_id: str) -> Path:
        if not self.exists(repo_id):
            raise InputError(repo_id, f"is not a repository of the local hub {self.root}",
                             f"check the repo id, or push it first (cosmofm push PATH --repo-id {repo_id} --hub-endpoint {self.root})")
        return self.repo_path(repo_id)

    def resolve(self, repo_id: str, revision: str = DEFAULT_REVISION) -> str | None:
        """The commit id a branch, tag or full commit id names, or None."""
        repo = self._require(repo_id)
        _check_revision(revision)
        candidates = [revision] if _SHA1_RE.fullmatch(revision) else []
        candidates += [f"refs/heads/{revision}", f"refs/tags/{revision}"]
        for ref in candidates:
            sha = self._git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
            if sha:
                return sha
        return None

    def branches(self, repo_id: str) -> dict[str, str]:
        """Branch name -> commit id."""
        return self._refs(repo_id, "refs/heads/")

    def tags(self, repo_id: str) -> dict[str, str]:
        """Tag name -> commit id."""
        return self._refs(repo_id, "refs/tags/")

    def _refs(self, repo_id: str, prefix: str) -> dict[str, str]:
        out = self._git(self._require(repo_id), "for-each-ref", "--format=%(objectname) %(refname)", prefix)
        return {ref.removeprefix(prefix): sha for sha, ref in (line.split(" ", 1) for line in out.splitlines() if line)}

    def create_branch(self, repo_id: str, branch: str, start: str = DEFAULT_REVISION) -> None:
        repo = self._require(repo_id)
        _check_revision(branch)
        sha = self.resolve(repo_id, start)
        if sha is None:
            raise InputError("revision", f"{start!r} does not exist in {repo_id}", "start the branch from an existing revision")
        self._git(repo, "update-ref", f"refs/heads/{branch}", sha, "0" * 40)

    def create_tag(self, repo_id: str, tag: str, revision: str) -> str:
        repo = self._require(repo_id)
        _check_revision(tag)
        sha = self.resolve(repo_id, revision)
        if sha is None:
            raise InputError("revision", f"{revision!r} does not exist in {repo_id}", "tag an existing revision")
        existing = self._git(repo, "rev-parse", "--verify", "--quiet", f"refs/tags/{tag}", check=False)
        if existing:
            raise InputError("tag", f"{tag!r} already exists in {repo_id} (commit {existing[:12]}); tags never move",
                             "choose a new tag name")
        self._git(repo, "update-ref", f"refs/tags/{tag}", sha, "0" * 40)
        return sha

    def commit(self, repo_id: str, *, branch: str = DEFAULT_REVISION, add: dict[str, str | os.PathLike | bytes] | None = None,
               delete: list[str] = (), delete_folders: list[str] = (), replace: bool = False, message: str = "cosmofm push") -> str:
        """Commit file changes on the existing `branch`.

        `add` maps repo paths to files or bytes; `replace=True` starts from an empty
        tree (the commit then holds exactly `add`). Returns the new commit id, or the
        current one when nothing changed.
        """
        repo = self._require(repo_id)
        _check_revision(branch)
        parent = self._git(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}^{{commit}}", check=False)
        if not parent:
            raise InputError("revision", f"branch {branch!r} does not exist in {repo_id}", "create it first (create_branch)")
        with tempfile.TemporaryDirectory(prefix="cosmofm-index-") as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            if not replace:
                self._git(repo, "read-tree", parent, env=env)
            else:
                self._git(repo, "read-tree", "--empty", env=env)
            for path in delete:
                self._git(repo, "update-index", "--force-remove", "--", _repo_path(path), env=env)
            for folder in delete_folders:
                prefix = _repo_path(folder.rstrip("/")) + "/"
                listed = self._git(repo, "ls-files", "-z", "--", prefix, env=env)
                for path in filter(None, listed.split("\0")):
                    self._git(repo, "update-index", "--force-remove", "--", path, env=env)
            entries = []
            for path, content in sorted((add or {}).items()):
                if isinstance(content, (bytes, bytearray)):
                    sha = self._git(repo, "hash-object", "-w", "--no-filters", "--stdin", input=bytes(content))
                else:
                    sha = self._git(repo, "hash-object", "-w", "--no-filters", "--", os.fspath(Path(content).resolve()))
                entries.append(f"100644 {sha}\t{_repo_path(path)}")
            if entries:
                self._git(repo, "update-index", "--add", "--index-info", input=("\n".join(entries) + "\n").encode(), env=env)
            tree = self._git(repo, "write-tree", env=env)
        if self._git(repo, "rev-parse", f"{parent}^{{tree}}") == tree:
            return parent
        commit = self._git(repo, "commit-tree", "--no-gpg-sign", tree, "-p", parent, "-m", message)
        self._git(repo, "update-ref", f"refs/heads/{branch}", commit, parent)
        return commit

    def _tree(self, repo: Path, commit: str) -> list[tuple[str, str, str, str, str]]:
        """(mode, kind, object id, size, path) of every entry below `commit`'s tree."""
        out = self._git(repo, "ls-tree", "-r", "-l", "-z", commit)
        entries = []
        for entry in filter(None, out.split("\0")):
            meta, path = entry.split("\t", 1)
            mode, kind, sha, size = meta.split()
            entries.append((mode, kind, sha, size, path))
        return entries

    def list_files(self, repo_id: str, commit: str) -> list[tuple[str, str, int]]:
        """(path, git blob id, size) of every file at `commit`."""
        return [(path, sha, int(size)) for _mode, kind, sha, size, path in self._tree(self._require(repo_id), commit)
                if kind == "blob"]

    def _release_files(self, repo: Path, commit: str, where: str) -> list[tuple[str, str]]:
        """(path, blob id) of every file at `commit`; a tree that could write outside the
        extraction folder (symbolic links, '..', absolute or '.git' paths, submodules) is refused."""
        files = []
        for mode, kind, sha, _size, path in self._tree(repo, commit):
            if mode == "120000":
                problem = f"holds a symbolic link {path!r}"
            elif kind != "blob":
                problem = f"holds a {kind} entry {path!r}"
            elif not _is_safe_repo_path(path):
                problem = f"holds an unsafe path {path!r}"
            else:
                files.append((path, sha))
                continue
            raise InputError(where, f"{problem}; a release holds only plain files at relative paths (nothing was extracted)",
                             "pull another revision, and have the publisher push the release again with `cosmofm push`")
        return files

    def _extract(self, repo: Path, files: list[tuple[str, str]], dest: Path, where: str) -> None:
        """Write each blob's raw bytes (`git cat-file --batch`: no filters, nothing run) below `dest`."""
        cmd, env = self._git_command(repo, "cat-file", "--batch")
        with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env) as proc:
            for path, sha in files:
                proc.stdin.write(f"{sha}\n".encode())
                proc.stdin.flush()
                header = proc.stdout.readline().split()
                if len(header) != 3 or header[1] != b"blob":
                    raise InputError(where, f"has no readable blob for {path!r}", "check the hub folder (git fsck)")
                target = dest.joinpath(*path.split("/"))
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    out = open(target, "xb")
                except (FileExistsError, NotADirectoryError):
                    raise InputError(where, f"holds {path!r} twice (or as both a file and a folder)",
                                     "pull another revision") from None
                with out:
                    left = int(header[2])
                    while left:
                        chunk = proc.stdout.read(min(left, 1 << 20))
                        if not chunk:
                            raise InputError(where, f"ended while reading {path!r}", "check the hub folder (git fsck)")
                        out.write(chunk)
                        left -= len(chunk)
                proc.stdout.read(1)  # the newline after each object
            proc.stdin.close()

    def read_file(self, repo_id: str, commit: str, path: str) -> bytes:
        cmd, env = self._git_command(self._require(repo_id), "cat-file", "blob", f"{commit}:{path}")
        out = subprocess.run(cmd, capture_output=True, env=env, timeout=600)
        if out.returncode != 0:
            raise FileNotFoundError(f"{repo_id}@{commit}: {path}")
        return out.stdout

    def snapshot(self, repo_id: str, revision: str = DEFAULT_REVISION, cache_dir: str | os.PathLike | None = None) -> Path:
        """Extract a revision (once; later calls reuse it) and return its folder."""
        commit = self.resolve(repo_id, revision)
        if commit is None:
            raise InputError("revision", f"{revision!r} does not exist in {repo_id} at {self.root}",
                             f"use a branch, tag or commit of the repo (branches: {', '.join(sorted(self.branches(repo_id))) or 'none'})")
        if cache_dir is None:
            from huggingface_hub import constants

            cache_dir = Path(constants.HF_HOME) / "cosmofm" / "local-hub"
        dest = Path(cache_dir) / repo_id.replace("/", "--") / commit
        if dest.is_dir():
            return dest
        repo, where = self.repo_path(repo_id), f"{repo_id}@{commit} in the hub {self.root}"
        files = self._release_files(repo, commit, where)  # checked before anything is written
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{commit}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir()
        try:
            self._extract(repo, files, tmp, where)
            try:
                os.replace(tmp, dest)
            except OSError:  # someone else extracted it meanwhile
                if not dest.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest


def _is_safe_repo_path(path: str) -> bool:
    """A '/'-separated relative path that stays inside the repo on any OS: no '', '.', '..'
    or '.git' parts, no '\\', no drive letters (the rules huggingface_hub applies to downloads)."""
    parts = path.split("/")
    return bool(path) and "\\" not in path and not path.startswith("/") \
        and not any(part in ("", ".", "..", ".git") or PureWindowsPath(part).drive for part in parts)


def _repo_path(path: str) -> str:
    text = str(path).replace("\\", "/")
    if not _is_safe_repo_path(text):
        raise InputError("path in repo", f"{path!r} is not a safe relative path", "use relative paths without '..'")
    return text


# ---------------------------------------------------------------------------------
# Push and pull
# ---------------------------------------------------------------------------------


@dataclass
class PushResult:
    repo_id: str
    revision: str  # the branch pushed to
    commit: str  # the new commit id: pin it with revision=<commit>
    tag: str | None
    endpoint: str  # the hub: URL or local folder

    def __str__(self) -> str:
        tag = f", tag {self.tag}" if self.tag else ""
        return f"{self.repo_id}@{self.revision} (commit {self.commit}{tag}) on {self.endpoint}"


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str, endpoint: str, action: str):
    """Turn huggingface_hub's exceptions into InputErrors that say what to do."""
    import httpx2
    from huggingface_hub import errors

    where = f"{repo_id}@{revision} on {endpoint}"
    try:
        yield
    except errors.RevisionNotFoundError:
        raise InputError("revision", f"{revision!r} does not exist in {repo_id} on {endpoint}",
                         "use a branch, tag or full commit id of the repo (--revision)") from None
    except errors.RepositoryNotFoundError:
        # Hubs answer 401 for a missing repo and for a private one without access, and
        # some mirrors say the same for a missing revision.
        raise InputError(where, "was not found (or your token has no access to it)",
                         "check the repo id and --revision, and set HF_TOKEN if the repo is private") from None
    except errors.OfflineModeIsEnabled:
        raise InputError(where, f"cannot be {action}ed: HF_HUB_OFFLINE=1 forbids network access",
                         "unset HF_HUB_OFFLINE to reach the hub") from None
    except errors.LocalEntryNotFoundError:
        raise InputError(where, "is not in the local cache and the hub cannot be reached (offline mode, or no connection)",
                         "download it once with network access (cosmofm pull), or unset HF_HUB_OFFLINE") from None
    except errors.LocalTokenNotFoundError:
        raise InputError("HF_TOKEN", f"is not set and {endpoint} needs a token to {action}",
                         "set HF_TOKEN=<a token with write access> or run `hf auth login`") from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise InputError("HF_TOKEN", f"{endpoint} refused to {action} {repo_id} (HTTP {status}): no token, or one without "
                             "write access", "set HF_TOKEN to a token with write access to the repo") from None
        raise InputError(where, f"{action} failed: {str(exc).splitlines()[0]}", "check the hub endpoint and try again") from None
    except (httpx2.ConnectError, httpx2.TimeoutException) as exc:
        raise InputError(endpoint, f"cannot be reached ({exc})", "check --hub-endpoint / HF_ENDPOINT and the network") from None
    except ValueError as exc:  # huggingface_hub refuses file names that would leave the cache
        if isinstance(exc, InputError) or not str(exc).startswith("Invalid filename"):
            raise
        raise InputError(where, f"lists a file that would be written outside the download folder ({exc})",
                         "pull another revision, and have the publisher push the release again with `cosmofm push`") from None


def push(source: str | os.PathLike, repo_id: str, *, hub_endpoint: str | os.PathLike | None = None,
         revision: str = DEFAULT_REVISION, tag: str | None = None, token: str | None = None, private: bool = False,
         eval_results: str | os.PathLike | dict | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
         commit_message: str | None = None) -> PushResult:
    """Assemble the release of `source` (run or release folder) and publish it.

    The commit holds exactly the release's files (files of the previous revision that
    the new one lacks are deleted in it; earlier commits keep them). `revision` is the
    branch to commit to (created from main if missing); `tag` marks the new commit.
    """
    check_repo_id(repo_id)
    _check_revision(revision)
    if tag is not None:
        _check_revision(tag)
    message = commit_message or f"cosmofm release of {Path(source).name}"
    with tempfile.TemporaryDirectory(prefix="cosmofm-release-") as tmp:
        release = assemble_release(source, Path(tmp) / "release", eval_results=eval_results,
                                   max_shard_size=max_shard_size, repo_id=repo_id)
        root = local_hub_root(hub_endpoint)
        if root is not None:
            hub = LocalHub(root)
            hub.create_repo(repo_id)
            if revision not in hub.branches(repo_id):
                hub.create_branch(repo_id, revision)
            files = {p.relative_to(release).as_posix(): p for p in sorted(release.rglob("*")) if p.is_file()}
            commit = hub.commit(repo_id, branch=revision, add=files, replace=True, message=message)
            if tag:
                hub.create_tag(repo_id, tag, commit)
            return PushResult(repo_id, revision, commit, tag, str(root))
        endpoint = _http_endpoint(hub_endpoint)
        from huggingface_hub import HfApi

        api = HfApi(endpoint=endpoint, token=token)
        with _hub_errors(repo_id, revision, endpoint, "push"):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision != DEFAULT_REVISION:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=release, revision=revision,
                                     commit_message=message, delete_patterns="*")
            if tag:
                api.create_tag(repo_id, tag=tag, revision=info.oid)
        return PushResult(repo_id, revision, info.oid, tag, endpoint)


def pull(repo_id: str, *, revision: str = DEFAULT_REVISION, hub_endpoint: str | os.PathLike | None = None,
         token: str | None = None, cache_dir: str | os.PathLike | None = None, force_download: bool = False) -> Path:
    """Download a revision (or reuse the cached copy), verify it, and return its folder.

    HTTP hubs go through `huggingface_hub.snapshot_download` (HF_ENDPOINT, HF_TOKEN,
    HF_HOME / cache_dir and HF_HUB_OFFLINE honoured); local-directory hubs extract the
    commit. Every checksum is verified and pickle files are refused before returning;
    `force_download` fetches again instead of trusting the cache.
    """
    check_repo_id(repo_id)
    _check_revision(revision)
    root = local_hub_root(hub_endpoint)
    if root is not None:
        hub = LocalHub(root)
        folder = hub.snapshot(repo_id, revision, cache_dir=cache_dir)
        if force_download:
            shutil.rmtree(folder)
            folder = hub.snapshot(repo_id, revision, cache_dir=cache_dir)
        where = str(root)
    else:
        where = _http_endpoint(hub_endpoint)
        from huggingface_hub import snapshot_download

        with _hub_errors(repo_id, revision, where, "download"):
            folder = Path(snapshot_download(repo_id, revision=revision, endpoint=where, token=token,
                                            cache_dir=cache_dir, force_download=force_download))
    try:
        verify_release(folder)
    except InputError as exc:
        raise InputError(exc.field, f"{exc.problem} [{repo_id}@{revision} from {where}]",
                         f"download it again (cosmofm pull {repo_id} --revision {revision} --force-download); "
                         "if that fails too, the published revision is broken: use another one") from None
    return folder
