"""A small hub server on localhost: the upload API that huggingface_hub calls, and downloads.

It speaks just enough of the Hugging Face Hub HTTP API for the real client:

* uploads: `HfApi.create_repo`, `create_branch`, `create_tag` and `upload_folder`
  (preupload, the LFS batch API with the "basic" PUT transfer, the NDJSON commit,
  the tree listing used by `delete_patterns`);
* downloads: `snapshot_download`, `hf_hub_download` and so `from_pretrained`
  (revision info, tree listing, HEAD/GET of `/{repo}/resolve/{revision}/{path}`).

Repositories are stored by `cosmofm.finetune.local_hub.LocalHub`: bare git repositories at
`<root>/models/<org>/<name>`, one commit per upload. That is the layout olah serves
from its `mirrors-path`, so tests upload here and download through olah, a real
hub-compatible server, from the same folder.

Binary files get upload mode "lfs", as on the Hub. This server implements the LFS
protocol, not Xet (the Hub's chunked storage, which needs its CAS service), so
clients must set `HF_HUB_DISABLE_XET=1` when hf_xet is installed.

Safety: binds 127.0.0.1 only; every connection times out after 30 s; request bodies
are capped at 1 GiB; writes need `Authorization: Bearer <token>` when a token is set.

Run by hand (for the README's publish/download walk-through):

    python tests/hub_server.py --root outputs/hub --port 8765 --token hf_local
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from cosmofm.data_cards.errors import InputError
from cosmofm.finetune.local_hub import LocalHub

MAX_BODY = 1 << 30
_OID_RE = re.compile(r"[0-9a-f]{64}")


class HubServer:
    """`with HubServer(root, token="t") as hub:` serves at `hub.url` until the block ends."""

    def __init__(self, root: str | os.PathLike, port: int = 0, token: str | None = None):
        self.hub = LocalHub(root)
        self.staging = Path(root) / ".lfs-staging"
        self.staging.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.lock = threading.Lock()  # one writer at a time
        self.stats = {"lfs_uploads": 0, "regular_files": 0, "commits": 0}
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        self.status, self.message, self.code = status, message, code


def _make_handler(server: HubServer):
    hub = server.hub

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 30  # seconds a connection may sit idle or trickle

        def log_message(self, fmt, *args):  # quiet; failures surface in the client
            pass

        # -- plumbing -------------------------------------------------------------
        def _segments(self) -> tuple[list[str], dict]:
            parts = urlsplit(self.path)
            return [unquote(s) for s in parts.path.split("/")[1:]], parse_qs(parts.query)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks, total = [], 0
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    total += size
                    if total > MAX_BODY:
                        raise _HttpError(413, "request body too large")
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise _HttpError(413, "request body too large")
            return self.rfile.read(length)

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():  # header values: one line of latin-1
                self.send_header(k, " ".join(str(v).split()).encode("ascii", "replace").decode())
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, obj, status: int = 200, headers: dict | None = None):
            self._send(status, json.dumps(obj).encode(), headers)

        def _auth(self):
            if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                raise _HttpError(401, "Invalid credentials in Authorization header")

        def _repo(self, org: str, name: str) -> str:
            repo_id = f"{org}/{name}"
            try:
                if hub.exists(repo_id):
                    return repo_id
            except InputError:
                pass
            raise _HttpError(404, f"Repository {repo_id} not found", "RepoNotFound")

        def _commit_of(self, repo_id: str, revision: str) -> str:
            try:
                sha = hub.resolve(repo_id, revision)
            except InputError:
                sha = None
            if sha is None:
                raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return sha

        def _dispatch(self):
            try:
                seg, query = self._segments()
                self._route(seg, query)
            except _HttpError as e:
                headers = {"X-Error-Message": e.message}
                if e.code:
                    headers["X-Error-Code"] = e.code
                self._json({"error": e.message}, e.status, headers)
            except InputError as e:
                self._json({"error": str(e)}, 400, {"X-Error-Message": str(e)})
            except (ValueError, KeyError, TypeError) as e:  # malformed request (bad JSON, base64, fields)
                self._json({"error": f"bad request: {e}"}, 400, {"X-Error-Message": "bad request"})

        do_GET = do_HEAD = do_POST = do_PUT = _dispatch

        # -- routes ---------------------------------------------------------------
        def _route(self, seg: list[str], query: dict):
            method = self.command
            if method == "POST" and seg == ["api", "repos", "create"]:
                return self._create_repo()
            if method == "POST" and seg == ["api", "validate-yaml"]:
                return self._validate_yaml()
            if seg[:2] == ["api", "models"] and len(seg) >= 4:
                repo_id = self._repo(seg[2], seg[3])
                rest = seg[4:]
                if method == "GET" and (not rest or rest[0] == "revision"):
                    return self._info(repo_id, rest[1] if len(rest) > 1 else "main")
                if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
                    return self._tree(repo_id, rest[1], "/".join(rest[2:]), query)
                if method == "POST" and len(rest) == 2 and rest[0] in ("preupload", "commit", "branch", "tag"):
                    self._auth()
                    return getattr(self, f"_{rest[0]}")(repo_id, rest[1])
            if method == "POST" and len(seg) == 6 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
                self._auth()
                return self._lfs_batch(self._repo(seg[0], seg[1][: -len(".git")]))
            if method == "PUT" and len(seg) == 2 and seg[0] == "lfs-upload":
                return self._lfs_put(seg[1])
            if method in ("GET", "HEAD") and len(seg) >= 5 and seg[2] == "resolve":
                return self._resolve(self._repo(seg[0], seg[1]), seg[3], "/".join(seg[4:]))
            raise _HttpError(404, f"no route for {method} {self.path}")

        def _create_repo(self):
            self._auth()
            payload = json.loads(self._body() or b"{}")
            if payload.get("type", "model") != "model":
                raise _HttpError(400, "this server stores model repos only")
            repo_id = f"{payload.get('organization')}/{payload.get('name')}"
            with server.lock:
                if hub.exists(repo_id):  # the Hub answers 409 with the url, which exist_ok uses
                    return self._json({"error": "You already created this model repo", "url": f"{server.url}/{repo_id}"}, 409)
                hub.create_repo(repo_id)
            self._json({"url": f"{server.url}/{repo_id}", "name": repo_id})

        def _validate_yaml(self):
            """The metadata check the Hub runs on README.md before an upload."""
            content = json.loads(self._body())["content"]
            match = re.match(r"\A---\n(.*?)\n---\n", content, flags=re.S)
            try:
                meta = yaml.safe_load(match.group(1)) if match else {}
            except yaml.YAMLError as exc:
                return self._json({"errors": [{"message": f"YAML: {exc}"}]}, 400)
            if not isinstance(meta, dict):
                return self._json({"errors": [{"message": "metadata must be a YAML mapping"}]}, 400)
            self._json({"errors": [], "warnings": [] if meta else [{"message": "empty metadata"}]})

        def _preupload(self, repo_id: str, revision: str):
            self._commit_of(repo_id, revision)
            files = json.loads(self._body())["files"]
            out = []
            for f in files:
                binary = b"\0" in base64.b64decode(f["sample"])
                out.append({"path": f["path"], "uploadMode": "lfs" if binary else "regular", "shouldIgnore": False, "oid": None})
            self._json({"files": out, "commitOid": self._commit_of(repo_id, revision)})

        def _lfs_batch(self, repo_id: str):
            payload = json.loads(self._body())
            if payload.get("operation") != "upload":
                raise _HttpError(400, "only uploads are served by the LFS batch API here")
            objects = []
            for obj in payload["objects"]:
                oid, size = obj["oid"], int(obj["size"])
                if not _OID_RE.fullmatch(oid):
                    raise _HttpError(400, f"bad oid {oid!r}")
                entry = {"oid": oid, "size": size}
                if not (server.staging / oid).is_file():
                    entry["actions"] = {"upload": {"href": f"{server.url}/lfs-upload/{oid}", "header": {}}}
                objects.append(entry)
            self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

        def _lfs_put(self, oid: str):
            if not _OID_RE.fullmatch(oid):
                raise _HttpError(400, f"bad oid {oid!r}")
            data = self._body()
            if hashlib.sha256(data).hexdigest() != oid:
                raise _HttpError(400, "uploaded content does not match its sha256")
            tmp = server.staging / f".{oid}.{uuid.uuid4().hex[:8]}"
            tmp.write_bytes(data)
            os.replace(tmp, server.staging / oid)
            with server.lock:
                server.stats["lfs_uploads"] += 1
            self._send(200, b"")

        def _commit(self, repo_id: str, revision: str):
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            header = next((item["value"] for item in lines if item["key"] == "header"), {})
            add, delete, delete_folders = {}, [], []
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "file":
                    add[value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    staged = server.staging / value["oid"]
                    if not _OID_RE.fullmatch(value["oid"]) or not staged.is_file():
                        raise _HttpError(400, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                    add[value["path"]] = staged
                elif key == "deletedFile":
                    delete.append(value["path"])
                elif key == "deletedFolder":
                    delete_folders.append(value["path"])
            with server.lock:
                parent = self._commit_of(repo_id, revision)
                if header.get("parentCommit") not in (None, parent):
                    raise _HttpError(412, "parentCommit is not the head of the branch")
                if revision not in hub.branches(repo_id):
                    raise _HttpError(404, f"{revision} is not a branch", "RevisionNotFound")
                sha = hub.commit(repo_id, branch=revision, add=add, delete=[p for p in delete if p not in add],
                                 delete_folders=delete_folders, message=header.get("summary") or "upload")
                server.stats["commits"] += 1
                server.stats["regular_files"] += sum(isinstance(v, bytes) for v in add.values())
            self._json({"commitUrl": f"{server.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

        def _branch(self, repo_id: str, branch: str):
            start = json.loads(self._body() or b"{}").get("startingPoint") or "main"
            with server.lock:
                if branch in hub.branches(repo_id):
                    raise _HttpError(409, f"branch {branch} already exists")
                self._commit_of(repo_id, start)
                hub.create_branch(repo_id, branch, start)
            self._json({})

        def _tag(self, repo_id: str, revision: str):
            tag = json.loads(self._body() or b"{}")["tag"]
            with server.lock:
                sha = self._commit_of(repo_id, revision)
                if tag in hub.tags(repo_id):
                    raise _HttpError(409, f"tag {tag} already exists")
                hub.create_tag(repo_id, tag, sha)
            self._json({})

        def _info(self, repo_id: str, revision: str):
            sha = self._commit_of(repo_id, revision)
            siblings = [{"rfilename": path} for path, _, _ in hub.list_files(repo_id, sha)]
            self._json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "disabled": False,
                        "gated": False, "tags": [], "siblings": siblings})

        def _tree(self, repo_id: str, revision: str, prefix: str, query: dict):
            sha = self._commit_of(repo_id, revision)
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            entries, folders = [], set()
            base = prefix.strip("/") + "/" if prefix.strip("/") else ""
            for path, blob, size in hub.list_files(repo_id, sha):
                if not path.startswith(base):
                    continue
                rel = path[len(base):]
                if "/" in rel and not recursive:
                    folders.add(base + rel.split("/", 1)[0])
                    continue
                if recursive:
                    parts = path.split("/")
                    folders.update("/".join(parts[:i]) for i in range(1, len(parts)) if "/".join(parts[:i]).startswith(base))
                entries.append({"type": "file", "oid": blob, "size": size, "path": path})
            entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
            self._json(entries)

        def _resolve(self, repo_id: str, revision: str, path: str):
            sha = self._commit_of(repo_id, revision)
            files = {p: (blob, size) for p, blob, size in hub.list_files(repo_id, sha)}
            if path not in files:
                raise _HttpError(404, f"{path} does not exist at {revision}", "EntryNotFound")
            blob, size = files[path]
            headers = {"X-Repo-Commit": sha, "ETag": f'"{blob}"'}
            if self.command == "HEAD":
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                return
            self._send(200, hub.read_file(repo_id, sha, path), headers, "application/octet-stream")

    return Handler


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="folder of the hub (bare git repos under models/)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token", help="token required for uploads (default: none required)")
    args = p.parse_args(argv)
    server = HubServer(args.root, port=args.port, token=args.token)
    print(f"hub serving {Path(args.root).resolve()} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
