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

from app.core.config import Settings, key_name
from app.errors import ForbiddenError, InvalidHeaderError, UnauthorizedError

TOKEN_RE = re.compile(r"^[\x21-\x7e]{1,4096}$")  # printable ASCII, no spaces


# Dependencies are ``async def``: they only read memory and hash a key, and FastAPI runs a plain ``def``
# dependency in its threadpool (two thread switches each, on every request).
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_redis(request: Request) -> Redis:
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
    chains: frozenset[str] | None = None  # the chains it may use (public ones included); None: every chain

    @property
    def name(self) -> str:
        """What quotas and job owners are keyed by: the key, else the client address."""
        return self.key_id or f"addr-{self.address}"


key_id = key_name  # ``key-`` + 12 hex digits of the key's sha256 (app.core.config)


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


async def caller(request: Request, settings: SettingsDep,
                 key: Annotated[str | None, Security(api_key_header)] = None) -> Caller:
    """The checked caller of a request that needs a key when keys are configured (401 otherwise)."""
    require_api_key(settings, key)
    return _identify(request, settings, key)


def _identify(request: Request, settings: Settings, key: str | None) -> Caller:
    """The caller of a checked key (or of none), its chains, noted for the access log (``request.state``)."""
    keyed = settings.keyed
    address = request.client.host if request.client is not None else "unknown"
    name = key_id(key) if keyed and key else None
    operator = bool(settings.operator_keys) and _matches(key, settings.operator_keys)
    request.state.cbd_key = name
    return Caller(key_id=name, operator=operator, address=address,
                  chains=settings.chains_of(name, operator=operator) if keyed else None)


async def reader(request: Request, settings: SettingsDep,
                 key: Annotated[str | None, Header(alias="X-API-Key", description=(
                     "needed when the service sets CBD_READ_KEYS_REQUIRED (except for public chains); a key scoped "
                     "to chains (CBD_API_KEYS key:chain1|chain2) reads only those"))] = None) -> Caller:
    """The caller of a read: a wrong key is 401; no key is anonymous, which sees only the public chains
    when ``CBD_READ_KEYS_REQUIRED`` is set (``check_chain`` then answers 401 for the rest)."""
    return read_caller(request, settings, key)


def read_caller(request: Request, settings: Settings, key: str | None) -> Caller:
    if key and settings.keyed:
        require_api_key(settings, key)
    return _identify(request, settings, key if settings.keyed else None)


def require_some_chain(caller: Caller, what: str) -> None:
    """401 for an anonymous caller that may see no chain at all (reads need a key, none is public)."""
    if caller.key_id is None and caller.chains is not None and not caller.chains:
        raise UnauthorizedError(f"{what}: a valid X-API-Key header is required (CBD_READ_KEYS_REQUIRED)")


def check_chain(caller: Caller, chain: str | None, what: str) -> None:
    """401 (no key, reads need one) or 403 (a key scoped to other chains) unless ``caller`` may use ``chain``."""
    if caller.chains is None or (chain is not None and chain in caller.chains):
        return
    if caller.key_id is None:
        raise UnauthorizedError(f"{what}: a valid X-API-Key header is required (CBD_READ_KEYS_REQUIRED)")
    allowed = sorted(caller.chains)
    raise ForbiddenError(f"{what}: key {caller.key_id} may not use chain {chain!r}; its chains: "
                         f"{', '.join(allowed) or 'none'}", allowed={"chains": allowed})


async def hub_token(x_hf_token: Annotated[str | None, Header(
        alias="X-HF-Token", description="Hugging Face token for push_to_hub; never stored in plaintext",
)] = None) -> str | None:
    """The Hub token, checked without ever echoing it (422 bodies repeat invalid input)."""
    if x_hf_token is None or x_hf_token == "":
        return None
    if not TOKEN_RE.match(x_hf_token):
        raise InvalidHeaderError("X-HF-Token is malformed: printable ASCII without spaces, at most 4096 characters")
    return x_hf_token


async def api_key(settings: SettingsDep, key: Annotated[str | None, Security(api_key_header)] = None) -> None:
    """``require_api_key`` as a dependency."""
    require_api_key(settings, key)


ApiKeyDep = Depends(api_key)
CallerDep = Annotated[Caller, Depends(caller)]
ReaderDep = Annotated[Caller, Depends(reader)]
HubTokenDep = Annotated[str | None, Depends(hub_token)]
