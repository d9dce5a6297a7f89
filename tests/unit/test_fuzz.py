"""Fuzz every route from the server's own OpenAPI spec (schemathesis): valid and invalid
bodies, wrong types, odd headers. No response may be a 5xx, none may hang, and the server
answers a normal request afterwards. The engine is the fake one (the HTTP layer is what is
fuzzed; engine-side validation runs against the real model in tests/e2e)."""

from __future__ import annotations

from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from starlette.testclient import TestClient

from tests.unit.fake_engine import MODEL, FakeAsyncEngine, make_app

_APP = make_app(FakeAsyncEngine())
_SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", _APP)


@pytest.fixture(scope="module", autouse=True)
def running_app() -> Any:
    with TestClient(_APP) as client:  # runs the lifespan: the (fake) engine starts
        yield client


@_SCHEMA.parametrize()
@hypothesis.settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same cases every run: CI failures reproduce
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_no_route_answers_5xx(case: schemathesis.Case) -> None:
    response = case.call(timeout=10)
    case.validate_response(response, checks=[not_a_server_error])


def test_server_still_answers_after_fuzzing(running_app: TestClient) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3}
    response = running_app.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert running_app.get("/health").status_code == 200
