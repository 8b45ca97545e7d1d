"""A client that disconnects in the middle of its request body (CONTRACT.md section 14): not an
error of the broker. Real API (uvicorn on loopback), real Redis, a raw socket as the client."""

from __future__ import annotations

import logging
import socket

import pytest

from tests.fixtures.stack import Admin, ApiServer
from tests.observability.helpers import samples, scrape
from tests.fixtures.wait import wait_until


def _leave_mid_body(port: int, key: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            b"POST /v1/sessions HTTP/1.1\r\nHost: broker\r\nAuthorization: Bearer " + key.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"end_user\": \"u"
        )


def test_a_client_leaving_mid_body_is_not_an_internal_error(api: ApiServer, admin: Admin,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Invariant: a POST /v1/sessions whose client disconnects mid-body is counted
    broker_admissions_total{outcome="abandoned",reason="client_disconnected"} and logged and
    counted as status 499 with client_disconnected, never as a 500 or reason="internal"."""
    caplog.set_level(logging.INFO, logger="broker.access")
    tenant, key = admin.tenant("acme")
    for _ in range(3):
        _leave_mid_body(api.port, key)
    def admissions() -> dict[tuple[str | None, str | None], float]:
        return {(lab.get("outcome"), lab.get("reason")): v for n, lab, v in samples(scrape(f"{api.url}/metrics"))
                if n == "broker_admissions_total" and lab.get("tenant") == tenant["id"]}

    wait_until(lambda: admissions().get(("abandoned", "client_disconnected")) == 3, 10,
               "3 admissions counted abandoned/client_disconnected", state=admissions)
    got = admissions()
    assert got == {("abandoned", "client_disconnected"): 3}, got
    statuses = {lab["status"]: v for n, lab, v in samples(scrape(f"{api.url}/metrics"))
                if n == "broker_http_requests_total" and lab.get("route") == "/v1/sessions" and lab["method"] == "POST"}
    assert statuses == {"499": 3}, statuses
    lines = [r for r in caplog.records if r.name == "broker.access" and getattr(r, "fields", {}).get("route")
             == "/v1/sessions" and r.fields["method"] == "POST"]
    assert len(lines) == 3 and all(r.fields["status"] == 499 and r.fields["client_disconnected"] for r in lines), \
        [r.fields for r in lines]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
