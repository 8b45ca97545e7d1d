"""The event outbox (contract section 11, issue 20) on a real stack: real API, real arq worker,
real Redis, the sandbox upstreams. The invariant: every session state change the contract names
(created, ready, failed, terminated) is recorded once, in order, with the session as of that
change; a refused request or a refused transition records nothing."""

from __future__ import annotations

import json

import httpx
import redis

from tests.fixtures.stack import Admin, tenant_client, wait_status


def _stream(redis_url: str, tenant_id: str) -> list[tuple[str, dict[str, str]]]:
    r = redis.Redis.from_url(redis_url)
    try:
        rows = r.xrange(f"sb:t:{tenant_id}:events")
    finally:
        r.close()
    return [(eid.decode(), {k.decode(): v.decode() for k, v in raw.items()}) for eid, raw in rows]


def _session_events(redis_url: str, tenant_id: str, sid: str) -> list[dict[str, str]]:
    return [f for _, f in _stream(redis_url, tenant_id) if f["session_id"] == sid]


def test_a_lifecycle_records_created_ready_terminated_in_sequence(api, worker, admin: Admin, settings) -> None:
    """Invariant: one event per state change, sequence 1, 2, 3, each with the state AT it."""
    tenant, key = admin.tenant("acme")
    with tenant_client(api.url, key) as c:
        r = c.post("/v1/sessions?wait=10", json={"ttl_seconds": 60, "end_user": "u_1", "metadata": {"k": "v"}})
        assert r.status_code == 201, r.text
        sid, token = r.json()["id"], r.json()["avaturn"]["token"]
        assert c.delete(f"/v1/sessions/{sid}").status_code in (200, 202)
        wait_status(c, sid, {"terminated"})
    events = _session_events(settings.redis_url, tenant["id"], sid)
    assert [e["type"] for e in events] == ["session.created", "session.ready", "session.terminated"]
    assert [int(e["sequence"]) for e in events] == [1, 2, 3]
    created, ready, ended = events
    assert created["status"] == "queued" and not created["ready_at"]
    assert created["end_user"] == "u_1" and json.loads(created["metadata"]) == {"k": "v"}
    assert ready["status"] == "ready" and ready["ready_at"] and ready["avaturn_session_id"]
    assert ended["status"] == "terminated" and ended["termination_reason"] == "requested"
    assert int(ended["billable_seconds"]) >= 0 and ended["terminated_at"]
    # the frontend token, the config and its secrets never enter the outbox
    for e in events:
        assert token not in str(e) and "config" not in e and "secret_enc" not in e


def test_a_failure_records_created_then_failed(api, worker, admin: Admin, settings) -> None:
    """Invariant: a session that fails has exactly its created and failed events."""
    tenant, key = admin.tenant("a", openai={"api_key": "sk-invalid-tenant-key-deadbeef12345"})
    with tenant_client(api.url, key) as c:
        r = c.post("/v1/sessions?wait=10")
        assert r.status_code == 502, r.text
        sid = r.json()["id"]
    events = _session_events(settings.redis_url, tenant["id"], sid)
    assert [e["type"] for e in events] == ["session.created", "session.failed"]
    assert events[1]["status"] == "failed" and events[1]["error_code"] == "openai_invalid_api_key"


def test_refusals_record_nothing(api, worker, admin: Admin, settings) -> None:
    """Invariant: no event without its state change: a refused admission, a repeated stop."""
    tenant, key = admin.tenant("a", quotas={"max_concurrent_sessions": 1})
    with tenant_client(api.url, key) as c:
        first = c.post("/v1/sessions?wait=10")
        assert first.status_code == 201, first.text
        assert c.post("/v1/sessions").status_code == 429
        sid = first.json()["id"]
        c.delete(f"/v1/sessions/{sid}")
        wait_status(c, sid, {"terminated"})
        c.delete(f"/v1/sessions/{sid}")
    stream = _stream(settings.redis_url, tenant["id"])
    assert [f["type"] for _, f in stream] == ["session.created", "session.ready", "session.terminated"]
    assert {f["session_id"] for _, f in stream} == {sid}




def test_get_events_pages_oldest_first_filters_and_is_tenant_scoped(api, worker, admin: Admin) -> None:
    """Invariant: GET /v1/events lists exactly the caller's state changes, oldest first after the
    cursor; another tenant's events are never visible; bad input is a 400 naming the field."""
    _, key_a = admin.tenant("a")
    _, key_b = admin.tenant("b")
    with tenant_client(api.url, key_a) as a, tenant_client(api.url, key_b) as b:
        sids = []
        for _ in range(3):
            r = a.post("/v1/sessions?wait=10", json={"ttl_seconds": 60})
            assert r.status_code == 201, r.text
            sids.append(r.json()["id"])
        assert b.post("/v1/sessions?wait=10").status_code == 201
        everything = a.get("/v1/events", params={"limit": 100}).json()
        assert len(everything["data"]) == 6
        assert sorted((e["data"]["session"]["id"], e["type"]) for e in everything["data"]) == sorted(
            [(s, "session.created") for s in sids] + [(s, "session.ready") for s in sids])
        for e in everything["data"]:
            assert e["id"].startswith("evt_") and e["created_at"].endswith("Z")
            assert e["data"]["session"]["status"] == e["type"].split(".")[1].replace("created", "queued")
        # pages of 2 walk the same list
        walked, after = [], None
        while True:
            page = a.get("/v1/events", params={"limit": 2, **({"after": after} if after else {})}).json()
            walked += page["data"]
            if page["next_cursor"] is None:
                break
            after = page["next_cursor"]
        assert [e["id"] for e in walked] == [e["id"] for e in everything["data"]]
        ready = a.get("/v1/events", params={"type": "session.ready", "session_id": sids[1]}).json()["data"]
        assert len(ready) == 1 and ready[0]["data"]["sequence"] == 2 and ready[0]["data"]["session"]["ready_at"]
        # tenant B sees only its own, even filtering by A's session or with A's cursor
        b_all = b.get("/v1/events").json()["data"]
        assert len(b_all) == 2 and not {e["data"]["session"]["id"] for e in b_all} & set(sids)
        assert b.get("/v1/events", params={"session_id": sids[0]}).json()["data"] == []
        after_a = b.get("/v1/events", params={"after": everything["data"][0]["id"]}).json()["data"]
        assert {e["id"] for e in after_a} <= {e["id"] for e in b_all}
        for params, field in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "x"}, "limit"),
                              ({"after": "nope"}, "after"), ({"type": "session.nope"}, "type"),
                              ({"session_id": "x"}, "session_id")):
            r = a.get("/v1/events", params=params)
            assert r.status_code == 400, (params, r.text)
            assert r.json()["error"]["field"] == field


def test_usage_thresholds_are_events_listed_by_type(api, worker, admin: Admin) -> None:
    """Invariant: each threshold of a budget crossed by an admission is one
    usage.threshold_reached event in GET /v1/events (filterable by type), counted by the API's
    broker_usage_thresholds_total; a refused admission records none."""
    _, key = admin.tenant("budgeted", quotas={"session_seconds_per_month": 100})
    with tenant_client(api.url, key) as c:
        assert c.post("/v1/sessions", json={"ttl_seconds": 60}).status_code == 202   # 60 %: 50
        assert c.post("/v1/sessions", json={"ttl_seconds": 60}).status_code == 202   # cut to 40: 80, 100
        assert c.post("/v1/sessions", json={"ttl_seconds": 60}).status_code == 402   # nothing left
        r = c.get("/v1/events", params={"type": "usage.threshold_reached"})
        assert r.status_code == 200, r.text
        events = r.json()["data"]
    assert [e["data"]["percent"] for e in events] == [50, 80, 100]
    first = events[0]["data"]
    assert (first["budget"], first["limit"], first["used"], first["reserved"], first["committed"]) == (
        "session_seconds_per_month", 100, 0, 60, 60)
    assert first["period_end"].endswith("-01T00:00:00Z") and len(first["period"]) == 7
    assert all("sequence" not in e["data"] and "end_user" not in e["data"] for e in events)
    metrics = httpx.get(f"{api.url}/metrics").text
    assert "broker_usage_thresholds_total 3.0" in metrics
