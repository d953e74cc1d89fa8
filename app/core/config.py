"""Service settings: one frozen object read from the environment once per app.

pydantic-settings is not installed, so ``Settings.from_env`` reads the variables itself; the
pydantic model still validates every value (a bad ``CBD_SYNC_WAIT_S`` fails at start-up).

| variable              | default                    | meaning                                              |
|-----------------------|----------------------------|------------------------------------------------------|
| REDIS_URL             | redis://127.0.0.1:6379/0   | queue (``unix:///path.sock`` for the embedded one)   |
| CBD_DEFAULT_CHAIN     | default                    | chain used when a request names none                 |
| CBD_SYNC_WAIT_S       | 20                         | how long POST /initialize waits for a fast job       |
| CBD_RETRY_AFTER_S     | 2                          | Retry-After on 202 and 503                           |
| CBD_API_KEYS          | (unset: open)              | comma-separated keys required in X-API-Key on POST   |
| CBD_OPERATOR_KEYS     | (none)                     | keys that may also cancel any job (valid API keys)   |
| CBD_PUBLIC_CHAINS     | (none)                     | chains every key, and anonymous readers, may use     |
| CBD_READ_KEYS_REQUIRED| 0                          | 1: GETs of inits, jobs, chains need a key too        |
| CBD_ACCESS_LOG        | - (stderr)                 | JSON lines access log: a file, ``-``, or ``off``     |
| CBD_ANSWER_CACHE      | 4096                       | repeated cached POSTs answered from memory (0: off)  |
| CBD_SECRET_KEY        | (unset: no push_to_hub)    | seals Hub tokens; the workers need the same value    |
| CBD_TOKEN_TTL_S       | 1800                       | how long a sealed Hub token waits in Redis           |
| CBD_FAST_TIMEOUT_S    | 900                        | job timeout on the fast queue                        |
| CBD_SLOW_TIMEOUT_S    | 21600                      | job timeout on the slow queue (chain builds, bridge) |
| CBD_RESULT_TTL_S      | 604800                     | how long rq keeps finished job records               |
| CBD_PUBLIC_URL        | (from the request)         | base of the file URLs in responses                   |
| CBD_RATE_LIMIT        | (unset: none)              | POSTs needing a job per caller, e.g. ``60/minute``   |
| CBD_MAX_JOBS_FAST     | 0 (no cap)                 | queued + running fast jobs per caller                |
| CBD_MAX_JOBS_SLOW     | 0 (no cap)                 | queued + running slow jobs (bridges) per caller      |
| CBD_QUEUE_BOUND_FAST  | 1000                       | fast queue depth beyond which new work gets 503      |
| CBD_QUEUE_BOUND_SLOW  | 100                        | slow queue depth beyond which new work gets 503      |
| CBD_STORE_URL         | file://$CBD_HOME           | the store: a folder, or ``s3://bucket/prefix``       |
| CBD_STORE_REDIRECT    | 0                          | 1: downloads from S3 redirect to presigned URLs      |
| CBD_PRESIGN_EXPIRES_S | 3600                       | how long a presigned download URL is valid           |
| CBD_BRIDGE_STEPS      | (unset: 120)               | distillation steps of a bridge job (its budget)      |

A caller is its API key (by a non-secret name), or its client address when keys are off. An entry of
``CBD_API_KEYS`` may scope its key to chains: ``key:chain1|chain2`` (without ``:``, or ``key:*``: every
chain; a key that itself holds ``:`` is given as ``key:*``). Operator keys see every chain.

The job limits (``CBD_*_TIMEOUT_S``, ``CBD_RESULT_TTL_S``) are defined by ``worker.queue.Limits``,
which the workers read from the same variables. Chains and artifacts live where ``cbd.core.paths`` says (CBD_HOME, CBD_CHAINS, CBD_ARTIFACTS).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from cbd.core import manifest, paths, recipe
from cbd.core.names import NAME_PATTERN
from cbd.core.plan import BridgeOptions
from worker import queue, tokens

ENV = {
    "redis_url": "REDIS_URL", "default_chain": "CBD_DEFAULT_CHAIN", "sync_wait_s": "CBD_SYNC_WAIT_S",
    "retry_after_s": "CBD_RETRY_AFTER_S", "api_keys": "CBD_API_KEYS", "secret_key": "CBD_SECRET_KEY",
    "operator_keys": "CBD_OPERATOR_KEYS", "rate_limit": "CBD_RATE_LIMIT",
    "max_jobs_fast": "CBD_MAX_JOBS_FAST", "max_jobs_slow": "CBD_MAX_JOBS_SLOW",
    "queue_bound_fast": "CBD_QUEUE_BOUND_FAST", "queue_bound_slow": "CBD_QUEUE_BOUND_SLOW",
    "token_ttl_s": "CBD_TOKEN_TTL_S", "store_redirect": "CBD_STORE_REDIRECT",
    "presign_expires_s": "CBD_PRESIGN_EXPIRES_S", **queue.LIMITS_ENV, "public_url": "CBD_PUBLIC_URL",
    "public_chains": "CBD_PUBLIC_CHAINS", "read_keys_required": "CBD_READ_KEYS_REQUIRED",
    "access_log": "CBD_ACCESS_LOG", "answer_cache": "CBD_ANSWER_CACHE", "bridge_steps": "CBD_BRIDGE_STEPS",
}
CHAIN_LIST_RE = re.compile(r"^(\*|[a-z0-9][a-z0-9._-]{0,63}(\|[a-z0-9][a-z0-9._-]{0,63})*)$")


def key_name(key: str) -> str:
    """A stable, non-secret name of an API key: ``key-`` + 12 hex digits of its sha256."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def parse_keys(text: str) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """``CBD_API_KEYS``: (keys, {key name: its chains}) for the entries scoped to chains."""
    keys, scopes = [], {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        key, sep, chains = entry.rpartition(":")
        if not sep:
            key, chains = entry, "*"
        if not key or not CHAIN_LIST_RE.match(chains):
            # the key itself is never echoed: only its non-secret name
            raise ValueError(f"CBD_API_KEYS entry {key_name(key or entry)} has a malformed scope: write "
                             "key, key:* (every chain) or key:chain1|chain2 (chain names)")
        keys.append(key)
        if chains != "*":
            scopes[key_name(key)] = tuple(chains.split("|"))
    return keys, scopes


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    redis_url: str = queue.DEFAULT_REDIS_URL
    default_chain: str = Field(default=manifest.DEFAULT_CHAIN, pattern=NAME_PATTERN)
    sync_wait_s: float = Field(default=20.0, ge=0, le=600)
    poll_interval_s: float = Field(default=0.1, gt=0, le=5)
    retry_after_s: int = Field(default=2, ge=1, le=3600)
    api_keys: tuple[SecretStr, ...] = ()
    operator_keys: tuple[SecretStr, ...] = ()
    secret_key: SecretStr | None = None
    token_ttl_s: int = Field(default=1800, ge=10, le=86400)
    fast_timeout_s: int = Field(default=queue.Limits.fast_timeout_s, ge=10)  # the limits: worker.queue.Limits
    slow_timeout_s: int = Field(default=queue.Limits.slow_timeout_s, ge=10)
    result_ttl_s: int = Field(default=queue.Limits.result_ttl_s, ge=60)
    recipes_dir: Path = paths.RECIPES_DIR  # not from the environment: cbd.core.recipe reads the same folder
    public_url: str | None = None
    rate_limit: str | None = Field(default=None, pattern=r"^\d+\s*(/|per)\s*\d*\s*(second|minute|hour|day)s?$",
                                   description="limits' notation: 60/minute, 1000 per hour")
    max_jobs_fast: int = Field(default=0, ge=0)
    max_jobs_slow: int = Field(default=0, ge=0)
    queue_bound_fast: int = Field(default=1000, ge=1)
    queue_bound_slow: int = Field(default=100, ge=1)
    store_redirect: bool = Field(default=False, description="S3 store: redirect downloads to presigned URLs")
    presign_expires_s: int = Field(default=3600, ge=60, le=7 * 86400)
    key_chains: dict[str, tuple[str, ...]] = Field(default_factory=dict,
                                                   description="key name -> the chains it may use (absent: all)")
    public_chains: tuple[str, ...] = ()
    read_keys_required: bool = False
    access_log: str = "-"
    answer_cache: int = Field(default=4096, ge=0)
    bridge_steps: int | None = Field(default=None, ge=0, le=100_000,
                                     description="distillation steps of a bridge job (unset: the default, 120)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if env is None else env
        data: dict[str, object] = {k: env[v] for k, v in ENV.items() if env.get(v)}
        if "api_keys" in data:
            keys, data["key_chains"] = parse_keys(str(data["api_keys"]))
            data["api_keys"] = tuple(keys)
        if "operator_keys" in data:
            data["operator_keys"] = tuple(k.strip() for k in str(data["operator_keys"]).split(",") if k.strip())
        if "public_chains" in data:
            data["public_chains"] = tuple(c.strip() for c in str(data["public_chains"]).split(",") if c.strip())
        data.update(overrides)
        if data.get("read_keys_required") in (True, "1", "true", "yes") and not (data.get("api_keys") or
                                                                                  data.get("operator_keys")):
            raise ValueError("CBD_READ_KEYS_REQUIRED=1 needs keys: set CBD_API_KEYS (or CBD_OPERATOR_KEYS)")
        secret = data.get("secret_key")
        if isinstance(secret, str) and len(secret) < tokens.MIN_KEY_CHARS:  # checked here: pydantic would echo it
            raise ValueError(f"CBD_SECRET_KEY must have at least {tokens.MIN_KEY_CHARS} characters")
        return cls.model_validate(data)

    def bridge_options(self) -> BridgeOptions | None:
        """The bridge budget plans are made with: ``CBD_BRIDGE_STEPS`` steps, else the defaults
        (None). It is part of every bridge plan's id, so a changed budget makes new checkpoints."""
        return None if self.bridge_steps is None else BridgeOptions(steps=self.bridge_steps)

    @property
    def keyed(self) -> bool:
        return bool(self.api_keys or self.operator_keys)

    def chains_of(self, name: str | None, *, operator: bool = False) -> frozenset[str] | None:
        """The chains a key (by name) may use, public ones included; None: every chain. An anonymous
        caller (``name`` None) sees every chain unless reads need a key, then only the public ones."""
        if operator:
            return None
        if name is None:
            return frozenset(self.public_chains) if self.read_keys_required else None
        scope = self.key_chains.get(name)
        return None if scope is None else frozenset(scope) | frozenset(self.public_chains)

    @property
    def limits(self) -> queue.Limits:
        return queue.Limits(fast_timeout_s=self.fast_timeout_s, slow_timeout_s=self.slow_timeout_s,
                            result_ttl_s=self.result_ttl_s)

    def recipe_dirs(self) -> list[Path]:
        """The packaged recipes, then the operator's folders (``$CBD_RECIPES``, read where the workers read it)."""
        return recipe.recipe_dirs(self.recipes_dir)

    def recipe_file(self, name: str) -> Path | None:
        return recipe.find_recipe(name, self.recipe_dirs())

    def recipe_exists(self, name: str) -> bool:
        return self.recipe_file(name) is not None

    def recipes(self) -> list[str]:
        return recipe.list_recipes(self.recipe_dirs())
