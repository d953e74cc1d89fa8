"""``POST /initialize``: resolve the chain, plan (torch-free), then serve, wait briefly or enqueue.

Chain resolution, documented in the OpenAPI description as well:
1. a request naming a chain gets that chain; if it is not built but its recipe ``<name>.toml``
   exists (in the packaged ``anchors/`` or a ``CBD_RECIPES`` folder), its build is enqueued on the
   slow queue (one job per anchor, each depending on the one before, then ``chain-<name>`` that
   publishes the manifest) and the answer is 202 pointing at ``chain-<name>``; otherwise 422
   listing the built chains and recipes;
2. a request naming none gets ``CBD_DEFAULT_CHAIN`` when built, else the first built chain (by
   name, with a warning: its checkpoints differ from the default chain's), else a build of the
   default chain's recipe (202), else 422.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from redis import Redis
from rq.job import Job as RQJob
from rq.job import JobStatus

from app import schemas, views
from app.core.config import Settings
from app.deps import Caller, CallerDep, HubTokenDep, RedisDep, SettingsDep, check_chain
from app.errors import (
    InvalidHeaderError,
    JobFailedError,
    PushNotConfiguredError,
    QueueFullError,
    TooManyRequestsError,
    is_hub_error,
    status_of,
)
from app.metrics import Metrics
from app.quotas import Quotas
from cbd.core import artifacts, chainstore, manifest
from cbd.core.catalog import list_tokenizers
from cbd.core.manifest import ChainManifest
from cbd.core.plan import make_plan
from cbd.core.recipe import load_recipe
from cbd.core.request import InitRequest
from cbd.errors import RecipeError, UnknownNameError
from worker import queue, store_budget, tokens

router = APIRouter(tags=["initialize"])
# What a job that failed while the request waited answers with (its error's status; else 500). The
# Hub's refusals are the caller's to fix (4xx: HUB_CODES, for Hub errors only), an unreachable or
# failing Hub is 503 / 502; any other job error past planning is the service's (500).
FAILURE_CODES = (409, 500, 502, 503, 507)
HUB_CODES = (401, 403, 404, 409, 422)
HUB_FAILURE = ("; the body's `cause` names the Hub's answer (`hub_status`, `hub_reason`) and never holds "
               "the token")
REMAKES = 2
DONE = {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}

RESPONSES: dict = {
    200: {"description": "the checkpoint exists: `files` lists its URLs, sizes and sha256s"},
    202: {"model": schemas.Job, "description": "queued (or a chain is being built): poll `Location`",
          "headers": {"Location": {"schema": {"type": "string"}, "description": "/jobs/{id}"},
                      "Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}},
    400: {"model": schemas.ValidationProblem, "description": "the body is not decodable JSON"},
    401: {"model": schemas.ErrorBody, "description": "X-API-Key missing or wrong (CBD_API_KEYS is set), or the Hub "
          "rejected the X-HF-Token of a push (`HubAuthError`, `WWW-Authenticate: Bearer`)" + HUB_FAILURE},
    403: {"model": schemas.JobFailure, "description": "the key is scoped to other chains (`ForbiddenError`); or the "
          "Hub refused the push with this token "
          "(`HubPermissionError`: no write access to the namespace, or a read-only token)" + HUB_FAILURE},
    404: {"model": schemas.JobFailure, "description": "the Hub says the repo or revision does not exist or "
          "is not visible to this token (`HubNotFoundError`)" + HUB_FAILURE},
    409: {"model": schemas.ErrorBody, "description": "the chain changed while the job waited: POST again; "
          "the push conflicted on the Hub (`HubConflictError`); or the job was cancelled while the request "
          "waited (`JobCancelledError`: POST again)"},
    413: {"model": schemas.ValidationProblem, "content": {"text/plain": {"schema": {"type": "string"}}},
          "description": "the body exceeds 64 KiB (app.main.MAX_BODY): text when Content-Length says so, "
                         "JSON when the bytes received do"},
    422: {"model": schemas.ValidationProblem, "description": "bad shape, unknown field, chain or tokenizer; "
          "or the Hub refused the push as malformed (`InvalidPushError`)"},
    429: {"model": schemas.ErrorBody, "description": "the caller (its API key, or its address when keys are off) "
          "is over its rate limit of requests that need a new job (CBD_RATE_LIMIT) or its cap of queued plus "
          "running jobs on the queue (CBD_MAX_JOBS_FAST / _SLOW); `limit` names which. Cached checkpoints and "
          "requests joining a queued job are never refused",
          "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}},
    500: {"model": schemas.JobFailure, "description": "the job failed while the request waited"},
    502: {"model": schemas.JobFailure, "description": "the Hub answered the push with an error of its own "
          "(5xx, `HubError`)" + HUB_FAILURE},
    503: {"model": schemas.ErrorBody, "description": "Redis or the object store (`StoreUnavailableError`) "
          "unreachable, push_to_hub not configured, the queue "
          "deeper than its bound (`QueueFullError`, CBD_QUEUE_BOUND_FAST / _SLOW: new work only), or the Hub "
          "unreachable or overloaded (`HubUnavailableError`: retry after `Retry-After`)" + HUB_FAILURE,
          "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
    507: {"model": schemas.ErrorBody, "description": "the artifact store is full"},
}


@dataclass
class Submitted:
    view: schemas.Job
    job: RQJob | None = None
    wait: bool = False
    warnings: list[str] = field(default_factory=list)
    cached: str | None = None  # the artifact id of an answer read from the store (app.answer_cache may keep it)


@router.post("/initialize", response_model=schemas.Job, response_model_exclude_none=True, responses=RESPONSES,
             summary="An initialisation for a target shape", description=__doc__)
async def initialize(body: InitRequest, request: Request, response: Response, settings: SettingsDep,
                     redis: RedisDep, token: HubTokenDep, caller: CallerDep) -> schemas.Job:
    if body.push_to_hub is not None:
        _check_push(token, settings)
    base = views.base_url(request)
    for _ in range(REMAKES + 1):
        sub = await run_in_threadpool(submit, body, token, settings, redis, base, request.app.state.metrics,
                                      caller.name, request.app.state.quotas, caller)
        view = sub.view
        if sub.job is not None and sub.wait and settings.sync_wait_s > 0 and view.status in ("queued", "started"):
            job = await wait_for(sub.job, settings)
            view = await run_in_threadpool(views.job_view, job, base, warnings=sub.warnings)
            if view.repo_id is None:
                view = view.model_copy(update={"repo_id": sub.view.repo_id, "repo_revision": sub.view.repo_revision})
        if not evicted(view, body):
            break
    if sub.cached is not None:
        request.state.cbd_answer = sub.cached  # app.answer_cache.STATE_KEY
    return answer(view, request, response, settings)


def evicted(view: schemas.Job, body: InitRequest) -> bool:
    """A finished init whose checkpoint the store budget evicted before this answer (a budget smaller than
    the work in flight): submitted again, it is made anew (``REMAKES`` times at most, then 202)."""
    return (view.status == "finished" and view.kind == "initialize" and view.files is None
            and body.push_to_hub is None and view.artifact_id is not None)


def answer(view: schemas.Job, request: Request, response: Response, settings: Settings) -> schemas.Job:
    if view.status == "finished" and not (view.kind == "initialize" and view.files is None and view.artifact_id):
        return view
    if view.status == "finished":  # made, then evicted before this answer: POSTed again it is made anew
        view = view.model_copy(update={"status": "queued", "message": (
            f"checkpoint {view.artifact_id} was evicted from the store (CBD_STORE_MAX_BYTES) right after it was "
            "made; POST the same request again: it is made anew, the same bytes")})
    if view.status in ("failed", "cancelled") and view.error is not None:
        status = view.error.status or status_of(view.error.type)
        allowed = FAILURE_CODES + HUB_CODES if is_hub_error(view.error.type) else FAILURE_CODES
        raise JobFailedError(view.id, view.error.model_dump(), status if status in allowed else 500)
    response.status_code = 202
    response.headers["Location"] = views.job_path(request, view.id)
    response.headers["Retry-After"] = str(settings.retry_after_s)
    return view


def submit(body: InitRequest, token: str | None, settings: Settings, redis: Redis, base: str,
           metrics: Metrics, owner: str | None = None, quotas: Quotas | None = None,
           caller: Caller | None = None) -> Submitted:
    """Everything blocking (disk, Redis) of one request, run in the threadpool; ``caller``'s chains checked."""
    if caller is not None and body.chain is not None:  # before the chain is looked up: nothing told about it
        check_chain(caller, body.chain, "this request")
    name, chain, warnings = resolve_chain(body.chain, settings)
    if caller is not None:
        check_chain(caller, name, "this request")
    if chain is None:
        build = queue.enqueue_build_chain(redis, name, anchors=recipe_anchors(name, settings), limits=settings.limits,
                                          owner=owner)
        job = build.job
        steps = f" (jobs {', '.join(build.job_ids)}: one per anchor, then the manifest)" if len(build.job_ids) > 1 else ""
        message = (f"chain {name!r} is not built yet; it is being built from its recipe by job {job.id}{steps}. "
                   "POST /initialize again when that job has finished.")
        return Submitted(views.job_view(job, base).model_copy(update={"message": message}), job)
    check_tokenizer(body.tokenizer, chain)
    plan = make_plan(body, chain, bridge_options=settings.bridge_options())
    warnings = [*warnings, *plan.warnings]
    info = artifacts.load_artifact(plan.id)
    metrics.cache(hit=info is not None)
    if info is not None and body.push_to_hub is None:
        store_budget.record_access(info.id)  # the budget evicts the least recently used
        return Submitted(views.artifact_view(info, base, chain=chain.name, warnings=warnings), cached=info.id)
    def stale(job: RQJob) -> bool:  # finished, yet its artifact is gone (deleted by an operator)
        return job.get_status(refresh=False) == JobStatus.FINISHED and artifacts.load_artifact(plan.id) is None

    push = body.push_to_hub.model_dump() if body.push_to_hub is not None else None
    queue_name = queue.queue_for(plan)
    current = queue.fetch_job(redis, plan.id) if push is None else None
    adds_work = current is None or current.get_status(refresh=False) in queue.DEAD or stale(current)
    if adds_work and quotas is not None:  # a request deduplicated onto a live job adds none
        try:
            quotas.admit(redis, owner or "anonymous", queue_name)
        except (TooManyRequestsError, QueueFullError) as exc:
            metrics.refused(exc.limit)
            raise
    token_ref = _stash(redis, token, settings) if push is not None else None

    job, created = queue.enqueue_initialize(redis, plan.model_dump(mode="json"), queue.queue_for(plan), push=push,
                                      token_ref=token_ref, limits=settings.limits, stale=stale, owner=owner)
    if created and quotas is not None:
        quotas.track(redis, owner or "anonymous", queue_name, job.id)
    view = views.job_view(job, base, warnings=warnings)
    if view.repo_id is None:
        view = view.model_copy(update=views.repo_fields(plan.model_dump(mode="json"), plan.id))
    return Submitted(view, job, wait=queue.queue_for(plan) == queue.FAST,
                     warnings=warnings)


