"""The Avaturn key that created a session is the one that deletes it (issue 17 item 3,
CONTRACT.md section 14), on the real stack: the API and a worker (threads of this process) on
the test's redis-server, the sandbox upstreams over loopback HTTP.

The sandbox keeps Avaturn accounts apart by key: a DELETE with another account's key answers
404 and leaves the session live (``workers/sandbox/state.py``), as Avaturn does. So a broker
that deletes with the tenant's *current* key, or falls back to the platform key, records the
session ``terminated`` while its avatar keeps running: the sandbox audit shows it."""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import pytest

from broker.core.settings import Settings
from tenants.scope import DUE_EXPIRY, TenantScope, due_member
from tests.fixtures.stack import PLATFORM_AVATURN_KEY, Admin, ApiServer, WorkerThread, make_settings, tenant_client, wait_status
from tests.fixtures.wait import wait_until
from workers.sandbox.state import fingerprint

import redis as sync_redis


def _key(account: str) -> str:
    return f"avaturn-{account}-{secrets.token_hex(8)}"


def _upstream(sandbox: Any, upstream_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    audit = sandbox.audit()
    [session] = [s for s in audit["sessions"] if s["session_id"] == upstream_id]
    return session, [d for d in audit["deletes"] if d["session_id"] == upstream_id]


def _ready_session(api: ApiServer, admin: Admin, avaturn_key: str) -> tuple[str, str, str]:
    """A tenant whose own Avaturn key is ``avaturn_key`` and a ready session of it:
    (tenant id, tenant API key, session id)."""
    tenant, key = admin.tenant(f"t{secrets.token_hex(3)}", avaturn={"api_key": avaturn_key})
    with tenant_client(api.url, key) as c:
        r = c.post("/v1/sessions?wait=10", json={"ttl_seconds": 600})
        assert r.status_code == 201 and r.json()["status"] == "ready", r.text
    return tenant["id"], key, r.json()["id"]


def _change_avaturn_key(admin: Admin, tenant_id: str, new_key: str) -> None:
    r = admin.http.patch(f"/admin/v1/tenants/{tenant_id}", json={"avaturn": {"api_key": new_key}})
    assert r.status_code == 200, r.text


def _assert_deleted_with(sandbox: Any, upstream_id: str, key: str) -> None:
    session, deletes = _upstream(sandbox, upstream_id)
    assert not session["live"] and session["ended_by"] == "delete", session
    assert session["key_fingerprint"] == fingerprint(key)
    assert [d["status"] for d in deletes if d["key_fingerprint"] == fingerprint(key)] == [200], deletes
    # nothing went out with another key (the new one, the platform's): its 404 would have been taken for "gone"
    assert all(d["key_fingerprint"] == fingerprint(key) for d in deletes), deletes


def test_a_stop_after_the_tenant_changed_its_avaturn_key_deletes_with_the_original_key(
        api: ApiServer, worker: WorkerThread, admin: Admin, sandbox: Any) -> None:
    """Invariant: DELETE /v1/sessions/{id} after a PATCH of avaturn.api_key (another account)
    ends the upstream session, with the key that created it, before `terminated` is recorded."""
    original, other = _key("one"), _key("two")
    tenant_id, key, sid = _ready_session(api, admin, original)
    with tenant_client(api.url, key) as c:
        upstream_id = c.get(f"/v1/sessions/{sid}").json()["avaturn"]["session_id"]
        _change_avaturn_key(admin, tenant_id, other)
        assert c.delete(f"/v1/sessions/{sid}").status_code in (200, 202)
        done = wait_status(c, sid, {"terminated"})
    assert done["termination_reason"] == "requested"
    _assert_deleted_with(sandbox, upstream_id, original)


def test_an_expiry_after_the_tenant_changed_its_avaturn_key_deletes_with_the_original_key(
        api: ApiServer, worker: WorkerThread, admin: Admin, sandbox: Any, settings: Settings) -> None:
    """Invariant: the expiry loop ends a session whose tenant changed its Avaturn key with the
    key that created it (the session is made due now instead of waiting for its TTL)."""
    original, other = _key("one"), _key("two")
    tenant_id, key, sid = _ready_session(api, admin, original)
    with tenant_client(api.url, key) as c:
        upstream_id = c.get(f"/v1/sessions/{sid}").json()["avaturn"]["session_id"]
        _change_avaturn_key(admin, tenant_id, other)
        r = sync_redis.Redis.from_url(settings.redis_url)
        try:
            assert r.zadd(DUE_EXPIRY, {due_member(tenant_id, sid): int(time.time() * 1000)}, xx=True, ch=True) == 1
            assert r.exists(TenantScope(tenant_id).session(sid))
        finally:
            r.close()
        done = wait_status(c, sid, {"terminated"})
    assert done["termination_reason"] == "expired"
    _assert_deleted_with(sandbox, upstream_id, original)


def test_a_stop_during_the_create_after_a_key_change_deletes_with_the_key_of_the_create(
        api: ApiServer, worker: WorkerThread, admin: Admin, sandbox: Any, settings: Settings) -> None:
    """Invariant: a session stopped while its Avaturn create is in flight, the tenant's key
    changed meanwhile, has the upstream session the create made deleted with the key the
    create used (the provisioning worker's stopped-meanwhile path)."""
    original, other = _key("one"), _key("two")
    tenant, key = admin.tenant(f"t{secrets.token_hex(3)}", avaturn={"api_key": original})
    sandbox.configure({"create": {"latency_ms": 1500}})
    r = sync_redis.Redis.from_url(settings.redis_url)
    try:
        with tenant_client(api.url, key) as c:
            sid = c.post("/v1/sessions", json={"ttl_seconds": 600}).json()["id"]
            wait_until(lambda: r.hget(TenantScope(tenant["id"]).session(sid), "create_state") == b"inflight", 10,
                       "the create marked in flight")
            _change_avaturn_key(admin, tenant["id"], other)
            assert c.delete(f"/v1/sessions/{sid}").status_code == 202
            done = wait_status(c, sid, {"terminated"})
    finally:
        r.close()
    assert done["termination_reason"] == "requested"
    [created] = sandbox.audit()["sessions"]
    _assert_deleted_with(sandbox, created["session_id"], original)


def _value(w: WorkerThread, name: str, **labels: str) -> float:
    return w.metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_session_key_that_does_not_decrypt_keeps_the_session_terminating_never_the_platform_key(
        api: ApiServer, admin: Admin, sandbox: Any, settings: Settings, redis_server: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    """Invariant: a worker whose BROKER_SECRET_KEY cannot decrypt the stored key of a session
    never deletes it with another key (the platform key is set): the session stays
    `terminating` and is retried, each attempt logged (one line, no secret) and counted; once a
    worker has the key again, it is deleted with the key that created it."""
    original = _key("one")
    first = WorkerThread(settings).start()
    try:
        tenant_id, key, sid = _ready_session(api, admin, original)
    finally:
        first.stop()
    # Another BROKER_SECRET_KEY: neither the tenant's credentials nor the session's key decrypt.
    lost = WorkerThread(make_settings(redis_server.url, sandbox)).start()
    code = "session_key_undecryptable"
    try:
        with caplog.at_level(logging.WARNING, logger="workers"), tenant_client(api.url, key) as c:
            upstream_id = c.get(f"/v1/sessions/{sid}").json()["avaturn"]["session_id"]
            assert c.delete(f"/v1/sessions/{sid}").status_code == 202
            wait_until(lambda: _value(lost, "broker_termination_failures_total", code=code) >= 2, 15,
                       "the undecryptable key retried (the stop, then a retry)")
            assert c.get(f"/v1/sessions/{sid}").json()["status"] == "terminating"
        session, deletes = _upstream(sandbox, upstream_id)
        assert session["live"] and deletes == [], deletes  # no DELETE with the platform key (or any other)
        lines = [r for r in caplog.records if r.name.startswith("workers") and code in r.getMessage()]
        assert len(lines) >= 2
        for line in lines:
            text = line.getMessage()
            assert original not in text and PLATFORM_AVATURN_KEY not in text
            assert "\n" not in text and line.exc_info is None
    finally:
        lost.stop()
    # The key is back (first in the list or not): the retry deletes it with the original key.
    restored = WorkerThread(settings).start()
    try:
        with tenant_client(api.url, key) as c:
            wait_status(c, sid, {"terminated"}, timeout=20)
    finally:
        restored.stop()
    _assert_deleted_with(sandbox, upstream_id, original)
