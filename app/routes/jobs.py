"""``GET /jobs/{id}``: status, progress, a clean error (type and message, no traceback), the result.

A chain build's ``chain-<name>`` waits (rq: deferred) for one job per anchor: meanwhile its progress
is theirs; once one of them has failed for good it reads as failed (``DependencyFailedError``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from redis import Redis
from rq.job import Job as RQJob
from rq.job import JobStatus

from app import schemas, views
from app.deps import RedisDep
from app.errors import NotFoundError
from cbd.core import artifacts
from worker import queue

router = APIRouter(tags=["jobs"])
Limit = Annotated[int, Query(ge=1, le=100, description="at most this many jobs")]
JobId = Annotated[str, Path(pattern=queue.JOB_ID_RE.pattern, description="from POST /initialize")]


@router.get("/jobs", response_model=schemas.JobList, response_model_exclude_none=True, responses={
    422: {"model": schemas.ValidationProblem, "description": "limit out of range"},
    503: {"model": schemas.ErrorBody, "description": "Redis unreachable"},
}, summary="Recent and running jobs")
async def list_jobs(redis: RedisDep, limit: Limit = 20) -> schemas.JobList:
    """The newest jobs Redis still holds (finished records expire after CBD_RESULT_TTL_S), newest first:
    queued, running and deferred ones with their progress, finished and failed ones. No secrets: ids, shapes,
    statuses."""
    jobs = await run_in_threadpool(queue.recent_jobs, redis, limit)
    return schemas.JobList(jobs=[views.job_summary(j) for j in jobs])


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
        view = views.job_view(job, base)
        return waiting_view(view, job) if view.rq_status == JobStatus.DEFERRED.value else view
    # A checkpoint outlives its job record (and one built by `cbd init` never had one).
    if artifacts.ID_RE.match(job_id) and (info := artifacts.load_artifact(job_id)) is not None:
        return views.artifact_view(info, base)
    raise NotFoundError(f"no job {job_id!r}")


def waiting_view(view: schemas.Job, job: RQJob) -> schemas.Job:
    """A job waiting for others (a chain build's anchor jobs): failed if one of them failed for good
    (rq leaves such a job deferred forever), else the progress of the build so far."""
    blocker = queue.blocked_by(job)
    if blocker is not None:
        return view.model_copy(update={"status": "failed", "error": _blocked_error(*blocker)})
    if view.progress is not None:
        return view
    ids = job.get_meta(refresh=False).get("jobs") or []
    for k, other in enumerate(queue.fetch_job(job.connection, i) for i in ids):
        if other is not None and other.get_status(refresh=False) != JobStatus.FINISHED:
            meta = other.get_meta(refresh=False)
            step = meta.get("progress") or {}
            fraction = (k + float(step.get("fraction", 0.0))) / len(ids)
            stage = f"job {k + 1}/{len(ids)} ({other.id}, anchor {meta.get('anchor', '-')}): {step.get('stage', 'waiting')}"
            return view.model_copy(update={"progress": {"stage": stage, "fraction": round(fraction, 4)}})
    return view


def _blocked_error(dep_id: str, dep: RQJob | None) -> schemas.JobError:
    what = f"job {dep_id}"
    if dep is not None and (anchor := dep.get_meta(refresh=False).get("anchor")):
        what += f" (anchor {anchor})"
    if dep is None:
        cause = "no longer exists (deleted, or its failure record expired)"
    else:
        err = views.job_error(dep)
        cause = f"ended as {dep.get_status(refresh=False).value}: {err.type}: {err.message}"
    message = (f"this job will not run: it waits for {what}, which {cause}. Submit the build again "
               "(POST /initialize or `cbd chain build NAME --queue`): it resumes from the anchors already built")
    return schemas.JobError(type="DependencyFailedError", message=message[:views.MAX_MESSAGE], status=500)
