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
    write; the executor, for the intermediates of one computation: :func:`intermediates`). Anything the pool did not lend, or a view of part
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


class Intermediates:
    """The buffers the active pool lent inside one :func:`intermediates` block.

    At the end of the block every one of them goes back to the pool except those passed to
    :meth:`keep` (and any buffer a kept tensor is a view of). Buffers are told apart by their
    storage, so a buffer given back early and lent again inside the block is counted once.
    """

    def __init__(self, pool: BufferPool | None, parent: Intermediates | None) -> None:
        self.pool = pool
        self.parent = parent
        self._lent: dict[int, torch.Tensor] = {}  # storage address -> the buffer (as lent)
        self._kept: set[int] = set()

    def note(self, t: torch.Tensor) -> None:
        self._lent.setdefault(_storage(t), t)

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` outlives the block: it is not given back (an enclosing block may still)."""
        if t.numel():
            self._kept.add(_storage(t))
        return t

    def release(self) -> None:
        for key, t in self._lent.items():
            if key not in self._kept:
                self.pool.give(t)  # ignored when already given back (and not lent again)
            elif self.parent is not None:
                self.parent.note(t)
        self._lent.clear()


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


_SCOPE: ContextVar[Intermediates | None] = ContextVar("cbd_intermediates", default=None)


def empty(shape: Iterable[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.empty``, from the active :class:`BufferPool` when there is one.

    Inside an :func:`intermediates` block the buffer is noted, to go back to the pool at the
    end of the block unless it is kept. Signature of ``cbd.shape.trans.Alloc``: the executor
    passes this function to Trans, which allocates through it and frees nothing.
    """
    pool = _POOL.get()
    if pool is None:
        return torch.empty(tuple(shape), dtype=dtype)
    t = pool.empty(shape, dtype)
    scope = _SCOPE.get()
    if scope is not None and t.numel() * t.dtype.itemsize >= pool.min_bytes:
        scope.note(t)
    return t


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


@contextmanager
def intermediates() -> Iterator[Intermediates]:
    """A block whose pooled buffers are intermediates: freed at the block's end, the last use.

    The executor of one computation (``LInit.chunks``: one target tensor or block of rows)
    opens one, computes, keeps the result and lets everything else go back to the pool::

        with intermediates() as scope:
            t = scope.keep(compute(alloc=empty))

    Without an active pool it does nothing. Do not ``yield`` inside the block: a suspended
    generator would leave it open in its consumer's context.
    """
    scope = Intermediates(_POOL.get(), _SCOPE.get())
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)
        if scope.pool is not None:
            scope.release()
