"""Property-based API tests from /openapi.json (schemathesis 4): no 5xx, no undocumented status.

The app runs in-process against a real Redis with no worker, so generated requests that are
valid just leave queued jobs behind (POST /initialize answers 202 at once: CBD_SYNC_WAIT_S=0).
Bounded to MAX_EXAMPLES generated cases per operation, valid and invalid (schemathesis' positive
and negative modes); invalid ones must be refused with a 4xx (``negative_data_rejection``) and
declared response headers must match their schemas. JSON that no schema can describe (NaN,
Infinity, deep nesting, oversized bodies) is fuzzed in tests/test_security.py.

Every check above also passes when every request is refused with a declared status (a 503 for
each POST, say): the statuses are counted, and the last test requires that generated requests
were accepted (2xx) by the operations where any valid request is.
"""

# ruff: noqa: F401, F811  (fixtures are imported from conftest_service and then requested by name)

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
import schemathesis
from conftest_service import module_artifacts, redis_db, redis_server
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.core.config import Settings
from app.main import create_app
from worker import queue

DB = 4
MAX_EXAMPLES = 40
SETTINGS = dict(sync_wait_s=0, secret_key="z" * 32)
# Redis is attached per module (the test server starts after collection); until then nothing listens.
APP = create_app(Settings(redis_url="redis://127.0.0.1:1/0", **SETTINGS))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def live_redis(redis_server, module_artifacts):
    url = redis_db(redis_server, DB)
    APP.state.settings = Settings(redis_url=url, **SETTINGS)
    APP.state.redis = queue.connect(url)
    yield
    redis_db(redis_server, DB)  # flush what the generated requests enqueued


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_api_conforms_to_its_schema(case):
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              response_headers_conformance, negative_data_rejection]
    op = f"{case.method.upper()} {case.path}"
    response = case.call_and_validate(checks=checks)
    STATUSES[op][response.status_code] += 1
    if op == "POST /initialize" and case.meta is not None and case.meta.generation.mode.is_positive \
            and isinstance(case.body, dict):
        # A valid body whose shape the test chain cannot serve (nearly all of them: its head dim is 16) is
        # refused with a 422, as it should be; the same body folded into a servable shape must be accepted,
        # and its 200/202 must conform to the schema as well.
        case.body = servable(case.body)
        response = case.call_and_validate(checks=checks)
        STATUSES[SERVABLE][response.status_code] += 1


def servable(body: dict) -> dict:
    """``body`` with its architecture folded onto shapes the random test chain serves (head dim 16,
    1-6 query heads, 1-4 layers, FFN under 200), the default chain and its tokenizer; alpha,
    calibrate and dtype stay as generated, and no push. (JSON integers may come as 1.0.)"""
    a = {k: int(v) for k, v in body["architecture"].items() if v is not None}
    heads = 1 + a["num_attention_heads"] % 6
    kv = [k for k in range(1, heads + 1) if heads % k == 0][(a.get("num_key_value_heads") or 0) % 2 - 1]
    arch = {"num_hidden_layers": 1 + a["num_hidden_layers"] % 4, "hidden_size": 16 * heads,
            "num_attention_heads": heads, "num_key_value_heads": kv}
    if a.get("intermediate_size"):
        arch["intermediate_size"] = 8 + a["intermediate_size"] % 185
    return {k: v for k, v in body.items() if k in ("alpha", "calibrate", "dtype")} | {"architecture": arch}


STATUSES: dict[str, Counter] = defaultdict(Counter)  # "POST /initialize" -> status -> count, over the run
SERVABLE = "POST /initialize (servable shape)"
# Operations where a request the schema describes can succeed without ids that exist only at run time.
MUST_ACCEPT = (SERVABLE, "GET /chains", "GET /healthz", "GET /jobs")


def test_generated_requests_were_also_accepted(request):
    """Some generated requests got a 2xx from each of MUST_ACCEPT (statuses of the test above)."""
    if not any(item.originalname == "test_api_conforms_to_its_schema" for item in request.session.items):
        pytest.skip("the schema test did not run in this session")
    seen = {op: dict(STATUSES[op]) for op in MUST_ACCEPT}
    print("statuses by operation:", {op: dict(c) for op, c in sorted(STATUSES.items())})
    assert all(any(200 <= s < 300 for s in codes) for codes in seen.values()), seen
