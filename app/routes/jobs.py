"""``GET /jobs/{id}``: status, progress, a clean error (type and message, no traceback), the result.
``DELETE /jobs/{id}``: cancel a queued job, or stop a running one at its next progress point.

A chain build's ``chain-<name>`` waits (rq: deferred) for one job per anchor: meanwhile its progress
is theirs; once one of them has failed for good it reads as failed (``DependencyFailedError``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from redis import Redis
from rq.job import Job as RQJob
from rq.job import JobStatus

from app import schemas, views
from app.deps import Caller, CallerDep, ReaderDep, RedisDep, SettingsDep, check_chain, require_some_chain
from app.errors import ForbiddenError, NotCancellableError, NotFoundError
from cbd.core import artifacts
from worker import queue

router = APIRouter(tags=["jobs"])
Limit = Annotated[int, Query(ge=1, le=100, description="at most this many jobs")]
JobId = Annotated[str, Path(pattern=queue.JOB_ID_RE.pattern, description="from POST /initialize")]


@router.get("/jobs", response_model=schemas.JobList, response_model_exclude_none=True, responses={
    401: {"model": schemas.ErrorBody, "description": "no key, and reads need one (CBD_READ_KEYS_REQUIRED), or a wrong key"},
    422: {"model": schemas.ValidationProblem, "description": "limit out of range"},
    503: {"model": schemas.ErrorBody, "description": "Redis unreachable"},
}, summary="Recent and running jobs")
async def list_jobs(redis: RedisDep, caller: ReaderDep, limit: Limit = 20) -> schemas.JobList:
    """The newest jobs Redis still holds (finished records expire after CBD_RESULT_TTL_S), newest first:
    queued, running and deferred ones with their progress, finished and failed ones. No secrets: ids, shapes,
    statuses. A key scoped to chains sees their jobs only."""
    require_some_chain(caller, "the job list")
    jobs = await run_in_threadpool(queue.recent_jobs, redis, limit)
    return schemas.JobList(jobs=[views.job_summary(j) for j in jobs
                                 if caller.chains is None or j.get_meta(refresh=False).get("chain") in caller.chains])


@router.get("/jobs/{job_id}", response_model=schemas.Job, response_model_exclude_none=True, responses={
    401: {"model": schemas.ErrorBody, "description": "no key, and reads need one (CBD_READ_KEYS_REQUIRED), or a wrong key"},
    403: {"model": schemas.ErrorBody, "description": "the key is scoped to other chains"},
    404: {"model": schemas.ErrorBody, "description": "no such job (finished records expire after CBD_RESULT_TTL_S)"},
    422: {"model": schemas.ValidationProblem, "description": "not a job id"},
    500: schemas.CORRUPT,
    503: {"model": schemas.ErrorBody, "description": "Redis unreachable"},
})
async def get_job(job_id: JobId, request: Request, redis: RedisDep, caller: ReaderDep) -> schemas.Job:
    return await run_in_threadpool(_view, redis, job_id, views.base_url(request), caller)


def _view(redis: Redis, job_id: str, base: str, caller: Caller | None = None) -> schemas.Job:
    job = queue.fetch_job(redis, job_id)
    if caller is not None:
        chain = job.get_meta(refresh=False).get("chain") if job is not None else None
        if job is None and artifacts.ID_RE.match(job_id) and (info := artifacts.load_artifact(job_id)):
            chain = info.plan.get("chain")
        if chain is not None or caller.key_id is None:
            check_chain(caller, chain, f"job {job_id}")
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


CANCEL_DOC = """Cancel a job: a queued one never runs (200, `status: cancelled`); a running one (a bridge,
a chain build's anchor) stops at its next progress point, within about a second of training
(202, `status: started`, then `cancelled` on `GET`): nothing is published and its staging
folder is removed. Identical requests that were deduplicated onto the job see `cancelled` with
`cancelled_by`; anyone may POST the same request again, which starts a new job. A chain build
(`chain-<name>`) is cancelled with all its anchor jobs. Only the key that created the job, or an
operator key (`CBD_OPERATOR_KEYS`), may cancel it (403 otherwise); when the service has no keys,
anyone may. A job that ends before its next progress point keeps its result."""


@router.delete("/jobs/{job_id}", response_model=schemas.Job, response_model_exclude_none=True,
               summary="Cancel a job", description=CANCEL_DOC, responses={
    202: {"model": schemas.Job, "description": "running: it stops at its next progress point; poll Location",
          "headers": {"Location": {"schema": {"type": "string"}}}},
    401: {"model": schemas.ErrorBody, "description": "X-API-Key missing or wrong (CBD_API_KEYS is set)"},
    403: {"model": schemas.ErrorBody, "description": "another key created this job (and this is no operator key)"},
    404: {"model": schemas.ErrorBody, "description": "no such job"},
    409: {"model": schemas.ErrorBody, "description": "the job has already ended (finished, failed or cancelled)"},
    422: {"model": schemas.ValidationProblem, "description": "not a job id"},
    503: {"model": schemas.ErrorBody, "description": "Redis unreachable",
          "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
})
async def cancel_job(job_id: JobId, request: Request, response: Response, redis: RedisDep, settings: SettingsDep,
                     caller: CallerDep) -> schemas.Job:
    view = await run_in_threadpool(_cancel, redis, job_id, caller, settings, views.base_url(request))
    if view.status not in ("cancelled",):
        response.status_code = 202
        response.headers["Location"] = views.job_path(request, job_id)
    return view


def _cancel(redis: Redis, job_id: str, caller: Caller, settings, base: str) -> schemas.Job:
    job = queue.fetch_job(redis, job_id)
    if job is None:
        raise NotFoundError(f"no job {job_id!r}")
    check_chain(caller, job.get_meta(refresh=False).get("chain"), f"job {job_id}")
    owner = job.get_meta(refresh=False).get("owner")
    if owner is not None and owner != caller.name and not caller.operator:
        raise ForbiddenError(f"job {job_id} was created by another key ({owner}); only that key or an operator "
                             "key (CBD_OPERATOR_KEYS) may cancel it")
    if job.get_status(refresh=False) not in queue.WAITING | {JobStatus.STARTED}:
        raise NotCancellableError(f"job {job_id} has already ended ({job.get_status(refresh=False).value}); "
                                  "there is nothing to cancel")
    ids = job.get_meta(refresh=False).get("jobs") or []  # a chain build: its anchor jobs too
    for other in (queue.fetch_job(redis, i) for i in ids if i != job_id):
        if other is not None and other.get_status(refresh=False) in queue.WAITING | {JobStatus.STARTED}:
            queue.request_cancel(other, caller.name, limits=settings.limits)
    queue.request_cancel(job, caller.name, limits=settings.limits)
    return views.job_view(queue.fetch_job(redis, job_id) or job, base)
