"""Thin RQ jobs: importable, JSON arguments and results, progress in ``job.meta``.

torch is imported inside the jobs (via ``cbd.run`` / ``cbd.chain``), never at module import,
so the API can enqueue these by dotted path without loading them. Failures leave a clean
``job.meta["error"] = {"type", "message"}`` (no traceback) for ``GET /jobs/{id}``, then re-raise
so rq records the failure and retries (``Retry(max=2)``; the outputs are content-addressed and
published atomically, so a retry is harmless).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rq import get_current_job
from rq.job import Job

from cbd.errors import (
    ChainIncompatibleError,
    ChainNotBuiltError,
    HubError,
    HubUnavailableError,
    JobCancelledError,
    RecipeError,
    ShapeError,
    StorageFullError,
    StoreUnavailableError,
    UnknownNameError,
)
from worker import queue, store_budget, tokens

PROGRESS_EVERY_S = 0.25
# Failures that are the caller's or the Hub's, not the service's: the worker logs one line for them
# (worker.main.HeartbeatWorker.handle_exception), no traceback.
EXPECTED: tuple[type[Exception], ...] = (HubError, StorageFullError, ShapeError, UnknownNameError, RecipeError,
                                         ChainIncompatibleError, ChainNotBuiltError, JobCancelledError,
                                         StoreUnavailableError)


def expected(exc: BaseException | None) -> bool:
    return isinstance(exc, EXPECTED)


def retryable(exc: BaseException) -> bool:
    """Whether a second try could end otherwise: not when the Hub refused (a 4xx: wrong or refused
    token, no such repo, a conflict) or the push is malformed. An unreachable or failing (5xx) Hub,
    a worker that cannot open the token (another may have the key) and every other failure is
    retried (``Retry(max=2)``)."""
    if isinstance(exc, JobCancelledError):
        return False
    if isinstance(exc, HubUnavailableError):
        return True
    if type(exc) is HubError:  # the Hub's 5xx, or this worker cannot open the token (another might)
        return exc.hub_status is None or exc.hub_status >= 500
    return not isinstance(exc, HubError)


TRANSPORT_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "h2", "hpack", "urllib3")


def initialize(plan: dict, push: dict | None = None, token_ref: str | None = None) -> dict:
    """Run a plan (``cbd.core.plan.Plan`` as JSON); then push the artifact when ``push`` is given."""
    from cbd.core.plan import Plan
    from cbd.run import run_plan

    with _tracked("initialize") as job, contextlib.ExitStack() as stack:
        store_budget.before_write()  # CBD_STORE_MAX_BYTES / _MIN_FREE_BYTES: room for this one
        if push is not None:  # never evicted between its publish and the end of its push
            stack.enter_context(store_budget.hold(plan["id"]))
        info = run_plan(Plan.model_validate(plan), progress=_reporter(job))
        store_budget.after_publish(info.id)
        out = {"artifact_id": info.id, "alpha": info.alpha,
               "files": {n: f.model_dump() for n, f in info.files.items()}}
        if push is not None:
            out["push"] = _push(job, info.id, push, token_ref)
        return out


def build_chain(name: str) -> dict:
    """Build the chain of recipe ``name`` and publish its manifest (the slow queue). The recipe is found
    by name as ``cbd.core.recipe.load_recipe`` finds it: ``<name>.toml`` in the packaged ``anchors/``,
    then in the ``CBD_RECIPES`` folders.

    Queued after one ``build_anchor`` job per anchor (``worker.queue.enqueue_build_chain``), it
    finds every anchor finished, verifies them and writes the manifest; alone, it builds them all.
    """
    from cbd.chain.build import build_chain as build

    with _tracked("build_chain") as job:
        manifest = build(name, progress=_reporter(job))
        from cbd.core import chainstore, objstore

        if objstore.is_remote():  # other hosts' workers and the API read chains from the bucket
            chainstore.push_chain(name)
        return {"chain": manifest.name, "anchors": [a.name for a in manifest.anchors],
                "manifest_sha256": manifest.sha256}


def build_anchor(name: str, anchor: str) -> dict:
    """Build one anchor of chain ``name`` from its parent on disk; returns at once if it is finished."""
    from cbd.chain.build import build_anchor as build

    with _tracked("build_anchor") as job:
        entry = build(name, anchor, progress=_reporter(job))
        return {"chain": name, "anchor": entry.name, "parent": entry.parent, "sha256": entry.sha256,
                "heldout_loss": entry.metrics.get("heldout_loss"), "wall_s": entry.metrics.get("wall_s")}


def _push(job: Job | None, artifact_id: str, push: dict, token_ref: str | None) -> dict:
    from cbd.core import artifacts
    from cbd.store import hub

    token = _open_token(job, token_ref)
    _save_progress(job, {"stage": "push", "fraction": 0.0})
    try:
        with _quiet_transport():
            result = hub.push_folder(artifacts.local_copy(artifact_id), push["repo_id"], token=token,
                                     private=bool(push.get("private", False)),
                                     revision=push.get("revision") or "main")
    except HubError as exc:
        _drop_token_if_last_try(job, token_ref, final=not retryable(exc))
        raise
    except Exception as exc:  # anything else leaves as a HubError with the token masked
        _drop_token_if_last_try(job, token_ref)
        raise HubError(hub.scrub(f"{type(exc).__name__}: {exc}", token)) from None
    if job is not None and token_ref:
        queue.drop_token(job.connection, token_ref)
    return dataclasses.asdict(result)


@contextmanager
def _quiet_transport() -> Iterator[None]:
    """No DEBUG records from the HTTP libraries while a Hub token is in use: their traces print raw
    request and response headers, and a server may echo the Authorization header back (a test
    Hub that does showed the token in the worker's log with CBD_LOG_LEVEL=DEBUG)."""
    loggers = [logging.getLogger(name) for name in TRANSPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.INFO))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _open_token(job: Job | None, token_ref: str | None) -> str:
    if job is None or not token_ref:
        raise HubError("push_to_hub needs a Hub token (header X-HF-Token); none came with this job")
    sealed = queue.read_token(job.connection, token_ref)
    if sealed is None:
        raise HubError("the Hub token of this job expired before the push ran (CBD_TOKEN_TTL_S); "
                       "POST /initialize again with X-HF-Token")
    key = tokens.secret_key_from_env()
    if key is None:
        raise HubError("this worker has no CBD_SECRET_KEY (at least 16 characters), so it cannot "
                       "open Hub tokens; give the workers the API's CBD_SECRET_KEY")
    try:
        return tokens.unseal(sealed, key, aad=token_ref)
    except tokens.SealError:
        raise HubError("the Hub token could not be opened: the worker's CBD_SECRET_KEY differs "
                       "from the API's") from None