async def wait_for(job: RQJob, settings: Settings) -> RQJob:
    """Poll the job's status until it ends or ``CBD_SYNC_WAIT_S`` passes, without holding a thread."""
    deadline = time.monotonic() + settings.sync_wait_s
    while time.monotonic() < deadline:
        fresh = await run_in_threadpool(queue.fetch_job, job.connection, job.id)
        if fresh is None:
            return job
        job = fresh
        if job.get_status(refresh=False) in DONE:
            break
        await asyncio.sleep(settings.poll_interval_s)
    return job


def resolve_chain(requested: str | None, settings: Settings) -> tuple[str, ChainManifest | None, list[str]]:
    """(name, manifest or None when it must be built first, warnings). See the module docstring."""
    built = chainstore.list_chains()
    if requested is not None:
        if requested in built:
            return requested, chainstore.load_manifest(requested), []
        if settings.recipe_exists(requested):
            return requested, None, []
        raise _no_chain(f"chain {requested!r} is not built and has no recipe", built, settings)
    name, warning = manifest.pick_default_chain(settings.default_chain, built)
    if name in built:
        return name, chainstore.load_manifest(name), [warning] if warning else []
    if settings.recipe_exists(name):
        return name, None, []
    raise _no_chain(f"no chain is built and the default chain {name!r} has no recipe", built, settings)


