"""The queue contract between the API and the workers. Torch-free: the web process imports it.

Two queues: ``fast`` (interpolation, seconds) and ``slow`` (chain builds and bridge
distillation, minutes to hours). Jobs are enqueued by dotted path with JSON-only arguments and
the JSON serializer (pickle would run code from whoever can write to Redis). The job id of an
initialisation is the plan id, so ``unique=True`` turns identical concurrent requests into one
job (rq's atomic Lua check). A chain build is one job per anchor, each depending on the one
before, then ``chain-<name>`` that publishes the manifest (rq refuses ``unique`` with
dependencies, so a Redis lock makes concurrent submissions one build). This is the one module
that knows Redis key names.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from redis import Redis
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from cbd.core.plan import Plan

FAST, SLOW = "fast", "slow"
QUEUES = (FAST, SLOW)
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
INITIALIZE = "worker.jobs.initialize"
BUILD_CHAIN = "worker.jobs.build_chain"
BUILD_ANCHOR = "worker.jobs.build_anchor"
RETRIES = 2
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # rq's own rule for custom job ids
TOKEN_PREFIX = "cbd:token:"
DURATION_PREFIX = "cbd:metrics:job:"
LOCK_PREFIX = "cbd:lock:"
CANCEL_PREFIX = "cbd:cancel:"  # + job id: set by DELETE /jobs/{id}, read by the job at its progress points
DURATION_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, math.inf)
# A job in one of these states will not produce anything: a new identical request replaces it.
DEAD = frozenset({JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED})


# The environment variables of the limits; the API's Settings and the workers read the same ones.
LIMITS_ENV = {"fast_timeout_s": "CBD_FAST_TIMEOUT_S", "slow_timeout_s": "CBD_SLOW_TIMEOUT_S",
              "result_ttl_s": "CBD_RESULT_TTL_S"}
ORPHAN_MARGIN_S = 600


@dataclass(frozen=True)
class Limits:
    """Per-queue job timeouts and how long rq keeps job records (artifacts live on disk): the one
    definition of each (``app.core.config.Settings`` takes its defaults from here)."""

    fast_timeout_s: int = 900
    slow_timeout_s: int = 6 * 3600
    result_ttl_s: int = 7 * 86400
    failure_ttl_s: int = 86400

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Limits:
        """The limits ``LIMITS_ENV`` sets, the defaults for the rest (a worker has no Settings)."""
        env = os.environ if env is None else env
        return cls(**{k: int(env[v]) for k, v in LIMITS_ENV.items() if env.get(v)})

    def timeout(self, queue: str) -> int:
        return self.slow_timeout_s if queue == SLOW else self.fast_timeout_s

    @property
    def orphan_age_s(self) -> int:
        """How old a staging folder of another host must be before it counts as abandoned
        (``cbd.core.artifacts.cleanup_orphans``): longer than the longest job may run, plus ten minutes."""
        return max(self.fast_timeout_s, self.slow_timeout_s) + ORPHAN_MARGIN_S


def queue_for(plan: Plan) -> str:
    """Interpolation is fast; bridge distillation is slow and goes to its own queue."""
    return SLOW if plan.bridge else FAST


def redis_url(url: str | None = None) -> str:
    return url or os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL


def connect(url: str | None = None, *, blocking: bool = False) -> Redis:
    """A client for the API (short socket timeout) or a worker (``blocking``: rq sets its own)."""
    timeout = None if blocking else 5.0
    return Redis.from_url(redis_url(url), socket_connect_timeout=2.0, socket_timeout=timeout,
                          health_check_interval=30)


def get_queue(name: str, connection: Redis) -> Queue:
    if name not in QUEUES:
        raise ValueError(f"unknown queue {name!r}; queues are {', '.join(QUEUES)}")
    return Queue(name, connection=connection, serializer=JSONSerializer)


def fetch_job(connection: Redis, job_id: str) -> Job | None:
    if not JOB_ID_RE.match(job_id):
        return None
    try:
        return Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    except NoSuchJobError:
        return None


# ---- job ids -------------------------------------------------------------------------------------
def chain_job_id(name: str) -> str:
    """``chain-<name>``; rq ids allow no '.', so such names get a hash suffix to stay distinct."""
    if "." not in name:
        return f"chain-{name}"
    return f"chain-{name.replace('.', '_')}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def anchor_job_id(name: str, anchor: str) -> str:
    """``chain-<name>-<anchor>-<hash>``: one anchor's build job (the hash keeps '-' in names unambiguous)."""
    digest = hashlib.sha256(f"{name}/{anchor}".encode()).hexdigest()[:8]
    return f"chain-{name.replace('.', '_')}-{anchor.replace('.', '_')}-{digest}"


