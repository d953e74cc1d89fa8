"""LazyReader: one tensor at a time from a verified safetensors file, as zero-copy views."""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
import warnings
from pathlib import Path

import torch

from cbd.errors import IntegrityError
from cbd.tensors.header import TORCH_DTYPES, read_header, verify
from cbd.tensors.pool import empty, recycle

MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)


class LazyReader:
    """``reader(name)`` returns one tensor (float32 unless ``keep_dtype``) from a checked file.

    Each call reads that tensor's bytes with ``pread`` into a fresh tensor the caller owns
    (from the active :class:`BufferPool`, if any): no mapping of the file stays resident.
    ``reader.view(name)`` instead returns a read-only float32 tensor over a shared read-only
    mapping of the file (zero-copy for float32 tensors); only the last viewed tensor's pages
    are kept mapped (``madvise(MADV_DONTNEED)`` on the one before: an older view still reads
    correctly, it just faults its pages back in from the page cache). Writing into a view is a
    bug (the mapping is read-only: the process would crash). Anchor files are never modified in
    place (chain builds publish by rename), so a view never changes under its reader.
    """

    def __init__(self, path: Path, *, sha256: str | None = None, keep_dtype: bool = False) -> None:
        verify(path, sha256)
        self.path = path
        self.entries, self.metadata = read_header(path)
        with open(path, "rb") as f:
            self._base = 8 + struct.unpack("<Q", f.read(8))[0]
        self._fd = os.open(path, os.O_RDONLY)
        self.keep_dtype = keep_dtype
        self._map: mmap.mmap | None | bool = None  # False: the file system refused a mapping
        self._bytes: torch.Tensor | None = None  # the whole file as uint8, over the mapping
        self._resident: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def keys(self) -> list[str]:
        return list(self.entries)

    def __call__(self, name: str) -> torch.Tensor:
        e = self._entry(name)
        b0, b1 = e["data_offsets"]
        t = empty(e["shape"], TORCH_DTYPES[e["dtype"]])
        buf = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if b1 > b0 else memoryview(b"")
        done = 0
        while done < b1 - b0:
            n = os.preadv(self._fd, [buf[done:]], self._base + b0 + done)
            if n == 0:
                raise IntegrityError(f"{self.path}: truncated while reading {name!r}")
            done += n
        if self.keep_dtype or t.dtype == torch.float32:
            return t
        f = empty(t.shape, torch.float32).copy_(t)
        recycle(t)
        return f

    def view(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as float32 without copying it when it is stored as float32 (read only)."""
        e = self._entry(name)
        b0, b1 = e["data_offsets"]
        dtype = TORCH_DTYPES[e["dtype"]]
        if b1 == b0 or (self._base + b0) % dtype.itemsize or not self._mapped():
            return self(name).float()  # nothing to map, not aligned for a view, or no mapping: a copy
        with self._lock:
            lo, hi = self._base + b0, self._base + b1
            if self._resident != (lo, hi):
                if self._resident is not None:
                    self._advise(MADV_DONTNEED, *self._resident)
                self._resident = (lo, hi)
        t = self._bytes[lo:hi].view(dtype).view(e["shape"])
        if dtype == torch.float32:
            return t
        return empty(t.shape, torch.float32).copy_(t)

    def _mapped(self) -> bool:
        with self._lock:
            if self._bytes is None and self._map is None:
                try:
                    self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError):  # a file system without mmap: views become copies
                    self._map = False
                    return False
                with warnings.catch_warnings():  # read-only by contract (class docstring)
                    warnings.simplefilter("ignore", UserWarning)
                    self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
            return self._bytes is not None

    def is_view(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lies in this reader's mapping (so must be copied before it is modified)."""
        if self._bytes is None or t.numel() == 0:
            return False
        lo = self._bytes.data_ptr()
        return lo <= t.data_ptr() < lo + self._bytes.numel()

    def _advise(self, advice: int, lo: int, hi: int) -> None:
        start = lo // mmap.PAGESIZE * mmap.PAGESIZE
        with contextlib.suppress(OSError):  # advice only: without it the pages just stay mapped
            self._map.madvise(advice, start, min(hi, len(self._map)) - start)

    def _entry(self, name: str) -> dict:
        e = self.entries.get(name)
        if e is None:
            raise IntegrityError(f"{self.path}: tensor {name!r} is missing")
        if e["dtype"] not in TORCH_DTYPES:
            raise IntegrityError(f"{self.path}: tensor {name!r} has dtype {e['dtype']}, which cbd does not read")
        return e

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    __getitem__ = __call__

    def load_all(self) -> dict[str, torch.Tensor]:
        return {k: self(k) for k in self.keys()}
