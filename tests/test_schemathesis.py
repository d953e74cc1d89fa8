"""Property-based API tests from /openapi.json (schemathesis 4): no 5xx, no undocumented status.

The app runs in-process against a real Redis with no worker, so generated requests that are
valid just leave queued jobs behind (POST /initialize answers 202 at once: CBD_SYNC_WAIT_S=0).
Bounded to MAX_EXAMPLES generated cases per operation, valid and invalid (schemathesis' positive
and negative modes); invalid ones must be refused with a 4xx (``negative_data_rejection``) and
declared response headers must match their schemas. JSON that no schema can describe (NaN,
Infinity, deep nesting, oversized bodies) is fuzzed in tests/test_security.py.
"""

# ruff: noqa: F401, F811  (fixtures are imported from conftest_service and then requested by name)

from __future__ import annotations

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
    case.call_and_validate(checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                   response_schema_conformance, response_headers_conformance,
                                   negative_data_rejection])