def _drop_token_if_last_try(job: Job | None, token_ref: str | None, *, final: bool = False) -> None:
    if job is not None and token_ref and (final or not job.retries_left):
        queue.drop_token(job.connection, token_ref)


@contextmanager
def _tracked(func: str) -> Iterator[Job | None]:
    """Clear a previous try's error, time the job, leave a clean error and metrics behind."""
    job = get_current_job()
    if job is not None:
        job.meta.pop("error", None)
        _save_progress(job, {"stage": "start", "fraction": 0.0})
    start = time.monotonic()
    try:
        _check_cancelled(job)  # cancelled between its dequeue and now
        yield job
    except Exception as exc:
        exc = _storage_full(exc) or exc
        if job is not None:
            job.meta["error"] = error_record(exc)  # status: the API's
            if not retryable(exc):
                job.retries_left = 0  # rq reads it right after this raise: failed now, not retried
            job.save_meta()
            queue.record_job(job.connection, func, time.monotonic() - start, ok=False)
        raise exc from None
    if job is not None:
        _save_progress(job, {"stage": "done", "fraction": 1.0})
        queue.record_job(job.connection, func, time.monotonic() - start, ok=True)


def _storage_full(exc: Exception) -> StorageFullError | None:
    """ENOSPC (OSError, or safetensors' SafetensorError that only says so in words) -> 507."""
    if isinstance(exc, StorageFullError):
        return None
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left" in str(exc):
        return StorageFullError("the artifact store is full; free space under CBD_ARTIFACTS and retry")
    return None


def error_record(exc: Exception) -> dict:
    """``{"type", "message"}`` plus, for a Hub error, what the Hub answered (``hub_status``,
    ``hub_reason``): JSON scalars for ``job.meta["error"]``, never the token."""
    out: dict = {"type": type(exc).__name__, "message": _message(exc)}
    for name in ("hub_status", "hub_reason"):
        if getattr(exc, name, None) is not None:
            out[name] = getattr(exc, name)
    return out


def _message(exc: Exception) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


def _reporter(job: Job | None) -> Callable[[dict], None]:
    """A progress callback writing at most every PROGRESS_EVERY_S (the last event always wins
    once the job ends with ``stage: done``)."""
    last = 0.0

    def report(event: dict) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S:
            last = now
            _check_cancelled(job)
            _save_progress(job, event)

    return report


def _check_cancelled(job: Job | None) -> None:
    """A progress point: raise ``JobCancelledError`` when ``DELETE /jobs/{id}`` asked this job to stop.
    The runners publish atomically and remove their staging folder on any exception, so a stopped
    job leaves nothing behind (a chain build keeps its resumable training state)."""
    if job is None:
        return
    by = queue.cancel_requested(job.connection, job.id)
    if by is not None:
        job.meta["cancelled"] = {"by": by, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # saved by _tracked
        raise JobCancelledError(f"job {job.id} was cancelled by {by} and stopped at a progress point; "
                                "nothing was published. POST the same request again to start it anew")


def _save_progress(job: Job | None, event: dict) -> None:
    """``job.meta["progress"]``, e.g. {"stage": "interpolate", "fraction": 0.4}: JSON scalars only."""
    if job is None:
        return
    job.meta["progress"] = {k: v for k, v in event.items() if isinstance(v, str | int | float | bool)}
    job.save_meta()
