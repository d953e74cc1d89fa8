"""Who may see what: keys scoped to chains, read keys required, public chains, the access log.

One API process (no worker: jobs stay queued) with CBD_READ_KEYS_REQUIRED=1, key A scoped to the test
chain, key B to chain ``other``, an operator key, and chain ``pub`` public. Checkpoints of ``other``
and ``pub`` are written into the store as a worker publishes them (an index and one file), and a job
of ``other`` is enqueued as the API enqueues one.
"""

# ruff: noqa: F401, F811  (fixtures are imported from conftest_service and then requested by name)

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import httpx
import pytest
from conftest_service import arch, children, module_artifacts, redis_db, redis_server
from redis import Redis

from app.core.config import Settings, parse_keys
from app.deps import key_id
from cbd.core import artifacts
from worker import queue

DB = 9
A, B, OPERATOR = "key-a-" + "a" * 20, "key-b-" + "b" * 20, "key-op-" + "o" * 20
SHAPE = arch(2, 4, num_key_value_heads=2, intermediate_size=48)


def put_checkpoint(root, chain: str, n: int) -> str:
    """A published checkpoint of ``chain`` with one file, as artifacts.publish leaves it."""
    aid = hashlib.sha256(f"{chain}{n}".encode()).hexdigest()[:32]
    folder = root / aid
    folder.mkdir(parents=True)
    data = f'{{"chain": "{chain}"}}'.encode()
    (folder / "config.json").write_bytes(data)
    info = artifacts.ArtifactInfo(id=aid, files={"config.json": artifacts.FileInfo(
        size=len(data), sha256=hashlib.sha256(data).hexdigest())}, alpha=0.5, plan={"chain": chain, "id": aid})
    (folder / artifacts.INDEX).write_text(info.model_dump_json())
    return aid


@pytest.fixture(scope="module")
def s(redis_server, random_chain, module_artifacts, children, tmp_path_factory):
    url = redis_db(redis_server, DB)
    log = tmp_path_factory.mktemp("access") / "access.jsonl"
    base, _ = children.api(url, CBD_API_KEYS=f"{A}:{random_chain.name},{B}:other", CBD_OPERATOR_KEYS=OPERATOR,
                           CBD_READ_KEYS_REQUIRED="1", CBD_PUBLIC_CHAINS="pub", CBD_SYNC_WAIT_S="0",
                           CBD_ACCESS_LOG=str(log))
    redis = Redis.from_url(url)
    other_id = put_checkpoint(module_artifacts, "other", 1)
    job, _ = queue.enqueue_initialize(redis, {"id": "c" * 32, "chain": "other"}, queue.FAST, owner=key_id(B))
    with httpx.Client(base_url=base, timeout=30) as client:
        yield SimpleNamespace(client=client, chain=random_chain, ours=put_checkpoint(module_artifacts, random_chain.name, 2),
                              other=other_id, public=put_checkpoint(module_artifacts, "pub", 3), job=job.id, log=log)


def h(key: str | None) -> dict:
    return {"X-API-Key": key} if key else {}


def url(aid: str) -> str:
    return f"/checkpoints/{aid}/config.json"


