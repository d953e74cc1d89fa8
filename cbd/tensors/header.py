"""safetensors headers: parsed and checked before any tensor is read, dtype tables, verification."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import torch

from cbd.core.files import file_version, sha256_file
from cbd.errors import IntegrityError

MAX_HEADER = 25_000_000  # huggingface_hub refuses larger headers; so do we


DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
               torch.int32: "I32", torch.uint8: "U8", torch.float64: "F64"}


TORCH_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # by request name


DTYPE_SIZES = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "F64": 8, "I8": 1, "I16": 2,
               "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


REVERIFY_S = 3600.0  # CBD_ANCHOR_REVERIFY_S: a verification older than this is redone (0: at every load)
_verified: dict[tuple[str, int, int, int], tuple[str, float]] = {}  # (path, inode, size, mtime) -> (sha256, when)


def _clock() -> float:
    return time.monotonic()


def reverify_s() -> float:
    """Seconds a file's verification stays valid (``CBD_ANCHOR_REVERIFY_S``, default 3600; 0: none)."""
    return max(0.0, float(os.environ.get("CBD_ANCHOR_REVERIFY_S", REVERIFY_S)))


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
    """Check a file against its recorded sha256: once per process and file identity (path, inode,
    size, mtime), and again once that verification is older than :func:`reverify_s` (so bytes
    changed in place without a new size or mtime, a disk going bad, are caught on the next load
    after the interval)."""
    if not path.is_file():
        raise IntegrityError(f"{path} is missing")
    if sha256 is None:
        return
    st = path.stat()
    key = (str(path), *file_version(st))
    now = _clock()
    done = _verified.get(key)
    if done is not None and done[0] == sha256 and now - done[1] < reverify_s():
        return
    actual = sha256_file(path)
    if actual != sha256:
        _verified.pop(key, None)
        raise IntegrityError(f"{path}: sha256 {actual[:12]}... does not match the manifest's {sha256[:12]}...; "
                             "the file was modified or corrupted: rebuild the chain")
    _verified[key] = (sha256, now)