def _no_chain(what: str, built: list[str], settings: Settings) -> UnknownNameError:
    recipes = settings.recipes()
    hint = f"`cbd chain build {recipes[0]}`" if recipes else "`cbd chain build <recipe>`"
    return UnknownNameError(f"{what}; built chains: {built or 'none'}; build one with {hint}",
                            allowed={"chains": built, "recipes": recipes})


def recipe_anchors(name: str, settings: Settings) -> list[str] | None:
    """The recipe's anchors, a0 first; None when it cannot be read here (the build job then says why)."""
    try:
        path = settings.recipe_file(name)
        return load_recipe(path).anchor_names if path is not None else None
    except (RecipeError, OSError):
        return None


def check_tokenizer(name: str | None, chain: ChainManifest) -> None:
    if name is None or name == chain.tokenizer:
        return
    known = list_tokenizers()
    if name not in known:
        raise UnknownNameError(f"unknown tokenizer {name!r}; use the chain's ({chain.tokenizer!r}) or one of "
                               f"{known}", allowed=[chain.tokenizer, *known])


def _check_push(token: str | None, settings: Settings) -> None:
    if token is None:
        raise InvalidHeaderError("push_to_hub needs a Hugging Face token in the X-HF-Token header")
    if settings.secret_key is None:
        raise PushNotConfiguredError("push_to_hub is not configured on this service: set CBD_SECRET_KEY "
                                     "(the same value for the API and the workers)")


def _stash(redis: Redis, token: str | None, settings: Settings) -> str:
    key = settings.secret_key.get_secret_value() if settings.secret_key else ""
    return queue.stash_token(redis, lambda ref: tokens.seal(token or "", key, aad=ref),
                             ttl_s=settings.token_ttl_s)
