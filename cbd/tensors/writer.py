"""Streaming safetensors writes: a fixed layout, tensors whole or in row blocks, early writeback,
and the file's sha256 computed from the bytes as they are written (never by reading the file back)."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from cbd.errors import StorageFullError
from cbd.tensors.header import DTYPE_NAMES, DTYPE_SIZES

SYNC_FILE_RANGE_WRITE = 2


def _libc_sync_file_range():
    """Linux's sync_file_range(2), which Python's os module does not wrap; None elsewhere."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_sync_file_range()


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` (fsynced); returns the file's sha256 (hex), computed while writing."""
    with StreamingWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
    return w.sha256


class StreamingWriter:
    """Write a safetensors file tensor by tensor, in the order declared up front.

    Every byte that goes into the file (the header with its padding, then each tensor or block of
    rows, in order) also goes through a sha256, so once the file is closed ``sha256`` (hex) and
    ``size`` are those of the file on disk, without reading it back (``cbd.core.artifacts.publish``
    takes them as known hashes)."""

    def __init__(self, path: Path, layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, *, durable: bool = True) -> None:
        self.path = path
        self.durable = durable  # fsync before close (False only to compare with writers that don't)
        self.order: list[tuple[str, torch.dtype, tuple[int, ...]]] = list(layout)
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, dtype, shape in self.order:
            n = DTYPE_SIZES[DTYPE_NAMES[dtype]]
            for s in shape:
                n *= s
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._next = 0
        self._rows = 0  # rows of the current tensor written so far (it may come in blocks)
        self._flushed = 0
        self._hash = hashlib.sha256()
        self.size = 0  # bytes written so far
        self.sha256: str | None = None  # the file's sha256 (hex), set by a successful close()
        self._f = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._io(lambda: self._put(struct.pack("<Q", len(raw)) + raw))

    def _put(self, buf) -> None:
        """Write ``buf`` (bytes or a contiguous byte memoryview) to the file and into the hash."""
        self._f.write(buf)
        self._hash.update(buf)  # releases the GIL for large buffers, as the write does
        self.size += len(buf)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor, whole or as its next block of rows (blocks in order)."""
        if self._next >= len(self.order):
            raise ValueError(f"{self.path}: all {len(self.order)} tensors are written; got {name}")
        exp_name, dtype, shape = self.order[self._next]
        got = tuple(tensor.shape)
        fits = got == shape if len(shape) == 0 else (
            len(got) == len(shape) and got[1:] == shape[1:] and self._rows + got[0] <= shape[0])
        if name != exp_name or tensor.dtype != dtype or not fits:
            done = f" (rows {self._rows}.. of it)" if self._rows else ""
            raise ValueError(f"expected {exp_name}{done} {dtype} {shape}, got {name} {tensor.dtype} {got}")
        data = tensor.detach().contiguous().cpu()
        self._io(lambda: self._put(memoryview(data.reshape(-1).view(torch.uint8).numpy()) if data.numel() else b""))
        self._rows += got[0] if shape else 0
        if not shape or self._rows == shape[0]:
            self._next += 1
            self._rows = 0
        self._io(self._start_writeback)

    def _start_writeback(self, chunk: int = 8 << 20) -> None:
        """Start writing what is written so far to disk, without waiting (Linux), so the fsync
        in ``close`` finds little left to do: the disk works while the next tensors are computed."""
        end = self._f.tell()
        if not self.durable or end - self._flushed < chunk or _sync_file_range is None:
            return
        self._f.flush()
        # a hint only: close() still fsyncs; an error here (none expected) is left to that fsync
        _sync_file_range(self._f.fileno(), ctypes.c_int64(self._flushed), ctypes.c_int64(end - self._flushed),
                         SYNC_FILE_RANGE_WRITE)
        self._flushed = end

    def write_all(self, items: Iterable[tuple[str, torch.Tensor]], *, ahead: int = 2,
                  written: Callable[[torch.Tensor], None] | None = None) -> None:
        """Write ``items`` in order while the caller's generator computes the next ones.

        The file writes run in one thread (they release the GIL), so computing tensor k+1
        overlaps writing tensor k; at most ``ahead`` finished tensors wait in between, which
        bounds the memory. ``written(tensor)`` is called once a tensor is in the file (to
        recycle its memory). An error on either side stops both and is raised here.
        """
        pending: queue.Queue = queue.Queue(maxsize=ahead)
        failed: list[BaseException] = []

        def drain() -> None:
            while (item := pending.get()) is not None:
                if not failed:
                    try:
                        self.write(*item)
                        if written is not None:
                            written(item[1])
                    except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
                        failed.append(exc)

        writer = threading.Thread(target=drain, name="cbd-writer", daemon=True)
        writer.start()
        try:
            for item in items:
                if failed:
                    break
                pending.put(item)
        finally:
            pending.put(None)
            writer.join()
        if failed:
            raise failed[0]

    def close(self) -> None:
        if self._next != len(self.order):
            self._f.close()
            raise ValueError(f"{self.path}: {len(self.order) - self._next} tensors were never written")
        self._io(self._f.flush)
        if self.durable:
            self._io(lambda: os.fsync(self._f.fileno()))
        self._f.close()
        self.sha256 = self._hash.hexdigest()

    def _io(self, fn):
        try:
            return fn()
        except OSError as exc:
            self._f.close()
            if exc.errno == 28:  # ENOSPC
                raise StorageFullError(f"no space left writing {self.path.name}") from None
            raise

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()
