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

A caller is its API key (by a non-secret name), or its client address when keys are off.

The job limits (``CBD_*_TIMEOUT_S``, ``CBD_RESULT_TTL_S``) are defined by ``worker.queue.Limits``,
which the workers read from the same variables. Chains and artifacts live where ``cbd.core.paths`` says (CBD_HOME, CBD_CHAINS, CBD_ARTIFACTS).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from cbd.core import manifest, paths, recipe
from cbd.core.names import NAME_PATTERN
from worker import queue, tokens

ENV = {
    "redis_url": "REDIS_URL", "default_chain": "CBD_DEFAULT_CHAIN", "sync_wait_s": "CBD_SYNC_WAIT_S",
    "retry_after_s": "CBD_RETRY_AFTER_S", "api_keys": "CBD_API_KEYS", "secret_key": "CBD_SECRET_KEY",
    "operator_keys": "CBD_OPERATOR_KEYS", "rate_limit": "CBD_RATE_LIMIT",
    "max_jobs_fast": "CBD_MAX_JOBS_FAST", "max_jobs_slow": "CBD_MAX_JOBS_SLOW",
    "queue_bound_fast": "CBD_QUEUE_BOUND_FAST", "queue_bound_slow": "CBD_QUEUE_BOUND_SLOW",
    "token_ttl_s": "CBD_TOKEN_TTL_S", "store_redirect": "CBD_STORE_REDIRECT",
    "presign_expires_s": "CBD_PRESIGN_EXPIRES_S", **queue.LIMITS_ENV, "public_url": "CBD_PUBLIC_URL",
}


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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if env is None else env
        data: dict[str, object] = {k: env[v] for k, v in ENV.items() if env.get(v)}
        for name in ("api_keys", "operator_keys"):
            if name in data:
                data[name] = tuple(k.strip() for k in str(data[name]).split(",") if k.strip())
        data.update(overrides)
        secret = data.get("secret_key")
        if isinstance(secret, str) and len(secret) < tokens.MIN_KEY_CHARS:  # checked here: pydantic would echo it
            raise ValueError(f"CBD_SECRET_KEY must have at least {tokens.MIN_KEY_CHARS} characters")
        return cls.model_validate(data)

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
