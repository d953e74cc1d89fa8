"""One place that turns exceptions into HTTP answers: the HTTP status of every error class.

Every ``cbd.errors.CBDError`` (and the service's own subclasses below) answers with its status in
``HTTP_STATUS`` (the nearest class of its MRO listed there) and ``.to_dict()``; Redis being
unreachable is 503 with ``Retry-After`` (never 500); a full disk is 507. pydantic's
``RequestValidationError`` keeps FastAPI's 422. The CLI's exit codes are ``cbd.cli.main.EXIT``.
"""

from __future__ import annotations

import errno
import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from cbd import errors as cbd_errors
from cbd.errors import CBDError

log = logging.getLogger("cbd.app")
MAX_ECHO_DEPTH = 12  # of a 422's echoed input
MAX_ECHO_CHARS = 2000


class UnauthorizedError(CBDError):
    """A POST without a valid ``X-API-Key`` while ``CBD_API_KEYS`` is set."""


class ForbiddenError(CBDError):
    """A valid key that may not do this (cancel another key's job)."""


class NotCancellableError(CBDError):
    """``DELETE /jobs/{id}`` of a job that has already ended."""


class _RetryLater:
    """What a refusal for now carries: the limit it hit and when to try again (mixed into a CBDError)."""

    def __init__(self, message: str, *, retry_after_s: int, limit: str) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit = limit

    def to_dict(self) -> dict:
        return super().to_dict() | {"limit": self.limit, "retry_after_s": self.retry_after_s}


class TooManyRequestsError(_RetryLater, CBDError):
    """A caller over its rate limit or its cap of queued plus running jobs (``app.quotas``)."""


class QueueFullError(_RetryLater, CBDError):
    """A queue deeper than its bound (``CBD_QUEUE_BOUND_*``): new work for it is refused for now."""


class InvalidHeaderError(CBDError):
    """A header that is present but malformed (its value is never echoed)."""


class NotFoundError(CBDError):
    """No such job, checkpoint or file."""


class PushNotConfiguredError(CBDError):
    """push_to_hub asked for, but the service has no CBD_SECRET_KEY to seal the token with."""


class QueueUnavailableError(CBDError):
    """Redis cannot be reached."""


class JobFailedError(CBDError):
    """The job behind a request failed; ``status`` (of this instance) follows the error the job raised."""

    def __init__(self, job_id: str, error: dict, status: int) -> None:
        super().__init__(f"job {job_id} failed: {error.get('type')}: {error.get('message')}")
        self.status = status
        self.job_id = job_id
        self.error = error

    def to_dict(self) -> dict:
        return {"error": "JobFailedError", "message": self.message, "job_id": self.job_id,
                "cause": {k: v for k, v in self.error.items() if v is not None}}

    @property
    def from_hub(self) -> bool:
        """The job failed because the Hub refused the push or could not be reached."""
        return is_hub_error(str(self.error.get("type")))


def is_hub_error(error_type: str) -> bool:
    """Whether a job's error (by class name) is a Hub's answer to a push (``cbd.errors.HubError``)."""
    cls = getattr(cbd_errors, error_type, None)
    return isinstance(cls, type) and issubclass(cls, cbd_errors.HubError)


HTTP_STATUS: dict[type[CBDError], int] = {
    CBDError: 400,
    cbd_errors.ShapeError: 422,
    cbd_errors.UnknownNameError: 422,
    cbd_errors.RecipeError: 422,
    cbd_errors.ChainIncompatibleError: 422,
    cbd_errors.ChainNotBuiltError: 409,
    cbd_errors.IntegrityError: 500,
    cbd_errors.AssetUnavailableError: 503,
    cbd_errors.StoreUnavailableError: 503,
    cbd_errors.StorageFullError: 507,
    cbd_errors.HubError: 502,
    cbd_errors.InvalidPushError: 422,  # and InvalidRepoIdError
    cbd_errors.HubAuthError: 401,
    cbd_errors.HubPermissionError: 403,
    cbd_errors.HubNotFoundError: 404,
    cbd_errors.HubConflictError: 409,
    cbd_errors.HubUnavailableError: 503,
    cbd_errors.JobCancelledError: 409,
    cbd_errors.FetchError: 502,  # raised by the client of another cbd service only, never here
    UnauthorizedError: 401,
    TooManyRequestsError: 429,
    QueueFullError: 503,
    ForbiddenError: 403,
    NotCancellableError: 409,
    InvalidHeaderError: 422,
    NotFoundError: 404,
    PushNotConfiguredError: 503,
    QueueUnavailableError: 503,
}


