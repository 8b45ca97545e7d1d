"""The sandbox's webhook receiver, on a real sandbox process: it verifies with the third-party
``standardwebhooks`` package, records every delivery, and fails, slows down or answers 410 on request."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from broker.webhooks.signing import headers as signed_headers
from broker.webhooks.signing import new_secret
from tests.fixtures.wait import wait_until
from workers.sandbox import SandboxProcess
from workers.sandbox.state import fingerprint

_names = itertools.count(1)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxProcess]:
    with SandboxProcess() as proc:
        yield proc


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0) as client:
        yield client


@pytest.fixture
def name() -> str:
    return f"rcv{next(_names)}"


def event(n: int = 1) -> tuple[str, bytes]:
    eid = f"evt_{int(time.time() * 1000)}-{n}"
    return eid, json.dumps({"id": eid, "type": "session.ready", "data": {"sequence": n}}).encode()


def deliver(http: httpx.Client, url: str, secrets: list[str], n: int = 1, *, timestamp: int | None = None,
            body: bytes | None = None, **kwargs: Any) -> httpx.Response:
    eid, payload = event(n)
    ts = int(time.time()) if timestamp is None else timestamp
    hdrs = signed_headers(secrets, eid, ts, payload)
    return http.post(url, content=payload if body is None else body, headers=hdrs, **kwargs)


def test_a_signed_delivery_is_verified_recorded_and_answered_204(sandbox: SandboxProcess, http: httpx.Client,
                                                                 name: str) -> None:
    secret = new_secret()
    shown = sandbox.configure_webhooks(name, {"secrets": [secret]})
    assert shown["secrets"] == [{"sha256": fingerprint(secret)}] and secret not in json.dumps(shown)
    url = sandbox.webhook_url(name)
    before = time.time()
    r = deliver(http, url, [secret], 1)
    assert r.status_code == 204
    [got] = sandbox.webhook_deliveries(name)
    assert got["verified"] is True and got["verified_by"] == [0] and got["error"] is None and got["status"] == 204
    assert got["webhook_id"].startswith("evt_") and int(got["webhook_timestamp"]) >= int(before) - 1
    assert json.loads(got["body"])["data"] == {"sequence": 1} and before <= got["received_at"] <= time.time()
    listing = http.get(url).json()
    assert secret not in json.dumps(listing) and listing["counters"] == {"received": 1, "verified": 1, "204": 1}


def test_a_wrong_secret_a_changed_body_or_an_old_timestamp_is_not_verified_and_answered_401(
        sandbox: SandboxProcess, http: httpx.Client, name: str) -> None:
    secret = new_secret()
    sandbox.configure_webhooks(name, {"secrets": [secret]})
    url = sandbox.webhook_url(name)
    assert deliver(http, url, [new_secret()]).status_code == 401
    assert deliver(http, url, [secret], body=b'{"id": "evt_forged"}').status_code == 401
    assert deliver(http, url, [secret], timestamp=int(time.time()) - 600).status_code == 401
    assert http.post(url, content=b"{}").status_code == 401  # no signature headers at all
    got = sandbox.webhook_deliveries(name)
    assert [d["verified"] for d in got] == [False] * 4 and all(d["status"] == 401 for d in got)
    assert "too old" in got[2]["error"] and "Missing" in got[3]["error"]
    # and a receiver nobody registered a secret for verifies nothing
    assert deliver(http, sandbox.webhook_url(name + "x"), [secret]).status_code == 401
    assert "no secret" in sandbox.webhook_deliveries(name + "x")[0]["error"]


def test_during_a_rotation_both_secrets_verify_the_same_delivery(sandbox: SandboxProcess, http: httpx.Client,
                                                                 name: str) -> None:
    old, new = new_secret(), new_secret()
    sandbox.configure_webhooks(name, {"secrets": [old, new]})
    url = sandbox.webhook_url(name)
    assert deliver(http, url, [new, old]).status_code == 204
    assert deliver(http, url, [new]).status_code == 204
    got = sandbox.webhook_deliveries(name)
    assert [d["verified_by"] for d in got] == [[0, 1], [1]]


def test_a_fraction_fails_with_503_and_retry_after_then_410_on_request(sandbox: SandboxProcess,
                                                                       http: httpx.Client, name: str) -> None:
    secret = new_secret()
    sandbox.configure_webhooks(name, {"secrets": [secret], "seed": 3,
                                      "fail": [{"status": 503, "rate": 0.3, "retry_after": 2}]})
    url = sandbox.webhook_url(name)
    answers = [deliver(http, url, [secret], n) for n in range(200)]
    failed = [r for r in answers if r.status_code == 503]
    assert 30 <= len(failed) <= 90, len(failed)  # 30 % of 200, seeded
    assert all(r.headers["retry-after"] == "2" for r in failed)
    assert {r.status_code for r in answers} == {204, 503}
    got = sandbox.webhook_deliveries(name)
    assert len(got) == 200 and all(d["verified"] for d in got)  # a failed one was received and verified too
    assert [d["status"] for d in got] == [r.status_code for r in answers]

    sandbox.configure_webhooks(name, {"secrets": [secret], "fail": [{"status": 410, "count": 1}]})
    assert deliver(http, url, [secret]).status_code == 410
    assert deliver(http, url, [secret]).status_code == 204
    assert len(sandbox.webhook_deliveries(name)) == 202  # a new config keeps what was received


def test_slow_answers_and_a_sender_that_gives_up(sandbox: SandboxProcess, http: httpx.Client, name: str) -> None:
    secret = new_secret()
    sandbox.configure_webhooks(name, {"secrets": [secret], "slow": {"rate": 1.0, "latency_ms": 400}})
    url = sandbox.webhook_url(name)
    started = time.monotonic()
    assert deliver(http, url, [secret]).status_code == 204
    assert time.monotonic() - started >= 0.4
    with pytest.raises(httpx.ReadTimeout):
        deliver(http, url, [secret], 2, timeout=0.1)
    # recorded as received at once, with no answer (the sender went away first)
    got = wait_until(lambda: d if (d := sandbox.webhook_deliveries(name))[-1]["status"] is None else None, 5,
                     "the delivery recorded with no answer")
    assert [d["delay_ms"] for d in got] == [400.0, 400.0] and got[1]["verified"]


def test_the_listing_pages_after_a_seq(sandbox: SandboxProcess, http: httpx.Client, name: str) -> None:
    secret = new_secret()
    sandbox.configure_webhooks(name, {"secrets": [secret]})
    url = sandbox.webhook_url(name)
    for n in range(5):
        deliver(http, url, [secret], n)
    page = http.get(url, params={"after": 1, "limit": 2}).json()
    assert [d["seq"] for d in page["deliveries"]] == [2, 3] and page["has_more"] and page["next_after"] == 3
    page = http.get(url, params={"after": 3, "limit": 10}).json()
    assert [d["seq"] for d in page["deliveries"]] == [4, 5] and not page["has_more"]
    assert [json.loads(d["body"])["data"]["sequence"] for d in sandbox.webhook_deliveries(name, after=2)] == [2, 3, 4]
    assert name in http.get(f"{sandbox.base_url}/_sandbox/webhooks").json()["receivers"]
    assert http.delete(url).status_code == 200
    assert sandbox.webhook_deliveries(name) == []


@pytest.mark.parametrize("config", [
    {"secrets": ["not-a-secret"]}, {"secrets": ["whsec_!!!"]}, {"fail": [{"status": 503, "hang": True}]},
    {"slow": {"rate": 2, "latency_ms": 1}}, {"latency_ms": -1}, {"frobnicate": 1},
])
def test_a_bad_config_is_refused(sandbox: SandboxProcess, http: httpx.Client, name: str,
                                 config: dict[str, Any]) -> None:
    r = http.put(f"{sandbox.webhook_url(name)}/config", json=config)
    assert r.status_code == 400 and "error" in r.json()


def test_routes(sandbox: SandboxProcess, http: httpx.Client) -> None:
    base = f"{sandbox.base_url}/_sandbox/webhooks"
    assert http.get(f"{base}/bad%20name").status_code == 404
    assert http.get(f"{base}/a/b").status_code == 404
    assert http.post(f"{base}/a/config").status_code == 405
    assert http.put(f"{base}/a").status_code == 405
    assert http.get(f"{base}/a", params={"limit": 0}).status_code == 400
    assert http.post(base).status_code == 405


def test_reset_forgets_the_receivers(sandbox: SandboxProcess, http: httpx.Client, name: str) -> None:
    secret = new_secret()
    sandbox.configure_webhooks(name, {"secrets": [secret]})
    deliver(http, sandbox.webhook_url(name), [secret])
    sandbox.reset()
    assert http.get(f"{sandbox.base_url}/_sandbox/webhooks").json() == {"receivers": {}}


def test_first_attempt_only_lets_every_redelivery_through(sandbox: SandboxProcess, http: httpx.Client,
                                                          name: str) -> None:
    secret = new_secret()
    sandbox.configure_webhooks(name, {"secrets": [secret], "first_attempt_only": True,
                                      "fail": [{"status": 503, "rate": 1.0}]})
    url = sandbox.webhook_url(name)
    eid, payload = event(7)
    send = lambda: http.post(url, content=payload, headers=signed_headers([secret], eid, int(time.time()), payload))  # noqa: E731
    assert [send().status_code for _ in range(3)] == [503, 204, 204]
    assert [d["nth"] for d in sandbox.webhook_deliveries(name)] == [1, 2, 3]
    assert deliver(http, url, [secret], 8).status_code == 503  # another id: its first receipt fails
