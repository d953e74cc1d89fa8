"""Two hosts sharing only Redis and an S3 bucket: the API, a worker and a chain builder in separate CBD_HOMEs.

A real S3 endpoint (SeaweedFS ``weed mini``, tests/s3server.py), one per module. The builder home
builds the small random chain and publishes it (`cbd chain push`); the worker pulls it into its own
cache on its first job; the API reads manifests and artifacts from the bucket only. Checked: the
202 and 200 paths, a download verified by sha256, ETag/304/Range/416, a presigned-URL redirect
(`cbd fetch`, `curl -L`, `hf_hub_download`), `cbd chain pull` into a fresh home, a worker SIGKILLed
mid-upload (nothing partial listed or served, orphans removed, the job finished by another worker), a
publisher SIGKILLed in the middle of a file larger than a multipart part (no object of it, no
incomplete upload), the store stopped and restarted (503 with Retry-After, /healthz says why, then
recovery with nothing lost), ``objstore.scrub`` and the store's errors, and the store's secret key in
no log, Redis key or value, or answer.
"""

# ruff: noqa: F401, F811  (fixtures are imported from conftest_service and then requested by name)

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from conftest_service import REPO, Children, arch, child_env, redis_db, redis_server, wait_job
from random_chain import build_random_chain
from redis import Redis
from s3server import SlowProxy, WeedS3
from test_security import flatten, forms_of, redis_dump

DB = 12
CHAIN = "s3chain"
SECRET = "S3SECRETcbdLeakTest9d2e7b41feedface"  # recognisable, searched for everywhere at the end
ACCESS = "cbdtestaccess17"
ABANDON_S = "8"


def home_env(home, s3: WeedS3, **extra: str) -> dict[str, str]:
    """A process of its own host: its own CBD_HOME, the bucket, and nothing else shared but Redis."""
    return {"CBD_HOME": str(home), "CBD_CHAINS": str(home / "chains"), "CBD_ARTIFACTS": str(home / "artifacts"),
            "CBD_DEFAULT_CHAIN": CHAIN, "CBD_ABANDON_AFTER_S": ABANDON_S, **s3.env("t17"), **extra}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = WeedS3(tmp_path_factory.mktemp("weed"), access_key=ACCESS, secret_key=SECRET)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def homes(tmp_path_factory):
    return {n: tmp_path_factory.mktemp(f"home-{n}") for n in ("builder", "api", "worker", "worker2", "client", "puller", "publisher")}


@pytest.fixture(scope="module")
def redis_url(redis_server):
    return redis_db(redis_server, DB)


@pytest.fixture(scope="module")
def kids(tmp_path_factory):
    k = Children(tmp_path_factory.mktemp("s3logs"))
    yield k
    k.stop()


