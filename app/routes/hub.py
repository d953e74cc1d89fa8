"""The Hub's read protocol for inits, so stock ``transformers`` / ``huggingface_hub`` fetch them by name.

With ``HF_ENDPOINT`` (or ``endpoint=``) pointing at the service, ``from_pretrained("test/L3-d64-h4-kv2-f64")``
works: the repo id names an init (``cbd.core.repo_ids``), and these routes answer what the clients
ask (huggingface_hub 2.x and the 0.x that transformers 4.57 uses; docs/hub.md):

- ``GET /api/models/{chain}/{name}[/revision/{rev}]``: model info, ``sha`` (the commit: the init's
  content id zero-padded to 40 hex) and ``siblings`` (sizes, blob ids and LFS data with ``?blobs=1``);
- ``GET /api/models/{chain}/{name}/tree/{rev}[/{path}]``: the file list ``snapshot_download`` reads;
- ``GET|HEAD /{chain}/{name}/resolve/{rev}/{file}``: the file, with ``X-Repo-Commit``, a strong
  ``ETag`` (its sha256, as ``/checkpoints`` sends), ``X-Linked-Etag`` / ``X-Linked-Size`` for the
  weights (LFS files on the Hub), ``Content-Length``, Range (206) and ``If-None-Match`` (304).

``main`` resolves to the init the name stands for; the commit sha (or the bare 32-hex id) names an
init that exists, e.g. one made with an explicit alpha. The first request for an init that does not
exist produces it as ``POST /initialize`` does: an interpolation is waited for (at most
``CBD_SYNC_WAIT_S``, capped at ``HUB_WAIT_S`` so the answer comes before the clients' 10 s
metadata timeout); anything longer (a bridge, a chain build) answers 503 with ``Retry-After``, which
huggingface_hub retries, and a message saying which job makes it and to retry later. Errors come as
the Hub sends them (``X-Error-Code``, ``X-Error-Message``, ``{"error": ...}``): a name that names no
init is 404 ``RepoNotFound`` with the reason and the format (clients show it), an unknown revision
``RevisionNotFound``, a missing file ``EntryNotFound`` (with ``X-Repo-Commit``, so clients cache the
absence). With ``CBD_API_KEYS`` set, a key is required as the clients send a token
(``Authorization: Bearer``), or as ``X-API-Key``. Left out of ``/openapi.json``: the Hub defines it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from app import views
from app.core.config import Settings
from app.deps import check_chain, read_caller, require_api_key
from app.errors import ForbiddenError, JobFailedError, UnauthorizedError, http_status
from app.routes import initialize
from app.routes.checkpoints import _matches as etag_matches
from app.routes.checkpoints import serve_file
from cbd.core import artifacts, repo_ids
from cbd.core.artifacts import ArtifactInfo
from cbd.core.repo_ids import RepoName
from cbd.errors import CBDError, StorageFullError
from worker import queue

router = APIRouter(tags=["hub"], include_in_schema=False)
HUB_WAIT_S = 8.0  # under the clients' 10 s metadata timeout (HF_HUB_ETAG_TIMEOUT); their retries of the 503
# wait again, so the HEAD path is not given up sooner than POST's CBD_SYNC_WAIT_S (docs/hub.md, On demand)
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores files from this size (and weights of any size) in LFS
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
IMMUTABLE = "public, max-age=31536000, immutable"
MAX_HEADER = 2000


class HubAnswer(Exception):
    """An error answered as the Hub answers it: status, ``X-Error-Code``, ``X-Error-Message``, JSON body."""

    def __init__(self, status: int, message: str, code: str | None = None, *,
                 headers: dict[str, str] | None = None, **extra: object) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = dict(headers or {}), extra

    def response(self) -> JSONResponse:
        one_line = " ".join(self.message.split()).encode("ascii", "replace").decode()[:MAX_HEADER]
        headers = {"X-Error-Message": one_line, **({"X-Error-Code": self.code} if self.code else {}), **self.headers}
        return JSONResponse({"error": self.message, **self.extra}, status_code=self.status, headers=headers)


async def _hub_answer(request: Request, exc: HubAnswer) -> JSONResponse:
    return exc.response()


def install(app: FastAPI) -> None:
    app.add_exception_handler(HubAnswer, _hub_answer)


@contextlib.contextmanager
def hub_errors(settings: Settings) -> Iterator[None]:
    """The service's errors in the Hub's terms (clients raise RepositoryNotFoundError for ``RepoNotFound``
    and show its message; 401 and 503 reach them as HTTP errors, 503 after retrying)."""
    retry = {"Retry-After": str(settings.retry_after_s)}
    try:
        yield
    except HubAnswer:
        raise
    except UnauthorizedError as e:
        raise HubAnswer(401, e.message, headers={"WWW-Authenticate": 'Bearer realm="cbd"'}) from None
    except JobFailedError as e:
        raise HubAnswer(e.status, e.message, job_id=e.job_id, cause=e.error) from None
    except CBDError as e:
        status = http_status(e)
        if status == 422:  # a shape, chain or tokenizer POST /initialize refuses: this repo does not exist
            message = e.message if repo_ids.FORMAT in e.message else repo_ids.invalid(e.message.rstrip(".")).message
            raise HubAnswer(404, message, "RepoNotFound", allowed=e.allowed) from None
        raise HubAnswer(status, e.message, headers=retry if status == 503 else None) from None
    except RedisError:
        raise HubAnswer(503, "the job queue (Redis) is unreachable; retry later", headers=retry) from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise HubAnswer(507, StorageFullError("the artifact store is full; free space and retry").message) from None
        raise


def check_key(request: Request, chain: str) -> None:
    """``require_api_key`` (app.deps) with the key as huggingface_hub sends a token, or as X-API-Key; then
    the key's chains (403 for a key scoped to others)."""
    auth = request.headers.get("authorization") or ""
    scheme, _, token = auth.partition(" ")
    key = (token.strip() if scheme.lower() == "bearer" else None) or request.headers.get("x-api-key")
    settings = request.app.state.settings
    try:
        require_api_key(settings, key)
    except UnauthorizedError:
        raise UnauthorizedError("a valid API key is required: give it to the client as its Hugging Face token "
                                "(HF_TOKEN=<key>, or token=<key>), sent as 'Authorization: Bearer <key>'") from None
    try:
        check_chain(read_caller(request, settings, key), chain, f"repo {chain}/...")
    except ForbiddenError as e:
        raise HubAnswer(403, e.message) from None


@dataclass(frozen=True)
class Init:
    repo: str  # as requested
    info: ArtifactInfo
    commit: str
    pinned: bool  # asked for by commit: the answer never changes


def _matches(plan: dict, name: RepoName) -> bool:
    """Whether an existing init's plan is the one ``name`` describes (alpha aside)."""
    t = plan.get("target") or {}
    shape = (t.get("num_hidden_layers"), t.get("hidden_size"), t.get("num_attention_heads"),
             t.get("num_key_value_heads"), t.get("intermediate_size"))
    bridge = plan.get("bridge_options") is not None
    tokenizer_ok = name.tokenizer == plan.get("tokenizer") or (name.tokenizer is None and not bridge)
    return (plan.get("chain") == name.chain and shape == (name.layers, name.hidden, name.heads, name.kv_heads, name.ffn)
            and plan.get("dtype") == name.dtype and tokenizer_ok)


async def find_init(request: Request, chain: str, name: str, revision: str) -> Init:
    """The init ``chain/name`` at ``revision``, produced on demand; a HubAnswer when there is none (yet)."""
    settings: Settings = request.app.state.settings
    repo = f"{chain}/{name}"
    with hub_errors(settings):
        check_key(request, chain)
        rn = repo_ids.parse(chain, name)
        body = rn.to_request()
        wanted = repo_ids.artifact_of_commit(revision)
        if revision != "main" and wanted is None:
            raise _no_revision(repo, revision)
        if wanted is not None:  # a commit names an init that exists (clients learn shas from model info)
            info = await run_in_threadpool(artifacts.load_artifact, wanted)
            if info is None or not _matches(info.plan, rn):
                raise _no_revision(repo, revision)
            return Init(repo, info, repo_ids.commit_of(info.id), pinned=True)
        base = views.base_url(request)
        sub = await run_in_threadpool(initialize.submit, body, None, settings, request.app.state.redis, base,
                                      request.app.state.metrics)
        view = sub.view
        if sub.job is not None and sub.wait and view.status in ("queued", "started") and settings.sync_wait_s > 0:
            job = await initialize.wait_for(sub.job, settings.model_copy(
                update={"sync_wait_s": min(settings.sync_wait_s, HUB_WAIT_S)}))
            view = await run_in_threadpool(views.job_view, job, base)
        if view.status == "failed" and view.error is not None:
            initialize.answer(view, request, Response(), settings)  # raises JobFailedError as POST does
        info = await run_in_threadpool(artifacts.load_artifact, view.artifact_id) \
            if view.status == "finished" and view.artifact_id else None
        if info is None:
            raise _not_ready(repo, view, request, settings)
        return Init(repo, info, repo_ids.commit_of(info.id), pinned=False)


def _no_revision(repo: str, revision: str) -> HubAnswer:
    return HubAnswer(404, f"revision {revision!r} of {repo} does not exist: use 'main' (the init this name stands "
                          "for) or the commit sha of an init that exists (model info's 'sha', or POST /initialize's "
                          "'repo_revision')", "RevisionNotFound")


def _not_ready(repo: str, view, request: Request, settings: Settings) -> HubAnswer:
    where = views.job_path(request, view.id)
    what = "a chain build" if view.kind == "build_chain" else (
        "an interpolation" if view.queue == queue.FAST else "a bridge to another tokenizer (minutes to hours)")
    progress = f", progress {view.progress}" if view.progress else ""
    message = (f"{repo} is not ready yet: it is being made by job {view.id} ({what}; {view.status}{progress}). "
               f"Retry in a while; GET {where} on the service shows its progress.")
    return HubAnswer(503, message, headers={"Retry-After": str(settings.retry_after_s)},
                     job={"id": view.id, "status": view.status, "location": where})


