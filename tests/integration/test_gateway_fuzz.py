"""Fuzzing the gateway with schemathesis from its own OpenAPI spec: no input yields a 5xx.

Runs against the real broker (the ``isolated`` fixture), so valid generated events
are really published.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings
from producers.gateway import create_gateway

pytestmark = pytest.mark.integration

TOKEN = "fuzz-token-0123456789-abcdefghijklmnop"


@pytest.mark.parametrize("path", ["/internal/feedback", "/internal/feedback/batch", "/healthz", "/readyz"])
def test_no_input_yields_a_server_error(isolated: Settings, path: str) -> None:
    configured = isolated.model_copy(update={"internal_tokens": TOKEN, "rate_limit_per_minute": 100_000.0})
    ensure_topics(configured)
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_gateway(configured))
    method = "GET" if path in ("/healthz", "/readyz") else "POST"
    strategy = schema[path][method].as_strategy()
    seen: list[int] = []

    @given(case=strategy)
    @settings(max_examples=60 if method == "POST" else 5, deadline=None, suppress_health_check=list(HealthCheck))
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call(headers={"X-Internal-Token": TOKEN})
        seen.append(response.status_code)
        assert response.status_code < 500, (path, response.status_code, response.text[:200])

    fuzz()
    assert seen  # the fuzzer really ran
    if method == "POST":
        assert {202, 207} & set(seen) or 422 in set(seen)
