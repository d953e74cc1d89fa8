"""The answer cache: a repeated ``POST /initialize`` for a checkpoint that exists, answered from memory.

Most calls from CI ask again for an init that was made long ago. The route answers those without a
job, but it still resolves the chain (a directory listing and the manifest parsed), plans the request,
reads the checkpoint's index, and goes through FastAPI's body parsing, dependencies and response
model: ~2.9 ms of server CPU per request against ~0.4 ms for a bare FastAPI endpoint
(bench/cached_post.py). This pure ASGI middleware keeps the exact bytes of each such answer, keyed by
what the answer depends on (the request body, the ``X-API-Key``, ``Content-Type`` and what the file
URLs are built from: scheme, host, root path), and replays them while nothing they depend on changed:

- the route marked the answer cacheable (a checkpoint read from the store, no push, no job), so
  202s, errors, pushes and answers that waited for a job are never stored;
- the checkpoint's index is still the file it was (same inode): an evicted or deleted checkpoint
  misses, and the route answers as it always did;
- the built chains are as they were when the answer was made (``manifest.chains_fingerprint``: every
  manifest's inode, size and mtime), so a build, rebuild or removal of any chain (which can change
  which chain a request naming none gets) misses;
- keys are configuration, fixed for the process: the same key got this answer, so it may again.

A request with ``X-HF-Token`` is never answered from here (the route checks that header), nor is any
request while the store is a bucket (``s3://``: no cheap check that a checkpoint still exists).
A hit does what the route's cached branch does besides answering: the cache-hit counter, the access
hint of the store budget (once per ``ACCESS_RESOLUTION_S``), and the key's name for the access log;
it sits inside the access log and the Prometheus middleware, so both see it as any request.
``CBD_ANSWER_CACHE`` sets the number of answers kept (least recently used first out; 0: off).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cbd.core import artifacts, manifest, objstore
from worker import store_budget

PATH = "/initialize"
STATE_KEY = "cbd_answer"  # scope["state"] entry the route sets on a cacheable answer: the artifact id


@dataclass
class Entry:
    start: Message
    body: bytes
    index: str
    ino: int
    chains: tuple
    aid: str
    key: str | None


class AnswerCache:
    def __init__(self, app: ASGIApp, size: int, max_body: int) -> None:
        self.app = app
        self.size = size
        self.max_body = max_body  # larger bodies are the app's to refuse (413)
        self.entries: OrderedDict[tuple, Entry] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.size <= 0 or scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != PATH
                or objstore.is_remote()):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # a repeated header keeps its last value: it is in the key anyway
        length = headers.get(b"content-length")
        if b"x-hf-token" in headers or length is None or not length.isdigit() or int(length) > self.max_body:
            await self.app(scope, receive, send)
            return
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client left: let the app see it
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        key = (body, headers.get(b"x-api-key"), headers.get(b"content-type"), headers.get(b"host"),
               scope.get("scheme"), scope.get("root_path", ""), tuple(scope.get("server") or ()))
        chains = manifest.chains_fingerprint()
        entry = self.entries.get(key)
        if entry is not None and messages[-1]["type"] == "http.request":
            if entry.chains == chains and self._live(entry):
                self.entries.move_to_end(key)
                scope.setdefault("state", {})["cbd_key"] = entry.key
                scope["app"].state.metrics.cache(hit=True)
                await send(entry.start)
                await send({"type": "http.response.body", "body": entry.body})
                return
            del self.entries[key]

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        sent: list[Message] = []

        async def capture(message: Message) -> None:
            sent.append(message)
            await send(message)

        await self.app(scope, replay, capture)
        state = scope.get("state") or {}
        aid = state.get(STATE_KEY)
        if aid is None or not sent or sent[0]["type"] != "http.response.start" or sent[0]["status"] != 200:
            return
        if any(m.get("more_body") for m in sent[1:]):
            return
        index = str(artifacts.artifact_dir(aid) / artifacts.INDEX)
        try:
            ino = os.stat(index).st_ino
        except OSError:
            return
        self.entries[key] = Entry(sent[0], b"".join(m.get("body", b"") for m in sent[1:]), index, ino, chains, aid,
                                  state.get("cbd_key"))
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    @staticmethod
    def _live(entry: Entry) -> bool:
        """The checkpoint is still the one answered (and its store-budget access hint is kept fresh)."""
        try:
            st = os.stat(entry.index)
        except OSError:
            return False
        if st.st_ino != entry.ino:
            return False
        if time.time() - st.st_mtime >= store_budget.ACCESS_RESOLUTION_S:
            store_budget.record_access(entry.aid)
        return True
