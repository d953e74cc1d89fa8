"""The artifact store: one folder per plan id, published by an atomic directory rename.

Torch-free (the web process serves from it). A folder ``$CBD_ARTIFACTS/<id>/`` exists only
once every file in it is complete and ``artifact.json`` lists their sizes and sha256s; work in
progress lives in ``.tmp-<id>-<pid>-<host>`` beside it and is never served.

With an ``s3://`` ``CBD_STORE_URL`` (``cbd.core.objstore``) the truth is the bucket: a worker still
writes the folder locally, then uploads its files to ``artifacts/<id>/<file>`` and the index
``artifacts/<id>/artifact.json`` **last**; an artifact exists when its index object does, so a reader
never sees a partial one, and objects of an id without an index (a worker killed mid-upload) are
removed by ``cleanup_remote_orphans``. The local folder stays as this host's cache (``local_copy``).
Called with an explicit ``root``, every function works on that folder, whatever the store.

The interface other modules build on (a store budget, say): ``list_artifacts``, ``load_artifact``,
``open_file``, ``publish``, ``delete_artifact``, ``artifact_size``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cbd.core import objstore, paths
from cbd.core.files import atomic_write_bytes, file_version, publish_dir, sha256_file
from cbd.errors import IntegrityError, UnknownNameError

ID_RE = re.compile(r"^[0-9a-f]{32}$")
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
INDEX = "artifact.json"
UPLOAD_THREADS = 4  # an artifact's files go up side by side (its index after all of them)
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


def _remote(root: Path | None) -> objstore.S3Store | None:
    """The bucket when the store is one and no explicit folder was asked for."""
    if root is not None:
        return None
    store = objstore.get_store()
    return store if store.remote else None


def key_of(aid: str, name: str = INDEX) -> str:
    return f"artifacts/{check_id(aid)}/{check_file_name(name)}"


def load_artifact(aid: str, root: Path | None = None) -> ArtifactInfo | None:
    """The finished artifact, or None when it does not exist (yet)."""
    if (store := _remote(root)) is not None:
        data = store.get_bytes(key_of(aid))
        if data is None:
            return None
        try:
            return ArtifactInfo.model_validate_json(data)
        except ValueError as exc:
            raise IntegrityError(f"artifact index {key_of(aid)} in {store.url} is corrupt: {exc}") from None
    index = artifact_dir(aid, root) / INDEX
    try:
        with open(index, "rb") as f:
            st = os.fstat(f.fileno())
            identity = (st.st_dev, *file_version(st))
            with _PARSED_LOCK:
                known = _PARSED.get(str(index))
                if known is not None and known[0] == identity:
                    _PARSED.move_to_end(str(index))
                    return known[1]
            data = f.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None  # not published yet, or evicted (renamed away) under our feet: both mean "none"
    try:
        info = ArtifactInfo.model_validate_json(data)
    except ValueError as exc:
        raise IntegrityError(f"artifact index {index} is corrupt: {exc}") from None
    with _PARSED_LOCK:
        _PARSED[str(index)] = (identity, info)
        while len(_PARSED) > PARSED_MAX:
            _PARSED.popitem(last=False)
    return info


# Indexes parsed before, by path, with the identity of the file they were parsed from (device, inode,
# size, mtime): a download or a cached POST re-reads only the identity. A re-made checkpoint is a new
# folder (a new inode); the store budget's access hint (a new mtime) costs one parse per second at most.
PARSED_MAX = 4096
_PARSED: OrderedDict[str, tuple[tuple[int, int, int, int], ArtifactInfo]] = OrderedDict()
_PARSED_LOCK = threading.Lock()


def staging_dir(aid: str, root: Path | None = None) -> Path:
    root = root or paths.artifacts_dir()
    tmp = root / f".tmp-{check_id(aid)}-{os.getpid()}-{host_tag()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, aid: str, fields: dict[str, Any], root: Path | None = None, *,
            hashes: Mapping[str, str] | None = None) -> ArtifactInfo:
    """Hash every file, write the index, fsync, and rename the folder into place (with a bucket:
    upload the files side by side, then the index). Returns the index (read from no store).

    ``hashes`` (file name -> sha256 hex) are files whose hash the caller already knows, computed
    while it wrote them (``StreamingWriter.sha256``): those are not read back; the others (config,
    tokenizer, card: small) are hashed by reading them.

    If another worker published the same id first, ours is discarded: ids are content
    addresses, so both folders hold the same bytes.
    """
    known = dict(hashes or {})
    files = {p.name: FileInfo(size=p.stat().st_size, sha256=known.get(p.name) or sha256_file(p))
             for p in sorted(tmp.iterdir()) if p.is_file()}
    info = ArtifactInfo(id=aid, files=files, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        **fields)
    atomic_write_bytes(tmp / INDEX, info.model_dump_json(indent=2).encode())
    if (store := _remote(root)) is not None:
        upload_files(store, aid, tmp, sorted(files))
        store.put_file(key_of(aid), tmp / INDEX)  # last: the index makes the artifact visible
    final = artifact_dir(aid, root)
    if publish_dir(tmp, final):  # with a bucket: this host's cache of it
        return info
    return load_artifact(aid, final.parent) or info  # published here first by another process: its index


def upload_files(store: objstore.S3Store, aid: str, folder: Path, names: list[str]) -> None:
    """Upload an artifact's files (not its index) side by side, a few at a time; returns once every
    one is in the bucket, or raises the first failure after the others have ended (none is left
    running while the caller goes on, so the index can never overtake a file)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(names) <= 1:
        for name in names:
            store.put_file(key_of(aid, name), folder / name)
        return
    with ThreadPoolExecutor(max_workers=min(UPLOAD_THREADS, len(names)), thread_name_prefix="cbd-upload") as pool:
        futures = [pool.submit(store.put_file, key_of(aid, name), folder / name) for name in names]
    for f in futures:
        f.result()


