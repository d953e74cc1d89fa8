"""Quotas and admission control for new work (``POST /initialize`` that needs a job).

Per caller (its API key by name, or its client address when keys are off): a rate limit
(``CBD_RATE_LIMIT``, a moving window kept in the service's Redis by the ``limits`` library, so
every API replica shares it) and a cap on its queued plus running jobs per queue
(``CBD_MAX_JOBS_FAST`` / ``_SLOW``): over either, 429 with ``Retry-After`` and a message naming the
limit. Per queue, admission control: deeper than ``CBD_QUEUE_BOUND_*``, new work gets 503 with
``Retry-After`` instead of waiting behind it. Cached answers and requests deduplicated onto a job
that is already queued add no work and are never refused.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, parse
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from redis import Redis
from rq.job import Job

from app.core.config import Settings
from app.errors import QueueFullError, TooManyRequestsError
from worker import queue

ACTIVE_PREFIX = "cbd:active:"  # + queue + ":" + caller: a set of the caller's job ids
ENDED = {b"finished", b"failed", b"stopped", b"canceled"}


class Quotas:
    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.settings = settings
        self.rate: RateLimitItem | None = parse(settings.rate_limit) if settings.rate_limit else None
        self.limiter = None
        if self.rate is not None:
            storage = RedisStorage("redis://", connection_pool=redis.connection_pool, key_prefix="cbd:limits")
            self.limiter = MovingWindowRateLimiter(storage)

    def cap(self, queue_name: str) -> int:
        return self.settings.max_jobs_slow if queue_name == queue.SLOW else self.settings.max_jobs_fast

    def bound(self, queue_name: str) -> int:
        return self.settings.queue_bound_slow if queue_name == queue.SLOW else self.settings.queue_bound_fast

    def describe(self) -> dict[str, object]:
        """The limits in force, for the OpenAPI document and /metrics."""
        return {"rate_limit": self.settings.rate_limit, "max_jobs_fast": self.settings.max_jobs_fast,
                "max_jobs_slow": self.settings.max_jobs_slow, "queue_bound_fast": self.settings.queue_bound_fast,
                "queue_bound_slow": self.settings.queue_bound_slow}

    def admit(self, redis: Redis, caller: str, queue_name: str) -> None:
        """Raise QueueFullError (503) or TooManyRequestsError (429) if ``caller`` may not add a job now."""
        depth = queue.get_queue(queue_name, redis).count
        if depth >= self.bound(queue_name):
            raise QueueFullError(
                f"the {queue_name} queue holds {depth} jobs, its bound (CBD_QUEUE_BOUND_{queue_name.upper()}="
                f"{self.bound(queue_name)}): new work is refused until it drains; retry later",
                retry_after_s=self.settings.retry_after_s, limit=f"queue_bound_{queue_name}")
        cap = self.cap(queue_name)
        if cap:
            active = self.active(redis, caller, queue_name)
            if active >= cap:
                raise TooManyRequestsError(
                    f"{caller} has {active} jobs queued or running on the {queue_name} queue, its cap "
                    f"(CBD_MAX_JOBS_{queue_name.upper()}={cap}): wait for one to finish, or cancel one "
                    "(DELETE /jobs/{id})", retry_after_s=self.settings.retry_after_s,
                    limit=f"max_jobs_{queue_name}")
        if self.limiter is not None and self.rate is not None and not self.limiter.hit(self.rate, caller):
            reset = self.limiter.get_window_stats(self.rate, caller).reset_time
            wait = max(1, math.ceil(reset - time.time()))
            raise TooManyRequestsError(
                f"{caller} is over its rate limit of {self.settings.rate_limit} requests that need a new job "
                f"(CBD_RATE_LIMIT); retry in {wait} s (cached checkpoints are always served)",
                retry_after_s=wait, limit="rate_limit")

    def track(self, redis: Redis, caller: str, queue_name: str, job_id: str) -> None:
        if self.cap(queue_name):
            key = f"{ACTIVE_PREFIX}{queue_name}:{caller}"
            redis.sadd(key, job_id)
            redis.expire(key, self.settings.limits.timeout(queue_name) * 2)

    def active(self, redis: Redis, caller: str, queue_name: str) -> int:
        """The caller's jobs on ``queue_name`` that are neither ended nor gone (ended ones are dropped)."""
        key = f"{ACTIVE_PREFIX}{queue_name}:{caller}"
        ids = [m.decode() for m in redis.smembers(key)]
        if not ids:
            return 0
        pipe = redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(Job.key_for(job_id), "status")
        ended = [i for i, status in zip(ids, pipe.execute(), strict=True) if status is None or status in ENDED]
        if ended:
            redis.srem(key, *ended)
        return len(ids) - len(ended)