@pytest.fixture(scope="module")
def pushed(s3, homes):
    """The random chain built in the builder's home and published with `cbd chain push`."""
    manifest = build_random_chain(homes["builder"] / "chains", CHAIN)
    r = subprocess.run([sys.executable, "-m", "cbd.cli", "chain", "push", CHAIN], cwd=REPO, capture_output=True,
                       text=True, env=child_env(**home_env(homes["builder"], s3)), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return manifest


@pytest.fixture(scope="module")
def service(s3, homes, redis_url, kids, pushed):
    kids.worker(redis_url, **home_env(homes["worker"], s3))
    base, _ = kids.api(redis_url, **home_env(homes["api"], s3, CBD_SYNC_WAIT_S="0"))
    client = httpx.Client(base_url=base, timeout=30)
    yield client
    client.close()


def bucket(s3: WeedS3, monkeypatch):
    """This test process pointed at the bucket (for listings and the orphan cleanup)."""
    for k, v in s3.env("t17").items():
        monkeypatch.setenv(k, v)
    from cbd.core import objstore

    return objstore.get_store()


ANSWERS: list[str] = []


def keep(r: httpx.Response) -> httpx.Response:
    ANSWERS.append(f"{r.status_code} {dict(r.headers)} {r.text[:20000] if r.headers.get('content-type', '').startswith('application/json') else ''}")
    return r


def test_the_chain_is_in_the_bucket_and_the_api_host_holds_none(service, pushed, homes):
    chains = keep(service.get("/chains")).json()
    assert [c["name"] for c in chains["chains"]] == [CHAIN]
    assert chains["chains"][0]["manifest_sha256"] == pushed.sha256
    health = keep(service.get("/healthz")).json()
    assert health["status"] == "ok" and health["store"] == "ok" and health["chains"] == [CHAIN]
    assert not (homes["api"] / "chains").exists()


def test_202_then_200_a_download_verified_by_sha256_and_the_http_contract(service, homes, s3, monkeypatch):
    body = {"architecture": arch(3, 3, intermediate_size=48)}
    first = keep(service.post("/initialize", json=body))
    assert first.status_code == 202, first.text
    done = wait_job(service, first.headers["location"])
    assert done["status"] == "finished", done
    aid = done["artifact_id"]
    # the worker pulled the chain into its own cache, verified; the API host has no artifact folder
    assert (homes["worker"] / "chains" / CHAIN / "manifest.json").is_file()
    assert not (homes["api"] / "artifacts" / aid).exists()
    store = bucket(s3, monkeypatch)
    keys = {o.key for o in store.list(f"artifacts/{aid}/")}
    assert f"artifacts/{aid}/artifact.json" in keys and f"artifacts/{aid}/model.safetensors" in keys

    again = keep(service.post("/initialize", json=body))
    assert again.status_code == 200 and again.json()["files"] == done["files"]
    link = done["files"]["model.safetensors"]
    got = keep(service.get(link["url"]))
    assert got.status_code == 200 and len(got.content) == link["size"]
    assert hashlib.sha256(got.content).hexdigest() == link["sha256"]
    assert got.headers["etag"] == f'"{link["sha256"]}"' and "immutable" in got.headers["cache-control"]
    assert keep(service.get(link["url"], headers={"If-None-Match": got.headers["etag"]})).status_code == 304
    part = keep(service.get(link["url"], headers={"Range": "bytes=10-1033"}))
    assert part.status_code == 206 and part.content == got.content[10:1034]
    assert part.headers["content-range"] == f"bytes 10-1033/{link['size']}"
    tail = keep(service.get(link["url"], headers={"Range": "bytes=-7"}))
    assert tail.status_code == 206 and tail.content == got.content[-7:]
    stale = keep(service.get(link["url"], headers={"Range": "bytes=0-3", "If-Range": '"other"'}))
    assert stale.status_code == 200 and stale.content == got.content  # If-Range of another version: all of it
    assert keep(service.get(link["url"], headers={"Range": f"bytes={link['size']}-"})).status_code == 416
    head = keep(service.head(link["url"]))
    assert head.status_code == 200 and int(head.headers["content-length"]) == link["size"] and not head.content
    assert keep(service.get(f"/checkpoints/{aid}/nothing.bin")).status_code == 404


def test_a_redirect_to_a_presigned_url_keeps_cbd_fetch_curl_and_hub_clients_working(
        service, s3, homes, redis_url, kids, tmp_path):
    from cbd.cli.fetch import fetch

    base, _ = kids.api(redis_url, **home_env(homes["api"], s3, CBD_STORE_REDIRECT="1", CBD_SYNC_WAIT_S="30"))
    body = {"architecture": arch(2, 2, intermediate_size=40)}
    out = fetch(body, tmp_path / "init", url=base, timeout=120)
    job = httpx.post(base + "/initialize", json=body, timeout=30).json()
    for name, f in job["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == f["sha256"]
    url = job["files"]["config.json"]["url"]
    r = keep(httpx.get(url))
    assert r.status_code == 307 and r.headers["location"].startswith(s3.endpoint)
    assert r.headers["etag"] == f'"{job["files"]["config.json"]["sha256"]}"'
    assert keep(httpx.get(url, headers={"If-None-Match": r.headers["etag"]})).status_code == 304
    curl = shutil.which("curl")
    if curl:
        dest = tmp_path / "config.json"
        subprocess.run([curl, "-sfL", "-o", str(dest), url], check=True, timeout=60)
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == job["files"]["config.json"]["sha256"]
    script = ("import sys; from huggingface_hub import hf_hub_download as d; "
              "print(d(sys.argv[1], 'model.safetensors', revision=sys.argv[2]))")
    r = subprocess.run([sys.executable, "-c", script, job["repo_id"], job["repo_revision"]], capture_output=True,
                       text=True, timeout=120, env=child_env(HF_ENDPOINT=base, HF_HOME=str(tmp_path / "hf"),
                                                             HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    with open(r.stdout.strip().splitlines()[-1], "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == job["files"]["model.safetensors"]["sha256"]


def test_a_worker_killed_mid_upload_leaves_nothing_listed_or_served(service, s3, homes, redis_url, kids, monkeypatch):
    from cbd.core import artifacts

    normal = kids.procs[0]  # the module's worker: stopped, so the slowed one takes the job
    normal.terminate()
    normal.wait(timeout=30)
    slow = kids.worker(redis_url, entry=("tests/_slow_worker.py",),
                       **home_env(homes["worker2"], s3, CBD_TEST_SLOW_UPLOAD_S="30"))
    body = {"architecture": arch(3, 2, intermediate_size=56)}
    r = keep(service.post("/initialize", json=body))
    assert r.status_code == 202, r.text
    aid = r.json()["artifact_id"] or r.json()["id"]
    store = bucket(s3, monkeypatch)
    deadline = time.monotonic() + 120
    while not store.list(f"artifacts/{aid}/"):  # the first file is up, the worker sleeps before the next
        assert time.monotonic() < deadline and slow.poll() is None, kids.log()
        time.sleep(0.2)

    def invisible() -> None:
        assert f"artifacts/{aid}/artifact.json" not in {o.key for o in store.list(f"artifacts/{aid}/")}
        assert aid not in artifacts.list_artifacts()
        for name in ("config.json", "model.safetensors", "artifact.json"):
            assert keep(service.get(f"/checkpoints/{aid}/{name}")).status_code == 404
        again = keep(service.post("/initialize", json=body))
        assert again.status_code == 202 and "files" not in again.json(), again.text

    invisible()
    slow.send_signal(signal.SIGKILL)
    slow.wait(timeout=30)
    invisible()
    assert artifacts.cleanup_remote_orphans(older_than_s=0) == [aid]  # what a worker does at start, past the age
    assert store.list(f"artifacts/{aid}/") == []
    kids.worker(redis_url, **home_env(homes["worker2"], s3))  # the abandoned job is taken back and finished
    done = wait_job(service, r.headers["location"], timeout=180)
    assert done["status"] == "finished", (done, kids.log())
    link = done["files"]["model.safetensors"]
    assert hashlib.sha256(keep(service.get(link["url"])).content).hexdigest() == link["sha256"]


def test_cbd_chain_pull_into_a_fresh_home_gives_the_builders_anchors(pushed, s3, homes):
    home = homes["puller"]
    r = subprocess.run([sys.executable, "-m", "cbd.cli", "chain", "pull", CHAIN], cwd=REPO, capture_output=True,
                       text=True, env=child_env(**home_env(home, s3)), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["manifest_sha256"] == pushed.sha256 and out["path"] == str(home / "chains" / CHAIN)
    pulled, built = home / "chains" / CHAIN, homes["builder"] / "chains" / CHAIN
    assert len(pushed.anchors) >= 2
    for entry in pushed.anchors:
        got = hashlib.sha256((pulled / entry.name / "model.safetensors").read_bytes()).hexdigest()
        assert got == entry.sha256 == hashlib.sha256((built / entry.name / "model.safetensors").read_bytes()).hexdigest()
    files = json.loads((pulled / "files.json").read_text())
    assert files and all(hashlib.sha256((pulled / rel).read_bytes()).hexdigest() == f["sha256"]
                         for rel, f in files.items())
    assert (pulled / "manifest.json").read_bytes() == (built / "manifest.json").read_bytes()
    assert not [p for p in (home / "chains").iterdir() if p.name.startswith(".")]  # no staging folder left


PUBLISHER = """
import os, sys
from cbd.core import artifacts, objstore
aid, mib, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if how == "multipart":
    objstore.SINGLE_PUT_MAX = 0  # as for a file above S3's 5 GiB limit for one PUT
stage = artifacts.staging_dir(aid)
(stage / "config.json").write_text('{"model_type": "llama"}')
(stage / "model.safetensors").write_bytes(os.urandom(mib << 20))
artifacts.publish(stage, aid, {"alpha": 0.5})
print("published", flush=True)
"""


def kill_mid_upload(s3: WeedS3, home, how: str, mib: int = 40) -> tuple[str, int]:
    """A process of its own home publishes an artifact whose model.safetensors (``mib``) is larger than
    a multipart part, through a throttled relay; SIGKILLed once more than a part's worth of bytes went
    out and before all of them did. Returns the id and the bytes sent."""
    from cbd.core import objstore

    assert mib << 20 > objstore.PART + (8 << 20)
    proxy = SlowProxy(s3.ports["s3"], rate=16 << 20)
    aid = uuid.uuid4().hex
    try:
        p = subprocess.Popen([sys.executable, "-c", PUBLISHER, aid, str(mib), how], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=child_env(**home_env(home, s3, AWS_ENDPOINT_URL=proxy.endpoint)))
        deadline = time.monotonic() + 60
        while proxy.sent < objstore.PART + (4 << 20):
            assert p.poll() is None, p.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        sent = proxy.sent
    finally:
        proxy.close()
    assert sent < mib << 20, "the upload finished before the kill"
    p.stdout.close()
    return aid, sent


def test_a_publisher_killed_in_a_file_larger_than_a_part_leaves_no_object_and_no_incomplete_upload(s3, homes,
                                                                                                  monkeypatch):
    from cbd.core import artifacts

    store = bucket(s3, monkeypatch)
    assert s3.incomplete_uploads() == []
    aid, _ = kill_mid_upload(s3, homes["publisher"], "put")
    assert aid not in artifacts.list_artifacts() and artifacts.load_artifact(aid) is None
    left = {o.key for o in store.list(f"artifacts/{aid}/")}
    assert left <= {f"artifacts/{aid}/config.json"}  # the large file is one PUT: all of it or nothing
    assert s3.incomplete_uploads() == []
    removed = artifacts.cleanup_remote_orphans(older_than_s=0)
    assert (aid in removed) == bool(left)
    assert store.list(f"artifacts/{aid}/") == [] and s3.incomplete_uploads() == []
    # the control: the same kill in a multipart upload (files above 5 GiB) leaves an incomplete upload
    # that no listing shows and obstore cannot abort (the bucket's lifecycle rule must); so the check sees one
    other, _ = kill_mid_upload(s3, homes["publisher"], "multipart")
    assert other not in artifacts.list_artifacts()
    assert f"artifacts/{other}/model.safetensors" not in {o.key for o in store.list(f"artifacts/{other}/")}
    assert len(s3.incomplete_uploads()) == 1


def test_scrub_and_the_stores_errors_never_show_credentials(monkeypatch):
    from cbd.core import objstore
    from cbd.errors import StoreUnavailableError, UnknownNameError

    token = "FwoGZXIvYXdzEXAMPLEsessiontoken0123456789"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    text = (f"PUT http://{ACCESS}:{SECRET}@s3.local/cbd?X-Amz-Security-Token={token} failed: "
            f"Credential={ACCESS}/20260101/us-east-1/s3 secret={SECRET}")
    clean = objstore.scrub(text)
    for value in (ACCESS, SECRET, token):
        assert value not in clean
    assert clean.count("***") == 5 and clean.startswith("PUT http://***:***@s3.local/cbd") and "failed" in clean
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "abc")  # too short to mask without mangling the text
    assert objstore.scrub("abc def") == "abc def"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)

    with pytest.raises(UnknownNameError) as bad:  # credentials written into the store's URL
        objstore.parse(f"s3://{ACCESS}:{SECRET}@cbd/prefix")
    assert SECRET not in str(bad.value) and ACCESS not in str(bad.value)

    store = objstore.S3Store("cbd", "p", endpoint="http://127.0.0.1:9", timeout_s=0.5)  # nothing listens
    err = store._fail("write k", RuntimeError(f"denied {ACCESS}:{SECRET} token {token}"))
    assert "denied" in err.message and not any(v in err.message for v in (ACCESS, SECRET, token))
    with pytest.raises(StoreUnavailableError) as down:
        store.put_bytes("k", b"x")
    assert "http://127.0.0.1:9" in str(down.value)
    assert not any(v in str(down.value) for v in (ACCESS, SECRET, token))


def test_the_store_stopped_then_restarted_503_then_recovery_nothing_lost(service, s3):
    made = keep(service.post("/initialize", json={"architecture": arch(3, 3, intermediate_size=48)}))
    assert made.status_code == 200, made.text
    link = made.json()["files"]["model.safetensors"]
    s3.stop()
    try:
        health = keep(service.get("/healthz"))
        assert health.status_code == 503 and health.headers["retry-after"]
        assert health.json()["store"].startswith("unreachable") and health.json()["redis"] == "ok"
        for body in ({"architecture": arch(3, 3, intermediate_size=48)}, {"architecture": arch(2, 3)}):
            down = keep(service.post("/initialize", json=body))
            assert down.status_code == 503 and down.headers["retry-after"], down.text
            assert down.json()["error"] == "StoreUnavailableError" and s3.endpoint in down.json()["message"]
        gone = keep(service.get(link["url"]))
        assert gone.status_code == 503 and gone.headers["retry-after"]
    finally:
        s3.start()
    deadline = time.monotonic() + 60
    while keep(service.get("/healthz")).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    back = keep(service.get(link["url"]))
    assert back.status_code == 200 and hashlib.sha256(back.content).hexdigest() == link["sha256"]
    new = keep(service.post("/initialize", json={"architecture": arch(2, 3)}))
    assert new.status_code == 202
    assert wait_job(service, new.headers["location"])["status"] == "finished"


def test_the_store_credentials_appear_in_no_log_redis_key_or_answer(service, kids, redis_url, homes):
    logs = kids.log().encode() + b"".join(p.read_bytes() for p in kids.logdir.glob("*.log"))
    places = {"logs": logs, "Redis": flatten(redis_dump(redis_url)), "answers": "\n".join(ANSWERS).encode()}
    assert len(ANSWERS) > 20 and Redis.from_url(redis_url).dbsize() > 0  # something was captured
    for where, text in places.items():
        for form in forms_of(SECRET):
            assert form not in text, f"the store's secret key appears in {where} (as {form[:12]!r}...)"
    for where in ("logs", "Redis"):  # the key id is in presigned URLs by design, nowhere else
        assert ACCESS.encode() not in places[where], f"the store's access key id appears in {where}"
