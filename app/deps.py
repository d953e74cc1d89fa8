"""``Annotated`` dependencies: settings, the Redis client, the API key check, the Hub token."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request, Security
from fastapi.security import APIKeyHeader
from redis import Redis

from app.core.config import Settings
from app.errors import InvalidHeaderError, UnauthorizedError

TOKEN_RE = re.compile(r"^[\x21-\x7e]{1,4096}$")  # printable ASCII, no spaces


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request) -> Redis:
    return request.app.state.redis


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="required on POST when the service sets CBD_API_KEYS")


@dataclass(frozen=True)
class Caller:
    """Who is asking, without secrets: ``key_id`` names the X-API-Key (None when keys are off),
    ``address`` is the client's address; ``operator`` is a key of ``CBD_OPERATOR_KEYS``."""

    key_id: str | None
    operator: bool
    address: str

    @property
    def name(self) -> str:
        """What quotas and job owners are keyed by: the key, else the client address."""
        return self.key_id or f"addr-{self.address}"


def key_id(key: str) -> str:
    """A stable, non-secret name of an API key: ``key-`` + 12 hex digits of its sha256."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _matches(given: str | None, keys: tuple) -> bool:
    digest = hashlib.sha256((given or "").encode()).digest()  # equal lengths: time reveals no key length
    ok = False
    for allowed in keys:  # every key tried
        ok |= hmac.compare_digest(hashlib.sha256(allowed.get_secret_value().encode()).digest(), digest)
    return ok


def require_api_key(settings: SettingsDep,
                    key: Annotated[str | None, Security(api_key_header)] = None) -> None:
    """401 unless ``X-API-Key`` equals one of ``CBD_API_KEYS`` or ``CBD_OPERATOR_KEYS`` (constant-time)."""
    if not settings.api_keys and not settings.operator_keys:
        return
    if not _matches(key, settings.api_keys + settings.operator_keys):
        raise UnauthorizedError("a valid X-API-Key header is required")


def caller(request: Request, settings: SettingsDep,
           key: Annotated[str | None, Security(api_key_header)] = None) -> Caller:
    """The checked caller of a request that needs a key when keys are configured (401 otherwise)."""
    require_api_key(settings, key)
    keyed = bool(settings.api_keys or settings.operator_keys)
    address = request.client.host if request.client is not None else "unknown"
    return Caller(key_id=key_id(key) if keyed and key else None,
                  operator=bool(settings.operator_keys) and _matches(key, settings.operator_keys), address=address)


def hub_token(x_hf_token: Annotated[str | None, Header(
        alias="X-HF-Token", description="Hugging Face token for push_to_hub; never stored in plaintext",
)] = None) -> str | None:
    """The Hub token, checked without ever echoing it (422 bodies repeat invalid input)."""
    if x_hf_token is None or x_hf_token == "":
        return None
    if not TOKEN_RE.match(x_hf_token):
        raise InvalidHeaderError("X-HF-Token is malformed: printable ASCII without spaces, at most 4096 characters")
    return x_hf_token


ApiKeyDep = Depends(require_api_key)
CallerDep = Annotated[Caller, Depends(caller)]
HubTokenDep = Annotated[str | None, Depends(hub_token)]
