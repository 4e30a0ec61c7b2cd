"""Publishing releases to a model hub and downloading them back, verified.

What a hub repository holds is a release folder (`cosmofm.finetune.release_folder`:
its files, `assemble_release`, `verify_release`). `push` assembles one and uploads it;
`pull` downloads a revision and verifies every checksum before anything is parsed.
Loading (`cosmofm.from_pretrained`) goes through `pull` for repo ids.

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
  This needs the `git` program (`cosmofm.finetune.local_hub.LocalHub`). The folder may be shared, so it is never trusted to
  run anything: its hooks and config cannot make a push or pull execute a program,
  and a tree holding links or paths that leave the cache is refused (`LocalHub`).

Versioning: a push adds a commit on a branch (default `main`) and never rewrites
history, so every earlier commit and tag still resolves; pin one with `revision=`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cosmofm.data_cards.errors import InputError
from cosmofm.finetune.local_hub import (
    DEFAULT_REVISION,
    LocalHub,
    check_repo_id,
    check_revision,
    http_endpoint,
    local_hub_root,
)
from cosmofm.finetune.release_folder import DEFAULT_MAX_SHARD_SIZE, assemble_release, verify_release


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
    check_revision(revision)
    if tag is not None:
        check_revision(tag)
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
        endpoint = http_endpoint(hub_endpoint)
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
    check_revision(revision)
    root = local_hub_root(hub_endpoint)
    if root is not None:
        hub = LocalHub(root)
        folder = hub.snapshot(repo_id, revision, cache_dir=cache_dir)
        if force_download:
            shutil.rmtree(folder)
            folder = hub.snapshot(repo_id, revision, cache_dir=cache_dir)
        where = str(root)
    else:
        where = http_endpoint(hub_endpoint)
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
