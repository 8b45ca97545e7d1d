"""The core session flow end to end: real API (uvicorn on loopback), real arq worker,
real Redis, the sandbox upstreams reached through the real openai SDK and httpx."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.fixtures.stack import PLATFORM_AVATURN_KEY, PLATFORM_OPENAI_KEY, Admin, tenant_client, wait_status
from tests.fixtures.wait import wait_until

TENANT_OPENAI_KEY = "sk-tenant-a-secret-abcdef0123456789"
TENANT_AVATURN_KEY = "avaturn-tenant-a-secret-0123456789"


def _live_upstream(audit: dict) -> list[dict]:
    return [s for s in audit["sessions"] if s["live"]]


def test_happy_path_to_ready_with_wait(api, worker, admin: Admin, sandbox) -> None:
    tenant, key = admin.tenant(
        "acme",
        openai={"api_key": TENANT_OPENAI_KEY, "session": {"instructions": "Be brief.", "audio": {"output": {"voice": "marin"}}}},
        avaturn={"api_key": TENANT_AVATURN_KEY, "avatar_id": "jane_20240829", "user_absent_timeout": 30},
    )
    with tenant_client(api.url, key) as c:
        r = c.post("/v1/sessions?wait=10", json={"ttl_seconds": 90, "end_user": "u_1", "metadata": {"k": "v"}})
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["status"] == "ready"
        assert r.headers["location"] == f"/v1/sessions/{body['id']}"
        assert body["avaturn"]["token"] and body["avaturn"]["session_id"]
        assert body["metadata"] == {"k": "v"} and body["end_user"] == "u_1"
        assert body["ready_at"] and body["expires_at"]
        got = c.get(f"/v1/sessions/{body['id']}").json()
        # a live session's billable seconds run up to the moment it is read (rounded up): the GET,
        # later than the answer, may show more, never less
        assert got.pop("billable_seconds") >= body.pop("billable_seconds")
        assert got == body
    audit = sandbox.audit()
    created = [s for s in audit["sessions"] if s["session_id"] == body["avaturn"]["session_id"]]
    assert len(created) == 1
    assert created[0]["max_duration"] == 90 and created[0]["user_absent_timeout"] == 30
    assert len(audit["secrets"]) == 1
    assert audit["secrets"][0]["session"]["instructions"] == "Be brief."
    assert audit["secrets"][0]["session"]["type"] == "realtime"
    for text in (r.text, str(r.headers)):
        for secret in (TENANT_OPENAI_KEY, TENANT_AVATURN_KEY, PLATFORM_OPENAI_KEY, PLATFORM_AVATURN_KEY, "ek_"):
            assert secret not in text


def test_without_wait_answers_202_then_ready(api, worker, admin: Admin) -> None:
    _, key = admin.tenant("acme")
    with tenant_client(api.url, key) as c:
        r = c.post("/v1/sessions")
        assert r.status_code == 202, r.text
        assert r.json()["status"] in ("queued", "provisioning", "ready")
        assert r.json()["avaturn"] is None or r.json()["status"] == "ready"
        ready = wait_status(c, r.json()["id"], {"ready"})
        assert ready["avaturn"]["token"]


@pytest.mark.slow
def test_short_ttl_terminates_upstream_at_expiry(api, worker, admin: Admin, sandbox) -> None:
    """Invariant: a session is deleted upstream when its TTL runs out (reason expired)."""
    _, key = admin.tenant("acme")
    with tenant_client(api.url, key) as c:
        r = c.post("/v1/sessions?wait=10", json={"ttl_seconds": 10})
        assert r.status_code == 201, r.text
        sid, upstream = r.json()["id"], r.json()["avaturn"]["session_id"]
        done = wait_status(c, sid, {"terminated"}, timeout=20)
        assert done["termination_reason"] == "expired"
        assert done["avaturn"]["token"] is None
        assert done["terminated_at"] is not None
    deleted = [s for s in sandbox.audit()["sessions"] if s["session_id"] == upstream]
    assert deleted and deleted[0]["deleted_at"] is not None and deleted[0]["ended_by"] == "delete"
    assert not _live_upstream(sandbox.audit())


def test_delete_ready_session(api, worker, admin: Admin, sandbox) -> None:
    _, key = admin.tenant("acme")
    with tenant_client(api.url, key) as c:
        sid = c.post("/v1/sessions?wait=10").json()["id"]
        r = c.delete(f"/v1/sessions/{sid}")
        assert r.status_code == 202 and r.json()["status"] == "terminating"  # even if a worker ends it at once
        done = wait_status(c, sid, {"terminated"})
        assert done["termination_reason"] == "requested"
        again = c.delete(f"/v1/sessions/{sid}")
        assert again.status_code == 200 and again.json()["status"] == "terminated"
    assert not _live_upstream(sandbox.audit())


def test_delete_while_queued_never_reaches_upstream(settings, api, admin: Admin, sandbox) -> None:
    """Invariant: a session deleted while queued is never created upstream."""
    from tests.fixtures.stack import WorkerThread

    _, key = admin.tenant("acme")
    with tenant_client(api.url, key) as c:
        sid = c.post("/v1/sessions").json()["id"]
        r = c.delete(f"/v1/sessions/{sid}")
        assert r.status_code == 202 and r.json()["status"] == "terminating"
        w = WorkerThread(settings).start()  # the worker only starts now
        try:
            done = wait_status(c, sid, {"terminated"})
        finally:
            w.stop()
        assert done["termination_reason"] == "requested"
    assert sandbox.audit()["sessions"] == []


def test_delete_while_provisioning_leaves_nothing_upstream(api, worker, admin: Admin, sandbox) -> None:
    """Invariant: a session deleted during the Avaturn create never stays alive upstream."""
    sandbox.configure({"create": {"latency_ms": 800}})
    _, key = admin.tenant("acme")
    with tenant_client(api.url, key) as c:
        sid = c.post("/v1/sessions").json()["id"]
        wait_status(c, sid, {"provisioning"})
        wait_until(lambda: sandbox.audit(summary=True)["counters"]["create"].get("requests", 0) >= 1, 10,
                   "the Avaturn create started (it takes 800 ms: the DELETE comes inside it)")
        assert c.delete(f"/v1/sessions/{sid}").status_code == 202
        done = wait_status(c, sid, {"terminated"})
        assert done["termination_reason"] == "requested"
    wait_until(lambda: not _live_upstream(sandbox.audit()), 5, "no session left alive upstream",
               state=lambda: _live_upstream(sandbox.audit()))


def test_other_tenants_session_is_not_found(api, worker, admin: Admin) -> None:
    _, key_a = admin.tenant("a")
    _, key_b = admin.tenant("b")
    with tenant_client(api.url, key_a) as a, tenant_client(api.url, key_b) as b:
        sid = a.post("/v1/sessions").json()["id"]
        unknown = b.get("/v1/sessions/ses_doesnotexist000000000")
        foreign = b.get(f"/v1/sessions/{sid}")
        assert foreign.status_code == unknown.status_code == 404
        assert foreign.json() == unknown.json()
        assert b.delete(f"/v1/sessions/{sid}").status_code == 404
        assert b.get("/v1/sessions").json()["data"] == []
        assert a.get(f"/v1/sessions/{sid}").status_code == 200


def test_revoked_key_is_refused(api, admin: Admin) -> None:
    tenant, key = admin.tenant("a")
    with tenant_client(api.url, key) as c:
        assert c.get("/v1/sessions").status_code == 200
        key_id = admin.http.get(f"/admin/v1/tenants/{tenant['id']}/keys").json()["data"][0]["id"]
        assert admin.http.delete(f"/admin/v1/tenants/{tenant['id']}/keys/{key_id}").status_code == 200
        r = wait_until(lambda: (r := c.get("/v1/sessions")).status_code == 401 and r, 5, "the revoked key refused")
        assert r.json()["error"]["code"]
        assert key not in r.text


def test_missing_and_malformed_keys(api) -> None:
    r = httpx.get(f"{api.url}/v1/sessions")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = httpx.get(f"{api.url}/v1/sessions", headers={"Authorization": "Bearer sbk_nonsense"})
    assert r.status_code == 401 and "sbk_nonsense" not in r.text


@pytest.mark.parametrize(
    ("kwargs", "status", "field"),
    [
        ({"json": {"session": {"temperature": 0.8}}}, 400, "session.temperature"),
        ({"json": {"session": {"voice": "alloy"}}}, 400, "session.voice"),
        ({"json": {"session": {"prompt": {"id": "pmpt_1", "version": 6}}}}, 400, "session.prompt.version"),
        ({"json": {"session": {"model": "gpt-4o"}}}, 400, "session.model"),
        ({"json": {"ttl_seconds": 5}}, 400, "ttl_seconds"),
        ({"json": {"ttl_seconds": 999999}}, 400, "ttl_seconds"),
        ({"json": {"ttl_seconds": "ten"}}, 400, "ttl_seconds"),
        ({"json": {"end_user": "x" * 129}}, 400, "end_user"),
        ({"json": {"metadata": {f"k{i}": "v" for i in range(17)}}}, 400, "metadata"),
        ({"json": {"metadata": {"k": 1}}}, 400, "metadata"),
        ({"json": {"surprise": 1}}, 400, "surprise"),
        ({"json": [1, 2]}, 400, None),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "body"),
        ({"content": b"a=b", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415, None),
        ({"content": b"{" + b" " * 70_000 + b"}", "headers": {"content-type": "application/json"}}, 413, None),
        ({"params": {"wait": "31"}}, 400, "wait"),
        ({"params": {"wait": "soon"}}, 400, "wait"),
        ({"headers": {"Idempotency-Key": "x" * 256}}, 400, "Idempotency-Key"),
    ],
)
def test_bad_input_names_the_field(api, admin: Admin, kwargs, status, field) -> None:
    _, key = admin.tenant("a")
    with tenant_client(api.url, key) as c:
        r = c.post("/v1/sessions", **kwargs)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] and err["message"]
        if field is not None:
            assert err.get("field") == field, err
        assert c.get("/v1/sessions").json()["data"] == []  # nothing was queued


def test_ga_advice_in_message(api, admin: Admin) -> None:
    _, key = admin.tenant("a")
    with tenant_client(api.url, key) as c:
        msg = c.post("/v1/sessions", json={"session": {"voice": "alloy"}}).json()["error"]["message"]
        assert "audio.output.voice" in msg


def test_list_pagination_newest_first(api, admin: Admin) -> None:
    _, key = admin.tenant("a", quotas={"max_concurrent_sessions": 50, "sessions_per_minute": 100})
    with tenant_client(api.url, key) as c:
        ids = [c.post("/v1/sessions").json()["id"] for _ in range(7)]
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
            page = c.get("/v1/sessions", params=params).json()
            seen += [s["id"] for s in page["data"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == list(reversed(ids))
        assert c.get("/v1/sessions", params={"limit": 0}).json()["error"]["field"] == "limit"
        assert c.get("/v1/sessions", params={"cursor": "!!"}).json()["error"]["field"] == "cursor"
        queued = c.get("/v1/sessions", params={"status": "queued"}).json()["data"]
        assert len(queued) == 7
        assert c.get("/v1/sessions", params={"status": "nope"}).status_code == 400


def test_permanent_upstream_failure_fails_clearly(api, worker, admin: Admin, sandbox) -> None:
    bad_key = "sk-invalid-tenant-key-deadbeef12345"
    _, key = admin.tenant("a", openai={"api_key": bad_key})
    with tenant_client(api.url, key) as c:
        r = c.post("/v1/sessions?wait=10")
        assert r.status_code == 502, r.text
        body = r.json()
        assert body["status"] == "failed"
        assert body["error"]["code"] == "openai_invalid_api_key"
        assert bad_key not in r.text and bad_key[:12] not in r.text and "deadbeef" not in r.text
    assert sandbox.audit()["sessions"] == []


def test_transient_upstream_failures_are_retried(api, worker, admin: Admin, sandbox) -> None:
    sandbox.configure({
        "mint": {"fail": [{"status": 500, "count": 1}]},
        "create": {"fail": [{"status": 503, "count": 2}]},
    })
    _, key = admin.tenant("a")
    with tenant_client(api.url, key) as c:
        r = c.post("/v1/sessions?wait=20")
        assert r.status_code == 201, r.text
    audit = sandbox.audit()
    assert len([s for s in audit["sessions"] if s["live"]]) == 1


def test_concurrency_limit_refuses_with_headers(api, admin: Admin) -> None:
    _, key = admin.tenant("a", quotas={"max_concurrent_sessions": 2})
    with tenant_client(api.url, key) as c:
        assert c.post("/v1/sessions").status_code == 202
        assert c.post("/v1/sessions").status_code == 202
        r = c.post("/v1/sessions")
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "concurrency_limit"
        assert int(r.headers["retry-after"]) >= 1
        assert "ratelimit-policy" in r.headers and "ratelimit" in r.headers


def test_healthz_readyz_openapi(api) -> None:
    assert httpx.get(f"{api.url}/healthz").status_code == 200
    assert httpx.get(f"{api.url}/readyz").status_code == 200
    schema = httpx.get(f"{api.url}/schema/openapi.json")
    assert schema.status_code == 200 and "/v1/sessions" in schema.json()["paths"]


def test_live_session_record_is_compact(api, worker, admin: Admin, redis_url: str) -> None:
    """Issue 8 (<= 2 KiB of Redis per live session): a ready session's hash, which holds the
    merged config, the frontend token and the upstream ids, stays in Redis's compact hash
    encoding on the Redis the project starts (``hash-max-ziplist-value 1024``, see
    broker/embedded_redis.py); with Redis's default 64-byte limit it is a hashtable of ~3 KB."""
    import redis as redis_lib

    from tenants.scope import TenantScope

    tenant, key = admin.tenant(
        "acme", openai={"session": {"instructions": "Answer in two sentences at most. " * 8}},
    )
    with tenant_client(api.url, key) as c:
        r = c.post("/v1/sessions?wait=10", json={"ttl_seconds": 120, "end_user": "u_1", "metadata": {"plan": "pro"}})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
    client = redis_lib.Redis.from_url(redis_url)
    try:
        record = TenantScope(tenant["id"]).session(sid)
        assert client.hget(record, "status") == b"ready"
        assert client.object("encoding", record) in (b"ziplist", b"listpack")
        assert client.memory_usage(record) < 1536
    finally:
        client.close()


