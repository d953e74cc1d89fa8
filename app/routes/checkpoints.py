"""``GET|HEAD /checkpoints/{id}/{file}``: immutable files, streamed, with a strong ETag.

Starlette's FileResponse does HEAD, Range (206, multipart, 416) and If-Range; the ETag is the
file's sha256 from ``artifact.json`` (so If-Range and If-None-Match compare content, not mtime)
and If-None-Match -> 304 is added here. Content-addressed, so cacheable forever.
"""

from __future__ import annotations

import mimetypes
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from app import schemas
from app.deps import ReaderDep, check_chain
from app.errors import NotFoundError
from app.files import OpenedFileResponse
from cbd.core import artifacts
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
    416: {"description": "Range not satisfiable"},
    422: {"model": schemas.ValidationProblem, "description": "invalid id or file name"},
    500: schemas.CORRUPT,
}


@router.get("/checkpoints/{artifact_id}/{name}", response_class=FileResponse, responses=RESPONSES,
            operation_id="get_checkpoint_file")
@router.head("/checkpoints/{artifact_id}/{name}", response_class=FileResponse, responses=RESPONSES,
             operation_id="head_checkpoint_file")
async def get_file(artifact_id: ArtifactId, name: FileName, request: Request, caller: ReaderDep) -> Response:
    artifacts.check_file_name(name)  # rejects '..' inside names the pattern lets through
    info = await run_in_threadpool(artifacts.load_artifact, artifact_id)
    if info is not None or caller.key_id is None:  # anonymous where reads need a key: 401, existing or not
        check_chain(caller, info.plan.get("chain") if info else None, f"checkpoint {artifact_id}")
    if info is None or name not in info.files:
        raise NotFoundError(f"checkpoint {artifact_id} has no file {name!r}" if info else missing(artifact_id))
    etag = f'"{info.files[name].sha256}"'
    headers = {"ETag": etag, "Cache-Control": CACHE}
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    media = mimetypes.guess_type(name)[0] or "application/octet-stream"
    try:  # opened here: an eviction from now on cannot cut this download short (app/files.py)
        return await run_in_threadpool(open_file, artifact_id, name, media_type=media, headers=headers)
    except FileNotFoundError:
        raise NotFoundError(missing(artifact_id)) from None


def open_file(artifact_id: str, name: str, **kwargs) -> OpenedFileResponse:
    """The file, opened; its checkpoint marked as used (the store budget evicts the least recently used)."""
    response = OpenedFileResponse.open(artifacts.artifact_dir(artifact_id) / name, **kwargs)
    store_budget.record_access(artifact_id)
    return response


def missing(artifact_id: str) -> str:
    return (f"no checkpoint {artifact_id} (if it existed, it was evicted from the store under "
            "CBD_STORE_MAX_BYTES: POST /initialize the same request again and it is made anew, the same bytes)")


def _matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 13.1.2: weak comparison, a list of tags or '*'."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags
