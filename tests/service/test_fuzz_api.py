"""Fuzz the HTTP API from its own OpenAPI document (schemathesis): never a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.service.conftest import LiveServer, run_server, tiny_settings


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_repository: Path) -> Iterator[LiveServer]:
    with run_server(tiny_settings(tiny_model_repository, max_body_bytes=256 * 1024)) as server:
        yield server


@pytest.fixture
def api_schema(fuzz_server: LiveServer) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_never_fails_with_a_server_error(case: Any) -> None:
    response = case.call(timeout=30)
    assert response.status_code < 500, (case.method, case.path, response.text[:300])
    if response.status_code >= 400 and case.path != "/readyz":
        error = response.json()["error"]
        assert error["code"] and error["message"]
