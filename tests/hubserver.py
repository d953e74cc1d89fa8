"""A small Hugging Face Hub-compatible server for tests: real bytes, real commit history.

It implements the routes huggingface_hub 2.4 calls for ``HfApi.create_repo`` / ``create_branch`` /
``create_commit`` (validate-yaml, preupload, the LFS batch API, the ndjson commit) and for
``hf_hub_download`` / ``snapshot_download`` (repo info, tree, ``resolve`` with HEAD and Range).
Large files travel through the legacy LFS protocol only: the Xet path (``xet-write-token`` and
Xet storage traffic, which huggingface_hub takes whenever hf-xet is installed) cannot be served
offline, so tests must set ``HF_HUB_DISABLE_XET`` (``huggingface_hub.constants.HF_HUB_DISABLE_XET``).

    with HubServer(tokens={"hf_alice": "alice"}, lfs_threshold=1024) as hub:
        HfApi(endpoint=hub.url, token="hf_alice").create_repo("alice/tiny")

Auth follows the Hub: ``Authorization: Bearer <token>``; an unknown token is 401 everywhere, a
valid token writing outside its own namespace is 403, a private repo is invisible (401 anonymous,
404 otherwise) to all but its owner. Namespaces are users; there are no organisations.

``refuse = (status, reason)`` (settable live) makes every request answer that status with the
Hub's error headers, e.g. ``(403, "read-only token")`` or ``(503, "maintenance")``; ``stop()`` shuts
the server down, leaving its port closed (a Hub that is unreachable).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import secrets
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: sha1 over ``blob <size>\\0`` + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """One stored file version; its bytes live at ``objects/<sha256>``."""

    sha256: str
    size: int
    lfs: bool
    git_oid: str  # of the content for regular files, of the LFS pointer for LFS files

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "path": path, "oid": self.git_oid, "size": self.size}
        if self.lfs:
            pointer = LFS_POINTER.format(oid=self.sha256, size=self.size)
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(pointer)}
        return entry


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    title: str
    files: dict[str, Blob]  # the full tree at this commit: path -> blob
    changed: tuple[str, ...]  # paths added, replaced or deleted by this commit


@dataclass
class Repo:
    owner: str
    name: str
    private: bool
    branches: dict[str, list[Commit]] = field(default_factory=dict)  # name -> history, head last
    lfs: set[str] = field(default_factory=set)  # sha256 of the LFS objects uploaded to this repo

    def commit(self, rev: str) -> Commit | None:
        """A branch name, or a full or short (>= 5 hex) commit id."""
        if rev in self.branches:
            return self.branches[rev][-1]
        if len(rev) >= 5:
            for history in self.branches.values():
                for c in history:
                    if c.oid.startswith(rev.lower()):
                        return c
        return None


class HubHTTPError(Exception):
    """Answered as the Hub does: JSON ``{"error": ...}`` plus ``X-Error-Code``/``X-Error-Message``."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: object) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class HubServer:
    """The app, its state, and a uvicorn thread on 127.0.0.1 with a free port (``.url``)."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        tokens: dict[str, str],
        lfs_threshold: int = 10 * 2**20,
        leak_tokens: bool = False,
    ):
        self._tmp = None if root is not None else tempfile.TemporaryDirectory(prefix="hubserver-")
        self.objects = Path(root if root is not None else self._tmp.name) / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens)  # token -> user name (= namespace)
        self.lfs_threshold = lfs_threshold  # files this size or larger upload as LFS; settable live
        self.leak_tokens = leak_tokens  # echo the Authorization header in errors, to test scrubbing
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for tests
        self.refuse: tuple[int, str] | None = None  # every request answers (status, reason) while set
        self._tickets: dict[str, tuple[Repo, int]] = {}  # upload ticket (presigned URL) -> repo, size
        self._seq = itertools.count(1)
        self.app = build_app(self)
        self.url = ""

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> HubServer:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("hub test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Shut the server down: its port refuses connections from now on."""
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- state helpers (also used by tests) --------------------------------------------------------

    def history(self, repo_id: str, branch: str = "main") -> list[Commit]:
        return list(self.repos[repo_id].branches[branch])

    def read_bytes(self, blob: Blob) -> bytes:
        return (self.objects / blob.sha256).read_bytes()

    def store(self, data: bytes, *, lfs: bool) -> Blob:
        sha = hashlib.sha256(data).hexdigest()
        self._write_object(sha, data)
        return self._blob(sha, len(data), lfs, data)

    def _blob(self, sha: str, size: int, lfs: bool, data: bytes | None = None) -> Blob:
        pointer = LFS_POINTER.format(oid=sha, size=size).encode()
        return Blob(sha, size, lfs, git_blob_oid(pointer if lfs else data))

    def _write_object(self, sha: str, data: bytes) -> None:
        target = self.objects / sha
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)

    def new_commit(self, repo: Repo, branch: str, title: str, files: dict[str, Blob], changed) -> Commit:
        parent = repo.branches[branch][-1].oid if branch in repo.branches else None
        seed = json.dumps([next(self._seq), parent, title, sorted((p, b.sha256) for p, b in files.items())])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, files, tuple(changed))
        repo.branches.setdefault(branch, []).append(commit)
        return commit

    def upload_mode(self, size: int) -> str:
        return "lfs" if size >= self.lfs_threshold and size > 0 else "regular"

    # -- auth --------------------------------------------------------------------------------------

    def user(self, request: Request) -> str | None:
        auth = request.headers.get("authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def readable(self, request: Request, ns: str, name: str) -> Repo:
        user, repo = self.user(request), self.repos.get(f"{ns}/{name}")
        if repo is None or (repo.private and user != repo.owner):
            raise HubHTTPError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def writable(self, request: Request, ns: str, name: str) -> Repo:
        repo = self.readable(request, ns, name)
        user = self.user(request)
        if user is None:
            raise HubHTTPError(401, "You must be authenticated to write to this repo")
        if user != repo.owner:
            raise HubHTTPError(403, f"You don't have the rights to write to {ns}/{name}")
        return repo

    @staticmethod
    def revision(repo: Repo, rev: str) -> Commit:
        commit = repo.commit(rev)
        if commit is None:
            raise HubHTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit


def build_app(hub: HubServer) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(HubHTTPError)
    async def _hub_error(request: Request, exc: HubHTTPError) -> JSONResponse:
        if hub.leak_tokens:  # a misbehaving server/proxy echoing credentials back
            exc.message += f" (sent {request.headers.get('authorization')!r})"
        headers = {"X-Error-Message": exc.message} | ({"X-Error-Code": exc.code} if exc.code else {})
        return JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status, headers=headers)

    @app.middleware("http")
    async def _record(request: Request, call_next):
        hub.requests.append((request.method, request.url.path))
        if hub.refuse is not None:
            status, reason = hub.refuse
            return JSONResponse({"error": reason}, status_code=status, headers={"X-Error-Message": reason})
        return await call_next(request)

    @app.post("/api/repos/create")
    async def create_repo(request: Request):
        body, user = await request.json(), hub.user(request)
        ns = body.get("organization") or user
        if user is None:
            raise HubHTTPError(401, "You must be authenticated to create a repo")
        if ns != user:
            raise HubHTTPError(403, f"You don't have the rights to create a model under the namespace {ns}")
        repo_id = f"{ns}/{body['name']}"
        if repo_id in hub.repos:
            raise HubHTTPError(409, "You already created this model repo", url=f"{hub.url}/{repo_id}")
        repo = hub.repos[repo_id] = Repo(ns, body["name"], body.get("visibility") == "private")
        blob = hub.store(GITATTRIBUTES, lfs=False)
        hub.new_commit(repo, "main", "initial commit", {".gitattributes": blob}, [".gitattributes"])
        return {"url": f"{hub.url}/{repo_id}", "name": repo_id}

    @app.post("/api/validate-yaml")
    async def validate_yaml(request: Request):
        hub.user(request)
        content = (await request.json())["content"]
        if content.startswith("---"):
            front = content.split("---", 2)[1] if content.count("---") >= 2 else None
            try:
                meta = yaml.safe_load(front) if front is not None else None
            except yaml.YAMLError as e:
                meta = e
            if not isinstance(meta, dict):
                return JSONResponse({"errors": [{"message": f"Invalid YAML metadata: {meta}"}]}, 400)
        return {"errors": [], "warnings": []}

    @app.get("/api/models/{ns}/{name}")
    @app.get("/api/models/{ns}/{name}/revision/{rev}")
    async def model_info(request: Request, ns: str, name: str, rev: str = "main"):
        repo = hub.readable(request, ns, name)
        commit = hub.revision(repo, rev)
        siblings = [{"rfilename": path} for path in sorted(commit.files)]  # no ?blobs=1 details
        info = {"id": f"{ns}/{name}", "author": ns, "sha": commit.oid, "private": repo.private}
        return info | {"siblings": siblings}

    @app.get("/api/models/{ns}/{name}/tree/{rev}")
    @app.get("/api/models/{ns}/{name}/tree/{rev}/{prefix:path}")
    async def tree(request: Request, ns: str, name: str, rev: str, prefix: str = ""):
        commit = hub.revision(hub.readable(request, ns, name), rev)
        recursive = request.query_params.get("recursive") in ("1", "true", "True")
        base = prefix.strip("/") + "/" if prefix.strip("/") else ""
        entries: dict[str, dict] = {}
        for path, blob in sorted(commit.files.items()):
            if not path.startswith(base):
                continue
            parts = path[len(base) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way down
                folder = base + "/".join(parts[:depth])
                oid = hashlib.sha1(f"{commit.oid}:{folder}".encode()).hexdigest()
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": oid, "size": 0})
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entries[path] = blob.tree_entry(path)
        if base and not entries:
            raise HubHTTPError(404, f"{prefix} does not exist on {rev}", "EntryNotFound")
        return list(entries.values())

    @app.get("/api/models/{ns}/{name}/refs")
    async def refs(request: Request, ns: str, name: str):
        repo = hub.readable(request, ns, name)
        branches = [
            {"name": b, "ref": f"refs/heads/{b}", "targetCommit": h[-1].oid} for b, h in repo.branches.items()
        ]
        return {"branches": branches, "converts": [], "tags": [], "pullRequests": []}

    @app.post("/api/models/{ns}/{name}/branch/{branch}")
    async def create_branch(request: Request, ns: str, name: str, branch: str):
        repo = hub.writable(request, ns, name)
        start = (await request.json() if await request.body() else {}).get("startingPoint") or "main"
        if branch in repo.branches:
            raise HubHTTPError(409, f"Reference refs/heads/{branch} already exists")
        source = hub.revision(repo, start)
        history = repo.branches.get(start) or [source]
        repo.branches[branch] = list(history)

    @app.post("/api/models/{ns}/{name}/preupload/{rev}")
    async def preupload(request: Request, ns: str, name: str, rev: str):
        commit = hub.revision(hub.writable(request, ns, name), rev)
        out = []
        for f in (await request.json())["files"]:
            mode, remote = hub.upload_mode(f["size"]), commit.files.get(f["path"])
            oid = None
            if remote is not None:  # what the client compares its local oid to (see _local_oid)
                oid = remote.sha256 if mode == "lfs" else git_blob_oid(hub.read_bytes(remote))
            out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return {"files": out, "commitOid": commit.oid}

    @app.post("/{ns}/{name}.git/info/lfs/objects/batch")
    async def lfs_batch(request: Request, ns: str, name: str):
        repo = hub.writable(request, ns, name)
        body = await request.json()
        if body.get("operation") != "upload":
            raise HubHTTPError(400, "only uploads are supported")
        objects = []
        for obj in body["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in repo.lfs:  # LFS storage is per repo: upload unless already there
                ticket = secrets.token_hex(8)
                hub._tickets[ticket] = (repo, obj["size"])
                href = f"{hub.url}/_lfs/{obj['oid']}?ticket={ticket}"
                item["actions"] = {
                    "upload": {"href": href},
                    "verify": {"href": f"{hub.url}/_lfs/{obj['oid']}/verify"},
                }
            objects.append(item)
        return JSONResponse(
            {"transfer": "basic", "objects": objects}, media_type="application/vnd.git-lfs+json"
        )

    @app.put("/_lfs/{oid}")
    async def lfs_put(request: Request, oid: str):
        if (ticket := hub._tickets.pop(request.query_params.get("ticket", ""), None)) is None:
            raise HubHTTPError(403, "invalid or expired upload URL")
        (repo, size), data = ticket, await request.body()
        if hashlib.sha256(data).hexdigest() != oid or len(data) != size:
            raise HubHTTPError(400, "uploaded bytes do not match the announced oid/size")
        hub._write_object(oid, data)
        repo.lfs.add(oid)
        return Response(status_code=200)

    @app.post("/_lfs/{oid}/verify")
    async def lfs_verify(request: Request, oid: str):
        hub.user(request)
        body, path = await request.json(), hub.objects / oid
        if not path.exists() or path.stat().st_size != body.get("size"):
            raise HubHTTPError(404, f"LFS object {oid} not found")
        return {"success": True}

    @app.post("/api/models/{ns}/{name}/commit/{rev}")
    async def commit(request: Request, ns: str, name: str, rev: str):
        repo = hub.writable(request, ns, name)
        if request.query_params.get("create_pr"):
            raise HubHTTPError(400, "pull requests are not supported by this test server")
        if rev not in repo.branches:
            raise HubHTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in (await request.body()).splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "the first ndjson line must be the header")
        header, head = lines[0]["value"], repo.branches[rev][-1]
        parent = header.get("parentCommit")
        if parent and not head.oid.startswith(parent.lower()):
            raise HubHTTPError(412, "A commit has happened since. Please refresh and try again.")
        files, changed = dict(head.files), []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                data = base64.b64decode(value["content"])
                files[path] = hub.store(data, lfs=False)
            elif key == "lfsFile":
                obj = hub.objects / value["oid"]
                if value["oid"] not in repo.lfs or obj.stat().st_size != value.get(
                    "size", obj.stat().st_size
                ):
                    raise HubHTTPError(422, f"LFS object {value['oid']} for {path} was never uploaded")
                files[path] = hub._blob(value["oid"], obj.stat().st_size, lfs=True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubHTTPError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                files = {p: b for p, b in files.items() if not p.startswith(path.rstrip("/") + "/")}
            else:
                raise HubHTTPError(400, f"unknown operation {key}")
            changed.append(path)
        new = hub.new_commit(repo, rev, header.get("summary", ""), files, changed)
        return {"commitUrl": f"{hub.url}/{ns}/{name}/commit/{new.oid}", "commitOid": new.oid, "success": True}

    @app.api_route("/{ns}/{name}/resolve/{rev}/{path:path}", methods=["GET", "HEAD"])
    async def resolve(request: Request, ns: str, name: str, rev: str, path: str):
        commit = hub.revision(hub.readable(request, ns, name), rev)
        blob = commit.files.get(path)
        if blob is None:
            raise HubHTTPError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.git_oid}"'}
        if blob.lfs:
            headers |= {"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)}
        return FileResponse(hub.objects / blob.sha256, headers=headers)  # HEAD, Range, Content-Length

    return app
