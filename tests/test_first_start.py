"""`cbd serve` on a fresh machine (no chain built) answers at once: /healthz, /chains with the first
chain's build and its progress, POST /initialize a 202 naming the build.

The service is `worker.serve.serve` (what `cbd serve` runs) against the test Redis, its worker
replaced by the real worker whose anchor builds are a stub (test-only: it reports progress and never
publishes), so nothing real is built and no teacher is loaded.
"""

# ruff: noqa: F401, F811  (fixtures are imported from conftest_service and then requested by name)

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
from conftest_service import REPO, child_env, free_port, redis_db, redis_server
from redis import Redis

from worker import queue, serve

DB = 9
STUB_WORKER = """
import time
import cbd.chain.build as build

def stub(name, anchor, progress=None):
    for i in range(60):
        progress({"stage": f"distil {anchor} (test stub)", "fraction": i / 60})
        time.sleep(0.05)
    raise RuntimeError("test stub: builds nothing")

build.build_anchor = stub
from worker.main import main
raise SystemExit(main())
"""
SERVE = """
import sys
from worker import serve
start = serve.Supervisor.start

def start_stub(self, name, cmd, *, restart=False):  # the workers run STUB_WORKER instead of worker.main
    if name.startswith("worker-"):
        cmd = [sys.executable, "-c", sys.argv[2], *cmd[3:]]
    start(self, name, cmd, restart=restart)

serve.Supervisor.start = start_stub
raise SystemExit(serve.serve(port=int(sys.argv[1])))
"""


def test_a_fresh_serve_answers_while_the_first_chain_builds(redis_server, tmp_path):
    url = redis_db(redis_server, DB)
    port = free_port()
    env = child_env(REDIS_URL=url, CBD_HOME=str(tmp_path), CBD_CHAINS=str(tmp_path / "chains"),
                    CBD_ARTIFACTS=str(tmp_path / "artifacts"), CBD_SYNC_WAIT_S="0", CBD_ACCESS_LOG="off")
    env.pop("CBD_DEFAULT_CHAIN", None)
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", SERVE, str(port), STUB_WORKER], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        health = None
        for _ in range(600):
            try:
                health = httpx.get(base + "/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                time.sleep(0.1)
        assert health is not None and health.status_code == 200 and health.json()["chains"] == []
        chains = httpx.get(base + "/chains").json()
        assert chains["chains"] == [] and [b["chain"] for b in chains["builds"]] == ["tiny"]
        assert chains["builds"][0]["job"] == "chain-tiny" and chains["builds"][0]["status"] in ("queued", "started")
        r = httpx.post(base + "/initialize", json={"architecture": {"num_hidden_layers": 4, "hidden_size": 256,
                                                                    "num_attention_heads": 4}})
        assert r.status_code == 202 and r.json()["id"] == "chain-tiny" and r.headers["Location"] == "/jobs/chain-tiny"
        assert "being built" in r.json()["message"]
        progress = None
        for _ in range(300):  # the stub worker picks up the first anchor job and reports
            build = httpx.get(base + "/chains").json()["builds"][0]
            progress = build.get("progress") or {}
            if progress.get("fraction", 0) > 0:
                break
            time.sleep(0.1)
        assert progress.get("fraction", 0) > 0 and "test stub" in progress["stage"], progress
        assert "is being built by the workers (job chain-tiny" in (tmp_path / "serve.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()


class NoChildren:
    """``serve.Supervisor`` stand-in: records what would be started, starts nothing."""

    started: list[str] = []

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def start(self, name: str, cmd: list[str], *, restart: bool = False) -> None:
        self.started.append(name)

    def run(self, *, main: str) -> int:
        return 0

    def stop(self) -> None:
        pass


def test_serve_builds_a_default_chain_whose_recipe_is_in_a_recipes_folder(redis_server, tmp_path, monkeypatch,
                                                                           capsys):
    """`cbd serve` with ``CBD_DEFAULT_CHAIN`` naming a recipe of one's own (a ``CBD_RECIPES`` folder) finds it
    as the service and `cbd chain build NAME` do, and queues one build job per anchor of that recipe."""
    url = redis_db(redis_server, DB)
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "mine.toml").write_text('name = "mine"\nladder = [0.4, 0.2, 0.1]\n')
    for k, v in {"CBD_HOME": tmp_path, "CBD_CHAINS": tmp_path / "chains", "CBD_DEFAULT_CHAIN": "mine"}.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.delenv("CBD_RECIPES", raising=False)
    monkeypatch.setattr(serve, "Supervisor", NoChildren)
    NoChildren.started = []
    assert serve.serve(redis_url=url) == serve.EXIT_NOT_BUILT  # not packaged, and no CBD_RECIPES yet
    assert "chain 'mine' has no recipe" in capsys.readouterr().err and NoChildren.started == []
    assert queue.fetch_job(Redis.from_url(url), queue.chain_job_id("mine")) is None

    monkeypatch.setenv("CBD_RECIPES", str(folder))
    assert serve.first_recipe("mine") == folder / "mine.toml"
    assert serve.serve(redis_url=url) == 0
    assert NoChildren.started == ["worker-0", "api"]
    build = queue.fetch_job(Redis.from_url(url), queue.chain_job_id("mine"))
    assert build is not None and build.meta["chain"] == "mine"
    assert build.meta["jobs"] == [*(queue.anchor_job_id("mine", a) for a in ("a0", "a1", "a2", "a3")),
                                  queue.chain_job_id("mine")]
    assert "chain 'mine' is being built by the workers" in capsys.readouterr().out
