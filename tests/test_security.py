"""Hostile input and secrets: every bad request gets a 4xx and writes nothing; Hub tokens leak nowhere.

- path traversal in chain, tokenizer, repo id and revision (body) and in job ids, checkpoint ids
  and file names (path), plain and percent-encoded;
- bodies over 64 KiB (413, by Content-Length and by counting a chunked upload), unknown fields,
  and JSON no schema describes (NaN, Infinity, huge numbers, deep nesting, lone surrogates,
  invalid UTF-8: fuzzed with hypothesis): 4xx, never 5xx;
- "writes nothing": every Redis key and the artifact store's listing are compared before/after;
- API keys: POST needs one when CBD_API_KEYS is set, checked against every key (no early exit);
- a recognisable Hub token sent through push_to_hub (a push that works, one the Hub refuses, one
  to a Hub that echoes the Authorization header in its errors, one to no Hub at all) appears in
  no log record, no captured output, no Redis key or value (job payloads decompressed) and no
  API response.
"""

# ruff: noqa: F401, F811  (fixtures are imported from conftest_service and then requested by name)

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import zlib

import pytest
from conftest_service import arch, free_port, module_artifacts, redis_db, redis_server
from fastapi.testclient import TestClient
from hubserver import HubServer
from huggingface_hub import constants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis

from app.core.config import Settings
from app.main import MAX_BODY, create_app
from cbd.core import artifacts
from worker import queue
from worker.main import run_worker

DB = 8
SECRET = "q" * 32
CANARY = "hf_CANARYcbdLeakTest7f3a9e21c0ffee"  # the recognisable token searched for everywhere
VALID = {"architecture": arch(2, 3)}


@pytest.fixture
def redis_url(redis_server):
    return redis_db(redis_server, DB)


@pytest.fixture
def make_client(redis_url, module_artifacts):
    def make(**overrides) -> TestClient:
        return TestClient(create_app(Settings(**({"redis_url": redis_url, "sync_wait_s": 0} | overrides))))

    return make


@pytest.fixture
def client(make_client):
    return make_client(secret_key=SECRET)


def redis_dump(url: str) -> dict[bytes, object]:
    """Every key of the database and its value, whatever its type."""
    r = Redis.from_url(url)
    read = {b"string": r.get, b"hash": r.hgetall, b"list": lambda k: r.lrange(k, 0, -1), b"set": r.smembers,
            b"zset": lambda k: r.zrange(k, 0, -1, withscores=True), b"stream": lambda k: r.xrange(k)}
    return {k: read.get(r.type(k), lambda _: None)(k) for k in r.scan_iter(count=1000)}