def test_a_lagging_ring_entry_is_corrected_by_the_sweeper(settings, api, admin: Admin, redis_url: str) -> None:
    """Invariant: no session lost. A tenant whose entry in the ring of tenants with scheduled
    provisioning is later than its due sessions (the ring is a hint; here pushed an hour ahead
    behind the broker's back) is found by the sweeper, its ring entry lowered once, and its
    sessions provisioned."""
    import redis as redis_lib

    from tenants.scope import PROVISION_TENANTS
    from tests.fixtures.stack import WorkerThread

    tenant, key = admin.tenant("acme")
    client = redis_lib.Redis.from_url(redis_url)
    with tenant_client(api.url, key) as c:
        lost = c.post("/v1/sessions").json()["id"]
        kept = c.post("/v1/sessions").json()["id"]
        assert client.zadd(PROVISION_TENANTS, {tenant["id"]: int(time.time() * 1000) + 3_600_000}, xx=True, ch=True) == 1
        w = WorkerThread(settings).start()
        try:
            for sid in (lost, kept):
                assert wait_status(c, sid, {"ready"}, timeout=15)["status"] == "ready"
            assert w.metrics.registry.get_sample_value("broker_sweeper_actions_total", {"action": "requeued"}) == 1
        finally:
            w.stop()
    client.close()