def push_job_id(plan_id: str) -> str:
    """Pushes are per request (each has its own token and target): a fresh id every time."""
    return f"{plan_id}-push-{secrets.token_hex(6)}"


# ---- enqueue -------------------------------------------------------------------------------------
def enqueue_initialize(connection: Redis, plan: dict, queue: str, *, push: dict | None = None,
                       token_ref: str | None = None, limits: Limits = Limits(),
                       stale: Callable[[Job], bool] | None = None, owner: str | None = None) -> tuple[Job, bool]:
    """Enqueue ``worker.jobs.initialize``; returns ``(job, created)``.

    Without a push the job id is the plan id and identical requests share one job; an existing
    job for which ``stale(job)`` holds (failed, cancelled, or finished but its artifact is gone) is
    replaced. ``owner`` (a key's non-secret name) is who may cancel the job, besides operators.
    """
    meta = {"kind": "initialize", "artifact_id": plan["id"], "chain": plan["chain"], "owner": owner}
    kwargs = {"plan": plan, "push": push, "token_ref": token_ref}
    if push is not None:
        meta["push_repo"] = push["repo_id"]
        job = _enqueue(connection, queue, INITIALIZE, push_job_id(plan["id"]), kwargs, meta, limits,
                       unique=False)
        return job, True
    return _enqueue_unique(connection, queue, INITIALIZE, plan["id"], kwargs, meta, limits, stale)


class ChainBuild(NamedTuple):
    """``(job, created)``; ``job`` is ``chain-<name>``, the last job of the build (it writes the manifest)."""

    job: Job
    created: bool

    @property
    def job_ids(self) -> list[str]:
        """Every job of the build in run order: one per anchor, then ``chain-<name>``."""
        return list(self.job.get_meta(refresh=False).get("jobs") or [self.job.id])


def enqueue_build_chain(connection: Redis, name: str, *, anchors: list[str] | None = None,
                        limits: Limits = Limits(), owner: str | None = None) -> ChainBuild:
    """Enqueue the build of chain ``name`` on the slow queue: one job per anchor, then the manifest.

    ``anchors`` (the recipe's, ``a0`` first, ``Recipe.anchor_names``): job k builds anchor k and
    depends on job k-1; ``chain-<name>`` depends on the last and publishes the manifest. Without
    them (a recipe the caller cannot read) ``chain-<name>`` alone builds the whole chain, or
    reports why it cannot. A live build of the same chain is returned instead (``created``
    False); a dead one (failed, or waiting on a failed anchor job: see ``blocked_by``) or a
    finished one is replaced, and the new jobs resume from the anchors already on disk.
    """
    final_id = chain_job_id(name)
    ids = [anchor_job_id(name, a) for a in anchors or []]
    with connection.lock(LOCK_PREFIX + final_id, timeout=60, blocking_timeout=20):
        current = fetch_job(connection, final_id)
        if current is not None and not _replaceable(current):
            return ChainBuild(current, False)
        before = current.get_meta(refresh=False).get("jobs", []) if current is not None else []
        for job_id in dict.fromkeys([*before, *ids, final_id]):  # the old build's records, if any
            if (old := fetch_job(connection, job_id)) is not None:
                delete_job(old)
        previous = None
        for anchor, job_id in zip(anchors or [], ids, strict=True):
            meta = {"kind": "build_chain", "chain": name, "anchor": anchor, "owner": owner}
            previous = _enqueue(connection, SLOW, BUILD_ANCHOR, job_id, {"name": name, "anchor": anchor}, meta,
                                limits, unique=False, depends_on=previous)
        meta = {"kind": "build_chain", "chain": name, "jobs": [*ids, final_id], "owner": owner}
        job = _enqueue(connection, SLOW, BUILD_CHAIN, final_id, {"name": name}, meta, limits, unique=False,
                       depends_on=previous)
    return ChainBuild(job, True)


