"""``GET /healthz``: 200 when Redis answers and the artifact store is writable, else 503."""

from __future__ import annotations

import os
import tempfile

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from redis import Redis
from redis.exceptions import RedisError
from rq import Worker

from app import schemas
from app.deps import RedisDep, SettingsDep
from cbd.core import manifest, paths
from worker import queue

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=schemas.Health,
            responses={503: {"model": schemas.Health, "description": "Redis or the store is not usable",
                             "headers": {"Retry-After": {"schema": {"type": "integer"}}}}})
async def healthz(redis: RedisDep, settings: SettingsDep) -> JSONResponse:
    health = await run_in_threadpool(check, redis)
    if health.status == "ok":
        return JSONResponse(health.model_dump(mode="json"))
    return JSONResponse(health.model_dump(mode="json"), status_code=503,
                        headers={"Retry-After": str(settings.retry_after_s)})


def check(redis: Redis) -> schemas.Health:
    workers = depths = None
    try:
        redis.ping()
        workers, depths, redis_state = Worker.count(connection=redis), queue.queue_depths(redis), "ok"
    except RedisError as exc:
        redis_state = f"unreachable ({type(exc).__name__})"
    store = store_state()
    ok = redis_state == "ok" and store == "ok"
    return schemas.Health(status="ok" if ok else "unavailable", redis=redis_state, store=store,
                          chains=manifest.list_chains(), workers=workers, queues=depths)


def store_state() -> str:
    """Write, fsync and remove a probe file in the artifact store (one name per call: concurrent
    probes sharing a name removed each other's file and reported a healthy store unwritable)."""
    root = paths.artifacts_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".healthz-", dir=root)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        return f"not writable ({exc.strerror or type(exc).__name__})"
    return "ok"
