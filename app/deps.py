"""``Annotated`` dependencies: settings, the Redis client, the API key check, the Hub token."""

from __future__ import annotations

import hashlib
import hmac
import re
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


def require_api_key(settings: SettingsDep,
                    key: Annotated[str | None, Security(api_key_header)] = None) -> None:
    """401 unless ``X-API-Key`` equals one of ``CBD_API_KEYS`` (constant-time, every key tried)."""
    if not settings.api_keys:
        return
    given = hashlib.sha256((key or "").encode()).digest()  # equal lengths: time reveals no key length
    ok = False
    for allowed in settings.api_keys:
        ok |= hmac.compare_digest(hashlib.sha256(allowed.get_secret_value().encode()).digest(), given)
    if not ok:
        raise UnauthorizedError("a valid X-API-Key header is required")


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
HubTokenDep = Annotated[str | None, Depends(hub_token)]
