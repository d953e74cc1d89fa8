"""The object store: where artifacts and published chains live, selected by ``CBD_STORE_URL``. Torch-free.

Two backends behind one small interface (``list``, ``get_bytes``, ``stream``, ``put_file``,
``put_bytes``, ``delete``, ``size``; keys are ``/``-separated, relative to the store's root):

- ``file:///path`` (the default: ``file://$CBD_HOME``): a local folder, today's layout
  (``artifacts/<id>/``, ``chains/<name>/``); ``local_path`` gives the file itself, so the API serves
  it with sendfile and publishing stays one folder rename (``cbd.core.artifacts``);
- ``s3://bucket/prefix``: any S3-compatible server, through obstore (Rust ``object_store``: no
  Python dependencies, streamed ranged reads, single PUTs of memory-mapped files, presigned URLs),
  configured by the standard variables ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` (and ``AWS_SESSION_TOKEN``). An ``http://`` endpoint is
  allowed (a store on the local network).

Every failure to reach the store is a ``StoreUnavailableError`` whose message names the store by
its URL and endpoint and is scrubbed of the credentials' values (they are never logged either).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote, urlparse

from cbd.errors import StoreUnavailableError, UnknownNameError

SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
CHUNK = 1 << 20  # streamed reads: 1 MiB pieces
PART = 16 << 20  # multipart uploads (files above SINGLE_PUT_MAX only): 16 MiB parts
SINGLE_PUT_MAX = 5 << 30  # S3's limit for one PUT: files up to it go up whole (a kill leaves no upload)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch


def scrub(text: str) -> str:
    """``text`` with the values of the credential variables masked (error messages of the client)."""
    for var in SECRET_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


class LocalStore:
    """A folder. Writes go through a temporary name and one rename (a reader never sees half a file)."""

    remote = False

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()
        self.url = f"file://{self.root}"

    def describe(self) -> str:
        return self.url

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts):
            raise UnknownNameError(f"invalid store key {key!r}")
        return self.root.joinpath(*parts)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        out = []
        for p in sorted(base.rglob("*")):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if p.is_file():
                out.append(ObjectInfo(p.relative_to(self.root).as_posix(), st.st_size, st.st_mtime))
        return out

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def stream(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of the object (``end`` None: to its end)."""
        f = open(self._path(key), "rb")  # noqa: SIM115 (closed by the generator)
        return _file_chunks(f, start, end)

    def put_file(self, key: str, path: Path) -> None:
        from cbd.core.files import publish_file

        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp.{os.getpid()}")
        with open(path, "rb") as src, open(tmp, "wb") as out:
            while block := src.read(CHUNK * 8):
                out.write(block)
        publish_file(tmp, dest)

    def put_bytes(self, key: str, data: bytes) -> None:
        from cbd.core.files import atomic_write_bytes

        atomic_write_bytes(self._path(key), data)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def presign(self, key: str, expires_s: int) -> str | None:
        return None

    def probe(self) -> str:
        """"ok", or why not: a probe file written, fsynced and removed (one name per call)."""
        import tempfile

        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".healthz-", dir=self.root)
            try:
                os.write(fd, b"ok")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as exc:
            return f"not writable ({exc.strerror or type(exc).__name__})"
        return "ok"


def _file_chunks(f, start: int, end: int | None) -> Iterator[bytes]:
    with f:
        f.seek(start)
        left = None if end is None else end - start
        while left is None or left > 0:
            block = f.read(CHUNK if left is None else min(CHUNK, left))
            if not block:
                return
            if left is not None:
                left -= len(block)
            yield block


