"""One flat module of precisely named exceptions (the rq / huggingface_hub style): every exception
the library raises is defined here.

Every error carries the offending values and a remedy. What an error *means* to a caller lives
with the caller, one map each: the service's HTTP status (``app.errors.HTTP_STATUS``) and the
CLI's exit code (``cbd.cli.main.EXIT``); tests/test_errors.py checks that both cover every class.
"""

from __future__ import annotations


class CBDError(Exception):
    """Base class."""

    def __init__(self, message: str, *, allowed: object | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.allowed = allowed

    def to_dict(self) -> dict:
        out: dict = {"error": type(self).__name__, "message": self.message}
        if self.allowed is not None:
            out["allowed"] = self.allowed
        return out


class ShapeError(CBDError, ValueError):
    """A model shape that is impossible (sizes do not divide) or out of the configured bounds."""


class UnknownNameError(CBDError, KeyError):
    """A chain, tokenizer, recipe, mode or file name that does not exist."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class ChainNotBuiltError(CBDError):
    """The chain exists as a recipe but has no built anchors yet."""


class ChainIncompatibleError(CBDError):
    """The target cannot be served from this chain (other family, head dim, vocabulary)."""


class IntegrityError(CBDError):
    """A stored file is corrupt, truncated, tampered with or not what its manifest says."""


class AssetUnavailableError(CBDError):
    """A model, tokenizer or corpus package cannot be fetched or read."""


class StorageFullError(CBDError):
    """The artifact store ran out of space while writing."""


class StoreUnavailableError(CBDError):
    """The object store (``CBD_STORE_URL``) cannot be reached, or refuses this service's credentials.

    Messages name the store by its URL and endpoint, never by its credentials."""


class RecipeError(CBDError, ValueError):
    """A chain recipe that does not validate."""


class JobCancelledError(CBDError):
    """The job was cancelled (``DELETE /jobs/{id}``) and stopped at its next progress point."""


# ---- the Hugging Face Hub (cbd.store.hub): one class per remedy; messages never contain the token ----
class HubError(CBDError):
    """A push to the Hugging Face Hub failed; the message never contains the token.

    ``hub_status`` is the HTTP status the Hub answered (None when it could not be reached) and
    ``hub_reason`` the Hub's own words for it (its ``X-Error-Message`` or JSON ``error``), scrubbed.
    """

    def __init__(self, message: str, *, allowed: object | None = None, hub_status: int | None = None,
                 hub_reason: str | None = None) -> None:
        super().__init__(message, allowed=allowed)
        self.hub_status = hub_status
        self.hub_reason = hub_reason

    def to_dict(self) -> dict:
        out = super().to_dict()
        if self.hub_status is not None:
            out["hub_status"] = self.hub_status
        if self.hub_reason:
            out["hub_reason"] = self.hub_reason
        return out


class InvalidPushError(HubError):
    """The push itself is malformed (folder, parent commit, README metadata): fix the request."""


class InvalidRepoIdError(InvalidPushError):
    """``repo_id`` is not ``namespace/name`` with the characters the Hub accepts."""


class HubAuthError(HubError):
    """The Hub rejected the token (401) or no token was given."""


class HubPermissionError(HubError):
    """The token is valid but may not write to this namespace or repo (403)."""


class HubNotFoundError(HubError):
    """The repo or revision does not exist, or is private to someone else (404)."""


class HubConflictError(HubError):
    """The branch moved past ``parent_commit`` (412) or a concurrent operation conflicted (409)."""


class HubUnavailableError(HubError):
    """The Hub endpoint could not be reached (connection refused, DNS, timeout, offline mode), or it
    answered that it is overloaded or down (429, 502, 503, 504): retry later."""


# ---- ``cbd fetch``, the client of a cbd service (cbd.cli.fetch) ---------------------------------------
class FetchError(CBDError):
    """``cbd fetch`` could not bring a checkpoint from the service."""


class FetchRefusedError(FetchError):
    """The service refused the request (4xx): fix the request."""


class FetchJobFailedError(FetchError):
    """The service accepted the request but its job failed."""


class FetchNotFoundError(FetchError):
    """The chain or tokenizer the request names does not exist on the service."""


class FetchChecksumError(FetchError):
    """A downloaded file does not match the sha256 the service reported (the part file is removed)."""


class FetchUnavailableError(FetchError):
    """The service is unreachable, answered 5xx, broke off a download or did not finish in time."""


class ForwardDone(Exception):  # noqa: N818 (control flow, not an error: never escapes cbd.repair)
    """Raised by a forward hook to end a forward pass once what it collects is in hand
    (``cbd.repair.refit``: the inputs of one reader; the layers after it are not needed)."""
