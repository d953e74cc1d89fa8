"""The worker loop: one long-lived process per device running rq's ``SimpleWorker``.

``SimpleWorker`` runs jobs in its own process instead of forking a work-horse per job. That is
what torch needs: a child forked from a parent that has used torch's thread pool hangs in
torch ops, and CUDA cannot be used in a forked child at all (../shared/SERVICE.md). It also
keeps imported modules and cached anchors warm across jobs. Timeouts still apply (SIGALRM in
the main thread, delivered when control returns to Python).

    python -m worker.main --queues fast,slow --redis-url redis://localhost:6379/0
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections.abc import Sequence

from rq import SimpleWorker
from rq.serializers import JSONSerializer

from cbd import artifacts
from worker import queue

log = logging.getLogger("cbd.worker")


def run_worker(queues: Sequence[str] = queue.QUEUES, redis_url: str | None = None,
               burst: bool = False) -> bool:
    """Serve ``queues`` in priority order until stopped (or, with ``burst``, until they are empty).

    Returns whether any job ran. Orphaned staging folders of killed workers are removed first.
    """
    for name in queues:
        queue.get_queue(name, queue.connect(redis_url))  # validates the names early
    removed = artifacts.cleanup_orphans()
    if removed:
        log.info("removed %d orphaned staging folders", len(removed))
    connection = queue.connect(redis_url, blocking=True)
    worker = SimpleWorker([queue.get_queue(name, connection) for name in queues], connection=connection,
                          serializer=JSONSerializer, name=f"cbd-{socket.gethostname()}-{os.getpid()}")
    return worker.work(burst=burst, logging_level=os.environ.get("CBD_LOG_LEVEL", "INFO"))


def parse_queues(text: str) -> list[str]:
    names = [q.strip() for q in text.split(",") if q.strip()]
    for name in names:
        if name not in queue.QUEUES:
            raise ValueError(f"unknown queue {name!r}; queues are {','.join(queue.QUEUES)}")
    return names or list(queue.QUEUES)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.main", description=__doc__.splitlines()[0])
    parser.add_argument("--queues", default=",".join(queue.QUEUES), help="comma-separated, in priority order")
    parser.add_argument("--redis-url", default=None, help="default: $REDIS_URL")
    parser.add_argument("--burst", action="store_true", help="exit once the queues are empty")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("CBD_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_worker(parse_queues(args.queues), args.redis_url, burst=args.burst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