def test_a_key_scoped_to_one_chain_is_refused_the_others(s):
    assert s.client.get(url(s.ours), headers=h(A)).status_code == 200
    r = s.client.get(url(s.other), headers=h(A))
    assert r.status_code == 403 and "may not use chain 'other'" in r.json()["message"] and A not in r.text
    assert s.client.get(url(s.other), headers=h(B)).status_code == 200
    assert s.client.get(url(s.ours), headers=h(OPERATOR)).status_code == 200
    assert s.client.get(url(s.other), headers=h(OPERATOR)).status_code == 200
    # jobs: the view, the cancel and the list
    assert s.client.get(f"/jobs/{s.job}", headers=h(A)).status_code == 403
    assert s.client.get(f"/jobs/{s.job}", headers=h(B)).json()["status"] == "queued"
    assert s.client.delete(f"/jobs/{s.job}", headers=h(A)).status_code == 403
    assert s.job not in [j["id"] for j in s.client.get("/jobs", headers=h(A)).json()["jobs"]]
    assert s.job in [j["id"] for j in s.client.get("/jobs", headers=h(B)).json()["jobs"]]
    # chains and new work
    assert [c["name"] for c in s.client.get("/chains", headers=h(A)).json()["chains"]] == [s.chain.name]
    assert s.client.get("/chains", headers=h(B)).json()["chains"] == []
    body = {"chain": s.chain.name, "architecture": SHAPE}
    r = s.client.post("/initialize", json=body, headers=h(B))
    assert r.status_code == 403 and r.json()["allowed"] == {"chains": ["other", "pub"]}
    assert s.client.post("/plan", json=body, headers=h(B)).status_code == 403
    assert s.client.post("/plan", json=body, headers=h(A)).status_code == 200


def test_hub_style_reads_are_scoped(s):
    name = f"{s.chain.name}/L2-d64-h4-kv2-f48"
    bearer = {"Authorization": f"Bearer {B}"}
    r = s.client.get(f"/api/models/{name}", headers=bearer)
    assert r.status_code == 403 and "may not use chain" in r.headers["X-Error-Message"]
    assert s.client.head(f"/{name}/resolve/main/config.json", headers=bearer).status_code == 403
    assert s.client.get(f"/api/models/{name}/tree/main", headers=bearer).status_code == 403
    # key A may: the init is being made (no worker here), which a Hub client reads as 503 + Retry-After
    r = s.client.get(f"/api/models/{name}", headers={"Authorization": f"Bearer {A}"})
    assert r.status_code == 503 and "Retry-After" in r.headers


def test_reads_need_a_key_when_required(s):
    r = s.client.get(url(s.ours))
    assert r.status_code == 401 and "X-API-Key" in r.json()["message"]
    assert s.client.get(url("d" * 32)).status_code == 401  # no key: nothing told about what exists
    assert s.client.get(url("d" * 32), headers=h(A)).status_code == 404
    assert s.client.get(url(s.ours), headers=h("wrong-key-" + "x" * 20)).status_code == 401
    assert s.client.get(f"/jobs/{s.job}").status_code == 401
    assert s.client.post("/plan", json={"chain": s.chain.name, "architecture": SHAPE}).status_code == 401
    assert s.client.get(url(s.public)).status_code == 200  # a public chain's checkpoints need no key
    assert s.client.get("/chains").json()["chains"] == []  # anonymous: the public chains only (none built)


def test_the_access_log_names_keys_never_holds_them(s):
    s.client.get(url(s.other), headers=h(A))
    lines = [json.loads(line) for line in s.log.read_text().splitlines()]
    text = s.log.read_text()
    assert A not in text and B not in text and OPERATOR not in text
    refused = [x for x in lines if x["path"] == url(s.other) and x["status"] == 403]
    assert refused and refused[-1]["key"] == key_id(A) and refused[-1]["method"] == "GET"
    assert {"time", "client", "ms"} <= set(refused[-1])
    anonymous = [x for x in lines if x["path"] == url(s.ours) and x["status"] == 401]
    assert anonymous and anonymous[0]["key"] is None


def test_key_scopes_parse_and_refuse_without_echoing_the_key():
    keys, scopes = parse_keys("k1:test|other,k2,k3:*,a:b:*")
    assert keys == ["k1", "k2", "k3", "a:b"] and scopes == {key_id("k1"): ("test", "other")}
    with pytest.raises(ValueError, match="malformed scope") as e:
        parse_keys("secret-key:Bad Chain")
    assert "secret-key" not in str(e.value)
    with pytest.raises(ValueError, match="needs keys"):
        Settings.from_env({"CBD_READ_KEYS_REQUIRED": "1"})
