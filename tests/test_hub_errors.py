"""A push the Hub refuses or cannot take is the caller's or the Hub's problem, never a 500.

A real API and worker process push to the Hub-compatible test server (tests/hubserver.py): a
wrong token and a refusing Hub (401, 403) answer a documented 4xx naming the Hub's status and
reason; an overloaded Hub (503) and an unreachable one (the server stopped, its port closed)
answer 503 with ``Retry-After``. No answer, job view or log line holds the token, and the worker
logs one line per expected failure, no traceback.
"""

# ruff: noqa: F401, F811  (fixtures are imported from conftest_service and then requested by name)

from __future__ import annotations

import httpx
import pytest
from conftest_service import arch, children, module_artifacts, redis_db, redis_server
from hubserver import HubServer

DB = 14
ALICE = "hf_alice_valid_token_0123456789abcd"
WRONG = "hf_wrong_token_canary_9876543210zyxw"
SECRET = "k" * 32
SHAPE = arch(2, 3)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub"), tokens={ALICE: "alice"}, lfs_threshold=4096) as server:
        yield server


@pytest.fixture(scope="module")
def service(redis_server, module_artifacts, children, hub):
    url = redis_db(redis_server, DB)
    env = {"CBD_SECRET_KEY": SECRET, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
    children.worker(url, **env)
    base, _ = children.api(url, CBD_SYNC_WAIT_S="60", **env)
    answers: list[str] = []
    with httpx.Client(base_url=base, timeout=120) as client:
        yield client, answers
    logs = worker_log(children) + children.log()
    for text in (*answers, logs):
        assert WRONG not in text and ALICE not in text


def push(service, repo_id: str, token: str) -> httpx.Response:
    client, answers = service
    r = client.post("/initialize", json={"architecture": SHAPE, "push_to_hub": {"repo_id": repo_id}},
                    headers={"X-HF-Token": token})
    answers.append(r.text + repr(dict(r.headers)))
    if "job_id" in r.text:
        view = client.get(f"/jobs/{r.json()['job_id']}")
        answers.append(view.text)
    return r


def commits_tried(hub: HubServer, repo_id: str) -> int:
    """How many times a worker looked the repo up: one per try of the push job."""
    return sum(1 for method, path in hub.requests if method == "GET" and path == f"/api/models/{repo_id}")


def test_a_good_push_is_200(service, hub):
    r = push(service, "alice/ok", ALICE)
    assert r.status_code == 200, r.text
    assert r.json()["push"]["repo_id"] == "alice/ok" and len(r.json()["push"]["commit_sha"]) == 40


def test_a_wrong_token_is_401_with_the_hubs_reason_and_is_not_retried(service, hub):
    r = push(service, "alice/wrong", WRONG)
    assert r.status_code == 401, r.text
    cause = r.json()["cause"]
    assert cause["type"] == "HubAuthError" and cause["hub_status"] == 401, cause
    assert "Invalid credentials" in cause["hub_reason"]
    assert r.headers["www-authenticate"].startswith("Bearer") and "X-HF-Token" in r.headers["www-authenticate"]
    assert commits_tried(hub, "alice/wrong") == 1  # a refused token is final: no retry


@pytest.mark.parametrize(("status", "reason", "error"), [
    (401, "Invalid credentials in Authorization header", "HubAuthError"),
    (403, "This token has read-only access: writing to alice/refused is not allowed", "HubPermissionError"),
])
def test_a_refusing_hub_is_the_same_4xx_with_its_reason(service, hub, status, reason, error):
    hub.refuse = (status, reason)
    try:
        r = push(service, f"alice/refused-{status}", ALICE)
    finally:
        hub.refuse = None
    assert r.status_code == status, r.text
    cause = r.json()["cause"]
    assert (cause["type"], cause["hub_status"], cause["hub_reason"]) == (error, status, reason)
    assert str(status) in r.json()["message"]


def test_an_overloaded_hub_is_503_with_retry_after_after_the_retries(service, hub):
    hub.refuse = (503, "Service temporarily unavailable for maintenance")
    try:
        r = push(service, "alice/busy", ALICE)
    finally:
        hub.refuse = None
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
    cause = r.json()["cause"]
    assert cause["type"] == "HubUnavailableError" and cause["hub_status"] == 503, cause
    assert commits_tried(hub, "alice/busy") == 3  # a Hub that is down is retried (Retry(max=2))


def test_the_openapi_documents_the_hub_failures(service):
    client, _ = service
    responses = client.get("/openapi.json").json()["paths"]["/initialize"]["post"]["responses"]
    for code in ("401", "403", "404", "502", "503"):
        assert "Hub" in responses[code]["description"], code
    assert "Retry-After" in responses["503"]["headers"]


def worker_log(children) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(children.logdir.glob("worker-*.log")))


def test_the_worker_logs_one_line_per_expected_failure(service, children):
    log = worker_log(children)
    assert "Traceback" not in log, log[-3000:]
    assert log.count("failed: HubPermissionError") == 1, log[-3000:]


def test_an_unreachable_hub_is_503_with_retry_after(service, hub):
    """Last: the Hub server is stopped, its port closed."""
    hub.stop()
    r = push(service, "alice/away", ALICE)
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
    cause = r.json()["cause"]
    assert cause["type"] == "HubUnavailableError" and "hub_status" not in cause, cause
    assert "Cannot reach the Hub" in cause["message"]