def list_artifacts(root: Path | None = None) -> list[str]:
    """Ids of the finished artifacts (those with an index), sorted."""
    if (store := _remote(root)) is not None:
        return sorted(o.key.split("/")[1] for o in store.list("artifacts/")
                      if o.key.count("/") == 2 and o.key.endswith("/" + INDEX) and ID_RE.match(o.key.split("/")[1]))
    root = root or paths.artifacts_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if ID_RE.match(p.name) and (p / INDEX).is_file())


def artifact_size(aid: str, root: Path | None = None) -> int | None:
    """Bytes of the artifact's files (its index aside), or None when it does not exist."""
    info = load_artifact(aid, root)
    return None if info is None else sum(f.size for f in info.files.values())


def open_file(aid: str, name: str, start: int = 0, end: int | None = None,
              root: Path | None = None) -> Iterator[bytes]:
    """Bytes ``[start, end)`` of one file of a finished artifact, streamed (from the bucket, or the folder)."""
    if (store := _remote(root)) is not None:
        return store.stream(key_of(aid, name), start, end)
    return objstore._file_chunks(open(artifact_dir(aid, root) / check_file_name(name), "rb"), start, end)


def file_path(aid: str, name: str, root: Path | None = None) -> Path | None:
    """The file on this host's disk when the store is a folder (served with sendfile), else None."""
    if _remote(root) is not None:
        return None
    return artifact_dir(aid, root) / check_file_name(name)


def read_file(aid: str, name: str, root: Path | None = None) -> bytes:
    """A small file of a finished artifact, whole."""
    return b"".join(open_file(aid, name, root=root))


def presign(aid: str, name: str, expires_s: int) -> str | None:
    """A URL the client may GET ``name`` from without credentials (a bucket only), else None."""
    store = _remote(None)
    return store.presign(key_of(aid, name), expires_s) if store is not None else None


def delete_artifact(aid: str, root: Path | None = None) -> bool:
    """Remove an artifact, its index first (so it stops existing before any of its files goes);
    the local cache folder too. Returns whether it existed."""
    existed = load_artifact(aid, root) is not None
    if (store := _remote(root)) is not None:
        store.delete([key_of(aid)])
        store.delete([o.key for o in store.list(f"artifacts/{aid}/")])
    folder = artifact_dir(aid, root)
    if folder.is_dir():
        gone = folder.with_name(f".tmp-{aid}-{os.getpid()}-{host_tag()}")  # out of sight first, then removed
        shutil.rmtree(gone, ignore_errors=True)
        os.rename(folder, gone)
        shutil.rmtree(gone, ignore_errors=True)
    return existed


def local_copy(aid: str) -> Path:
    """The artifact's folder on this host: with a bucket, downloaded (each file's sha256 checked) into
    the local cache when it is not there yet. An UnknownNameError when the artifact does not exist."""
    info = load_artifact(aid)
    if info is None:
        raise UnknownNameError(f"no checkpoint {aid}")
    final = artifact_dir(aid)
    cached = load_artifact(aid, final.parent)
    if _remote(None) is None or (cached is not None and cached.files == info.files):
        return final
    tmp = staging_dir(aid)
    try:
        for name, f in info.files.items():
            with open(tmp / name, "wb") as out:
                for block in open_file(aid, name):
                    out.write(block)
            if sha256_file(tmp / name) != f.sha256:
                raise IntegrityError(f"{key_of(aid, name)} does not match its sha256 in the index")
        atomic_write_bytes(tmp / INDEX, info.model_dump_json(indent=2).encode())
        publish_dir(tmp, final, replace=cached is not None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def cleanup_remote_orphans(*, older_than_s: float) -> list[str]:
    """Delete the objects of ids that have no index (a worker killed mid-upload) once their newest
    object is older than ``older_than_s`` (a live writer may still be uploading). A bucket only."""
    store = _remote(None)
    if store is None:
        return []
    groups: dict[str, list[objstore.ObjectInfo]] = {}
    for o in store.list("artifacts/"):
        parts = o.key.split("/")
        if len(parts) == 3 and ID_RE.match(parts[1]):
            groups.setdefault(parts[1], []).append(o)
    now, removed = time.time(), []
    for aid, objs in groups.items():
        if any(o.key.endswith("/" + INDEX) for o in objs) or now - max(o.mtime for o in objs) <= older_than_s:
            continue
        store.delete([o.key for o in objs])
        removed.append(aid)
    return removed


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


