"""``GET /jobs/{id}``: status, progress, a clean error (type and message, no traceback), the result."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.concurrency import run_in_threadpool
from redis import Redis

from app import schemas, views
from app.deps import RedisDep
from app.errors import NotFoundError
from cbd import artifacts
from worker import queue

router = APIRouter(tags=["jobs"])
JobId = Annotated[str, Path(pattern=queue.JOB_ID_RE.pattern, description="from POST /initialize")]


@router.get("/jobs/{job_id}", response_model=schemas.Job, response_model_exclude_none=True, responses={
    404: {"model": schemas.ErrorBody, "description": "no such job (finished records expire after CBD_RESULT_TTL_S)"},
    422: {"model": schemas.ValidationProblem, "description": "not a job id"},
    500: schemas.CORRUPT,
    503: {"model": schemas.ErrorBody, "description": "Redis unreachable"},
})
async def get_job(job_id: JobId, request: Request, redis: RedisDep) -> schemas.Job:
    return await run_in_threadpool(_view, redis, job_id, views.base_url(request))


def _view(redis: Redis, job_id: str, base: str) -> schemas.Job:
    job = queue.fetch_job(redis, job_id)
    if job is not None:
        return views.job_view(job, base)
    # A checkpoint outlives its job record (and one built by `cbd init` never had one).
    if artifacts.ID_RE.match(job_id) and (info := artifacts.load_artifact(job_id)) is not None:
        return views.artifact_view(info, base)
    raise NotFoundError(f"no job {job_id!r}")