def _is_lfs(name: str, size: int) -> bool:
    return name.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE


def _pointer(sha256: str, size: int) -> bytes:
    return LFS_POINTER.format(oid=sha256, size=size).encode()


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@lru_cache(maxsize=1024)
def _blob_oid(aid: str, name: str, sha256: str, size: int, lfs: bool) -> str:
    """The git blob id the Hub lists for a file: of its content, or of its LFS pointer (files are immutable,
    so ``(id, name, sha256)`` keys the cache)."""
    return _git_oid(_pointer(sha256, size) if lfs else artifacts.read_file(aid, name))


def _entry(init: Init, name: str, *, sibling: bool) -> dict:
    f = init.info.files[name]
    lfs = _is_lfs(name, f.size)
    oid = _blob_oid(init.info.id, name, f.sha256, f.size, lfs)
    out: dict = {"rfilename": name, "size": f.size, "blobId": oid} if sibling else \
        {"type": "file", "path": name, "oid": oid, "size": f.size}
    if lfs:
        pointer = len(_pointer(f.sha256, f.size))
        out["lfs"] = {"sha256" if sibling else "oid": f.sha256, "size": f.size, "pointerSize": pointer}
    return out


def _files(init: Init) -> list[str]:
    return sorted(init.info.files)


@router.get("/api/models/{chain}/{name}")
@router.get("/api/models/{chain}/{name}/revision/{revision}")
async def model_info(request: Request, chain: str, name: str, revision: str = "main") -> JSONResponse:
    init = await find_init(request, chain, name, revision)
    blobs = request.query_params.get("blobs") in ("1", "true", "True")
    try:
        siblings = await run_in_threadpool(
            lambda: [_entry(init, n, sibling=True) if blobs else {"rfilename": n} for n in _files(init)])
    except FileNotFoundError:
        raise _evicted(init, request) from None
    plan = init.info.plan
    body = {"_id": init.info.id, "id": init.repo, "modelId": init.repo, "author": chain, "sha": init.commit,
            "private": False, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["transformers", "safetensors", "cbd", (plan.get("target") or {}).get("model_type", "llama")],
            "config": {"model_type": (plan.get("target") or {}).get("model_type", "llama")},
            "siblings": siblings, "cbd": {"artifact_id": init.info.id, "alpha": init.info.alpha,
                                          "anchors": init.info.anchors, "canonical_repo_id":
                                              repo_ids.repo_id_of_plan(plan)}}
    return JSONResponse(body, headers={"X-Repo-Commit": init.commit})


@router.get("/api/models/{chain}/{name}/tree/{revision}")
@router.get("/api/models/{chain}/{name}/tree/{revision}/{prefix:path}")
async def tree(request: Request, chain: str, name: str, revision: str, prefix: str = "") -> JSONResponse:
    init = await find_init(request, chain, name, revision)
    prefix = prefix.strip("/")
    if prefix and prefix not in init.info.files:
        raise HubAnswer(404, f"{prefix} does not exist in {init.repo} at {revision}", "EntryNotFound",
                        headers={"X-Repo-Commit": init.commit})
    names = [prefix] if prefix else _files(init)
    try:
        entries = await run_in_threadpool(lambda: [_entry(init, n, sibling=False) for n in names])
    except FileNotFoundError:
        raise _evicted(init, request) from None
    return JSONResponse(entries, headers={"X-Repo-Commit": init.commit})


@router.get("/{chain}/{name}/resolve/{revision}/{filename:path}")
@router.head("/{chain}/{name}/resolve/{revision}/{filename:path}")
async def resolve(request: Request, chain: str, name: str, revision: str, filename: str) -> Response:
    init = await find_init(request, chain, name, revision)
    f = init.info.files.get(filename)
    if f is None:
        raise HubAnswer(404, f"{filename} does not exist in {init.repo} at {revision}; its files: "
                             f"{', '.join(_files(init))}", "EntryNotFound", headers={"X-Repo-Commit": init.commit})
    etag = f'"{f.sha256}"'
    headers = {"X-Repo-Commit": init.commit, "ETag": etag,
               "Cache-Control": IMMUTABLE if init.pinned else "no-cache"}
    if _is_lfs(filename, f.size):
        headers |= {"X-Linked-Etag": etag, "X-Linked-Size": str(f.size)}
    if etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    # from a bucket: streamed, or (CBD_STORE_REDIRECT=1) a 302 to a presigned URL, as the Hub's CDN redirects
    try:
        return await serve_file(request, init.info.id, filename, f.size, etag, headers, "application/octet-stream",
                                filename=filename, redirect_status=302)
    except FileNotFoundError:  # evicted since find_init: the next request makes it again
        raise _evicted(init, request) from None


def _evicted(init: Init, request: Request) -> HubAnswer:
    return HubAnswer(503, f"{init.repo} was just evicted from the store (CBD_STORE_MAX_BYTES); retry: the next "
                          "request makes it anew, the same bytes",
                     headers={"Retry-After": str(request.app.state.settings.retry_after_s)})
