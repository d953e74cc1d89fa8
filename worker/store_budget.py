"""The store budget: least-recently-used checkpoints evicted to keep ``$CBD_ARTIFACTS`` inside its limits.

Torch-free and Redis-free (the web process records accesses; any process may enforce): everything
it needs lives on the store's own filesystem, so API replicas and workers sharing a store agree.

- ``CBD_STORE_MAX_BYTES`` (unset: no cap): the bytes under ``$CBD_ARTIFACTS`` (published checkpoints,
  staging folders of jobs writing) after an eviction round; ``CBD_STORE_MIN_FREE_BYTES`` (0): the free
  space the filesystem must keep. Both take ``K``/``M``/``G``/``T`` suffixes (powers of 1024).
- **Last access** is the mtime of a checkpoint's ``artifact.json``: publishing writes it, an answer
  from the cache or a download touches it (at most once per ``ACCESS_RESOLUTION_S``: one stat, and
  rarely a utime, per request).
- **Never evicted**: a staging folder (not published yet), a checkpoint pinned by an operator
  (``.pins/<id>``: ``cbd store pin``), one held by a push in flight (``.holds/<id>.<pid>-<host>``,
  created under the eviction lock, removed when the push ends; a hold whose process is gone, or of
  another host and older than ``HOLD_MAX_AGE_S``, is ignored), and the one the enforcing job has
  just published (``keep``). Chains live elsewhere (``$CBD_CHAINS``) and are never touched.
- **A download in progress completes**: the API opens the file before it answers
  (``app.files.OpenedFileResponse``) and an evicted folder is renamed away and then unlinked; on
  POSIX an open file's bytes stay readable until it is closed (their space is freed then).
- An evicted init is re-made by its next request (ids are content addresses; the bytes are the same).

Eviction rounds run after every publish and before every write (``worker.jobs``), and on ``cbd store
gc``; one process at a time (a file lock in the store). Counters for ``/metrics`` are kept in
``.budget.json`` beside the checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from cbd.core import artifacts, paths
from cbd.core.files import atomic_write_bytes

log = logging.getLogger("cbd.store")
ENV = {"max_bytes": "CBD_STORE_MAX_BYTES", "min_free_bytes": "CBD_STORE_MIN_FREE_BYTES"}
PINS, HOLDS, STATS, LOCK = ".pins", ".holds", ".budget.json", ".gc.lock"
EVICTING = ".evict-"  # + id-pid-host: renamed away, being removed
ACCESS_RESOLUTION_S = 1.0
HOLD_MAX_AGE_S = 6 * 3600 + 600  # the slow queue's job timeout plus a margin (worker.queue.Limits)
LOCK_TIMEOUT_S = 30.0
UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_bytes(text: str | int, *, name: str = "size") -> int:
    """``1048576``, ``500M``, ``2G``, ``1TiB`` -> bytes; ValueError naming what is allowed."""
    if isinstance(text, int):
        value = text
    else:
        m = SIZE_RE.match(text)
        if m is None:
            raise ValueError(f"{name} {text!r} is not a size: an integer number of bytes, optionally with "
                             "K, M, G or T (powers of 1024), e.g. 500M or 20G")
        value = int(m[1]) * UNITS[m[2].upper()]
    if value < 0:
        raise ValueError(f"{name} must not be negative")
    return value


@dataclass(frozen=True)
class Budget:
    """The limits in force; ``max_bytes`` None means no cap (the free-space margin may still evict)."""

    max_bytes: int | None = None
    min_free_bytes: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Budget:
        env = os.environ if env is None else env
        raw = {k: env[v] for k, v in ENV.items() if env.get(v, "").strip()}
        return cls(**{k: parse_bytes(v, name=ENV[k]) for k, v in raw.items()})

    @property
    def active(self) -> bool:
        return self.max_bytes is not None or self.min_free_bytes > 0


@dataclass(frozen=True)
class Entry:
    """A published checkpoint as the budget sees it."""

    id: str
    bytes: int
    last_access: float
    pinned: bool
    held: bool


@dataclass
class Round:
    """What one eviction round found and did."""

    evicted: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    free_bytes: int = 0
    within: bool = True  # False when only protected checkpoints were left to evict


def root_dir(root: Path | None = None) -> Path:
    return root or paths.artifacts_dir()


# ---- access --------------------------------------------------------------------------------------
def record_access(aid: str, root: Path | None = None, *, now: float | None = None) -> None:
    """Mark checkpoint ``aid`` as just used (its index's mtime). Never raises: a read-only or
    vanished store only loses the hint."""
    index = artifacts.artifact_dir(aid, root) / artifacts.INDEX
    now = time.time() if now is None else now
    with contextlib.suppress(OSError):
        if now - index.stat().st_mtime >= ACCESS_RESOLUTION_S:
            os.utime(index, (now, now))


# ---- pins and holds ------------------------------------------------------------------------------
def pin(aid: str, root: Path | None = None) -> bool:
    """Pin a published checkpoint (never evicted); False when there is no such checkpoint."""
    root = root_dir(root)
    if not (artifacts.artifact_dir(aid, root) / artifacts.INDEX).is_file():
        return False
    (root / PINS).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(root / PINS / artifacts.check_id(aid), b"")
    return True


def unpin(aid: str, root: Path | None = None) -> bool:
    """Whether ``aid`` was pinned."""
    try:
        (root_dir(root) / PINS / artifacts.check_id(aid)).unlink()
        return True
    except FileNotFoundError:
        return False


def pins(root: Path | None = None) -> set[str]:
    folder = root_dir(root) / PINS
    return {p.name for p in folder.iterdir() if artifacts.ID_RE.match(p.name)} if folder.is_dir() else set()


def holds(root: Path | None = None, *, now: float | None = None) -> set[str]:
    """Ids held by a live push; stale hold files are removed."""
    folder = root_dir(root) / HOLDS
    if not folder.is_dir():
        return set()
    now, here, out = time.time() if now is None else now, artifacts.host_tag(), set()
    for p in folder.iterdir():
        aid, _, owner = p.name.partition(".")
        pid, _, host = owner.partition("-")
        try:
            age = now - p.stat().st_mtime
        except FileNotFoundError:
            continue
        alive = (artifacts.pid_alive(int(pid)) or int(pid) == os.getpid()) if host == here and pid.isdigit() \
            else age < HOLD_MAX_AGE_S
        if alive and artifacts.ID_RE.match(aid):
            out.add(aid)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return out


@contextlib.contextmanager
def hold(aid: str, root: Path | None = None) -> Iterator[None]:
    """Protect ``aid`` from eviction while the block runs (a push reading its files). Taken under the
    eviction lock, so a round in progress either finished before (the caller then finds the checkpoint
    gone and re-makes it) or sees the hold."""
    root = root_dir(root)
    path = root / HOLDS / f"{artifacts.check_id(aid)}.{os.getpid()}-{artifacts.host_tag()}"
    with _lock(root):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---- the store -----------------------------------------------------------------------------------
def _folder_bytes(folder: Path) -> int:
    total = 0
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for e in os.scandir(folder):
            with contextlib.suppress(FileNotFoundError):
                total += e.stat(follow_symlinks=False).st_size if e.is_file(follow_symlinks=False) else 0
    return total


def scan(root: Path | None = None) -> tuple[list[Entry], int]:
    """The published checkpoints (oldest access first) and the bytes of everything else under the
    store that counts against the budget (staging folders of jobs writing, folders being removed)."""
    root = root_dir(root)
    if not root.is_dir():
        return [], 0
    pinned, held = pins(root), holds(root)
    entries, other = [], 0
    for e in os.scandir(root):
        if not e.is_dir(follow_symlinks=False):
            continue
        if artifacts.ID_RE.match(e.name):
            try:
                access = os.stat(Path(e.path) / artifacts.INDEX).st_mtime
            except FileNotFoundError:
                continue  # not a published checkpoint (or removed meanwhile)
            entries.append(Entry(e.name, _folder_bytes(Path(e.path)), access, e.name in pinned, e.name in held))
        elif e.name.startswith((".tmp-", EVICTING)):
            other += _folder_bytes(Path(e.path))
    entries.sort(key=lambda x: (x.last_access, x.id))
    return entries, other


def store_bytes(root: Path | None = None) -> int:
    entries, other = scan(root)
    return other + sum(e.bytes for e in entries)


def evict(aid: str, root: Path | None = None) -> int:
    """Remove one checkpoint: renamed away first (readers then see none; open files stay readable),
    then deleted. The bytes freed (0 when it was gone)."""
    root = root_dir(root)
    folder = artifacts.artifact_dir(aid, root)
    size = _folder_bytes(folder)
    away = root / f"{EVICTING}{aid}-{os.getpid()}-{artifacts.host_tag()}"
    try:
        os.rename(folder, away)
    except FileNotFoundError:
        return 0
    shutil.rmtree(away, ignore_errors=True)
    return size


def enforce(budget: Budget | None = None, root: Path | None = None, *, keep: Iterable[str] = ()) -> Round:
    """One eviction round: the least recently used checkpoints that are neither pinned, held nor in
    ``keep`` are evicted until the store is within ``max_bytes`` and the filesystem has
    ``min_free_bytes`` free. Leftovers of interrupted rounds are removed first."""
    budget = Budget.from_env() if budget is None else budget
    root = root_dir(root)
    out = Round()
    if not root.is_dir():
        return out
    keep = set(keep)
    with _lock(root):
        for p in root.glob(f"{EVICTING}*"):
            shutil.rmtree(p, ignore_errors=True)
        entries, other = scan(root)
        total = other + sum(e.bytes for e in entries)
        out.bytes_before = total
        free = shutil.disk_usage(root).free

        def over() -> bool:
            return (budget.max_bytes is not None and total > budget.max_bytes) or free < budget.min_free_bytes

        for e in entries:
            if not over():
                break
            if e.pinned or e.held or e.id in keep:
                continue
            freed = evict(e.id, root)
            total -= freed
            free += freed  # an open download keeps its bytes until it ends; the margin counts them freed
            out.evicted.append(e.id)
            out.freed_bytes += freed
        out.within = not over()
        out.bytes_after, out.free_bytes = total, shutil.disk_usage(root).free
        _update_stats(root, out, budget, len(entries) - len(out.evicted))
    if out.evicted:
        log.info("store: evicted %d checkpoints (%d bytes) to stay within %s; %d bytes now",
                 len(out.evicted), out.freed_bytes, _describe(budget), out.bytes_after)
    if not out.within:
        log.warning("store: over its budget (%s) with %d bytes: everything left is pinned, held or being "
                    "written", _describe(budget), out.bytes_after)
    return out


def _describe(b: Budget) -> str:
    return f"max_bytes={b.max_bytes}, min_free_bytes={b.min_free_bytes}"


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / LOCK), timeout=LOCK_TIMEOUT_S):
        yield


# ---- counters for /metrics -----------------------------------------------------------------------
def read_stats(root: Path | None = None) -> dict[str, float]:
    """``bytes``, ``checkpoints`` (as of the last round), ``evictions``, ``evicted_bytes`` (since the store
    was created), ``max_bytes``, ``min_free_bytes``; {} before the first round."""
    try:
        data = json.loads((root_dir(root) / STATS).read_bytes())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _update_stats(root: Path, r: Round, budget: Budget, checkpoints: int) -> None:
    old = read_stats(root)
    data = {"bytes": r.bytes_after, "checkpoints": checkpoints,
            "evictions": int(old.get("evictions", 0)) + len(r.evicted),
            "evicted_bytes": int(old.get("evicted_bytes", 0)) + r.freed_bytes,
            "max_bytes": budget.max_bytes or 0, "min_free_bytes": budget.min_free_bytes, "at": time.time()}
    with contextlib.suppress(OSError):
        atomic_write_bytes(root / STATS, json.dumps(data).encode())


def after_publish(aid: str, root: Path | None = None) -> Round | None:
    """The round a job runs once it has published ``aid`` (kept); never raises (the init exists)."""
    record_access(aid, root)  # also when the job found it made already
    budget = Budget.from_env()
    if not budget.active:
        return None
    try:
        return enforce(budget, root, keep=[aid])
    except Exception as exc:  # a budget problem must not fail a job whose checkpoint is published
        log.warning("store: eviction round failed: %s: %s", type(exc).__name__, exc)
        return None


def before_write(root: Path | None = None) -> Round | None:
    """The round a job runs before it writes: room for what it is about to make."""
    budget = Budget.from_env()
    if not budget.active:
        return None
    try:
        return enforce(budget, root)
    except Exception as exc:
        log.warning("store: eviction round failed: %s: %s", type(exc).__name__, exc)
        return None