def http_status(exc: CBDError | type[CBDError]) -> int:
    """The HTTP status of an error (or error class): the nearest class of its MRO in HTTP_STATUS."""
    if isinstance(exc, JobFailedError):
        return exc.status
    cls = exc if isinstance(exc, type) else type(exc)
    return next(HTTP_STATUS[c] for c in cls.__mro__ if c in HTTP_STATUS)


def status_of(error_type: str, default: int = 500) -> int:
    """The HTTP status of a cbd error class, by name (jobs report errors as names)."""
    cls = getattr(cbd_errors, error_type, None)
    if isinstance(cls, type) and issubclass(cls, CBDError):
        return http_status(cls)
    for sub in _subclasses(CBDError):
        if sub.__name__ == error_type and sub is not JobFailedError:
            return http_status(sub)
    return default


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def _retry_after(request: Request) -> str:
    return str(request.app.state.settings.retry_after_s)


async def cbd_error(request: Request, exc: CBDError) -> JSONResponse:
    status = http_status(exc)
    headers = {"Retry-After": _retry_after(request)} if status == 503 else None
    if isinstance(exc, TooManyRequestsError | QueueFullError):
        headers = {"Retry-After": str(exc.retry_after_s)}
    if status == 401:  # the Hub refused the X-HF-Token (a push), or this service the X-API-Key
        hub = isinstance(exc, JobFailedError) and exc.from_hub
        headers = {"WWW-Authenticate": 'Bearer realm="Hugging Face Hub", header="X-HF-Token"' if hub
                   else 'ApiKey header="X-API-Key"'}
    return JSONResponse(exc.to_dict(), status_code=status, headers=headers)


async def redis_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis unavailable: %s", type(exc).__name__)
    body = QueueUnavailableError("the job queue (Redis) is unreachable; retry later").to_dict()
    return JSONResponse(body, status_code=503, headers={"Retry-After": _retry_after(request)})


async def os_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        body = cbd_errors.StorageFullError("the artifact store is full; free space and retry").to_dict()
        return JSONResponse(body, status_code=507)
    log.exception("unexpected OSError", exc_info=exc)
    return JSONResponse({"error": "InternalError", "message": "internal error"}, status_code=500)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own 422 body, except that echoed inputs UTF-8 JSON cannot carry (NaN and
    Infinity, which Python's json parses; lone surrogates such as "\\ud800") are made printable
    instead of failing the response with a 500."""
    return JSONResponse({"detail": _json_safe(exc.errors())}, status_code=422)


def _json_safe(value: object, depth: int = 0) -> object:
    """JSON-encodable, printable and bounded: deep inputs (``[[[[...]]]]``) would otherwise
    exhaust the recursion limit of the encoder, long strings are cut."""
    if depth > MAX_ECHO_DEPTH:
        return "..."
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        text = value if len(value) <= MAX_ECHO_CHARS else value[:MAX_ECHO_CHARS] + "..."
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {str(_json_safe(str(k), depth + 1)): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, depth + 1) for v in value]
    return _json_safe(str(value), depth + 1)  # exceptions in ``ctx``, Decimals, ...


def install(app: FastAPI) -> None:
    app.add_exception_handler(CBDError, cbd_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(RedisError, redis_error)
    app.add_exception_handler(OSError, os_error)
