"""Schemathesis against the LIVE broker's own OpenAPI document, tenant and admin APIs, authenticated.

Every documented operation is fuzzed in two modes: ``positive`` (data the schema allows) and
``negative`` (data it forbids, which the server must refuse with a 4xx). A case fails on a 5xx,
an undocumented status, a response body or header that does not match the schema (response
objects are closed: an extra field such as a secret breaks them), a non-2xx without the
contract's error shape, an operation that works without its credential, and (negative mode) a
violation the server accepts.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from broker.api.app import create_app
from broker.api.openapi import OPERATIONS
from broker.core.settings import Settings
from tenants.crypto import generate_secret_key

from .conftest import FuzzBudget, LiveBroker

CODE = re.compile(r"^[a-z][a-z0-9_]*$")
COMMON_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
                 response_headers_conformance, response_schema_conformance, ignored_auth]
# invalid input must be refused with a documented 4xx (413: a generated body over 64 KiB)
CONFIG = schemathesis.Config.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 409, 413, 415, 422, 429]}}}
)
# The SSE streams (issue 20) answer 200 with a body that never ends, which a fuzz case would read
# for ever: they are exercised by tests/api/test_event_streams.py (200, 400 Last-Event-ID, 401, 404, 429).
ENDLESS = {("get", "/v1/events/stream"), ("get", "/v1/sessions/{session_id}/events")}
LABELS = sorted(f"{method.upper()} {path}" for method, path in OPERATIONS if (method, path) not in ENDLESS)


def _local_schema() -> dict[str, Any]:
    """The schema the app serves, built without any I/O (used to name the parametrized tests)."""
    app = create_app(Settings.from_env({"BROKER_ADMIN_TOKEN": "x", "BROKER_SECRET_KEY": generate_secret_key()}))
    return app.openapi_schema.to_schema()


@pytest.fixture(scope="module")
def live_schema(live_broker: LiveBroker) -> Any:
    raw = httpx.get(f"{live_broker.url}/schema/openapi.json", timeout=10).json()
    return schemathesis.openapi.from_dict(raw, config=CONFIG)


def test_served_schema_documents_every_operation(live_broker: LiveBroker) -> None:
    """Invariant: the live /schema/openapi.json documents bodies, params, errors and auth of every route."""
    served = httpx.get(f"{live_broker.url}/schema/openapi.json", timeout=10).json()
    assert served == _local_schema()
    documented = sorted(f"{m.upper()} {p}" for p, item in served["paths"].items() for m in item)
    assert documented == sorted(LABELS + [f"{m.upper()} {p}" for m, p in ENDLESS])
    assert set(served["components"]["securitySchemes"]) == {"tenantApiKey", "adminToken"}
    for path, item in served["paths"].items():
        for method, op in item.items():
            assert op["security"], (method, path)
            errors = [s for s in op["responses"] if s.startswith("4") or s == "503"]
            assert "401" in errors and "503" in errors, (method, path)
            for status in errors:
                assert op["responses"][status]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/Error"
                }
    create = served["paths"]["/v1/sessions"]["post"]
    assert {p["name"] for p in create["parameters"]} == {"wait", "Idempotency-Key"}
    assert create["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/SessionCreate")
    listing = served["paths"]["/v1/sessions"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {"status", "limit", "cursor"}
    assert {p["name"] for p in served["paths"]["/v1/usage"]["get"]["parameters"]} == {"end_user"}
    for admin_body in (("/admin/v1/tenants", "post"), ("/admin/v1/tenants/{tenant_id}", "patch")):
        assert served["paths"][admin_body[0]][admin_body[1]]["requestBody"]


def _assert_contract_error(response: Any) -> None:
    if 200 <= response.status_code < 300:
        return
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err.get("code"), str) and CODE.match(err["code"]), body
    assert isinstance(err.get("message"), str) and err["message"], body
    assert "field" not in err or isinstance(err["field"], str), body


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("label", LABELS)
def test_fuzz_operation(label: str, mode: GenerationMode, live_broker: LiveBroker, live_schema: Any,
                        fuzz_budget: FuzzBudget) -> None:
    """Invariant: no generated request gets a 5xx, an undocumented answer, a body or header off the
    schema, a non-2xx without the error shape, or (negative mode) a 2xx for invalid input."""
    operation = live_schema.find_operation_by_label(label)
    assert operation is not None, label
    headers = live_broker.headers_for(operation.path)
    checks = COMMON_CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
    # random ids (mostly 404s) and the ids of objects that exist (the 2xx paths and their checks)
    strategy = st.one_of(
        operation.as_strategy(generation_mode=mode),
        *(operation.as_strategy(generation_mode=mode, path_parameters=ids)
          for ids in live_broker.ids_for(operation.method, operation.path)),
    )

    @seed(fuzz_budget.seed)
    @settings(max_examples=fuzz_budget.max_examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(case=strategy)
    def run(case: Any) -> None:
        response = case.call(base_url=live_broker.url, headers=headers, timeout=40)
        case.validate_response(response, checks=checks, headers=headers)
        _assert_contract_error(response)

    run()
