"""``GET|HEAD /checkpoints/{id}/{file}``: immutable files, streamed, with a strong ETag.

The ETag is the file's sha256 from ``artifact.json`` (so If-Range and If-None-Match compare content,
not mtime) and If-None-Match -> 304 is answered here. Content-addressed, so cacheable forever.
From a folder store, Starlette's FileResponse does HEAD, Range (206, multipart, 416) and If-Range;
from an S3 bucket (``serve_file``) the file is streamed by ranged GETs (one range: 206; several: the
whole file, 200, as RFC 9110 allows; 416 past the end; If-Range), or with ``CBD_STORE_REDIRECT=1``
the answer is a redirect to a presigned URL of the object (the bucket then answers the Range).
"""

from __future__ import annotations

import mimetypes
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse

from app import schemas
from app.deps import ReaderDep, check_chain
from app.errors import NotFoundError
from app.files import OpenedFileResponse
from cbd.core import artifacts, objstore
from worker import store_budget

router = APIRouter(tags=["checkpoints"])
CACHE = "public, max-age=31536000, immutable"
ArtifactId = Annotated[str, Path(pattern=artifacts.ID_RE.pattern, description="32 hex characters")]
FileName = Annotated[str, Path(pattern=artifacts.FILE_RE.pattern, description="e.g. model.safetensors")]
BINARY = {"schema": {"type": "string", "format": "binary"}}


RESPONSES: dict = {
    200: {"content": {"application/octet-stream": BINARY}, "description": "the file"},
    206: {"content": {"application/octet-stream": BINARY}, "description": "the requested Range"},
    304: {"description": "If-None-Match matched the ETag"},
    401: {"model": schemas.ErrorBody, "description": "no key, and reads need one (CBD_READ_KEYS_REQUIRED), or a wrong key"},
    403: {"model": schemas.ErrorBody, "description": "the key is scoped to other chains"},
    404: {"model": schemas.ErrorBody, "description": "no such checkpoint or file"},
    307: {"description": "with CBD_STORE_REDIRECT=1 (an S3 store): a presigned URL of the object in "
                         "`Location`; the ETag and Cache-Control headers are this answer's"},
    416: {"description": "Range not satisfiable"},
    503: {"model": schemas.ErrorBody, "description": "the object store is unreachable (`StoreUnavailableError`)",
          "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
    422: {"model": schemas.ValidationProblem, "description": "invalid id or file name"},
    500: schemas.CORRUPT,
}


@router.get("/checkpoints/{artifact_id}/{name}", response_class=FileResponse, responses=RESPONSES,
            operation_id="get_checkpoint_file")
@router.head("/checkpoints/{artifact_id}/{name}", response_class=FileResponse, responses=RESPONSES,
             operation_id="head_checkpoint_file")
async def get_file(artifact_id: ArtifactId, name: FileName, request: Request, caller: ReaderDep) -> Response:
    artifacts.check_file_name(name)  # rejects '..' inside names the pattern lets through
    # From a folder store the index is parsed once and then only its identity is read (a stat), and the file
    # is opened here: microseconds, cheaper on the event loop than two trips through the threadpool.
    local = not objstore.is_remote()
    info = artifacts.load_artifact(artifact_id) if local else await run_in_threadpool(artifacts.load_artifact,
                                                                                      artifact_id)
    if info is not None or caller.key_id is None:  # anonymous where reads need a key: 401, existing or not
        check_chain(caller, info.plan.get("chain") if info else None, f"checkpoint {artifact_id}")
    if info is None or name not in info.files:
        raise NotFoundError(f"checkpoint {artifact_id} has no file {name!r}" if info else missing(artifact_id))
    etag = f'"{info.files[name].sha256}"'
    headers = {"ETag": etag, "Cache-Control": CACHE}
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    media = mimetypes.guess_type(name)[0] or "application/octet-stream"
    try:
        return await serve_file(request, artifact_id, name, info.files[name].size, etag, headers, media)
    except FileNotFoundError:
        raise NotFoundError(missing(artifact_id)) from None


async def serve_file(request: Request, aid: str, name: str, size: int, etag: str, headers: dict, media: str, *,
                     filename: str | None = None, redirect_status: int = 307) -> Response:
    """The file's bytes from wherever the store keeps them (see the module docstring). A local
    file is opened here: an eviction from now on cannot cut the download short (app/files.py);
    FileNotFoundError when it is gone already."""
    path = artifacts.file_path(aid, name)
    if path is not None:
        response = OpenedFileResponse.open(path, media_type=media, headers=headers, filename=filename,
                                           content_disposition_type="inline")
        store_budget.record_access(aid)
        return response
    if filename is not None:
        headers = headers | {"Content-Disposition": f'inline; filename="{filename}"'}
    settings = request.app.state.settings
    if settings.store_redirect:
        url = await run_in_threadpool(artifacts.presign, aid, name, settings.presign_expires_s)
        return Response(status_code=redirect_status, headers=headers | {"Location": url})
    start, end, status = 0, size, 200
    headers = headers | {"Accept-Ranges": "bytes"}
    wanted = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if wanted and (if_range is None or if_range.strip() == etag):
        parsed = parse_range(wanted, size)
        if parsed == "unsatisfiable":
            return Response(status_code=416, headers=headers | {"Content-Range": f"bytes */{size}"})
        if parsed is not None:
            start, end, status = parsed[0], parsed[1], 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=media)
    body = await run_in_threadpool(artifacts.open_file, aid, name, start, end)  # 503 here, not mid-body
    return StreamingResponse(body, status_code=status, headers=headers, media_type=media)


def parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """``bytes=a-b`` / ``a-`` / ``-n`` -> (start, end exclusive); "unsatisfiable"; None for anything
    else (several ranges, another unit, bad syntax): then the whole file is sent."""
    unit, _, spec = value.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()) or (first and not first.isdigit()) or \
            (last and not last.isdigit()):
        return None
    if not first:  # the last n bytes
        n = int(last)
        if n == 0:
            return "unsatisfiable"
        return max(0, size - n), size
    start = int(first)
    end = min(size, int(last) + 1) if last else size
    if start >= size:
        return "unsatisfiable"
    if last and int(last) < start:
        return None
    return start, end


def missing(artifact_id: str) -> str:
    return (f"no checkpoint {artifact_id} (if it existed, it was evicted from the store under "
            "CBD_STORE_MAX_BYTES: POST /initialize the same request again and it is made anew, the same bytes)")


def _matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 13.1.2: weak comparison, a list of tags or '*'."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags
