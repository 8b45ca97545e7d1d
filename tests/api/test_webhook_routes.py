"""Webhook endpoints on the tenant API (contract section 11): a real API on loopback, real Redis.
Invariants: the secret is shown only by the create and the rotation, stored only encrypted; at
most 10 endpoints per tenant even under parallel creates; another tenant's endpoint answers
exactly like an unknown one; bad input is a 400 naming the field, never a 500; the hash fields
are those of broker/webhooks/__init__.py (the delivery reads them)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis

from broker.embedded_redis import EmbeddedRedis
from broker.sessions.outbox import EVENT_TYPES
from broker.webhooks.endpoints import MAX_ENDPOINTS
from tests.fixtures.stack import Admin, ApiServer, make_settings, tenant_client
from tenants.crypto import CredentialCipher

PUBLIC = "https://93.184.216.34/hooks"
_ID = re.compile(r"we_[0-9a-f]{24}")
_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
VIEW_FIELDS = {"id", "url", "description", "events", "disabled", "disabled_reason", "disabled_at", "created_at"}


def _sync(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


def _hash(settings: Any, tenant_id: str, weid: str) -> dict[str, str]:
    r = _sync(settings.redis_url)
    try:
        return r.hgetall(f"sb:t:{tenant_id}:wh:ep:{weid}")
    finally:
        r.close()


def _create(c: httpx.Client, **body: Any) -> dict[str, Any]:
    r = c.post("/v1/webhook_endpoints", json={"url": PUBLIC, **body})
    assert r.status_code == 201, r.text
    return r.json()


def _error(r: httpx.Response, status: int, code: str, field: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    if field is not None:
        assert err.get("field") == field, err
    return str(err["message"])


def test_create_shows_the_secret_once_and_stores_the_documented_fields(api, admin: Admin, settings) -> None:
    tenant, key = admin.tenant("acme")
    with tenant_client(api.url, key) as c:
        created = _create(c, events=["session.ready", "session.failed"], description="billing")
        secret = created.pop("secret")
        assert secret.startswith("whsec_") and len(secret) > 30
        assert set(created) == VIEW_FIELDS
        assert _ID.fullmatch(created["id"]) and _ISO.fullmatch(created["created_at"])
        assert created["url"] == PUBLIC and created["description"] == "billing"
        assert created["events"] == ["session.ready", "session.failed"]
        assert (created["disabled"], created["disabled_reason"], created["disabled_at"]) == (False, None, None)
        weid = created["id"]
        # never again: get, list
        got = c.get(f"/v1/webhook_endpoints/{weid}")
        assert got.status_code == 200 and got.json() == created
        listed = c.get("/v1/webhook_endpoints")
        assert listed.status_code == 200 and listed.json() == {"data": [created]}
        assert secret not in got.text + listed.text
    fields = _hash(settings, tenant["id"], weid)
    assert secret not in json.dumps(fields)
    assert CredentialCipher(settings.secret_keys).decrypt(fields["secret_enc"]) == secret
    created_ms = int(fields["created_at"])
    assert fields["since"] == "0-0"  # the tenant's last event when it was created: none yet
    assert abs(created_ms / 1000 - time.time()) < 60
    assert {k: fields[k] for k in ("url", "description", "events", "disabled", "disabled_reason", "disabled_at",
                                   "failing_since", "prev_secret_enc", "prev_secret_until")} == {
        "url": PUBLIC, "description": "billing", "events": "session.ready,session.failed", "disabled": "0",
        "disabled_reason": "", "disabled_at": "", "failing_since": "", "prev_secret_enc": "", "prev_secret_until": ""}
    r = _sync(settings.redis_url)
    try:
        assert r.smembers(f"sb:t:{tenant['id']}:wh:eps") == {weid}
        assert tenant["id"] in r.smembers("sb:wh:tenants")
    finally:
        r.close()


def test_events_default_to_every_type(api, admin: Admin, settings) -> None:
    tenant, key = admin.tenant("acme")
    with tenant_client(api.url, key) as c:
        created = _create(c)
        assert created["events"] is None and created["description"] == ""
        assert _hash(settings, tenant["id"], created["id"])["events"] == ""
        # duplicates are kept once, in the tenant's order
        dup = _create(c, events=["test.ping", "session.ready", "test.ping"])
        assert dup["events"] == ["test.ping", "session.ready"]


def test_bad_input_is_a_400_naming_the_field(api, admin: Admin) -> None:
    _, key = admin.tenant("acme")
    with tenant_client(api.url, key) as c:
        post = lambda body: c.post("/v1/webhook_endpoints", json=body)  # noqa: E731
        assert "session.readdy" in _error(post({"url": PUBLIC, "events": ["session.readdy"]}), 400,
                                          "invalid_event_type", "events")
        _error(post({"url": PUBLIC, "events": []}), 400, "invalid_event_type", "events")
        _error(post({"url": PUBLIC, "events": "session.ready"}), 400, "invalid_field", "events")
        _error(post({"url": PUBLIC, "secret": "whsec_x"}), 400, "invalid_field", "secret")
        _error(post({"events": ["session.ready"]}), 400, "invalid_field", "url")
        _error(post({"url": 5}), 400, "invalid_field", "url")
        _error(post({"url": PUBLIC, "description": "x" * 257}), 400, "invalid_description", "description")
        _error(post({"url": PUBLIC, "description": "a\nb"}), 400, "invalid_description", "description")
        _error(c.post("/v1/webhook_endpoints"), 400, "missing_body", "body")
        _error(c.post("/v1/webhook_endpoints", content=b"url=x", headers={"content-type": "text/plain"}),
               415, "unsupported_media_type")
        for url in ("http://93.184.216.34/", "https://127.0.0.1/", "https://localhost/", "ftp://x/",
                    "https://u:p@93.184.216.34/", "https://93.184.216.34/#x", "https://no-such-host.invalid/"):
            _error(post({"url": url}), 400, "invalid_webhook_url", "url")
        assert c.get("/v1/webhook_endpoints").json() == {"data": []}  # nothing was created


def test_at_most_ten_endpoints_even_under_parallel_creates(api, admin: Admin, settings) -> None:
    """Invariant: N parallel creates with L places left create exactly L (one Lua step checks and adds)."""
    tenant, key = admin.tenant("acme")
    with tenant_client(api.url, key) as c:
        for _ in range(3):
            _create(c)

    def one(_: int) -> httpx.Response:
        with tenant_client(api.url, key) as client:
            return client.post("/v1/webhook_endpoints", json={"url": PUBLIC})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(24)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [201] * (MAX_ENDPOINTS - 3) + [409] * (24 - MAX_ENDPOINTS + 3), statuses
    refusal = next(r for r in answers if r.status_code == 409).json()["error"]
    assert refusal["code"] == "webhook_endpoint_limit" and refusal["limit"] == MAX_ENDPOINTS
    assert refusal["current"] == MAX_ENDPOINTS
    with tenant_client(api.url, key) as c:
        listed = c.get("/v1/webhook_endpoints").json()["data"]
        assert len(listed) == MAX_ENDPOINTS
        assert [e["created_at"] for e in listed] == sorted(e["created_at"] for e in listed)  # oldest first
        # a delete frees a place
        assert c.delete(f"/v1/webhook_endpoints/{listed[0]['id']}").status_code == 200
        _create(c)
        _error(c.post("/v1/webhook_endpoints", json={"url": PUBLIC}), 409, "webhook_endpoint_limit")
    r = _sync(settings.redis_url)
    try:
        assert r.scard(f"sb:t:{tenant['id']}:wh:eps") == MAX_ENDPOINTS
    finally:
        r.close()


def test_another_tenants_endpoint_answers_like_an_unknown_one(api, admin: Admin) -> None:
    _, key_a = admin.tenant("a")
    _, key_b = admin.tenant("b")
    with tenant_client(api.url, key_a) as a, tenant_client(api.url, key_b) as b:
        weid = _create(a)["id"]
        unknown = "we_" + "0" * 24
        for target in (weid, unknown, "we_nothex", "ses_x"):
            base = f"/v1/webhook_endpoints/{target}"
            for r in (b.get(base), b.patch(base, json={"description": "x"}), b.delete(base),
                      b.post(base + "/rotate_secret"), b.post(base + "/test"), b.get(base + "/attempts")):
                _error(r, 404, "webhook_endpoint_not_found")
        assert b.get("/v1/webhook_endpoints").json() == {"data": []}
        assert a.get(f"/v1/webhook_endpoints/{weid}").status_code == 200  # untouched


def test_patch_updates_disables_and_reenables(api, admin: Admin, settings) -> None:
    tenant, key = admin.tenant("acme")
    with tenant_client(api.url, key) as c:
        weid = _create(c, events=["session.ready"], description="d")["id"]
        path = f"/v1/webhook_endpoints/{weid}"
        r = c.patch(path, json={"url": "https://93.184.216.35/v2", "events": None, "description": None})
        assert r.status_code == 200, r.text
        assert (r.json()["url"], r.json()["events"], r.json()["description"]) == ("https://93.184.216.35/v2", None, "")
        assert c.patch(path, json={"events": ["test.ping"]}).json()["events"] == ["test.ping"]
        assert c.patch(path).json()["url"] == "https://93.184.216.35/v2"  # an empty body changes nothing
        # disabled: true by the tenant
        off = c.patch(path, json={"disabled": True}).json()
        assert off["disabled"] is True and off["disabled_reason"] == "tenant" and _ISO.fullmatch(off["disabled_at"])
        # the delivery disabled it (410) and recorded failures: false clears all of it
        r_ = _sync(settings.redis_url)
        try:
            r_.hset(f"sb:t:{tenant['id']}:wh:ep:{weid}",
                    mapping={"disabled_reason": "gone", "failing_since": "1700000000000"})
        finally:
            r_.close()
        again = c.patch(path, json={"disabled": True}).json()  # already disabled: the reason is kept
        assert again["disabled_reason"] == "gone" and again["disabled_at"] == off["disabled_at"]
        on = c.patch(path, json={"disabled": False}).json()
        assert (on["disabled"], on["disabled_reason"], on["disabled_at"]) == (False, None, None)
        fields = _hash(settings, tenant["id"], weid)
        assert (fields["disabled"], fields["disabled_reason"], fields["disabled_at"], fields["failing_since"]) == (
            "0", "", "", "")
        # refusals change nothing
        _error(c.patch(path, json={"url": "https://10.0.0.1/"}), 400, "invalid_webhook_url", "url")
        _error(c.patch(path, json={"url": None}), 400, "invalid_field", "url")
        _error(c.patch(path, json={"events": ["nope"]}), 400, "invalid_event_type", "events")
        _error(c.patch(path, json={"disabled": "no"}), 400, "invalid_field", "disabled")
        _error(c.patch(path, json={"disabled_reason": "x"}), 400, "invalid_field", "disabled_reason")
        assert c.get(path).json()["url"] == "https://93.184.216.35/v2"


def test_rotation_keeps_the_old_secret_for_24_hours(api, admin: Admin, settings) -> None:
    tenant, key = admin.tenant("acme")
    cipher = CredentialCipher(settings.secret_keys)
    with tenant_client(api.url, key) as c:
        created = _create(c)
        weid, first = created["id"], created["secret"]
        r = c.post(f"/v1/webhook_endpoints/{weid}/rotate_secret")
        assert r.status_code == 200, r.text
        second = r.json()["secret"]
        assert second.startswith("whsec_") and second != first
        assert {k: v for k, v in r.json().items() if k != "secret"} == {k: v for k, v in created.items()
                                                                       if k != "secret"}
        assert second not in c.get(f"/v1/webhook_endpoints/{weid}").text
    fields = _hash(settings, tenant["id"], weid)
    assert cipher.decrypt(fields["secret_enc"]) == second
    assert cipher.decrypt(fields["prev_secret_enc"]) == first
    overlap = int(fields["prev_secret_until"]) / 1000 - time.time()
    assert 24 * 3600 - 60 < overlap <= 24 * 3600 + 1


def test_delete_removes_the_endpoint_its_attempts_and_the_tenant_mark(api, admin: Admin, settings) -> None:
    tenant, key = admin.tenant("acme")
    tid = tenant["id"]
    r = _sync(settings.redis_url)
    try:
        with tenant_client(api.url, key) as c:
            first, second = _create(c)["id"], _create(c)["id"]
            r.xadd(f"sb:t:{tid}:wh:ep:{first}:attempts", {"event_id": "evt_1-0", "at": "1"})
            d = c.delete(f"/v1/webhook_endpoints/{first}")
            assert d.status_code == 200 and d.json() == {"id": first, "deleted": True}
            assert not r.exists(f"sb:t:{tid}:wh:ep:{first}", f"sb:t:{tid}:wh:ep:{first}:attempts")
            assert r.smembers(f"sb:t:{tid}:wh:eps") == {second}
            assert tid in r.smembers("sb:wh:tenants")
            _error(c.delete(f"/v1/webhook_endpoints/{first}"), 404, "webhook_endpoint_not_found")
            _error(c.get(f"/v1/webhook_endpoints/{first}"), 404, "webhook_endpoint_not_found")
            assert c.delete(f"/v1/webhook_endpoints/{second}").status_code == 200
            assert tid not in r.smembers("sb:wh:tenants") and not r.exists(f"sb:t:{tid}:wh:eps")
            assert c.get("/v1/webhook_endpoints").json() == {"data": []}
    finally:
        r.close()


def test_test_ping_appends_an_event_for_that_endpoint_only(api, admin: Admin, settings) -> None:
    tenant, key = admin.tenant("acme")
    with tenant_client(api.url, key) as c:
        weid = _create(c, events=["session.ready"])["id"]  # a ping goes to its endpoint whatever the filter
        r = c.post(f"/v1/webhook_endpoints/{weid}/test")
        assert r.status_code == 202, r.text
        event = r.json()
        assert event["type"] == "test.ping" and event["data"] == {"endpoint_id": weid}
        assert event["id"].startswith("evt_") and _ISO.fullmatch(event["created_at"])
        listed = c.get("/v1/events", params={"type": "test.ping"}).json()["data"]
        assert listed == [event]
        c.patch(f"/v1/webhook_endpoints/{weid}", json={"disabled": True})
        _error(c.post(f"/v1/webhook_endpoints/{weid}/test"), 409, "webhook_endpoint_disabled")
    rr = _sync(settings.redis_url)
    try:
        rows = rr.xrange(f"sb:t:{tenant['id']}:events")
    finally:
        rr.close()
    assert len(rows) == 1
    assert rows[0][0] == event["id"].removeprefix("evt_")
    assert rows[0][1] == {"type": "test.ping", "data": json.dumps({"endpoint_id": weid}, separators=(",", ":")),
                          "endpoint_id": weid}


def test_attempts_are_listed_newest_first_with_a_cursor(api, admin: Admin, settings) -> None:
    tenant, key = admin.tenant("acme")
    with tenant_client(api.url, key) as c:
        weid = _create(c)["id"]
        stream = f"sb:t:{tenant['id']}:wh:ep:{weid}:attempts"
        r = _sync(settings.redis_url)
        try:
            # as the delivery writes them (fields: broker/webhooks/__init__.py)
            r.xadd(stream, {"event_id": "evt_1700000000000-0", "event_type": "session.ready", "attempt": "1",
                            "status": "", "error": "timeout", "latency_ms": "15000", "response": "",
                            "at": "1700000015000"})
            for n in range(2, 6):
                r.xadd(stream, {"event_id": "evt_1700000000000-0", "event_type": "session.ready", "attempt": str(n),
                                "status": "500" if n < 5 else "200", "error": "", "latency_ms": "12",
                                "response": "nope" if n < 5 else "", "at": str(1700000020000 + n)})
        finally:
            r.close()
        first = c.get(f"/v1/webhook_endpoints/{weid}/attempts", params={"limit": 2})
        assert first.status_code == 200, first.text
        page = first.json()
        assert [a["attempt"] for a in page["data"]] == [5, 4]
        assert page["data"][0] == {"event_id": "evt_1700000000000-0", "event_type": "session.ready", "attempt": 5,
                                   "status": 200, "error": None, "latency_ms": 12, "response": None,
                                   "attempted_at": "2023-11-14T22:13:40.005Z"}
        assert page["data"][1]["response"] == "nope" and page["data"][1]["status"] == 500
        seen = [a["attempt"] for a in page["data"]]
        cursor = page["next_cursor"]
        while cursor:
            nxt = c.get(f"/v1/webhook_endpoints/{weid}/attempts", params={"limit": 2, "cursor": cursor}).json()
            seen += [a["attempt"] for a in nxt["data"]]
            cursor = nxt["next_cursor"]
        assert seen == [5, 4, 3, 2, 1]
        oldest = c.get(f"/v1/webhook_endpoints/{weid}/attempts", params={"limit": 100}).json()
        assert oldest["next_cursor"] is None and oldest["data"][-1]["status"] is None
        assert oldest["data"][-1]["error"] == "timeout" and oldest["data"][-1]["latency_ms"] == 15000
        for params in ({"limit": 0}, {"limit": 101}, {"limit": "x"}):
            _error(c.get(f"/v1/webhook_endpoints/{weid}/attempts", params=params), 400, "invalid_limit", "limit")
        for cursor in ("x", "1-", "99999999999999999999-0", "evt_1-0"):
            _error(c.get(f"/v1/webhook_endpoints/{weid}/attempts", params={"cursor": cursor}), 400,
                   "invalid_cursor", "cursor")
        assert c.get(f"/v1/webhook_endpoints/{weid}/attempts", params={"cursor": "0-0"}).json() == {
            "data": [], "next_cursor": None}


def test_routes_need_the_tenant_key(api, admin: Admin) -> None:
    _, key = admin.tenant("acme")
    with tenant_client(api.url, key) as c:
        weid = _create(c)["id"]
    with httpx.Client(base_url=api.url, timeout=10) as anon:
        for method, path in (("POST", "/v1/webhook_endpoints"), ("GET", "/v1/webhook_endpoints"),
                             ("GET", f"/v1/webhook_endpoints/{weid}"), ("PATCH", f"/v1/webhook_endpoints/{weid}"),
                             ("DELETE", f"/v1/webhook_endpoints/{weid}"),
                             ("POST", f"/v1/webhook_endpoints/{weid}/rotate_secret"),
                             ("POST", f"/v1/webhook_endpoints/{weid}/test"),
                             ("GET", f"/v1/webhook_endpoints/{weid}/attempts"),
                             ("POST", "/v1/events/evt_1-0/resend")):
            assert anon.request(method, path).status_code == 401, (method, path)


@pytest.fixture
def private_api(redis_server: EmbeddedRedis, sandbox: Any) -> Iterator[ApiServer]:
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    r.close()
    server = ApiServer(make_settings(redis_server.url, sandbox, BROKER_WEBHOOK_ALLOW_PRIVATE="true")).start()
    try:
        yield server
    finally:
        server.stop()


def test_allow_private_admits_http_loopback_endpoints(private_api: ApiServer) -> None:
    admin = Admin(private_api.url)
    try:
        _, key = admin.tenant("dev")
    finally:
        admin.close()
    with tenant_client(private_api.url, key) as c:
        r = c.post("/v1/webhook_endpoints", json={"url": "http://127.0.0.1:9/_sandbox/webhooks"})
        assert r.status_code == 201, r.text
        assert r.json()["url"] == "http://127.0.0.1:9/_sandbox/webhooks"
        _error(c.post("/v1/webhook_endpoints", json={"url": "http://u:p@127.0.0.1/"}), 400, "invalid_webhook_url")


def test_every_event_type_is_accepted(api, admin: Admin) -> None:
    _, key = admin.tenant("acme")
    with tenant_client(api.url, key) as c:
        assert _create(c, events=list(EVENT_TYPES))["events"] == list(EVENT_TYPES)


def test_resend_queues_the_event_for_the_matching_enabled_endpoints(api, admin: Admin, settings) -> None:
    """Invariant: a resend queues one delivery of the stored entry per target endpoint, in the
    session's queue of that endpoint (broker/webhooks/queue.py), and nothing for the others."""
    from tenants.scope import TenantScope

    tenant, key = admin.tenant("acme")
    scope = TenantScope(tenant["id"])
    with tenant_client(api.url, key) as c:
        every = _create(c)["id"]
        created_only = _create(c, events=["session.created"])["id"]
        ready_only = _create(c, events=["session.ready"])["id"]
        off = _create(c)["id"]
        c.patch(f"/v1/webhook_endpoints/{off}", json={"disabled": True})
        s = c.post("/v1/sessions")
        assert s.status_code == 202, s.text
        sid = s.json()["id"]
        event = c.get("/v1/events", params={"session_id": sid}).json()["data"][0]
        assert event["type"] == "session.created"
        entry = event["id"].removeprefix("evt_")

        r = c.post(f"/v1/events/{event['id']}/resend")
        assert r.status_code == 202, r.text
        assert r.json()["event_id"] == event["id"]
        assert sorted(r.json()["endpoint_ids"]) == sorted([every, created_only])
        one = c.post(f"/v1/events/{event['id']}/resend", json={"endpoint_id": ready_only})
        assert one.status_code == 202 and one.json()["endpoint_ids"] == [ready_only]  # explicit: whatever the filter

        rr = _sync(settings.redis_url)
        try:
            assert rr.lrange(scope.webhook_queue(every, sid), 0, -1) == [entry]
            assert rr.lrange(scope.webhook_queue(created_only, sid), 0, -1) == [entry]
            assert rr.lrange(scope.webhook_queue(ready_only, sid), 0, -1) == [entry]
            assert not rr.exists(scope.webhook_queue(off, sid))
        finally:
            rr.close()

        # a test.ping is resent to its own endpoint only
        ping = c.post(f"/v1/webhook_endpoints/{every}/test").json()
        assert c.post(f"/v1/events/{ping['id']}/resend").json()["endpoint_ids"] == [every]

        # refusals
        _error(c.post(f"/v1/events/{event['id']}/resend", json={"endpoint_id": off}), 409,
               "webhook_endpoint_disabled")
        _error(c.post(f"/v1/events/{event['id']}/resend", json={"endpoint_id": "we_" + "1" * 24}), 404,
               "webhook_endpoint_not_found")
        _error(c.post(f"/v1/events/{event['id']}/resend", json={"endpoint_id": "x"}), 400, "invalid_endpoint_id",
               "endpoint_id")
        _error(c.post(f"/v1/events/{event['id']}/resend", json={"endpoint": every}), 400, "invalid_field",
               "endpoint")
        for unknown in ("evt_1-0", "evt_x", "nope", event["id"] + "1"):
            _error(c.post(f"/v1/events/{unknown}/resend"), 404, "event_not_found")

    # another tenant's event is not found
    _, other = admin.tenant("other")
    with tenant_client(api.url, other) as b:
        _error(b.post(f"/v1/events/{event['id']}/resend"), 404, "event_not_found")


