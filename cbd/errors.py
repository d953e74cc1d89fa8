"""One flat module of precisely named exceptions (the rq / huggingface_hub style).

Every error carries the offending values and a remedy; the service maps each class to one HTTP
status in a single handler (``app/errors.py``), the CLI maps them to exit codes.
"""

from __future__ import annotations


class CBDError(Exception):
    """Base class. ``status`` is the HTTP status the service answers with."""

    status: int = 400

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

    status = 422


class UnknownNameError(CBDError, KeyError):
    """A chain, tokenizer, recipe, mode or file name that does not exist."""

    status = 422

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class ChainNotBuiltError(CBDError):
    """The chain exists as a recipe but has no built anchors yet."""

    status = 409


class ChainIncompatibleError(CBDError):
    """The target cannot be served from this chain (other family, head dim, vocabulary)."""

    status = 422


class IntegrityError(CBDError):
    """A stored file is corrupt, truncated, tampered with or not what its manifest says."""

    status = 500


class AssetUnavailableError(CBDError):
    """A model, tokenizer or corpus package cannot be fetched or read."""

    status = 503


class StorageFullError(CBDError):
    """The artifact store ran out of space while writing."""

    status = 507


class RecipeError(CBDError, ValueError):
    """A chain recipe that does not validate."""

    status = 422


class HubError(CBDError):
    """A push to the Hugging Face Hub failed; the message never contains the token."""

    status = 502
