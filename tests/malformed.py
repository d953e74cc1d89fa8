"""A corpus of malformed safetensors files, generated at test time (no binaries in git).

``cases()`` maps a case name to the bytes of a file that ``cbd.tensors.header.read_header`` must refuse.
Each starts from one small valid file (two float32 tensors) and breaks one thing: the length
prefix, the JSON, an entry, the metadata or the data section.

    >>> sorted(cases())[:3]
    ['bool_in_shape', 'data_gap', 'data_leading_gap']
"""

from __future__ import annotations

import functools
import json
import struct

MAX_HEADER = 25_000_000  # cbd.tensors.header.MAX_HEADER (kept literal: this module imports nothing of cbd)
DATA = bytes(range(40))  # a: F32 [2, 3] -> bytes 0..24, b: F32 [4] -> bytes 24..40


def valid_header() -> dict:
    return {"__metadata__": {"format": "pt"},
            "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}}


def pack(header: bytes | dict | list | str, data: bytes = DATA, *, length: int | None = None) -> bytes:
    """Length prefix + header (JSON-encoded unless bytes) + data; ``length`` overrides the prefix."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def entry(name: str, **change: object) -> bytes:
    """The valid file with entry ``name`` changed (keys set to None are removed)."""
    h = valid_header()
    h[name] = {k: v for k, v in (h[name] | change).items() if v is not None}
    return pack(h)


def valid() -> bytes:
    return pack(valid_header())


@functools.cache
def cases() -> dict[str, bytes]:
    ok = json.dumps(valid_header()).encode()
    dup = ok[:-1] + b', "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}'
    dup_meta = ok[:-1] + b', "__metadata__": {"x": "y"}}'
    return {
        # the 8-byte length prefix
        "empty_file": b"",
        "truncated_prefix": b"\x10\x00\x00\x00\x00",
        "zero_length_header": pack(b""),
        "length_beyond_file": pack(ok, length=len(ok) + len(DATA) + 1),
        "huge_length": pack(ok, length=2**63),
        "length_over_cap": struct.pack("<Q", MAX_HEADER + 8) + b"{" + b" " * (MAX_HEADER + 7),
        # the JSON text
        "not_json": pack(b"this is not json at all!"),
        "invalid_utf8": pack(b'{"a\xff\xfe": 1}'),
        "utf16_json": pack(json.dumps(valid_header()).encode("utf-16")),
        "json_array": pack([1, 2, 3]),
        "json_string": pack("a string"),
        "json_null": pack(b"null"),
        "deeply_nested": pack(b"[" * 200_000 + b"]" * 200_000),
        "duplicate_tensor_keys": pack(dup),
        "duplicate_metadata_keys": pack(dup_meta),
        "nan_in_shape": pack(ok.replace(b"[2, 3]", b"[NaN, 3]")),
        # one tensor entry
        "entry_not_object": pack(valid_header() | {"a": [0, 24]}),
        "entry_missing_offsets": entry("a", data_offsets=None),
        "entry_extra_key": entry("a", checksum="abc"),
        "bad_dtype": entry("a", dtype="F33"),
        "dtype_not_string": entry("a", dtype=["F32"]),
        "dtype_lowercase": entry("a", dtype="f32"),
        "negative_shape": entry("a", shape=[-2, -3]),
        "shape_not_list": entry("a", shape="2x3"),
        "float_in_shape": entry("a", shape=[2.0, 3]),
        "bool_in_shape": entry("b", shape=[True, 4], data_offsets=[24, 40]),
        "bool_in_offsets": entry("a", data_offsets=[False, 24]),
        "numel_overflow": entry("a", shape=[2**62, 2**62]),
        "offsets_outside_data": entry("b", data_offsets=[24, 400]),
        "offsets_reversed": entry("a", data_offsets=[24, 0]),
        "offsets_three_numbers": entry("a", data_offsets=[0, 12, 24]),
        "offsets_negative": entry("a", data_offsets=[-24, 0]),
        "overlapping_offsets": entry("b", shape=[6], data_offsets=[16, 40]),
        "size_mismatch": entry("a", shape=[2, 4]),
        # coverage of the data section (safetensors requires it to be exactly indexed)
        "data_gap": pack(valid_header() | {"b": {"dtype": "F32", "shape": [3], "data_offsets": [28, 40]}}),
        "data_leading_gap": pack({"a": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}}),
        "trailing_bytes": pack(valid_header(), DATA + b"\x00" * 8),
        "truncated_data": pack(valid_header(), DATA[:30]),
        # metadata
        "metadata_value_not_string": pack(valid_header() | {"__metadata__": {"format": 1}}),
        "metadata_not_object": pack(valid_header() | {"__metadata__": ["format", "pt"]}),
        "metadata_nested": pack(valid_header() | {"__metadata__": {"recipe": {"alpha": "0.5"}}}),
    }
