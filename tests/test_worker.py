"""The jobs and the worker loop, in-process (rq's SimpleWorker in burst mode) against a real Redis."""

# ruff: noqa: F401, F811  (fixtures are imported from conftest_service and then requested by name)

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest_service import arch, module_artifacts, redis_db, redis_server
from fastapi.testclient import TestClient
from hubserver import HubServer
from huggingface_hub import constants, snapshot_download
from redis import Redis
from rq import SimpleWorker
from rq.serializers import JSONSerializer
from transformers import AutoModelForCausalLM

from app.core.config import Settings
from app.main import create_app
from cbd.core import artifacts
from cbd.core.plan import Plan
from worker import queue
from worker.main import run_worker

DB = 2
SECRET = "w" * 32
ALICE = "hf_alice_0123456789abcdef"


@pytest.fixture
def redis_url(redis_server):
    return redis_db(redis_server, DB)


@pytest.fixture
def client(redis_url, module_artifacts):
    return TestClient(create_app(Settings(redis_url=redis_url, sync_wait_s=0, secret_key=SECRET)))


def work(redis_url: str) -> None:
    redis = queue.connect(redis_url, blocking=True)
    SimpleWorker([queue.get_queue(q, redis) for q in queue.QUEUES], connection=redis,
                 serializer=JSONSerializer).work(burst=True, logging_level="WARNING")


def test_initialize_job_publishes_reports_and_is_then_cached(client, redis_url):
    r = client.post("/initialize", json={"architecture": arch(3, 3)})
    assert r.status_code == 202
    work(redis_url)
    body = client.get(r.headers["location"]).json()
    assert body["status"] == "finished", body
    assert body["progress"] == {"stage": "done", "fraction": 1.0}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(body["files"])
    assert 0.0 <= body["alpha"] <= 1.0 and [a["name"] for a in body["anchors"]] == ["a2", "a1"]
    info = artifacts.load_artifact(body["id"])
    assert body["files"]["model.safetensors"]["sha256"] == info.files["model.safetensors"].sha256
    stats = queue.read_jobs_metrics(Redis.from_url(redis_url))["initialize"]
    assert stats["count"] == 1 and stats["ok"] == 1
    cached = client.post("/initialize", json={"architecture": arch(3, 3)})
    assert cached.status_code == 200 and cached.json()["files"] == body["files"]


def test_failed_job_has_a_clean_error_and_is_retried(client, redis_url, random_chain):
    redis = Redis.from_url(redis_url)
    r = client.post("/initialize", json={"architecture": arch(2, 3)})
    plan = queue.fetch_job(redis, r.json()["id"]).kwargs["plan"]
    queue.fetch_job(redis, plan["id"]).delete()
    plan["manifest_sha256"] = "0" * 64  # as if the chain changed after planning
    plan["id"] = Plan.model_validate(plan | {"id": ""}).id  # ids are content hashes: a new plan, a new id
    job, created = queue.enqueue_initialize(redis, plan, "fast")
    assert created
    work(redis_url)
    body = client.get(f"/jobs/{job.id}").json()
    assert body["status"] == "failed"
    assert body["error"]["type"] == "ChainNotBuiltError" and "changed" in body["error"]["message"]
    assert "Traceback" not in str(body)
    assert queue.read_jobs_metrics(redis)["initialize"]["failed"] == 1 + queue.RETRIES  # tried 3 times
    # A dead job does not block the id: enqueueing again replaces it.
    _, created = queue.enqueue_initialize(redis, plan, "fast")
    assert created


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local Hub-compatible server; LFS instead of Xet, online for it only (see tests/test_hub.py)."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubServer(tmp_path / "hub", tokens={ALICE: "alice"}, lfs_threshold=4096) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def test_push_to_hub_job(client, redis_url, hub, monkeypatch, tmp_path):
    monkeypatch.setenv("CBD_SECRET_KEY", SECRET)  # the worker's copy of the shared key
    body = {"architecture": arch(2, 2), "push_to_hub": {"repo_id": "alice/tiny-init"}}
    r = client.post("/initialize", json=body, headers={"X-HF-Token": ALICE})
    assert r.status_code == 202
    ref = queue.fetch_job(Redis.from_url(redis_url), r.json()["id"]).kwargs["token_ref"]
    work(redis_url)
    done = client.get(r.headers["location"]).json()
    assert done["status"] == "finished", done
    assert done["push"]["repo_id"] == "alice/tiny-init" and len(done["push"]["commit_sha"]) == 40
    assert done["push"]["commit_url"].startswith(hub.url) and not done["push"]["no_op"]
    assert Redis.from_url(redis_url).exists(ref) == 0  # the sealed token is deleted after use
    folder = snapshot_download("alice/tiny-init", endpoint=hub.url, token=ALICE, cache_dir=tmp_path / "cache")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    # Pushing the same checkpoint again is idempotent: no new commit.
    again = client.post("/initialize", json=body, headers={"X-HF-Token": ALICE})
    work(redis_url)
    assert client.get(again.headers["location"]).json()["push"]["no_op"] is True