def store_listing(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def unchanged(redis_url, module_artifacts):
    """Asserts, after the test, that Redis and the artifact store are exactly as before it."""
    before = (redis_dump(redis_url), store_listing(module_artifacts))
    yield
    assert (redis_dump(redis_url), store_listing(module_artifacts)) == before


# ---- path traversal ------------------------------------------------------------------------------

TRAVERSALS = ["..", "../etc", "../../etc/passwd", "test/../test", "/etc/passwd", "..\\..\\windows", "%2e%2e",
              "%2e%2e%2fetc", "..%2f..", "test\x00", "test/", ".test", "~root", "test\n", "tést", "a" * 300]


@pytest.mark.parametrize("value", TRAVERSALS)
@pytest.mark.parametrize("field", ["chain", "tokenizer", "repo_id", "revision"])
def test_traversal_in_body_names_is_422_and_writes_nothing(client, unchanged, field, value):
    body = dict(VALID)
    if field in ("chain", "tokenizer"):
        body[field] = value
    else:
        body["push_to_hub"] = {"repo_id": "alice/tiny", field: value} if field == "revision" else {"repo_id": value}
    r = client.post("/initialize", json=body, headers={"X-HF-Token": CANARY})
    assert r.status_code == 422, (field, value, r.text)
    assert CANARY not in r.text


@pytest.mark.parametrize("repo_id", ["alice/..", "../alice", "alice/../bob", "alice/b/c", "alice/x.git", "a/b/",
                                     "alice\\bob", "alice/%2e%2e", "/alice/x", "alice/x\x00", "аlice/x"])
def test_more_repo_ids_are_422(client, unchanged, repo_id):
    r = client.post("/initialize", json=VALID | {"push_to_hub": {"repo_id": repo_id}}, headers={"X-HF-Token": CANARY})
    assert r.status_code == 422, r.text


@pytest.fixture
def artifact(module_artifacts):
    aid = "0123456789abcdef0123456789abcdef"
    if artifacts.load_artifact(aid) is None:
        tmp = artifacts.staging_dir(aid)
        (tmp / "model.safetensors").write_bytes(b"weights" * 100)
        artifacts.publish(tmp, aid, {"alpha": 0.5})
    (module_artifacts / "secret.txt").write_text("root:x:0:0 do not serve")  # beside the artifacts
    return aid


@pytest.mark.parametrize("path", [
    "/checkpoints/{id}/..%2Fsecret.txt", "/checkpoints/{id}/..%2F..%2Fetc%2Fpasswd", "/checkpoints/{id}/%2e%2e",
    "/checkpoints/{id}/..", "/checkpoints/{id}/.%2e/secret.txt", "/checkpoints/{id}/artifact.json",
    "/checkpoints/{id}/model.safetensors%00.txt", "/checkpoints/{id}/%2Fetc%2Fpasswd", "/checkpoints/{id}/..%5Csecret.txt",
    "/checkpoints/{id}/secret.txt", "/checkpoints/..%2F{id}/model.safetensors", "/checkpoints/../secret.txt",
    "/checkpoints/{id}%2F..%2F/secret.txt", "/checkpoints/%2e%2e/secret.txt", "/checkpoints/{ID}/model.safetensors",
    "/jobs/..%2F..%2Fetc%2Fpasswd", "/jobs/%2e%2e", "/jobs/chain-..", "/jobs/{id}%2F..", "/jobs/" + "a" * 129,
])
def test_traversal_in_paths_is_4xx(client, artifact, unchanged, path):
    r = client.get(path.format(id=artifact, ID=artifact.upper()))
    assert 400 <= r.status_code < 500, (path, r.status_code)
    assert b"root:x" not in r.content and b"weights" not in r.content


# ---- oversized, unknown and malformed bodies -----------------------------------------------------


def padded(size: int) -> bytes:
    """A valid body padded with JSON whitespace to exactly ``size`` bytes."""
    raw = json.dumps(VALID).encode()
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def test_bodies_over_64_kib_are_413(client, unchanged):
    headers = {"content-type": "application/json"}
    r = client.post("/initialize", content=padded(MAX_BODY + 1), headers=headers)
    assert r.status_code == 413
    chunks = (padded(MAX_BODY + 1)[i:i + 4096] for i in range(0, MAX_BODY + 1, 4096))  # no Content-Length
    r = client.post("/initialize", content=chunks, headers=headers)
    assert r.status_code == 413 and r.json() == {"detail": "Content Too Large"}
    r = client.post("/initialize", content=b"[" * (10 * MAX_BODY), headers=headers)
    assert r.status_code == 413


def test_a_body_of_exactly_64_kib_is_accepted(client):
    r = client.post("/initialize", content=padded(MAX_BODY), headers={"content-type": "application/json"})
    assert r.status_code == 202, r.text


@pytest.mark.parametrize("body", [
    VALID | {"colour": "red"},
    VALID | {"hf_token": CANARY},
    {"architecture": arch(2, 3) | {"num_experts": 8}},
    VALID | {"push_to_hub": {"repo_id": "alice/x", "token": CANARY}},
    VALID | {"__proto__": {"admin": True}},
    VALID | {"Chain": "test"},
])
def test_unknown_fields_are_422_and_write_nothing(client, unchanged, body):
    r = client.post("/initialize", json=body, headers={"X-HF-Token": "hf_other"})
    assert r.status_code == 422 and "extra_forbidden" in r.text


JSON_ODDITIES = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "-0", "1" * 5000, "1" * 300, '"\\ud800"',
                 '"\\u0000"', "null", "true", "[]", "{}", '"2"', "2.5", "0", "-1", "256", "4", "2", "32",
                 '"' + "a" * 70000 + '"']


@st.composite
def hostile_bodies(draw) -> bytes:
    value = st.one_of(st.sampled_from(JSON_ODDITIES), st.integers(0, 3000).map(lambda n: "[" * n + "]" * n))
    layers, hidden, heads, alpha = (draw(value) for _ in range(4))
    extra = draw(st.sampled_from(["", ', "alpha": 0.3', ', "dtype": "float64"', ', "calibrate": "yes"']))
    text = (f'{{"architecture": {{"num_hidden_layers": {layers}, "hidden_size": {hidden}, '
            f'"num_attention_heads": {heads}}}, "alpha": {alpha}{extra}}}').encode()
    return draw(st.one_of(st.just(text), st.binary(max_size=300),
                          st.just(text).map(lambda t: t.replace(b"2", b"\xff", 1))))


@given(body=hostile_bodies())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
def test_json_no_schema_describes_is_never_a_5xx(client, body):
    r = client.post("/initialize", content=body, headers={"content-type": "application/json"})
    assert r.status_code in (200, 202, 400, 413, 422), (body[:200], r.status_code, r.text[:300])


# ---- API keys ------------------------------------------------------------------------------------


