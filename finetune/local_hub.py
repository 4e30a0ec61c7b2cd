"""The local-directory hub, and what names a hub, a repo and a revision.

A local-directory hub (`file:///path` or a plain path) is one bare git repository per
model at `<dir>/models/<org>/<name>`, a revision being a git commit, branches and tags
git refs: immutable, content-addressed revisions for free, in the layout that `olah`
serves from its `mirrors-path`. `LocalHub` drives it with git plumbing that can run
nothing from the hub folder (docs/safety.md). `cosmofm.finetune.hub` (push, pull)
uses it for such endpoints and `huggingface_hub` for HTTP ones.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path, PureWindowsPath
from urllib.parse import unquote, urlparse

from cosmofm.data_cards.errors import InputError

DEFAULT_REVISION = "main"

_REPO_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*")
_SHA1_RE = re.compile(r"[0-9a-f]{40}")

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


def check_revision(revision: str) -> str:
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


def http_endpoint(hub_endpoint) -> str:
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
        check_revision(revision)
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
        check_revision(branch)
        sha = self.resolve(repo_id, start)
        if sha is None:
            raise InputError("revision", f"{start!r} does not exist in {repo_id}", "start the branch from an existing revision")
        self._git(repo, "update-ref", f"refs/heads/{branch}", sha, "0" * 40)

    def create_tag(self, repo_id: str, tag: str, revision: str) -> str:
        repo = self._require(repo_id)
        check_revision(tag)
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
        check_revision(branch)
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


