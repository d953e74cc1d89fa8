"""The HTTP edge against a real Redis, with no worker: jobs stay queued. Torch-free paths only."""

# ruff: noqa: F401, F811  (fixtures are imported from conftest_service and then requested by name)

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
from conftest_service import REPO, arch, closed_port_url, module_artifacts, redis_db, redis_server
from fastapi.testclient import TestClient
from redis import Redis

from app.core.config import Settings
from app.main import create_app
from cbd.core import artifacts
from worker import queue, tokens

DB = 1
SECRET = "s" * 32
TOKEN = "hf_SuperSecretToken0123456789"


@pytest.fixture
def redis_url(redis_server):
    return redis_db(redis_server, DB)


@pytest.fixture
def make_client(redis_url, module_artifacts):
    def make(**overrides) -> TestClient:
        settings = Settings(**({"redis_url": redis_url, "sync_wait_s": 0} | overrides))
        return TestClient(create_app(settings))

    return make


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def artifact(module_artifacts):
    """A published artifact with small files (no torch: the store does not care what they hold)."""
    aid = "0123456789abcdef0123456789abcdef"
    if artifacts.load_artifact(aid) is None:
        tmp = artifacts.staging_dir(aid)
        (tmp / "model.safetensors").write_bytes(bytes(range(256)) * 40)
        (tmp / "config.json").write_text('{"model_type": "llama"}')
        artifacts.publish(tmp, aid, {"alpha": 0.5, "plan": {"chain": "test"}})
    return artifacts.load_artifact(aid)


def test_openapi_declares_every_status(client):
    paths = client.get("/openapi.json").json()["paths"]
    declared = {(m, p): set(op["responses"]) for p, ops in paths.items() for m, op in ops.items()}
    assert {"200", "202", "401", "422", "503", "507"} <= declared[("post", "/initialize")]
    assert {"200", "404", "422", "503"} <= declared[("get", "/jobs/{job_id}")]
    for method in ("get", "head"):
        assert {"200", "206", "304", "404", "416", "422"} <= declared[(method, "/checkpoints/{artifact_id}/{name}")]
    assert {"200", "503"} <= declared[("get", "/healthz")]


def test_queued_request_answers_202_with_location(client, redis_url):
    r = client.post("/initialize", json={"architecture": arch(3, 3)})
    assert r.status_code == 202, r.text
    body = r.json()
    assert r.headers["location"] == f"/jobs/{body['id']}"
    assert int(r.headers["retry-after"]) >= 1
    assert body["status"] == "queued" and body["queue"] == "fast" and body["id"] == body["artifact_id"]
    assert "default chain 'default' is not built" in body["warnings"][0]  # fell back to 'test'
    polled = client.get(r.headers["location"])
    assert polled.status_code == 200 and polled.json()["status"] == "queued"
    job = queue.fetch_job(Redis.from_url(redis_url), body["id"])
    assert job.func_name == queue.INITIALIZE and job.kwargs["plan"]["id"] == body["id"]
    assert job.retries_left == queue.RETRIES
    # The same request again joins the same job.
    again = client.post("/initialize", json={"architecture": arch(3, 3)})
    assert again.status_code == 202 and again.json()["id"] == body["id"]
    assert queue.get_queue("fast", Redis.from_url(redis_url)).count == 1


@pytest.mark.parametrize(("body", "needle"), [
    ({"architecture": arch(2, 2), "colour": "red"}, "extra_forbidden"),
    ({"architecture": {"num_hidden_layers": 2, "hidden_size": 50, "num_attention_heads": 3}}, "ShapeError"),
    ({"architecture": {"num_hidden_layers": 2, "hidden_size": 60, "num_attention_heads": 3}}, "ChainIncompatibleError"),
    ({"architecture": arch(0, 2)}, "greater_than_equal"),
    ({"architecture": arch(200, 60)}, "ShapeError"),  # far larger than the chain allows
    ({"architecture": arch(2, 2), "chain": "nope"}, "cbd chain build"),
    ({"architecture": arch(2, 2), "chain": "../etc"}, "string_pattern_mismatch"),
    ({"architecture": arch(2, 2), "tokenizer": "klingon"}, "unknown tokenizer"),
    ({"architecture": arch(2, 2), "push_to_hub": {"repo_id": "../x"}}, "string_pattern_mismatch"),
])
def test_bad_requests_are_422_and_say_what_is_allowed(client, body, needle):
    r = client.post("/initialize", json=body)
    assert r.status_code == 422, r.text
    assert needle in r.text


