"""File helpers: durable atomic writes and publishes, fsync by path, sha256 of a file, canonical JSON. Torch-free.

Everything cbd makes visible (an artifact, an anchor, a training checkpoint, an asset, a token
cache entry) is written under a temporary name beside its final one and published by one rename
after its bytes are on disk: a reader sees all of it or nothing, also after a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any


def file_version(st: os.stat_result) -> tuple[int, int, int]:
    """A file's identity for caches keyed by it: (inode, size, mtime in ns). A file replaced (a new inode),
    rewritten or touched reads as another version."""
    return st.st_ino, st.st_size, st.st_mtime_ns


def canonical_json(obj: Any) -> str:
    """The one serialisation hashes are taken of: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``name.tmp.<pid>``, fsync, ``os.replace``: a kill mid-write leaves no final file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by path (a folder: so a rename or a new entry in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Indented, sorted JSON with a final newline, written atomically (the format of every JSON file cbd writes)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def publish_file(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, rename it to ``final`` (replacing it), fsync the folder."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


def publish_dir(tmp: Path, final: Path, *, replace: bool = False) -> bool:
    """Publish the folder ``tmp`` (beside ``final``) as ``final``: every file in it and the folder
    fsynced, one rename, the parent fsynced.

    When ``final`` exists already: with ``replace`` it is removed first (a rebuild); without, it was
    published by another process (same content, by construction of the callers' names), so ``tmp``
    is removed and False is returned.
    """
    for p in sorted(tmp.rglob("*")):
        if p.is_file() and not p.is_symlink():
            fsync_path(p)
    fsync_path(tmp)
    if replace and final.exists():
        shutil.rmtree(final)
    try:
        os.rename(tmp, final)
    except OSError:
        if replace or not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    fsync_path(final.parent)
    return True
