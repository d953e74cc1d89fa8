"""The answer cache (app/answer_cache.py): a repeated POST /initialize for a checkpoint that exists is
answered from memory with the route's own bytes, and never once what it depends on has changed.

One API in-process against a real Redis, no worker (a POST that needs a job stays queued: 202). The
route's ``submit`` is wrapped to count its calls: a call that did not reach it was the cache's.
"""

# ruff: noqa: F401, F811  (fixtures are imported from conftest_service and then requested by name)

from __future__ import annotations

import hashlib
import logging
import os
import shutil

import pytest
from conftest_service import arch, module_artifacts, redis_db, redis_server
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
from app.routes import initialize
from cbd.core import artifacts, manifest
from cbd.core.files import atomic_write_bytes
from cbd.core.plan import make_plan
from cbd.core.request import InitRequest

DB = 12
SHAPE = arch(2, 4, num_key_value_heads=2, intermediate_size=48)
A, B = "key-a-" + "a" * 20, "key-b-" + "b" * 20


def publish_for(body: dict, chain) -> str:
    """The checkpoint ``body`` names, published as a worker publishes one (a small file: the store does
    not care what it holds)."""
    aid = make_plan(InitRequest.model_validate(body), chain).id
    tmp = artifacts.staging_dir(aid)
    data = hashlib.sha256(aid.encode()).digest() * 64
    (tmp / "model.safetensors").write_bytes(data)
    artifacts.publish(tmp, aid, {"alpha": 0.5, "plan": {"chain": chain.name, "id": aid}})
    return aid


@pytest.fixture
def calls(monkeypatch):
    seen = []
    real = initialize.submit

    def counted(*args, **kwargs):
        seen.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(initialize, "submit", counted)
    return seen


@pytest.fixture
def make_client(redis_server, module_artifacts):
    def make(env: dict | None = None, **overrides) -> TestClient:
        env = {"REDIS_URL": redis_db(redis_server, DB), "CBD_SYNC_WAIT_S": "0"} | (env or {})
        return TestClient(create_app(Settings.from_env(env, **overrides)))
    return make


def test_a_repeat_is_the_routes_bytes_without_the_route(make_client, random_chain, calls):
    body = {"chain": random_chain.name, "architecture": SHAPE, "alpha": 0.25}
    aid = publish_for(body, random_chain)
    c = make_client()
    first = c.post("/initialize", json=body)
    assert first.status_code == 200 and first.json()["artifact_id"] == aid and len(calls) == 1
    for _ in range(3):
        again = c.post("/initialize", json=body)
        assert again.status_code == 200
        assert again.content == first.content and again.headers["content-type"] == first.headers["content-type"]
    assert len(calls) == 1  # answered from memory three times
    metrics = c.get("/metrics").text
    assert 'cbd_cache_requests_total{result="hit"} 4.0' in metrics  # the route's hit and the cache's three
    assert 'handler="/initialize"' in metrics  # the request metrics see the cache's answers as any other
    # other bytes are another key (the same JSON written differently goes through the route once)
    spaced = c.post("/initialize", content=b" " + first.request.content, headers={"content-type": "application/json"})
    assert spaced.content == first.content and len(calls) == 2
    off = make_client(answer_cache=0)
    off.post("/initialize", json=body)
    off.post("/initialize", json=body)
    assert len(calls) == 4  # CBD_ANSWER_CACHE=0: every request reaches the route


def test_an_evicted_or_remade_checkpoint_goes_through_the_route(make_client, random_chain, calls):
    body = {"chain": random_chain.name, "architecture": SHAPE, "alpha": 0.5}
    aid = publish_for(body, random_chain)
    c = make_client()
    assert c.post("/initialize", json=body).status_code == 200
    assert c.post("/initialize", json=body).status_code == 200 and len(calls) == 1
    folder = artifacts.artifact_dir(aid)
    shutil.rmtree(folder)  # evicted (or deleted by an operator)
    gone = c.post("/initialize", json=body)
    assert gone.status_code == 202 and gone.json()["status"] == "queued" and len(calls) == 2  # a job, as before
    publish_for(body, random_chain)  # made again: a new folder
    assert c.post("/initialize", json=body).status_code == 200 and len(calls) == 3
    assert c.post("/initialize", json=body).status_code == 200 and len(calls) == 3


def test_any_change_to_the_built_chains_goes_through_the_route(make_client, random_chain, calls):
    body = {"architecture": SHAPE, "alpha": 0.75}  # names no chain: which one it gets depends on all of them
    c = make_client(default_chain=random_chain.name)
    body_chain = body | {"chain": random_chain.name}
    publish_for(body_chain, random_chain)
    assert c.post("/initialize", json=body).status_code == 200
    assert c.post("/initialize", json=body).status_code == 200 and len(calls) == 1
    path = manifest.chain_dir(random_chain.name) / "manifest.json"
    atomic_write_bytes(path, path.read_bytes())  # the same manifest, a new file: as a rebuild publishes
    assert c.post("/initialize", json=body).status_code == 200 and len(calls) == 2
    other = manifest.chain_dir("zz-other")
    other.mkdir(parents=True)
    try:
        (other / "manifest.json").write_bytes(path.read_bytes().replace(b'"test"', b'"zz-other"'))
        assert c.post("/initialize", json=body).status_code == 200 and len(calls) == 3  # a chain was added
        assert c.post("/initialize", json=body).status_code == 200 and len(calls) == 3
    finally:
        shutil.rmtree(other)
    assert c.post("/initialize", json=body).status_code == 200 and len(calls) == 4  # and removed


def test_keys_tokens_and_scopes_are_never_answered_from_another_callers_entry(make_client, random_chain, calls):
    body = {"chain": random_chain.name, "architecture": SHAPE, "alpha": 0.125}
    publish_for(body, random_chain)
    c = make_client(env={"CBD_API_KEYS": f"{A}:{random_chain.name},{B}:other"})
    ok = c.post("/initialize", json=body, headers={"X-API-Key": A})
    assert ok.status_code == 200
    assert c.post("/initialize", json=body, headers={"X-API-Key": A}).content == ok.content and len(calls) == 1
    assert c.post("/initialize", json=body).status_code == 401
    assert c.post("/initialize", json=body, headers={"X-API-Key": "wrong" + A}).status_code == 401
    for _ in range(2):  # B is scoped to another chain: 403 each time, never A's answer
        assert c.post("/initialize", json=body, headers={"X-API-Key": B}).status_code == 403
    # a Hub token is the route's to check: a malformed one is 422 even where the answer is cached
    bad = c.post("/initialize", json=body, headers={"X-API-Key": A, "X-HF-Token": "has space"})
    assert bad.status_code == 422


def test_a_hit_is_in_the_access_log_with_its_key_name(make_client, random_chain):
    body = {"chain": random_chain.name, "architecture": SHAPE, "alpha": 0.375}
    publish_for(body, random_chain)
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    log = logging.getLogger("cbd.access")
    handler = Keep()
    log.addHandler(handler)
    try:
        c = make_client(env={"CBD_API_KEYS": A})
        for _ in range(2):
            assert c.post("/initialize", json=body, headers={"X-API-Key": A}).status_code == 200
    finally:
        log.removeHandler(handler)
    posts = [r for r in records if '"/initialize"' in r]
    assert len(posts) == 2 and all(f'"key":"key-{hashlib.sha256(A.encode()).hexdigest()[:12]}"' in r for r in posts)
    assert all(A not in r for r in records)
