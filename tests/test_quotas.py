"""Quotas and admission control (app/quotas.py) against a real Redis, with no worker: jobs stay queued.

Per caller a cap of queued plus running jobs and a rate limit (429 with ``Retry-After``, the limit
named); per queue a bound (503 with ``Retry-After``). Cached answers and requests that join a job
already queued are never refused. The limits are in the OpenAPI document and /metrics.
"""

# ruff: noqa: F401, F811  (fixtures are imported from conftest_service and then requested by name)

from __future__ import annotations

import pytest
from conftest_service import arch, module_artifacts, redis_db, redis_server
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.deps import key_id
from app.main import create_app
from cbd.core import artifacts
from cbd.core.plan import make_plan
from cbd.core.request import InitRequest

DB = 14
A, B = "quota-key-a-" + "a" * 16, "quota-key-b-" + "b" * 16
CACHED = {"architecture": arch(2, 4)}


@pytest.fixture
def make_client(redis_server, module_artifacts, random_chain):
    url = redis_db(redis_server, DB)
    plan = make_plan(InitRequest.model_validate(CACHED), random_chain)
    if artifacts.load_artifact(plan.id) is None:  # a checkpoint that exists (its bytes do not matter here)
        tmp = artifacts.staging_dir(plan.id)
        (tmp / "model.safetensors").write_bytes(b"\0" * 64)
        artifacts.publish(tmp, plan.id, {"alpha": 0.5, "plan": {"chain": random_chain.name}})

    def make(**limits) -> TestClient:
        settings = Settings(redis_url=url, sync_wait_s=0, api_keys=(A, B), **limits)
        return TestClient(create_app(settings))

    return make


def new(i: int) -> dict:
    return {"architecture": arch(3, 3), "alpha": round(0.05 + 0.01 * i, 4)}  # a new plan (a job) each


def post(client: TestClient, body: dict, k: str):
    return client.post("/initialize", json=body, headers={"X-API-Key": k})


def test_a_caller_over_its_job_cap_gets_429_naming_it(make_client):
    client = make_client(max_jobs_fast=2)
    assert [post(client, new(i), A).status_code for i in range(2)] == [202, 202]
    over = post(client, new(2), A)
    assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1, over.text
    body = over.json()
    assert body["error"] == "TooManyRequestsError" and body["limit"] == "max_jobs_fast"
    assert "CBD_MAX_JOBS_FAST=2" in body["message"] and key_id(A) in body["message"]
    assert post(client, new(0), A).status_code == 202  # joins its own queued job: no new work
    assert post(client, CACHED, A).status_code == 200  # a cached answer is never refused
    assert post(client, new(3), B).status_code == 202  # another caller has its own cap
    metrics = client.get("/metrics").text
    assert 'cbd_admission_refused_total{limit="max_jobs_fast"} 1.0' in metrics
    assert 'cbd_quota_limit{limit="max_jobs_fast",window="-"} 2.0' in metrics


def test_a_caller_over_its_rate_limit_gets_429_with_the_wait(make_client):
    client = make_client(rate_limit="3/minute")
    assert [post(client, new(10 + i), A).status_code for i in range(3)] == [202] * 3
    over = post(client, new(13), A)
    assert over.status_code == 429, over.text
    assert 1 <= int(over.headers["retry-after"]) <= 60
    assert over.json()["limit"] == "rate_limit" and "3/minute" in over.json()["message"]
    assert post(client, CACHED, A).status_code == 200
    assert post(client, new(14), B).status_code == 202


def test_a_queue_deeper_than_its_bound_refuses_new_work_with_503(make_client):
    client = make_client(queue_bound_fast=2)
    assert post(client, new(20), A).status_code == 202
    assert post(client, new(21), B).status_code == 202
    full = post(client, new(22), B)
    assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1, full.text
    assert full.json()["error"] == "QueueFullError" and "CBD_QUEUE_BOUND_FAST=2" in full.json()["message"]
    assert post(client, new(20), B).status_code == 202  # joins a queued job
    assert post(client, CACHED, B).status_code == 200


def test_the_openapi_document_names_the_limits(make_client):
    client = make_client(rate_limit="30/minute", max_jobs_slow=1)
    doc = client.get("/openapi.json").json()
    assert doc["info"]["x-cbd-limits"]["rate_limit"] == "30/minute"
    assert doc["info"]["x-cbd-limits"]["max_jobs_slow"] == 1
    responses = doc["paths"]["/initialize"]["post"]["responses"]
    assert "Retry-After" in responses["429"]["headers"] and "rate_limit=30/minute" in responses["429"]["description"]
    assert "QueueFullError" in responses["503"]["description"]
