"""A pool of recycled tensor buffers: fresh memory costs a page fault per 4 KiB."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch


class BufferPool:
    """Recycled memory for the large tensors of one streamed write.

    ``empty`` lends a buffer (a free one of the same dtype and size, or a new one); ``give``
    takes back a tensor the pool lent once nothing reads it any more (the writer, after the
    write; Trans, for its intermediates). Anything the pool did not lend, or a view of part
    of a lent buffer, is ignored by ``give``, so handing it a cached or caller-owned tensor is
    harmless. Small tensors (< ``min_bytes``) are left to the allocator, which reuses them
    already. Thread safe: the writer thread gives back while the caller's thread takes.
    """

    def __init__(self, min_bytes: int = 1 << 18) -> None:
        self.min_bytes = min_bytes
        self._free: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}
        self._lent: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.allocated = 0  # buffers created (the rest of the takes were recycled)

    def empty(self, shape: Iterable[int], dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(shape)
        numel = math.prod(shape)
        if numel * dtype.itemsize < self.min_bytes:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            free = self._free.get((dtype, numel))
            flat = free.pop() if free else None
        if flat is None:
            flat = torch.empty(numel, dtype=dtype)
            self.allocated += 1
        with self._lock:
            self._lent[flat.data_ptr()] = flat
        return flat.view(shape)

    def lent(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is a whole buffer this pool lent (so its borrower may overwrite it)."""
        with self._lock:
            flat = self._lent.get(t.data_ptr())
        return flat is not None and flat.numel() == t.numel() and flat.dtype == t.dtype

    def give(self, t: torch.Tensor | None) -> None:
        if t is None or t.numel() * t.dtype.itemsize < self.min_bytes:
            return
        with self._lock:
            flat = self._lent.get(t.data_ptr())
            if flat is None or flat.numel() != t.numel() or flat.dtype != t.dtype:
                return
            del self._lent[flat.data_ptr()]
            self._free.setdefault((flat.dtype, flat.numel()), []).append(flat)


_POOL: ContextVar[BufferPool | None] = ContextVar("cbd_buffer_pool", default=None)


def empty(shape: Iterable[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.empty``, from the active :class:`BufferPool` when there is one."""
    pool = _POOL.get()
    return pool.empty(shape, dtype) if pool is not None else torch.empty(tuple(shape), dtype=dtype)


def scratch(*candidates: torch.Tensor) -> torch.Tensor:
    """An output buffer shaped like ``candidates[0]``: one of the candidates when the active pool
    lent it (an elementwise op may write over its own input), else a new one from ``empty``."""
    pool = _POOL.get()
    if pool is not None:
        for t in candidates:
            if pool.lent(t):
                return t
    return empty(candidates[0].shape, candidates[0].dtype)


def recycle(t: torch.Tensor | None) -> None:
    """Give ``t`` back to the active pool: the caller promises nothing reads it any more."""
    pool = _POOL.get()
    if pool is not None:
        pool.give(t)


@contextmanager
def pooled(pool: BufferPool | None) -> Iterator[BufferPool | None]:
    """Make ``pool`` the active pool of this thread (``None``: plain ``torch.empty``)."""
    token = _POOL.set(pool)
    try:
        yield pool
    finally:
        _POOL.reset(token)
