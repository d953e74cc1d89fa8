"""``DELETE /jobs/{id}``: a queued job never runs, a running bridge stops at its next progress point.

One real worker (its bridge steps slowed, test-only, so a bridge job is still training when it
is cancelled) and one API process with three keys: A and B (``CBD_API_KEYS``) and an operator
key. Nothing is published by a cancelled job and no staging folder is left; requests that were
deduplicated onto it read ``cancelled`` with who cancelled it; another key gets 403; the same
request afterwards runs to the end.
"""

# ruff: noqa: F401, F811  (fixtures are imported from conftest_service and then requested by name)

from __future__ import annotations

import time
from types import SimpleNamespace

import httpx
import pytest
from conftest_service import arch, children, module_artifacts, redis_db, redis_server
from redis import Redis

from app.deps import key_id
from worker import queue

DB = 14
A, B, OPERATOR = "key-a-" + "a" * 20, "key-b-" + "b" * 20, "key-op-" + "o" * 20
# The real worker with each bridge training step slowed (test-only; nothing in cbd/ knows).
SLOW_BRIDGE_WORKER = """
import os, time
from cbd.bridge import runner
step_s = float(os.environ["CBD_TEST_SLOW_BRIDGE_STEP_S"])
train = runner.bridge_train

def slowed(report):
    def each_step(event):
        time.sleep(step_s)
        report(event)
    return each_step

runner.bridge_train = lambda *a, report, **kw: train(*a, report=slowed(report), **kw)
from worker.main import main
raise SystemExit(main())
"""
BRIDGE_ARCH = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 64}
BRIDGE_STEPS = 10


@pytest.fixture(scope="module")
def s(redis_server, random_chain, module_artifacts, children):
    url = redis_db(redis_server, DB)
    keys = {"CBD_API_KEYS": f"{A},{B}", "CBD_OPERATOR_KEYS": OPERATOR}
    children.worker(url, entry=("-c", SLOW_BRIDGE_WORKER), CBD_TEST_SLOW_BRIDGE_STEP_S="0.4")
    base, _ = children.api(url, CBD_SYNC_WAIT_S="0", **keys)
    with httpx.Client(base_url=base, timeout=30) as client:
        yield SimpleNamespace(client=client, redis=Redis.from_url(url), chain=random_chain, root=module_artifacts,
                              children=children, bridge=None)


def bridge_plan(chain) -> dict:
    """A bridge plan with a small budget (the API's default bridge is minutes long)."""
    from cbd.core.plan import BridgeOptions, make_plan
    from cbd.core.request import InitRequest

    opts = BridgeOptions(steps=BRIDGE_STEPS, batch_size=2, seq_len=32, warmup_steps=2, corpus="austen",
                         eval_batches=1, eval_batch_size=2, eval_seq_len=32, seed=7)
    req = InitRequest(chain=chain.name, architecture=BRIDGE_ARCH, tokenizer="gpt2")
    return make_plan(req, chain, bridge_options=opts).model_dump(mode="json")


def enqueue_bridge(s, owner: str) -> str:
    """As the API enqueues a bridge for key ``owner`` (its body cannot carry bridge options)."""
    job, created = queue.enqueue_initialize(s.redis, bridge_plan(s.chain), queue.SLOW, owner=key_id(owner))
    assert created and job.origin == queue.SLOW
    return job.id


def wait_training(s, job_id: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = s.client.get(f"/jobs/{job_id}", headers=key(A)).json().get("progress") or {}
        if progress.get("stage") == "bridge distillation" and progress.get("step", 0) >= 1:
            return
        time.sleep(0.1)
    raise AssertionError(f"bridge job {job_id} never trained; log:\n{s.children.log()}")


def key(k: str) -> dict:
    return {"X-API-Key": k}


def nothing_published(s, artifact_id: str) -> None:
    assert not (s.root / artifact_id).exists()
    assert not [p.name for p in s.root.iterdir() if p.name.startswith(".tmp-")]


def test_a_queued_job_is_cancelled_and_its_deduplicated_callers_are_told(s):
    s.bridge = enqueue_bridge(s, A)  # keeps the one worker busy: the fast job below stays queued
    wait_training(s, s.bridge)
    body = {"architecture": arch(2, 5)}
    first = s.client.post("/initialize", json=body, headers=key(A))
    assert first.status_code == 202 and first.json()["status"] == "queued", first.text
    job_id = first.json()["id"]
    second = s.client.post("/initialize", json=body, headers=key(B))  # deduplicated onto A's job
    assert second.json()["id"] == job_id and second.json()["owner"] == key_id(A)
    refused = s.client.delete(f"/jobs/{job_id}", headers=key(B))
    assert refused.status_code == 403 and key_id(A) in refused.json()["message"], refused.text
    assert s.client.delete(f"/jobs/{job_id}").status_code == 401
    done = s.client.delete(f"/jobs/{job_id}", headers=key(A))
    assert done.status_code == 200 and done.json()["status"] == "cancelled", done.text
    seen_by_b = s.client.get(f"/jobs/{job_id}", headers=key(B)).json()
    assert seen_by_b["status"] == "cancelled" and seen_by_b["cancelled_by"] == key_id(A)
    assert seen_by_b["error"]["type"] == "JobCancelledError" and "POST the same request" in seen_by_b["error"]["message"]
    assert s.client.delete(f"/jobs/{job_id}", headers=key(A)).status_code == 409  # already ended


def test_a_running_bridge_stops_at_its_next_progress_point_and_publishes_nothing(s):
    job_id = s.bridge
    assert s.client.get(f"/jobs/{job_id}").json()["status"] == "started"
    assert s.client.delete(f"/jobs/{job_id}", headers=key(B)).status_code == 403
    r = s.client.delete(f"/jobs/{job_id}", headers=key(OPERATOR))  # an operator key may cancel any job
    assert r.status_code == 202 and r.headers["location"] == f"/jobs/{job_id}", r.text
    final = _wait_ended(s, job_id)
    assert final["status"] == "cancelled" and final["rq_status"] == "stopped", final
    assert final["cancelled_by"] == key_id(OPERATOR)
    step = (final.get("progress") or {}).get("step", 0)
    assert step < BRIDGE_STEPS, final  # stopped mid-run, not at the end
    nothing_published(s, job_id)


def _wait_ended(s, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = s.client.get(f"/jobs/{job_id}").json()
        if body["status"] in ("finished", "failed", "cancelled") or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def test_the_same_requests_afterwards_run_to_the_end(s):
    r = s.client.post("/initialize", json={"architecture": arch(2, 5)}, headers=key(B))
    assert r.status_code == 202, r.text
    fast = _wait_ended(s, r.json()["id"])
    assert fast["status"] == "finished" and fast["owner"] == key_id(B), fast
    assert (s.root / fast["id"] / "model.safetensors").is_file()
    bridge = enqueue_bridge(s, A)
    assert bridge == s.bridge  # the same plan, the same id: the cancelled job's flag does not stop it
    final = _wait_ended(s, bridge, timeout=120)
    assert final["status"] == "finished", final
    assert (s.root / bridge / "model.safetensors").is_file()


def test_the_worker_logs_one_line_per_cancellation(s):
    log = "\n".join(p.read_text(errors="replace") for p in sorted(s.children.logdir.glob("worker-*.log")))
    assert "Traceback" not in log, log[-3000:]
    assert log.count("failed: JobCancelledError") == 1, log[-3000:]