def _replaceable(job: Job) -> bool:
    status = job.get_status(refresh=False)
    return status in DEAD or status == JobStatus.FINISHED or blocked_by(job) is not None


def blocked_by(job: Job) -> tuple[str, Job | None] | None:
    """``(id, job or None)`` of the dead job a deferred ``job`` waits for, directly or through
    other deferred jobs; None when it can still run.

    rq 3 leaves the dependents of a job that failed for good (or was stopped or canceled)
    deferred, with no expiry: they never run. A dependency whose record is gone (deleted, or
    expired after ``failure_ttl_s``) blocks as well; it is returned as ``(id, None)``.
    """
    seen: set[str] = set()
    while job.get_status(refresh=False) == JobStatus.DEFERRED and job.id not in seen:
        seen.add(job.id)
        waiting = None
        for dep_id in job.dependency_ids:
            dep = fetch_job(job.connection, dep_id)
            if dep is None or dep.get_status(refresh=False) in DEAD:
                return dep_id, dep
            if dep.get_status(refresh=False) == JobStatus.DEFERRED:
                waiting = dep
        if waiting is None:
            return None
        job = waiting
    return None


def _enqueue_unique(connection: Redis, queue: str, func: str, job_id: str, kwargs: dict, meta: dict,
                    limits: Limits, stale: Callable[[Job], bool] | None) -> tuple[Job, bool]:
    for _ in range(3):
        try:
            return _enqueue(connection, queue, func, job_id, kwargs, meta, limits, unique=True), True
        except DuplicateJobError:
            job = fetch_job(connection, job_id)
            if job is None:  # expired between the check and the fetch: try again
                continue
            if job.get_status(refresh=False) not in DEAD and not (stale and stale(job)):
                return job, False
            delete_job(job)
    job = fetch_job(connection, job_id)
    if job is None:
        raise RuntimeError(f"could not enqueue job {job_id}: it keeps appearing and vanishing")
    return job, False


def delete_job(job: Job) -> None:
    """``job.delete()``, also for a job whose worker was killed.

    rq 3.0 keeps an execution's id in the job's execution registry 60 s longer than the
    execution's own hash lives; ``Job.delete`` then raises ValueError ("Execution ... not found
    in Redis") for about a minute after a killed worker's job was abandoned. The stale ids
    point at nothing, so the registry is dropped and the delete tried again.
    """
    try:
        job.delete()
    except ValueError:
        job.connection.delete(job.execution_registry.key)
        job.delete()


def _enqueue(connection: Redis, queue: str, func: str, job_id: str, kwargs: dict, meta: dict,
             limits: Limits, *, unique: bool, depends_on: Job | None = None) -> Job:
    if not unique:  # a unique enqueue clears the flag once it has created the job (below)
        connection.delete(CANCEL_PREFIX + job_id)  # a new job under a cancelled one's id runs
    job = get_queue(queue, connection).enqueue(
        func, kwargs=kwargs, job_id=job_id, unique=unique, retry=Retry(max=RETRIES),
        job_timeout=limits.timeout(queue), result_ttl=limits.result_ttl_s,
        failure_ttl=limits.failure_ttl_s, meta=meta, description=f"{func.rsplit('.', 1)[-1]} {job_id}",
        depends_on=depends_on)
    if unique:
        connection.delete(CANCEL_PREFIX + job_id)
    return job


# ---- cancellation --------------------------------------------------------------------------------
WAITING = frozenset({JobStatus.CREATED, JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED,
                     JobStatus.READY_TO_ENQUEUE, JobStatus.RATE_LIMITED})


