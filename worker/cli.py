"""``cbd serve``, ``cbd worker`` and ``cbd chain build --queue``: the service side of the command line.

The library's CLI (``cbd.cli.main``) finds these through entry points (``cbd.commands`` and
``cbd.queue`` in pyproject.toml), so ``cbd`` itself imports neither the web nor the queue.

    cbd serve                       # embedded Redis + 1 worker + API on 127.0.0.1:8000
    cbd serve --redis-url redis://redis:6379/0 --workers 2
    cbd worker --queues fast,slow   # one long-lived worker (REDIS_URL from the environment)
"""

from __future__ import annotations

import json
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    from worker.store_cli import store_app

    app.command("serve")(serve)
    app.command("worker")(worker)
    app.add_typer(store_app, name="store")


def serve(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    redis_url: Annotated[str | None, typer.Option(help="external Redis; default $REDIS_URL, else embedded")] = None,
    workers: Annotated[int, typer.Option(min=1, help="worker processes (each serves fast, then slow)")] = 1,
    limit_concurrency: Annotated[int, typer.Option(help="requests in flight before the API answers 503")] = 64,
) -> None:
    """Run the service: Redis (embedded unless given), workers and the HTTP API."""
    from worker.serve import serve as run

    raise typer.Exit(run(host=host, port=port, redis_url=redis_url, workers=workers,
                         limit_concurrency=limit_concurrency))


def worker(
    queues: Annotated[str, typer.Option(help="comma-separated queues, in priority order")] = "fast,slow",
    redis_url: Annotated[str | None, typer.Option(help="default $REDIS_URL")] = None,
    burst: Annotated[bool, typer.Option(help="exit once the queues are empty")] = False,
) -> None:
    """Run one worker (rq SimpleWorker: no fork, anchors stay loaded between jobs)."""
    import logging
    import os

    from cbd.core.threads import thread_env
    from worker.main import parse_queues, run_worker

    os.environ.update(thread_env())  # before a job imports torch: CBD_TORCH_PROCESSES workers share the CPUs

    logging.basicConfig(level=os.environ.get("CBD_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        names = parse_queues(queues)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--queues") from None
    run_worker(names, redis_url, burst=burst)


def enqueue_chain(r, redis_url: str | None) -> None:
    """Print the job ids (JSON, run order) of the queued build; exit 5 when Redis is unreachable."""
    from redis.exceptions import RedisError
    from rich.console import Console

    from worker import queue

    console = Console(stderr=True)
    try:
        build = queue.enqueue_build_chain(queue.connect(redis_url), r.name, anchors=r.anchor_names)
    except RedisError as exc:
        console.print(f"[red]error:[/] Redis at {queue.redis_url(redis_url)} is unreachable: {exc}")
        raise typer.Exit(5) from None
    state = "queued" if build.created else "already queued or running"
    console.print(f"chain {r.name}: {state}; follow job {build.job.id} (GET /jobs/{build.job.id})")
    print(json.dumps({"chain": r.name, "created": build.created, "job": build.job.id, "jobs": build.job_ids}))
