"""The worker loop: one long-lived process per device running rq's ``SimpleWorker``.

``SimpleWorker`` runs jobs in its own process instead of forking a work-horse per job. That is
what torch needs: a child forked from a parent that has used torch's thread pool hangs in
torch ops, and CUDA cannot be used in a forked child at all (CUDA's own rule: no CUDA context survives a fork). It also
keeps imported modules and cached anchors warm across jobs. Timeouts still apply (SIGALRM in
the main thread, delivered when control returns to Python).

A worker that is killed outright (SIGKILL, OOM) leaves its job ``started``. rq re-queues such a
job (or fails it with ``AbandonedJobError`` when no retry is left) once its entry in the started
registry expires, at the next maintenance pass. rq's forking ``Worker`` refreshes that entry every
``job_monitoring_interval`` (30 s) with a TTL of interval + 60 s; its ``SimpleWorker`` sends no
heartbeat while a job runs and sets the TTL to the job timeout + 60 s (16 minutes on the fast
queue, over 6 hours on the slow one). :class:`HeartbeatWorker` adds the missing heartbeat thread,
so a dead worker's job is taken back after ``CBD_ABANDON_AFTER_S`` (default 90 s, as with rq's
forking worker) plus at most one maintenance interval (the same length).

    python -m worker.main --queues fast,slow --redis-url redis://localhost:6379/0
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence

from redis import Redis
from redis.exceptions import RedisError
from rq import SimpleWorker
from rq.exceptions import StopRequested
from rq.executions import Execution
from rq.job import Job
from rq.job_lifecycle import call_exception_handlers
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from cbd.core import artifacts
from cbd.errors import JobCancelledError, StoreUnavailableError
from worker import jobs, queue

log = logging.getLogger("cbd.worker")
ABANDON_AFTER_S = 90  # rq's forking worker: job_monitoring_interval 30 s + 60 s


class HeartbeatWorker(SimpleWorker):
    """``SimpleWorker`` plus a thread that keeps the running job's heartbeat alive.

    The started-registry TTL is ``abandon_after_s`` and the heartbeat comes every third of it, so
    two missed beats are tolerated; maintenance (which re-queues abandoned jobs) runs as often,
    and the blocking dequeue wakes up in time for it.
    """

    def __init__(self, *args, abandon_after_s: int = ABANDON_AFTER_S, **kwargs) -> None:
        kwargs.setdefault("job_monitoring_interval", max(1, abandon_after_s // 3))
        kwargs.setdefault("maintenance_interval", abandon_after_s)
        kwargs.setdefault("worker_ttl", abandon_after_s + 15)  # rq dequeues for worker_ttl - 15 s
        super().__init__(*args, **kwargs)
        self.abandon_after_s = abandon_after_s
        self.stop_requested = False  # set by SIGINT/SIGTERM; else work() ended on an error

    def request_stop(self, signum, frame) -> None:
        self.stop_requested = True
        super().request_stop(signum, frame)

    def handle_exception(self, job: Job, *exc_info) -> None:
        """One log line for an expected failure (the caller's or the Hub's: a refused token, an
        unreachable Hub, a shape the chain cannot serve), rq's traceback for anything else."""
        exc = exc_info[1] if len(exc_info) > 1 else None
        if not jobs.expected(exc):
            return super().handle_exception(job, *exc_info)
        if isinstance(exc, JobCancelledError):
            self._stopped_job_id = job.id  # rq: STOPPED (not failed), never retried
        self.log.warning("job %s failed: %s: %s", job.id, type(exc).__name__, jobs.error_record(exc)["message"])
        call_exception_handlers(self._exc_handlers, job, *exc_info)  # rq's, without its traceback log
        return None

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.abandon_after_s

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, stop), name="rq-heartbeat", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: Job, execution: Execution, stop: threading.Event) -> None:
        while not stop.wait(self.job_monitoring_interval):
            try:
                self.maintain_heartbeats(job, execution)
            except Exception as exc:  # Redis away for a moment: the next beat tries again
                log.warning("heartbeat for job %s failed: %s", job.id, type(exc).__name__)


def abandon_after_s() -> int:
    return int(os.environ.get("CBD_ABANDON_AFTER_S") or ABANDON_AFTER_S)


def run_worker(queues: Sequence[str] = queue.QUEUES, redis_url: str | None = None,
               burst: bool = False) -> bool:
    """Serve ``queues`` in priority order until stopped (or, with ``burst``, until they are empty).

    Returns whether any job ran. Orphaned staging folders of killed workers are removed first.
    rq's work loop quits when Redis goes away at the wrong moment (mid-job, or while it records
    its own death); this loop then waits for Redis and starts a fresh worker, so a Redis restart
    never leaves the queues without workers. A job that was running meanwhile is re-queued by the
    abandoned-job check (``CBD_ABANDON_AFTER_S``).
    """
    for name in queues:
        queue.get_queue(name, queue.connect(redis_url))  # validates the names early
    removed = artifacts.cleanup_orphans(older_than_s=queue.Limits.from_env().orphan_age_s)
    if removed:
        log.info("removed %d orphaned staging folders", len(removed))
    try:  # objects of ids whose upload never finished (a worker killed mid-upload), past the orphan age
        gone = artifacts.cleanup_remote_orphans(older_than_s=queue.Limits.from_env().orphan_age_s)
        if gone:
            log.info("removed the objects of %d unpublished artifacts from the store", len(gone))
    except StoreUnavailableError as exc:
        log.warning("orphan cleanup skipped: %s", exc.message)
    worked = False
    for generation in itertools.count():
        connection = queue.connect(redis_url, blocking=True)
        worker = HeartbeatWorker([queue.get_queue(name, connection) for name in queues], connection=connection,
                                 serializer=JSONSerializer, abandon_after_s=abandon_after_s(),
                                 name=f"cbd-{socket.gethostname()}-{os.getpid()}-{generation}")
        try:
            worked |= worker.work(burst=burst, logging_level=os.environ.get("CBD_LOG_LEVEL", "INFO"))
        except RedisError as exc:
            log.warning("worker stopped: Redis unreachable (%s)", type(exc).__name__)
        if burst or worker.stop_requested:
            return worked
        _release(worker)
        try:
            _wait_for_redis(connection, worker)
        except StopRequested:
            return worked
        if worker.stop_requested:
            return worked
        log.warning("Redis answers again: starting a new worker")
    raise AssertionError("unreachable")


def _release(worker: HeartbeatWorker) -> None:
    """What rq's teardown skips when Redis fails under it: stop the pubsub thread (it would retry
    forever), close the connections."""
    if worker.pubsub_thread is not None:
        worker.pubsub_thread.stop()  # ends within its 60 s poll; a daemon thread meanwhile
    with contextlib.suppress(Exception):
        worker.pubsub.close()
    worker.connection.close()


def _wait_for_redis(connection: Redis, worker: HeartbeatWorker, max_wait_s: float = 30.0) -> None:
    """Ping with exponential backoff until Redis answers (or a stop is requested)."""
    wait = 0.5
    while not worker.stop_requested:
        try:
            connection.ping()
            return
        except RedisError:
            time.sleep(wait)
            wait = min(2 * wait, max_wait_s)


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