def test_push_with_a_bad_token_or_key_fails_without_leaking(client, redis_url, hub, monkeypatch):
    body = {"architecture": arch(2, 2), "push_to_hub": {"repo_id": "alice/other"}}
    monkeypatch.setenv("CBD_SECRET_KEY", "x" * 32)  # not the API's key
    r = client.post("/initialize", json=body, headers={"X-HF-Token": ALICE})
    work(redis_url)
    failed = client.get(r.headers["location"]).json()
    assert failed["status"] == "failed" and "differs from the API's" in failed["error"]["message"]
    monkeypatch.setenv("CBD_SECRET_KEY", SECRET)
    wrong = "hf_not_a_valid_token_999"
    r = client.post("/initialize", json=body, headers={"X-HF-Token": wrong})
    work(redis_url)
    failed = client.get(r.headers["location"]).json()
    assert failed["status"] == "failed" and failed["error"]["type"].startswith("Hub")
    assert wrong not in str(failed)
    job = queue.fetch_job(Redis.from_url(redis_url), failed["id"])
    assert wrong not in (job.latest_result().exc_string or "")
    assert Redis.from_url(redis_url).exists(job.kwargs["token_ref"]) == 0  # dropped after the last try


def test_run_worker_cleans_orphans_and_drains(redis_url, module_artifacts):
    # A pid above the kernel's pid_max can never be alive (a fixed small pid such as 999 may be).
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    here, there = artifacts.host_tag(), "0badc0de" if artifacts.host_tag() != "0badc0de" else "0badcafe"
    age = queue.Limits.from_env().orphan_age_s
    old = time.time() - age - 60
    orphan = module_artifacts / f".tmp-0123456789abcdef0123456789abcdef-{dead}"  # no host: this one
    orphan_here = module_artifacts / f".tmp-1123456789abcdef0123456789abcdef-{dead}-{here}"
    stale_there = module_artifacts / f".tmp-2123456789abcdef0123456789abcdef-{dead}-{there}"
    busy_there = module_artifacts / f".tmp-3123456789abcdef0123456789abcdef-{dead}-{there}"  # young: may be writing
    fresh = module_artifacts / f".tmp-fedcba9876543210fedcba9876543210-1-{here}"  # pid 1 lives
    for p in (orphan, orphan_here, stale_there, busy_there, fresh):
        p.mkdir()
    os.utime(stale_there, (old, old))
    assert run_worker(["fast"], redis_url, burst=True) is False  # nothing queued
    assert not orphan.exists() and not orphan_here.exists() and not stale_there.exists()
    assert busy_there.exists() and fresh.exists()
    busy_there.rmdir()
    fresh.rmdir()


def test_build_chain_job_then_initialize(redis_url, module_artifacts, monkeypatch, tmp_path):
    """A chain with a recipe but not built: POST -> build job (slow queue) -> POST again -> checkpoint.

    ``cbd.chain.build.build_chain`` is stood in for by the random test chain (the real build distills).
    """
    import sys
    import types

    from random_chain import build_random_chain

    from cbd.core import paths

    def build_chain(name, *, progress=None):
        progress({"stage": "distill", "fraction": 0.5, "anchor": "a1"})
        return build_random_chain(paths.chains_dir(), name)

    monkeypatch.setitem(sys.modules, "cbd.chain.build", types.SimpleNamespace(build_chain=build_chain))
    monkeypatch.setenv("CBD_CHAINS", str(tmp_path / "chains"))
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "fresh.toml").write_text("# recipe\n")
    client = TestClient(create_app(Settings(redis_url=redis_url, sync_wait_s=0, recipes_dir=tmp_path / "recipes",
                                            default_chain="fresh")))
    r = client.post("/initialize", json={"architecture": arch(2, 2)})
    assert r.status_code == 202 and r.json()["id"] == "chain-fresh"
    work(redis_url)
    built = client.get("/jobs/chain-fresh").json()
    assert built["status"] == "finished" and built["result"]["anchors"] == ["a0", "a1", "a2"]
    r = client.post("/initialize", json={"architecture": arch(2, 2)})
    assert r.status_code == 202 and r.json()["kind"] == "initialize" and r.json()["chain"] == "fresh"
    work(redis_url)
    assert client.get(r.headers["location"]).json()["status"] == "finished"
