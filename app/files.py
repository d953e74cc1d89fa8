"""A ``FileResponse`` over a file opened before the route returns, so a download that has been
answered always completes: the store may evict the checkpoint (``worker.store_budget``) between the
route and the first byte, or while the bytes go out, and on POSIX an open file stays readable after
it is unlinked. Range, If-Range, HEAD and multipart ranges are Starlette's own.

It reads in 1 MiB chunks (Starlette's are 64 KiB) and closes its duplicate descriptor on the event
loop: each chunk is a trip through the threadpool, and for an init's small files those trips were
most of what a download cost beyond a plain ``FileResponse`` (bench/cached_post.py)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from fastapi.responses import FileResponse
from starlette.types import Receive, Scope, Send


class OpenedFileResponse(FileResponse):
    chunk_size = 1024 * 1024

    def __init__(self, fd: int, path: Path, **kwargs) -> None:
        self._fd = fd
        super().__init__(path, stat_result=os.fstat(fd), **kwargs)

    @classmethod
    def open(cls, path: Path, **kwargs) -> OpenedFileResponse:
        """Open ``path`` now (FileNotFoundError when it is gone)."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            return cls(fd, path, **kwargs)
        except BaseException:
            os.close(fd)
            raise

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extensions = {k: v for k, v in scope.get("extensions", {}).items() if k != "http.response.pathsend"}
        try:
            await super().__call__({**scope, "extensions": extensions}, receive, send)  # never by path
        finally:
            self.close()

    @contextlib.asynccontextmanager
    async def _open_file(self) -> AsyncIterator[anyio.AsyncFile[bytes]]:
        fd = os.dup(self._fd)  # shares the offset: one open per response, from the start (ranges seek)
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.fdopen(fd, "rb")
        try:
            yield anyio.wrap_file(raw)
        finally:
            raw.close()  # a descriptor of a regular file: no I/O to wait for, and nothing to cancel

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:  # a response built but never sent (the client went away first)
        self.close()