def test_api_keys_guard_every_post_and_compare_every_key(make_client, monkeypatch, redis_url):
    client = make_client(api_keys=("key-one", "key-two", "key-three"), secret_key=SECRET)
    push = VALID | {"push_to_hub": {"repo_id": "alice/tiny"}}
    before = redis_dump(redis_url)
    for headers in ({}, {"X-API-Key": ""}, {"X-API-Key": "key-on"}, {"X-API-Key": "key-one "},
                    {"X-API-Key": "KEY-ONE"}, {"X-API-Key": "k" * 5000}):
        r = client.post("/initialize", json=push, headers=headers | {"X-HF-Token": CANARY})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("ApiKey"), headers
    assert redis_dump(redis_url) == before  # refused before the token was sealed and stored
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(len(a) == len(b)) or real(a, b))
    for key in ("key-one", "nope"):  # the first key matching still tries them all, on equal-length digests
        calls.clear()
        client.post("/initialize", json=VALID, headers={"X-API-Key": key})
        assert calls == [True, True, True]
    assert client.post("/initialize", json=VALID, headers={"X-API-Key": "key-three"}).status_code == 202
    assert client.get("/chains").status_code == 200 and client.get("/healthz").status_code == 200


# ---- Hub tokens ----------------------------------------------------------------------------------


@pytest.fixture
def hub_env(monkeypatch):
    """Pushes go to local Hub test servers over LFS (no Xet offline), as in tests/test_worker.py."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("CBD_SECRET_KEY", SECRET)  # the worker's copy of the API's key


def forms_of(token: str) -> list[bytes]:
    """The token and the encodings a careless log line or payload might hold it in."""
    raw = token.encode()
    return [raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw), raw.hex().encode(),
            hashlib.sha256(raw).hexdigest().encode(), token[4:].encode()]


def flatten(dump: dict[bytes, object]) -> bytes:
    """Keys and values as bytes; rq's job payloads are zlib-compressed JSON, so also decompressed."""
    out = []

    def walk(v: object) -> None:
        if isinstance(v, bytes):
            out.append(v)
            with contextlib.suppress(zlib.error):
                out.append(zlib.decompress(v))
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(k)
                walk(x)
        elif isinstance(v, list | tuple | set):
            for x in v:
                walk(x)
        elif v is not None:
            out.append(str(v).encode())

    walk(dump)
    return b"\n".join(out)


def test_hub_token_leaks_nowhere(make_client, redis_url, hub_env, monkeypatch, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)  # everything every library logs, huggingface_hub and httpx included
    monkeypatch.setattr(constants, "HF_DEBUG", True)  # huggingface_hub logs each request as a curl command
    client = make_client(secret_key=SECRET)
    answers: list[str] = []

    def push(repo_id: str, token: str) -> dict:
        body = VALID | {"push_to_hub": {"repo_id": repo_id}}
        r = client.post("/initialize", json=body, headers={"X-HF-Token": token})
        answers.append(r.text + json.dumps(dict(r.headers)))
        assert r.status_code == 202, r.text
        run_worker(["fast"], redis_url, burst=True)
        final = client.get(r.headers["location"])
        answers.append(final.text)
        for link in (final.json().get("files") or {}).values():
            answers.append(client.get(link["url"]).content.decode(errors="replace")[:100000])
        answers.append(client.get("/metrics").text + client.get("/healthz").text)
        return final.json()

    with HubServer(tmp_path / "hub", tokens={CANARY: "alice"}, lfs_threshold=4096) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        ok = push("alice/canary", CANARY)
        assert ok["status"] == "finished" and ok["push"]["repo_id"] == "alice/canary", ok
        forbidden = push("bob/canary", CANARY)  # a valid token writing outside its namespace: 403
        assert forbidden["status"] == "failed" and forbidden["error"]["type"].startswith("Hub"), forbidden
    with HubServer(tmp_path / "hub2", tokens={}, leak_tokens=True) as leaky:  # echoes Authorization in errors
        monkeypatch.setenv("HF_ENDPOINT", leaky.url)
        refused = push("alice/canary", CANARY)
        assert refused["status"] == "failed" and refused["error"]["type"] == "HubAuthError", refused
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    unreachable = push("alice/canary", CANARY)
    assert unreachable["status"] == "failed", unreachable

    out, err = capfd.readouterr()
    logs = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records
                     if not r.name.startswith("uvicorn"))  # uvicorn here is the Hub test servers' own
    assert len(caplog.records) > 20  # something was captured
    places = {"logs": logs.encode(), "stdout+stderr": (out + err).encode(), "API answers": "\n".join(answers).encode(),
              "Redis": flatten(redis_dump(redis_url))}
    for where, text in places.items():
        for form in forms_of(CANARY):
            assert form not in text, f"the Hub token appears in {where} (as {form[:12]!r}...)"
    assert not [k for k in Redis.from_url(redis_url).scan_iter(match=queue.TOKEN_PREFIX + "*")]  # all dropped
