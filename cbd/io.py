"""The one place that reads and writes safetensors (STYLE.md, guideline 4).

- Reads are lazy: one tensor at a time from a memory-mapped file, after the header has been
  checked (size cap, JSON, dtypes, offsets inside the file, no overlaps, no duplicate keys);
  a file can also be verified against the sha256 its manifest records. Nothing is ever read
  with ``torch.load``.
- Writes stream: :class:`StreamingWriter` writes the header first (shapes are known from the
  plan) and then each tensor as it is produced, so a checkpoint as large as the teacher never
  sits in memory twice. The layout is exactly safetensors' (8-byte little-endian header length,
  JSON header padded with spaces to 8 bytes, tensors in header order).
- Large tensors of one streamed write are recycled (:class:`BufferPool`): a fresh large
  allocation costs a page fault per 4 KiB page on first touch, which is most of the time of a
  LInit (measured: filling 216 MiB of fresh memory 0.09-0.14 s, of recycled memory 0.012 s),
  so reads, Trans and the blend take their outputs from the pool and the writer gives each
  tensor back once it is on disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import math
import mmap
import os
import queue
import struct
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch

from cbd.errors import IntegrityError, StorageFullError
from cbd.manifest import sha256_file

MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
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
MAX_HEADER = 25_000_000  # huggingface_hub refuses larger headers; so do we
DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
               torch.int32: "I32", torch.uint8: "U8", torch.float64: "F64"}
TORCH_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
DTYPE_SIZES = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "F64": 8, "I8": 1, "I16": 2,
               "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

_verified: dict[tuple[str, int, int], str] = {}


def read_header(path: Path) -> tuple[dict, dict[str, str]]:
    """Validate a safetensors header; return (tensor entries, metadata)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise IntegrityError(f"{path}: truncated (no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise IntegrityError(f"{path}: header length {n} exceeds the file ({size} bytes) or the {MAX_HEADER} cap")
        text = f.read(n)
    try:  # UTF-8 only (json.loads would guess UTF-16/32 from bytes); deep nesting is RecursionError
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"{path}: header is not valid UTF-8 JSON ({str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise IntegrityError(f"{path}: __metadata__ must map strings to strings")
    _check_entries(path, header, size - 8 - n)
    return header, meta


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})[:3]}")
    return dict(pairs)


def _check_entries(path: Path, header: dict, data_len: int) -> None:
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise IntegrityError(f"{path}: tensor {name!r} has a malformed entry")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES or not isinstance(shape, list) or not all(
                _is_uint(s) for s in shape):
            raise IntegrityError(f"{path}: tensor {name!r} has dtype {dtype!r} / shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_uint(o) for o in offs)
                and offs[0] <= offs[1] <= data_len):
            raise IntegrityError(f"{path}: tensor {name!r} offsets {offs!r} fall outside the data ({data_len} bytes)")
        numel = 1
        for s in shape:
            numel *= s
        if offs[1] - offs[0] != numel * DTYPE_SIZES[dtype]:
            raise IntegrityError(f"{path}: tensor {name!r} size does not match its shape {shape} and dtype {dtype}")
        spans.append(tuple(offs))
    spans.sort()
    end = 0  # the data must be indexed exactly: no overlap, no gap, nothing after (as safetensors checks)
    for b0, b1 in spans:
        if b0 != end:
            raise IntegrityError(f"{path}: tensors {'overlap' if b0 < end else 'leave a gap'} at byte {min(b0, end)}")
        end = b1
    if end != data_len:
        raise IntegrityError(f"{path}: the tensors cover {end} of the {data_len} data bytes")


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def verify(path: Path, sha256: str | None) -> None:
    """Check a file against its recorded sha256 (once per process per file version)."""
    if not path.is_file():
        raise IntegrityError(f"{path} is missing")
    if sha256 is None:
        return
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if _verified.get(key) != sha256:
        actual = sha256_file(path)
        if actual != sha256:
            raise IntegrityError(f"{path}: sha256 {actual[:12]}... does not match the manifest's {sha256[:12]}...; "
                                 "the file was modified or corrupted: rebuild the chain")
        _verified[key] = sha256


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


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    with StreamingWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)


class StreamingWriter:
    """Write a safetensors file tensor by tensor, in the order declared up front."""

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
        self._f = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._io(lambda: self._f.write(struct.pack("<Q", len(raw)) + raw))

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
        self._io(lambda: self._f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()) if data.numel() else b""))
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
