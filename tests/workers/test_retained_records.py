"""What a session record keeps once it has ended (issue 17 item 5): the fields its GET serves,
not its config, sealed credentials, frontend token, minted secret or Avaturn key. A retained
record lives 7 days under ``noeviction``, so its size is the capacity guide's per-session
figure. On the real stack (API and worker threads, the test's redis-server, the sandbox), for
each terminal path: a stop (transition.lua via finish_terminated), an expiry (the expiry
loop's batched termination_finish.lua) and a failure (fail_session)."""

from __future__ import annotations

import secrets
import time
from typing import Any

import msgspec
import redis as sync_redis

from broker.sessions.terminal import TERMINAL_DROP
from broker.core.settings import Settings
from tenants.scope import DUE_EXPIRY, TenantScope, due_member
from tests.fixtures.stack import Admin, ApiServer, WorkerThread, tenant_client, wait_status

BOUND = 3 * 1024          # bytes of MEMORY USAGE a retained record may take
METADATA = {"customer": "c-42", "plan": "pro"}
END_USER = "user-7"


def big_body() -> bytes:
    """A create body of about 58 KB: long instructions and four documented function tools."""
    tools = [{"type": "function", "name": f"tool_{i}", "description": f"{i}" + "d" * 6_400,
              "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}} for i in range(4)]
    body = {"session": {"instructions": "i" * 32_000, "tools": tools}, "ttl_seconds": 600,
            "end_user": END_USER, "metadata": METADATA}
    raw = msgspec.json.encode(body)
    assert 57_000 <= len(raw) <= 60_000, len(raw)
    return raw


def _tenant(admin: Admin, **openai: Any) -> tuple[str, str]:
    tenant, key = admin.tenant(f"t{secrets.token_hex(3)}",
                               openai={"allowed_overrides": ["instructions", "tools"], **openai})
    return tenant["id"], key


def _create(api: ApiServer, key: str, status: int = 201) -> dict[str, Any]:
    """Created and waited for: 201 ready, or 502 failed upstream (CONTRACT.md)."""
    with tenant_client(api.url, key) as c:
        r = c.post("/v1/sessions?wait=10", content=big_body(), headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    return r.json()


def _session_key(tenant_id: str, sid: str) -> str:
    return TenantScope(tenant_id).session(sid)


def _assert_retained_small(settings: Settings, tenant_id: str, sid: str) -> None:
    r = sync_redis.Redis.from_url(settings.redis_url)
    try:
        key = _session_key(tenant_id, sid)
        used = r.memory_usage(key, samples=0)  # every field counted, not a sample of 5
        assert used is not None and used < BOUND, used
        fields = {k.decode() for k in r.hkeys(key)}
        assert not fields & set(TERMINAL_DROP), fields & set(TERMINAL_DROP)
        assert {"status", "created_at", "terminated_at", "termination_reason", "end_user", "metadata"} <= fields
        assert 0 < r.ttl(key) <= 7 * 24 * 3600
    finally:
        r.close()


def _get(api: ApiServer, key: str, sid: str) -> dict[str, Any]:
    with tenant_client(api.url, key) as c:
        r = c.get(f"/v1/sessions/{sid}")
    assert r.status_code == 200, r.text
    return r.json()


def test_a_stopped_session_keeps_only_what_its_get_serves(
        api: ApiServer, worker: WorkerThread, admin: Admin, settings: Settings) -> None:
    """Invariant: a stopped session with a 58 KB body is retained in < 3 KB, and GET still
    serves its status, timestamps, end_user, metadata, reason and upstream session id."""
    tenant_id, key = _tenant(admin)
    ready = _create(api, key)
    assert ready["status"] == "ready", ready
    with tenant_client(api.url, key) as c:
        assert c.delete(f"/v1/sessions/{ready['id']}").status_code == 202
        wait_status(c, ready["id"], {"terminated"})
    _assert_retained_small(settings, tenant_id, ready["id"])
    got = _get(api, key, ready["id"])
    assert got["status"] == "terminated" and got["termination_reason"] == "requested"
    assert got["end_user"] == END_USER and got["metadata"] == METADATA
    assert got["created_at"] == ready["created_at"] and got["ready_at"] == ready["ready_at"]
    assert got["expires_at"] == ready["expires_at"] and got["terminated_at"]
    assert got["avaturn"] == {"session_id": ready["avaturn"]["session_id"], "token": None}
    assert got["error"] is None


def test_an_expired_session_keeps_only_what_its_get_serves(
        api: ApiServer, worker: WorkerThread, admin: Admin, settings: Settings) -> None:
    """Invariant: the expiry loop's batched terminal step (termination_finish.lua) drops the same fields."""
    tenant_id, key = _tenant(admin)
    ready = _create(api, key)
    assert ready["status"] == "ready", ready
    r = sync_redis.Redis.from_url(settings.redis_url)
    try:
        assert r.zadd(DUE_EXPIRY, {due_member(tenant_id, ready["id"]): int(time.time() * 1000)}, xx=True, ch=True) == 1
    finally:
        r.close()
    with tenant_client(api.url, key) as c:
        wait_status(c, ready["id"], {"terminated"})
    _assert_retained_small(settings, tenant_id, ready["id"])
    got = _get(api, key, ready["id"])
    assert got["termination_reason"] == "expired" and got["terminated_at"]
    assert got["end_user"] == END_USER and got["metadata"] == METADATA and got["ready_at"] == ready["ready_at"]


def test_a_failed_session_keeps_only_what_its_get_serves(
        api: ApiServer, worker: WorkerThread, admin: Admin, settings: Settings) -> None:
    """Invariant: a session that failed (OpenAI refused the tenant's key) is retained in < 3 KB
    with its error served by GET."""
    tenant_id, key = _tenant(admin, api_key=f"sk-invalid-{secrets.token_hex(8)}")
    failed = _create(api, key, 502)
    assert failed["status"] == "failed", failed
    _assert_retained_small(settings, tenant_id, failed["id"])
    got = _get(api, key, failed["id"])
    assert got["status"] == "failed" and got["termination_reason"] == "upstream_failed"
    assert got["error"]["code"] == failed["error"]["code"] and got["error"]["message"]
    assert got["end_user"] == END_USER and got["metadata"] == METADATA and got["terminated_at"]