def test_crafted_input_is_a_4xx_never_a_500(api, admin: Admin) -> None:
    """Invariant: whatever the tenant sends (wrong types, nulls, unknown fields, ids and cursors
    out of a stream id's range), the answer is a 4xx in the error shape, never a 500."""
    _, key = admin.tenant("acme")
    with tenant_client(api.url, key) as c:
        weid = _create(c)["id"]
        path = f"/v1/webhook_endpoints/{weid}"
        bodies: list[Any] = [
            {"url": None}, {"disabled": None}, {"events": "x"}, {"events": [1]}, {"description": 5},
            {"url": 1, "events": 2, "description": 3, "disabled": "no", "other": 1}, {"nope": 1}, [], "x", 5, None,
            {"events": ["session.ready"] * 100000}, {"url": "https://" + "a" * 5000 + ".com/"},
            {"url": "https://2130706433/"}, {"url": "https://0x7f.1/"}, {"url": "https://0.0.0.0/"},
            {"url": "https://[::ffff:127.0.0.1]/"}, {"url": "https://[::1]/"}, {"url": "https://127.0.0.1./"},
            {"url": "https://93.184.216.34:99999/"}, {"url": "https://[fe80::1%25eth0]/"},
            {"url": "https://017700000001/"}, {"url": "https://127.1/"}, {"url": "https://[64:ff9b::7f00:1]/"},
            {"url": "https://[2002:7f00:1::]/"}, {"url": "https://[::ffff:0:7f00:1]/"}, {"url": "https://[::7f00:1]/"},
        ]
        for body in bodies:
            r = c.patch(path, content=json.dumps(body), headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500 and "error" in r.json(), (body, r.status_code, r.text)
            r = c.post("/v1/webhook_endpoints", content=json.dumps(body), headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500 and "error" in r.json(), (body, r.status_code, r.text)
        big = "9" * 20
        for evt in (f"evt_{big}-0", f"evt_1-{big}", f"evt_{big}-{big}"):
            r = c.post(f"/v1/events/{evt}/resend")
            assert 400 <= r.status_code < 500, (evt, r.status_code, r.text)
            r = c.get("/v1/events", params={"after": evt})
            assert r.status_code == 400, (evt, r.status_code, r.text)
        for cursor in (f"{big}-0", "18446744073709551615-18446744073709551615", "0-0", "-1", "1-", "x"):
            r = c.get(f"{path}/attempts", params={"cursor": cursor})
            assert r.status_code in (200, 400), (cursor, r.status_code, r.text)
        for limit in ("0", "101", "-1", "x", "1e3"):
            r = c.get(f"{path}/attempts", params={"limit": limit})
            assert r.status_code == 400, (limit, r.status_code, r.text)
