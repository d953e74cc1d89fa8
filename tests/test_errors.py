"""Every exception of cbd.errors (and the service's own) has one HTTP status (app.errors.HTTP_STATUS)
and one exit code (cbd.cli.main.EXIT), each decided for it or a named ancestor, never by accident."""

from __future__ import annotations

import inspect

import pytest

import app.errors as app_errors
from app.errors import HTTP_STATUS, http_status, status_of
from cbd import errors
from cbd.cli.main import EXIT, exit_code
from cbd.errors import CBDError

LIBRARY = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, CBDError)]
SERVICE = [c for _, c in inspect.getmembers(app_errors, inspect.isclass)
           if issubclass(c, CBDError) and c.__module__ == "app.errors" and c is not app_errors.JobFailedError]

# what the service answered before the maps moved out of the classes (cbd 0.1 `status`), and the exit
# codes README states (a Hub error by its cause: 2 bad input or token, 3 not found, 5 unreachable)
WANT_HTTP = {"CBDError": 400, "ShapeError": 422, "UnknownNameError": 422, "ChainNotBuiltError": 409,
             "ChainIncompatibleError": 422, "IntegrityError": 500, "AssetUnavailableError": 503,
             "StorageFullError": 507, "StoreUnavailableError": 503, "RecipeError": 422, "HubError": 502, "InvalidPushError": 422,
             "InvalidRepoIdError": 422, "HubAuthError": 401, "HubPermissionError": 403, "HubNotFoundError": 404,
             "HubConflictError": 409, "HubUnavailableError": 503, "UnauthorizedError": 401,
             "InvalidHeaderError": 422, "NotFoundError": 404, "PushNotConfiguredError": 503,
             "QueueUnavailableError": 503, "JobCancelledError": 409, "ForbiddenError": 403,
             "NotCancellableError": 409, "TooManyRequestsError": 429, "QueueFullError": 503}
WANT_EXIT = {"CBDError": 1, "ShapeError": 2, "UnknownNameError": 3, "ChainNotBuiltError": 3,
             "ChainIncompatibleError": 2, "IntegrityError": 4, "AssetUnavailableError": 5, "StorageFullError": 1, "StoreUnavailableError": 5,
             "RecipeError": 2, "HubError": 5, "InvalidPushError": 2, "InvalidRepoIdError": 2, "HubAuthError": 2,
             "HubPermissionError": 2, "HubNotFoundError": 3, "HubConflictError": 1, "HubUnavailableError": 5,
             "FetchError": 1, "FetchRefusedError": 2, "FetchJobFailedError": 3, "FetchNotFoundError": 3,
             "FetchChecksumError": 4, "FetchUnavailableError": 5, "JobCancelledError": 3}


def _decided_by(cls: type, table: dict) -> type:
    return next(c for c in cls.__mro__ if c in table)


@pytest.mark.parametrize("cls", LIBRARY + SERVICE, ids=lambda c: c.__name__)
def test_every_error_has_a_status_and_the_library_ones_an_exit_code(cls):
    assert not hasattr(cls, "status"), "statuses live in app.errors.HTTP_STATUS"
    assert cls is CBDError or _decided_by(cls, HTTP_STATUS) is not CBDError
    assert http_status(cls) == status_of(cls.__name__)
    if cls.__name__ in WANT_HTTP:
        assert http_status(cls) == WANT_HTTP[cls.__name__]
    if cls in LIBRARY:
        assert cls is CBDError or _decided_by(cls, EXIT) is not CBDError
        assert exit_code(cls("x")) == WANT_EXIT[cls.__name__]


def test_every_library_error_is_in_cbd_errors():
    """No module of cbd defines an exception of its own (cbd.errors is the one place)."""
    import pkgutil
    from importlib import import_module

    import cbd

    skip = {"cbd.cli.__main__"}
    for mod in pkgutil.walk_packages(cbd.__path__, "cbd."):
        if mod.name in skip:
            continue
        m = import_module(mod.name)
        own = [c for _, c in inspect.getmembers(m, inspect.isclass)
               if issubclass(c, BaseException) and c.__module__ == mod.name]
        assert mod.name == "cbd.errors" or not own, (mod.name, own)


def test_job_statuses_by_name():
    assert status_of("HubAuthError") == 401 and status_of("ZeroDivisionError") == 500
    assert status_of("JobFailedError") == 500  # its status is per instance (the job's error)
