"""The structured access log: one JSON line per request, without secrets.

Fields: ``time`` (UTC, ISO 8601 with milliseconds), ``method``, ``path`` (no query string: it may carry
anything), ``status``, ``key`` (the caller's non-secret key name ``key-<12 hex>`` once a route has
checked it, else null), ``client`` (address), ``ms`` (until the response started), and ``job`` when the
answer names one (``Location: /jobs/{id}``). ``CBD_ACCESS_LOG``: ``-`` (default: stderr), a file path
(appended to), or ``off``. The key itself, ``X-HF-Token`` and request bodies are never written.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("cbd.access")


def configure(target: str) -> bool:
    """Point the ``cbd.access`` logger at ``target``; whether the log is on."""
    if target.strip().lower() in ("off", "0", "none", ""):
        return False
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr) if target == "-" else logging.FileHandler(target)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return True


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        seen: dict = {}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                seen["ms"] = round((time.monotonic() - start) * 1000, 2)
                for k, v in message.get("headers", []):
                    if k.lower() == b"location" and v.startswith(b"/jobs/"):
                        seen["job"] = v[len(b"/jobs/"):].decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            state = scope.get("state") or {}
            client = scope.get("client")
            now = time.time()
            record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
                      "method": scope.get("method"), "path": scope.get("path"), "status": seen.get("status", 500),
                      "key": state.get("cbd_key"), "client": client[0] if client else None, "ms": seen.get("ms")}
            if "job" in seen:
                record["job"] = seen["job"]
            log.info(json.dumps(record, separators=(",", ":")))