def request_cancel(job: Job, by: str, *, limits: Limits = Limits()) -> str:
    """Cancel ``job`` on behalf of ``by``: a waiting job at once (rq ``Job.cancel``: it never runs),
    a running one at its next progress point (a flag the job reads: ``cancel_requested``; rq's own
    stop command cannot interrupt a ``SimpleWorker``). Returns ``"cancelled"`` or ``"stopping"``.
    """
    # For a waiting job; a running one's worker rewrites its meta, and records this itself when it stops.
    job.meta["cancelled"] = {"by": by, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    job.save_meta()
    # First the flag, so a job dequeued between the status read and the cancel still stops.
    job.connection.set(CANCEL_PREFIX + job.id, by, ex=limits.timeout(job.origin or FAST) + 60)
    if job.get_status(refresh=True) in WAITING:
        try:
            job.cancel()
            return "cancelled"
        except Exception:  # started meanwhile (or cancelled by another caller): the flag stops it
            pass
    return "stopping"


def cancel_requested(connection: Redis, job_id: str) -> str | None:
    """Who cancelled job ``job_id`` while it was running, or None."""
    value = connection.get(CANCEL_PREFIX + job_id)
    return value.decode() if value is not None else None


# ---- sealed Hub tokens ---------------------------------------------------------------------------
def stash_token(connection: Redis, seal: Callable[[str], str], *, ttl_s: int) -> str:
    """Store a sealed token under a fresh key with a TTL; return the key name (the job's arg).

    ``seal(key_name)`` returns the ciphertext bound to that key name (see worker.tokens).
    """
    ref = TOKEN_PREFIX + secrets.token_hex(16)
    connection.set(ref, seal(ref), ex=ttl_s)
    return ref


def read_token(connection: Redis, ref: str) -> str | None:
    if not ref.startswith(TOKEN_PREFIX):
        return None
    value = connection.get(ref)
    return value.decode() if value is not None else None


def drop_token(connection: Redis, ref: str) -> None:
    if ref.startswith(TOKEN_PREFIX):
        connection.delete(ref)


# ---- metrics kept in Redis (workers write, the API exposes) ---------------------------------------
def record_job(connection: Redis, func: str, seconds: float, *, ok: bool) -> None:
    """Cumulative histogram buckets, sum and count per job function, plus outcome counts."""
    key = DURATION_PREFIX + func
    pipe = connection.pipeline(transaction=False)
    for bound in DURATION_BUCKETS:
        if seconds <= bound:
            pipe.hincrby(key, f"le:{bound}", 1)
    pipe.hincrbyfloat(key, "sum", seconds)
    pipe.hincrby(key, "count", 1)
    pipe.hincrby(key, "ok" if ok else "failed", 1)
    pipe.execute()


def read_jobs_metrics(connection: Redis) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key in connection.scan_iter(match=DURATION_PREFIX + "*", count=100):
        name = key.decode()[len(DURATION_PREFIX):]
        out[name] = {k.decode(): float(v) for k, v in connection.hgetall(key).items()}
    return out


def queue_depths(connection: Redis) -> dict[str, dict[str, int]]:
    """Per queue: jobs waiting and jobs running."""
    out = {}
    for name in QUEUES:
        q = get_queue(name, connection)
        out[name] = {"queued": q.count, "started": q.started_job_registry.count}
    return out


def recent_jobs(connection: Redis, limit: int) -> list[Job]:
    """Up to ``limit`` jobs of every queue (waiting, running, deferred, finished, failed), newest first.
    Read only: the registries are not cleaned up here (the workers do that)."""
    ids: list[str] = []
    for name in QUEUES:
        q = get_queue(name, connection)
        ids += q.get_job_ids(0, limit)
        for registry in (q.started_job_registry, q.deferred_job_registry, q.finished_job_registry,
                         q.failed_job_registry):
            ids += registry.get_job_ids(0, limit - 1, desc=True, cleanup=False)
    unique = [i for i in dict.fromkeys(ids) if JOB_ID_RE.match(i)]
    jobs = [j for j in Job.fetch_many(unique, connection=connection, serializer=JSONSerializer) if j is not None]
    jobs.sort(key=lambda j: j.enqueued_at or j.created_at, reverse=True)
    return jobs[:limit]
