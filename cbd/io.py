"""The one place that reads and writes safetensors (STYLE.md, guideline 4).

- Reads are lazy: one tensor at a time from a memory-mapped file, after the header has been
  checked (size cap, JSON, dtypes, offsets inside the file, no overlaps, no duplicate keys);
  a file can also be verified against the sha256 its manifest records. Nothing is ever read
  with ``torch.load``.
- Writes stream: :class:`StreamingWriter` writes the header first (shapes are known from the
  plan) and then each tensor as it is produced, so a checkpoint as large as the teacher never
  sits in memory twice. The layout is exactly safetensors' (8-byte little-endian header length,
  JSON header padded with spaces to 8 bytes, tensors in header order).
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from cbd.errors import IntegrityError, StorageFullError
from cbd.manifest import sha256_file

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


class LazyReader:
    """``reader(name)`` returns one tensor (float32 unless ``keep_dtype``) from a checked file.

    Each call reads that tensor's bytes with ``pread`` into a fresh tensor the caller owns: no
    mapping of the file stays resident, so streaming a teacher-sized LInit holds only the
    tensors in flight (the page cache still serves repeated reads).
    """

    returns_fresh = True  # callers may modify what it returns in place (cbd.linit does)

    def __init__(self, path: Path, *, sha256: str | None = None, keep_dtype: bool = False) -> None:
        verify(path, sha256)
        self.path = path
        self.entries, self.metadata = read_header(path)
        with open(path, "rb") as f:
            self._base = 8 + struct.unpack("<Q", f.read(8))[0]
        self._fd = os.open(path, os.O_RDONLY)
        self.keep_dtype = keep_dtype

    def keys(self) -> list[str]:
        return list(self.entries)

    def __call__(self, name: str) -> torch.Tensor:
        e = self.entries.get(name)
        if e is None:
            raise IntegrityError(f"{self.path}: tensor {name!r} is missing")
        if e["dtype"] not in TORCH_DTYPES:
            raise IntegrityError(f"{self.path}: tensor {name!r} has dtype {e['dtype']}, which cbd does not read")
        b0, b1 = e["data_offsets"]
        t = torch.empty(e["shape"], dtype=TORCH_DTYPES[e["dtype"]])
        buf = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if b1 > b0 else memoryview(b"")
        done = 0
        while done < b1 - b0:
            n = os.preadv(self._fd, [buf[done:]], self._base + b0 + done)
            if n == 0:
                raise IntegrityError(f"{self.path}: truncated while reading {name!r}")
            done += n
        return t if self.keep_dtype else t.float()

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
                 metadata: dict[str, str] | None = None) -> None:
        self.path = path
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
        self._f = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._io(lambda: self._f.write(struct.pack("<Q", len(raw)) + raw))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, dtype, shape = self.order[self._next]
        if name != exp_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"expected {exp_name} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().contiguous().cpu()
        self._io(lambda: self._f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()) if data.numel() else b""))
        self._next += 1

    def write_all(self, items: Iterable[tuple[str, torch.Tensor]], *, ahead: int = 2) -> None:
        """Write ``items`` in order while the caller's generator computes the next ones.

        The file writes run in one thread (they release the GIL), so computing tensor k+1
        overlaps writing tensor k; at most ``ahead`` finished tensors wait in between, which
        bounds the memory. An error on either side stops both and is raised here.
        """
        pending: queue.Queue = queue.Queue(maxsize=ahead)
        failed: list[BaseException] = []

        def drain() -> None:
            while (item := pending.get()) is not None:
                if not failed:
                    try:
                        self.write(*item)
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