class S3Store:
    """A bucket (and a key prefix in it) of an S3-compatible server."""

    remote = True

    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str | None = None,
                 region: str | None = None, timeout_s: float = 5.0) -> None:
        from obstore.store import S3Store as _S3

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        kwargs: dict = {"region": region}
        if self.endpoint:
            kwargs |= {"endpoint": self.endpoint, "virtual_hosted_style_request": False}
        self.timeout_s = timeout_s
        self._store = _S3(bucket, prefix=self.prefix or None,
                          client_options={"allow_http": True, "connect_timeout": timedelta(seconds=timeout_s),
                                          "read_timeout": timedelta(seconds=max(30.0, 6 * timeout_s))},
                          retry_config={"max_retries": 2, "retry_timeout": timedelta(seconds=2 * timeout_s),
                                        "backoff": {"init_backoff": timedelta(milliseconds=100),
                                                    "max_backoff": timedelta(seconds=1), "base": 2}},
                          **kwargs)

    def describe(self) -> str:
        return f"{self.url} at {self.endpoint}" if self.endpoint else self.url

    def local_path(self, key: str) -> Path | None:
        return None

    def _fail(self, what: str, exc: BaseException) -> StoreUnavailableError:
        detail = scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else "")[:300]
        return StoreUnavailableError(
            f"object store {self.describe()} is unreachable or refused to {what} ({type(exc).__name__}"
            f"{': ' + detail if detail else ''}); retry later, and check CBD_STORE_URL, AWS_ENDPOINT_URL "
            "and the credentials")

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        import obstore

        try:
            out = []
            for batch in obstore.list(self._store, prefix or None, chunk_size=1000):
                out += [ObjectInfo(m["path"], int(m["size"]), m["last_modified"].timestamp()) for m in batch]
            return out
        except Exception as exc:
            raise self._fail(f"list {prefix!r}", exc) from None

    def get_bytes(self, key: str) -> bytes | None:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            return bytes(obstore.get(self._store, key).bytes())
        except (NotFoundError, FileNotFoundError):
            return None
        except Exception as exc:
            raise self._fail(f"read {key}", exc) from None

    def size(self, key: str) -> int | None:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            return int(obstore.head(self._store, key)["size"])
        except (NotFoundError, FileNotFoundError):
            return None
        except Exception as exc:
            raise self._fail(f"read {key}", exc) from None

    def stream(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes ``[start, end)`` as a ranged GET; the request is made before this returns (so an
        unreachable store raises here, not halfway through a response)."""
        import obstore
        from obstore.exceptions import NotFoundError

        options: dict = {}
        if start or end is not None:
            options["range"] = (start, end) if end is not None else {"offset": start}
        try:
            result = obstore.get(self._store, key, options=options or None)
        except (NotFoundError, FileNotFoundError):
            raise UnknownNameError(f"no object {key!r} in {self.url}") from None
        except Exception as exc:
            raise self._fail(f"read {key}", exc) from None
        return self._chunks(result, key)

    def _chunks(self, result, key: str) -> Iterator[bytes]:
        try:
            for block in result.stream(min_chunk_size=CHUNK):
                yield bytes(block)
        except Exception as exc:
            raise self._fail(f"read {key}", exc) from None

    def put_file(self, key: str, path: Path) -> None:
        """One object, all of it or none. Up to ``SINGLE_PUT_MAX`` (S3's 5 GiB limit for one PUT) a
        single PUT of the memory-mapped file (page cache, no copy on the heap): a process killed
        mid-upload leaves nothing in the bucket, not even an incomplete upload. Above it a multipart
        upload (``PART``-sized parts), which the client aborts on any error in this process; one
        killed mid-upload leaves an incomplete upload that no listing or read shows and that obstore
        can neither list nor abort: only the bucket's ``AbortIncompleteMultipartUpload`` lifecycle
        rule removes it."""
        import mmap

        import obstore

        path = Path(path)
        try:
            size = path.stat().st_size
            if size == 0:
                obstore.put(self._store, key, b"", use_multipart=False)
            elif size <= SINGLE_PUT_MAX:
                with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped, \
                        memoryview(mapped) as view:
                    obstore.put(self._store, key, view, use_multipart=False)
            else:
                obstore.put(self._store, key, path, chunk_size=PART, max_concurrency=4)
        except Exception as exc:
            raise self._fail(f"write {key}", exc) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        import obstore

        try:
            obstore.put(self._store, key, data, use_multipart=False)
        except Exception as exc:
            raise self._fail(f"write {key}", exc) from None

    def delete(self, keys: list[str]) -> None:
        import obstore

        try:
            for i in range(0, len(keys), 1000):
                obstore.delete(self._store, keys[i:i + 1000])
        except Exception as exc:
            raise self._fail("delete objects", exc) from None

    def presign(self, key: str, expires_s: int) -> str:
        """A GET URL for ``key`` that needs no credentials for ``expires_s`` seconds. It carries the
        access key's id (as every S3 presigned URL does) and a signature, never the secret."""
        import obstore

        return obstore.sign(self._store, "GET", key, timedelta(seconds=expires_s))

    def probe(self) -> str:
        """"ok" when a small object can be written, read back and removed; else why not."""
        key = f".healthz/{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
        try:
            self.put_bytes(key, b"ok")
            ok = self.get_bytes(key) == b"ok"
            self.delete([key])
        except StoreUnavailableError as exc:
            return f"unreachable ({exc.message if hasattr(exc, 'message') else exc})"[:500]
        return "ok" if ok else "unreadable (a probe object read back differently)"


Store = LocalStore | S3Store
_cache: dict[tuple, Store] = {}
_lock = threading.Lock()


def store_url() -> str:
    """``CBD_STORE_URL``, else ``file://$CBD_HOME``."""
    from cbd.core import paths

    return os.environ.get("CBD_STORE_URL") or f"file://{paths.home()}"


def parse(url: str) -> tuple[str, str, str]:
    """(scheme, bucket or path, prefix) of a store URL; an UnknownNameError says what is allowed."""
    u = urlparse(url)
    if u.scheme == "file" and not u.netloc and u.path.startswith("/"):
        return "file", unquote(u.path), ""
    if u.scheme == "s3" and u.netloc and not u.username and not u.password and not u.query:
        return "s3", u.netloc, u.path.strip("/")
    raise UnknownNameError(f"CBD_STORE_URL {url.split('@')[-1]!r} is not a store URL: use file:///absolute/path "
                           "or s3://bucket[/prefix] (credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                           "never in the URL)", allowed=["file:///path", "s3://bucket/prefix"])


def get_store() -> Store:
    """The store ``CBD_STORE_URL`` names (one client per URL, endpoint and process)."""
    url = store_url()
    key = (url, os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ACCESS_KEY_ID"), os.getpid())
    with _lock:
        if key not in _cache:
            scheme, where, prefix = parse(url)
            timeout = float(os.environ.get("CBD_STORE_TIMEOUT_S") or 5.0)
            _cache[key] = LocalStore(Path(where)) if scheme == "file" else S3Store(where, prefix, timeout_s=timeout)
        return _cache[key]


def is_remote() -> bool:
    """Whether the store is an S3 bucket (chains and artifacts live there, this host keeps caches)."""
    return get_store().remote
