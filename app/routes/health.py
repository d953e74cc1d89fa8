"""``GET /healthz``: 200 when Redis answers and the store (a folder, or an S3 bucket) is writable, else 503
with the reason in ``store`` / ``redis``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from redis import Redis
from redis.exceptions import RedisError
from rq import Worker

from app import schemas
from app.deps import RedisDep, SettingsDep
from cbd.core import chainstore, objstore, paths
from cbd.errors import CBDError
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
    try:
        chains = chainstore.list_chains() if store == "ok" else []
    except CBDError as exc:  # the store went away between the probe and the listing
        chains, store = [], f"unreachable ({exc.message})"[:500]
    ok = redis_state == "ok" and store == "ok"
    return schemas.Health(status="ok" if ok else "unavailable", redis=redis_state, store=store,
                          chains=chains, workers=workers, queues=depths)


def store_state() -> str:
    """"ok", or why the store is not usable: with a folder, a probe file written, fsynced and removed in
    the artifacts folder (one name per call: concurrent probes sharing a name removed each other's file
    and reported a healthy store unwritable); with a bucket, a probe object written, read and removed."""
    store = objstore.get_store()
    if store.remote:
        return store.probe()
    return objstore.LocalStore(paths.artifacts_dir()).probe()