def test_unknown_chain_lists_built_chains(client):
    body = client.post("/initialize", json={"architecture": arch(2, 2), "chain": "nope"}).json()
    assert body["error"] == "UnknownNameError" and body["allowed"]["chains"] == ["test"]


def test_chain_with_recipe_but_not_built_enqueues_a_build(make_client, redis_url, tmp_path):
    (tmp_path / "fresh.toml").write_text("# a recipe\n")
    client = make_client(recipes_dir=tmp_path)
    r = client.post("/initialize", json={"architecture": arch(2, 2), "chain": "fresh"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["id"] == "chain-fresh" and body["kind"] == "build_chain" and "POST /initialize again" in body["message"]
    assert r.headers["location"] == "/jobs/chain-fresh"
    job = queue.fetch_job(Redis.from_url(redis_url), "chain-fresh")
    assert job.origin == "slow" and job.func_name == queue.BUILD_CHAIN and job.kwargs == {"name": "fresh"}
    assert job.timeout == Settings().slow_timeout_s
    assert client.post("/initialize", json={"architecture": arch(2, 2), "chain": "fresh"}).json()["id"] == "chain-fresh"
    assert queue.get_queue("slow", Redis.from_url(redis_url)).count == 1


def test_dead_job_is_replaced_by_a_new_request(client, redis_url):
    r = client.post("/initialize", json={"architecture": arch(1, 2)})
    redis = Redis.from_url(redis_url)
    job = queue.fetch_job(redis, r.json()["id"])
    job.set_status("failed")
    again = client.post("/initialize", json={"architecture": arch(1, 2)})
    assert again.status_code == 202 and again.json()["status"] == "queued"
    assert queue.fetch_job(redis, job.id).get_status() == "queued"


def test_jobs_unknown_404_and_bad_id_422(client):
    assert client.get("/jobs/" + "f" * 32).status_code == 404
    assert client.get("/jobs/chain-nothing").status_code == 404
    assert client.get("/jobs/bad.id").status_code == 422


def test_job_record_gone_but_artifact_present_reads_finished(client, artifact):
    body = client.get(f"/jobs/{artifact.id}").json()
    assert body["status"] == "finished" and set(body["files"]) == {"model.safetensors", "config.json"}


def test_checkpoint_etag_304_range_416_head(client, artifact):
    url = f"/checkpoints/{artifact.id}/model.safetensors"
    r = client.get(url)
    sha = artifact.files["model.safetensors"].sha256
    assert r.status_code == 200 and r.content == bytes(range(256)) * 40
    assert r.headers["etag"] == f'"{sha}"'
    assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert client.get(url, headers={"If-None-Match": f'"{sha}"'}).status_code == 304
    assert client.get(url, headers={"If-None-Match": f'W/"{sha}", "other"'}).status_code == 304
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    part = client.get(url, headers={"Range": "bytes=0-7"})
    assert part.status_code == 206 and part.content == bytes(range(8))
    assert part.headers["content-range"] == f"bytes 0-7/{256 * 40}"
    assert client.get(url, headers={"Range": "bytes=999999-"}).status_code == 416
    head = client.head(url)
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(256 * 40)
    assert client.get(f"/checkpoints/{artifact.id}/config.json").headers["content-type"] == "application/json"


@pytest.mark.parametrize("path", [
    "/checkpoints/{id}/a..b", "/checkpoints/{id}/.hidden", "/checkpoints/{id}/..%2F..%2Fetc%2Fpasswd",
    "/checkpoints/not-an-id/model.safetensors", "/checkpoints/{id}/%2e%2e",
])
def test_checkpoint_names_are_strict(client, artifact, path):
    r = client.get(path.format(id=artifact.id))
    assert r.status_code in (404, 422), r.text
    assert b"root:" not in r.content


def test_checkpoint_unknown_file_and_id_404(client, artifact):
    assert client.get(f"/checkpoints/{artifact.id}/artifact.json").status_code == 404  # not listed
    assert client.get(f"/checkpoints/{'e' * 32}/model.safetensors").status_code == 404


def test_api_keys(make_client):
    client = make_client(api_keys=("k-one", "k-two"))
    body = {"architecture": arch(2, 3)}
    assert client.post("/initialize", json=body).status_code == 401
    assert client.post("/initialize", json=body, headers={"X-API-Key": "k-three"}).status_code == 401
    assert client.post("/initialize", json=body, headers={"X-API-Key": "k-two"}).status_code == 202
    assert client.get("/chains").status_code == 200  # reads stay open


def test_redis_down_is_503_never_500(make_client):
    client = make_client(redis_url=closed_port_url())
    r = client.post("/initialize", json={"architecture": arch(2, 4)})
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"] == "QueueUnavailableError"
    assert "redis://" not in r.text
    assert client.get("/jobs/" + "a" * 32).status_code == 503
    health = client.get("/healthz")
    assert health.status_code == 503 and health.json()["redis"].startswith("unreachable")
    assert "cbd_redis_up 0.0" in client.get("/metrics").text


def test_healthz_chains_and_metrics(client):
    health = client.get("/healthz").json()
    assert health == health | {"status": "ok", "redis": "ok", "store": "ok", "chains": ["test"]}
    chains = client.get("/chains").json()
    test = chains["chains"][0]
    assert test["name"] == "test" and [a["name"] for a in test["anchors"]] == ["a0", "a1", "a2"]
    assert test["servable"]["head_dim"] == 16 and test["anchors"][0]["spec"]["hidden_size"] == 96
    client.post("/initialize", json={"architecture": arch(2, 5)})
    text = client.get("/metrics").text
    for name in ("http_requests_total", "http_request_duration_seconds", 'cbd_cache_requests_total{result="miss"}',
                 'cbd_queue_jobs{queue="fast",state="queued"}', "cbd_redis_up 1.0"):
        assert name in text


def test_push_token_is_sealed_never_plaintext(make_client, redis_url):
    client = make_client(secret_key=SECRET, token_ttl_s=600)
    body = {"architecture": arch(2, 6), "push_to_hub": {"repo_id": "alice/tiny", "private": True}}
    r = client.post("/initialize", json=body, headers={"X-HF-Token": TOKEN})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert job_id.startswith(r.json()["artifact_id"] + "-push-")
    redis = Redis.from_url(redis_url)
    dump = b"".join(k + repr(_value(redis, k)).encode() for k in redis.keys("*"))
    assert TOKEN.encode() not in dump and b"SuperSecret" not in dump
    job = queue.fetch_job(redis, job_id)
    ref = job.kwargs["token_ref"]
    assert ref.startswith(queue.TOKEN_PREFIX) and job.kwargs["push"]["repo_id"] == "alice/tiny"
    assert 0 < redis.ttl(ref) <= 600
    assert tokens.unseal(redis.get(ref).decode(), SECRET, aad=ref) == TOKEN


def _value(redis: Redis, key: bytes) -> object:
    kind = redis.type(key)
    return {b"string": redis.get, b"hash": redis.hgetall, b"list": lambda k: redis.lrange(k, 0, -1),
            b"set": redis.smembers, b"zset": lambda k: redis.zrange(k, 0, -1),
            b"stream": lambda k: redis.xrange(k)}.get(kind, lambda k: None)(key)


def test_push_needs_a_token_and_a_secret(make_client):
    body = {"architecture": arch(2, 6), "push_to_hub": {"repo_id": "alice/tiny"}}
    no_secret = make_client()
    r = no_secret.post("/initialize", json=body, headers={"X-HF-Token": TOKEN})
    assert r.status_code == 503 and "CBD_SECRET_KEY" in r.text and TOKEN not in r.text
    with_secret = make_client(secret_key=SECRET)
    assert with_secret.post("/initialize", json=body).status_code == 422
    bad = with_secret.post("/initialize", json=body, headers={"X-HF-Token": "has space " + TOKEN})
    assert bad.status_code == 422 and TOKEN not in bad.text


def test_seal_round_trip_and_tamper():
    box = tokens.seal(TOKEN, SECRET, aad="cbd:token:1")
    assert TOKEN not in box and tokens.unseal(box, SECRET, aad="cbd:token:1") == TOKEN
    assert tokens.seal(TOKEN, SECRET, aad="cbd:token:1") != box  # fresh nonce
    for wrong in (dict(key="t" * 32, aad="cbd:token:1"), dict(key=SECRET, aad="cbd:token:2")):
        with pytest.raises(tokens.SealError):
            tokens.unseal(box, wrong["key"], aad=wrong["aad"])
    raw = bytearray(__import__("base64").urlsafe_b64decode(box))
    raw[20] ^= 1
    with pytest.raises(tokens.SealError):
        tokens.unseal(__import__("base64").urlsafe_b64encode(bytes(raw)).decode(), SECRET, aad="cbd:token:1")


def test_web_process_never_imports_torch(redis_url, module_artifacts, artifact):
    """Import the app, serve a POST and a download in a fresh interpreter: torch stays unloaded."""
    script = textwrap.dedent(f"""
        import json, sys
        from fastapi.testclient import TestClient
        from app.core.config import Settings
        from app.main import create_app
        client = TestClient(create_app(Settings(redis_url={redis_url!r}, sync_wait_s=0.2)))
        codes = [client.post("/initialize", json={{"architecture": {json.dumps(arch(2, 1))}}}).status_code,
                 client.get("/chains").status_code, client.get("/healthz").status_code,
                 client.get("/checkpoints/{artifact.id}/model.safetensors").status_code,
                 client.get("/metrics").status_code]
        heavy = sorted(m for m in ("torch", "transformers", "safetensors.torch") if m in sys.modules)
        print(json.dumps({{"codes": codes, "heavy": heavy}}))
    """)
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"codes": [202, 200, 200, 200, 200], "heavy": []}, result
    assert time.monotonic() - start < 60


def test_store_full_is_507(client, monkeypatch):
    import errno

    from app.routes import initialize
    from cbd.errors import StorageFullError

    def full(_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(initialize.artifacts, "load_artifact", full)
    r = client.post("/initialize", json={"architecture": arch(2, 1)})
    assert r.status_code == 507 and r.json()["error"] == "StorageFullError"

    def full_cbd(_):
        raise StorageFullError("the artifact store is full")

    monkeypatch.setattr(initialize.artifacts, "load_artifact", full_cbd)
    assert client.post("/initialize", json={"architecture": arch(2, 1)}).status_code == 507


def test_a_failed_job_answers_with_its_errors_status():
    from fastapi import Response
    from starlette.requests import Request

    from app import schemas
    from app.errors import JobFailedError
    from app.routes.initialize import answer

    request = Request({"type": "http", "app": None, "headers": []})
    for error, status in [({"type": "StorageFullError", "message": "full", "status": 507}, 507),
                          ({"type": "HubAuthError", "message": "401 from the Hub", "status": 502}, 502),
                          ({"type": "ChainNotBuiltError", "message": "changed"}, 409),
                          ({"type": "ZeroDivisionError", "message": "oops"}, 500),
                          ({"type": "ShapeError", "message": "odd", "status": 422}, 500),
                          # the Hub's refusals are the caller's (4xx), an unreachable Hub 503, never a 500
                          ({"type": "HubAuthError", "message": "401 from the Hub", "hub_status": 401}, 401),
                          ({"type": "HubPermissionError", "message": "403", "hub_status": 403}, 403),
                          ({"type": "HubNotFoundError", "message": "404", "hub_status": 401}, 404),
                          ({"type": "InvalidRepoIdError", "message": "bad id"}, 422),
                          ({"type": "HubUnavailableError", "message": "refused"}, 503)]:
        view = schemas.Job(id="a" * 32, status="failed", error=schemas.JobError(**error))
        with pytest.raises(JobFailedError) as info:
            answer(view, request, Response(), Settings())
        assert info.value.status == status and info.value.to_dict()["cause"]["message"] == error["message"]


def test_each_job_limit_is_defined_once():
    """worker.queue.Limits defines the limits; the API's Settings and a worker (no Settings) read the
    same variables; the library's orphan cleanup takes its age from the caller."""
    import inspect

    from cbd.core import artifacts
    from worker import queue

    env = {"CBD_FAST_TIMEOUT_S": "60", "CBD_SLOW_TIMEOUT_S": "7200", "CBD_RESULT_TTL_S": "3600"}
    assert Settings().limits == queue.Limits()
    assert Settings.from_env(env).limits == queue.Limits.from_env(env) == queue.Limits(60, 7200, 3600)
    assert queue.Limits.from_env({}).orphan_age_s == 6 * 3600 + 600
    assert inspect.signature(artifacts.cleanup_orphans).parameters["older_than_s"].default is inspect.Parameter.empty
    assert not hasattr(artifacts, "orphan_age_s")


def test_settings_from_env():
    s = Settings.from_env({"REDIS_URL": "redis://r:6379/2", "CBD_API_KEYS": " a, b ,", "CBD_SYNC_WAIT_S": "1.5",
                           "CBD_DEFAULT_CHAIN": "tiny", "CBD_SECRET_KEY": "k" * 20})
    assert [k.get_secret_value() for k in s.api_keys] == ["a", "b"]
    assert (s.redis_url, s.sync_wait_s, s.default_chain) == ("redis://r:6379/2", 1.5, "tiny")
    with pytest.raises(ValueError, match="at least 16"):
        Settings.from_env({"CBD_SECRET_KEY": "short-secret"})
    with pytest.raises(ValueError):
        Settings.from_env({"CBD_SYNC_WAIT_S": "-1"})
