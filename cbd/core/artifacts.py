"""The artifact store: one folder per plan id, published by an atomic directory rename.

Torch-free (the web process serves from it). A folder ``$CBD_ARTIFACTS/<id>/`` exists only
once every file in it is complete and ``artifact.json`` lists their sizes and sha256s; work in
progress lives in ``.tmp-<id>-<pid>-<host>`` beside it and is never served.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cbd.core import paths
from cbd.core.files import atomic_write_bytes, publish_dir, sha256_file
from cbd.errors import IntegrityError, UnknownNameError

ID_RE = re.compile(r"^[0-9a-f]{32}$")
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
INDEX = "artifact.json"
# .tmp-<id>-<pid>-<host tag>; folders from before the host tag (.tmp-<id>-<pid>) count as this host's
STAGING_RE = re.compile(r"^\.tmp-(?P<id>[0-9a-f]{32})-(?P<pid>\d+)(?:-(?P<host>[0-9a-f]{8}))?$")


class FileInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    size: int
    sha256: str


class ArtifactInfo(BaseModel):
    """What ``artifact.json`` holds: the files and the recipe that made them."""

    model_config = ConfigDict(frozen=True)

    id: str
    files: dict[str, FileInfo]
    alpha: float
    alpha_source: str = Field("", description="what chose alpha: request, distance, calibrate, single-anchor")
    anchors: list[dict[str, Any]] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    plan: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    created: str = ""


def check_id(aid: str) -> str:
    if not isinstance(aid, str) or not ID_RE.match(aid):
        raise UnknownNameError(f"invalid checkpoint id {aid!r}: 32 lowercase hex characters expected")
    return aid


def check_file_name(name: str) -> str:
    if not isinstance(name, str) or not FILE_RE.match(name) or ".." in name:
        raise UnknownNameError(f"invalid file name {name!r}")
    return name


def artifact_dir(aid: str, root: Path | None = None) -> Path:
    return (root or paths.artifacts_dir()) / check_id(aid)


def load_artifact(aid: str, root: Path | None = None) -> ArtifactInfo | None:
    """The finished artifact, or None when it does not exist (yet)."""
    index = artifact_dir(aid, root) / INDEX
    if not index.is_file():
        return None
    try:
        return ArtifactInfo.model_validate_json(index.read_bytes())
    except ValueError as exc:
        raise IntegrityError(f"artifact index {index} is corrupt: {exc}") from None


def staging_dir(aid: str, root: Path | None = None) -> Path:
    root = root or paths.artifacts_dir()
    tmp = root / f".tmp-{check_id(aid)}-{os.getpid()}-{host_tag()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, aid: str, fields: dict[str, Any], root: Path | None = None) -> ArtifactInfo:
    """Hash every file, write the index, fsync, and rename the folder into place.

    If another worker published the same id first, ours is discarded: ids are content
    addresses, so both folders hold the same bytes.
    """
    files = {p.name: FileInfo(size=p.stat().st_size, sha256=sha256_file(p))
             for p in sorted(tmp.iterdir()) if p.is_file()}
    info = ArtifactInfo(id=aid, files=files, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        **fields)
    atomic_write_bytes(tmp / INDEX, info.model_dump_json(indent=2).encode())
    publish_dir(tmp, artifact_dir(aid, root))
    return load_artifact(aid, root) or info


def host_tag() -> str:
    """8 hex characters naming this host (stores may be shared by several machines)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def cleanup_orphans(root: Path | None = None, *, older_than_s: float) -> list[Path]:
    """Remove staging folders left by killed workers; call it before this process stages anything.

    A folder of this host is an orphan as soon as its process is gone (or is this one); a folder
    of another host only once it is older than ``older_than_s`` (its writer may still be busy:
    the folder's mtime does not change while a large file is written into it), which the caller
    knows: longer than its longest job may run (a worker: ``worker.queue.Limits.orphan_age_s``).
    """
    root = root or paths.artifacts_dir()
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    now, here = time.time(), host_tag()
    for p in root.iterdir():
        if not p.name.startswith(".tmp-"):
            continue
        m = STAGING_RE.match(p.name)
        local = m is not None and m["host"] in (None, here)
        try:
            stale = now - p.stat().st_mtime > older_than_s
        except FileNotFoundError:  # another worker removed or published it meanwhile
            continue
        if stale or (local and not pid_alive(int(m["pid"]))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether another process with this pid runs here (ours counts as gone: see cleanup_orphans)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


