"""Tenant isolation on every tenant endpoint: tenant B cannot read, list, delete, replay an
idempotency key of, or consume the quota of tenant A; a foreign id is indistinguishable from an
unknown one (status, body, time); and every tenant-scoped Redis key is built by TenantScope."""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

import httpx

from tests.fixtures.stack import Admin, ApiServer, tenant_client

from .support import assert_error

ROOT = Path(__file__).resolve().parents[2]
UNKNOWN_SID = "ses_" + "Q" * 22


def _two_tenants(admin: Admin, **quotas: int | str) -> tuple[str, str]:
    _, key_a = admin.tenant("a", quotas=quotas or None)
    _, key_b = admin.tenant("b", quotas=quotas or None)
    return key_a, key_b


def test_b_cannot_read_delete_or_list_a_sessions(api: ApiServer, admin: Admin) -> None:
    """Invariant: GET and DELETE of A's session by B answer exactly what an unknown id answers (404,
    same body), leave A's session untouched, and B's listing (every status filter) never shows it."""
    key_a, key_b = _two_tenants(admin)
    with tenant_client(api.url, key_a) as a, tenant_client(api.url, key_b) as b:
        sids = [a.post("/v1/sessions", json={"end_user": "u1", "metadata": {"k": "v"}}).json()["id"]]
        sids.append(a.post("/v1/sessions", json={"end_user": "u2"}).json()["id"])
        assert a.delete(f"/v1/sessions/{sids[1]}").status_code == 202  # A has a terminating one too
        for sid in sids:
            before = a.get(f"/v1/sessions/{sid}").json()
            for method in ("GET", "DELETE"):
                foreign, unknown = b.request(method, f"/v1/sessions/{sid}"), b.request(method, f"/v1/sessions/{UNKNOWN_SID}")
                assert_error(foreign, 404, "session_not_found")
                assert (foreign.status_code, foreign.json()) == (unknown.status_code, unknown.json())
                assert {k.lower() for k in foreign.headers} - {"x-request-id", "date"} == \
                    {k.lower() for k in unknown.headers} - {"x-request-id", "date"}
            assert a.get(f"/v1/sessions/{sid}").json() == before
        for status in (None, "queued", "terminating", "terminated", "failed", "ready", "provisioning"):
            params = {"status": status} if status else {}
            listed = b.get("/v1/sessions", params=params)
            assert listed.status_code == 200 and listed.json()["data"] == [], status
            assert not any(sid in listed.text for sid in sids)
        assert {s["id"] for s in a.get("/v1/sessions").json()["data"]} == set(sids)


def test_b_cannot_replay_or_collide_with_a_idempotency_key(api: ApiServer, admin: Admin) -> None:
    """Invariant: Idempotency-Key is scoped to the tenant: B using A's key (same or another body)
    gets its own new session, never A's (nor a 409/422), and A's replay still returns A's session."""
    key_a, key_b = _two_tenants(admin)
    headers = {"Idempotency-Key": "order-42"}
    body = {"end_user": "u1", "metadata": {"order": "42"}}
    with tenant_client(api.url, key_a) as a, tenant_client(api.url, key_b) as b:
        first = a.post("/v1/sessions", json=body, headers=headers)
        assert first.status_code == 202
        same = b.post("/v1/sessions", json=body, headers=headers)
        other = b.post("/v1/sessions", json={"end_user": "u9"}, headers={"Idempotency-Key": "order-42"})
        assert same.status_code == 202 and same.json()["id"] != first.json()["id"]
        assert other.status_code == 422  # B's own key, reused by B with another body: B's business
        assert first.json()["id"] not in same.text + other.text
        replay = a.post("/v1/sessions", json=body, headers=headers)
        assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]
        assert b.post("/v1/sessions", json=body, headers=headers).json()["id"] == same.json()["id"]
        assert len(a.get("/v1/sessions").json()["data"]) == 1 and len(b.get("/v1/sessions").json()["data"]) == 1


def test_b_cannot_consume_a_quotas(api: ApiServer, admin: Admin) -> None:
    """Invariant: every quota counts per tenant: A exhausting its concurrency, its per-minute rate
    and its per-end-user cap refuses A only; B's usage shows none of A's consumption."""
    key_a, key_b = _two_tenants(admin, max_concurrent_sessions=3, sessions_per_minute=3, max_sessions_per_end_user=1)
    with tenant_client(api.url, key_a) as a, tenant_client(api.url, key_b) as b:
        assert a.post("/v1/sessions", json={"end_user": "shared"}).status_code == 202
        assert_error(a.post("/v1/sessions", json={"end_user": "shared"}), 429, "end_user_limit")
        assert b.post("/v1/sessions", json={"end_user": "shared"}).status_code == 202  # same name, other tenant
        assert [a.post("/v1/sessions").status_code for _ in range(2)] == [202, 202]
        refused = a.post("/v1/sessions")
        assert refused.status_code == 429 and refused.json()["error"]["code"] in ("concurrency_limit", "rate_limited")
        usage_b = b.get("/v1/usage", params={"end_user": "shared"}).json()
        assert usage_b["active_sessions"] == 1 and usage_b["usage"]["end_user"]["used"] == 1
        assert usage_b["usage"]["minute"]["used"] == 1 and usage_b["usage"]["day"]["used"] == 1
        assert [b.post("/v1/sessions").status_code for _ in range(2)] == [202, 202]
        assert a.get("/v1/usage").json()["active_sessions"] == 3
        assert b.get("/v1/usage").json()["active_sessions"] == 3


def _timed_ms(client: httpx.Client, method: str, path: str) -> float:
    start = time.perf_counter()
    r = client.request(method, path)
    elapsed = (time.perf_counter() - start) * 1000
    assert r.status_code == 404
    return elapsed


def test_foreign_and_unknown_ids_take_similar_time(api: ApiServer, admin: Admin) -> None:
    """Invariant: over 50 interleaved requests each, the median time of a foreign id and of an
    unknown id differ by at most 5 ms or a factor of 2 (no timing oracle for ids)."""
    key_a, key_b = _two_tenants(admin)
    with tenant_client(api.url, key_a) as a, tenant_client(api.url, key_b) as b:
        sid = a.post("/v1/sessions").json()["id"]
        for method in ("GET", "DELETE"):
            foreign: list[float] = []
            unknown: list[float] = []
            for _ in range(5):  # warm the connection and the caches
                _timed_ms(b, method, f"/v1/sessions/{sid}")
            for _ in range(50):
                foreign.append(_timed_ms(b, method, f"/v1/sessions/{sid}"))
                unknown.append(_timed_ms(b, method, f"/v1/sessions/{UNKNOWN_SID}"))
            mf, mu = statistics.median(foreign), statistics.median(unknown)
            assert abs(mf - mu) <= 5 or max(mf, mu) <= 2 * min(mf, mu), (method, mf, mu)


SCOPE_FILE = ROOT / "tenants" / "scope.py"
# a hard-coded tenant key ("sb:t:..."), or the tenant part glued onto the prefix by hand
HAND_BUILT = re.compile(r"sb:t:|PREFIX\s*\}\s*t:|PREFIX\s*\+\s*[\"']t:|[\"']sb:[\"']\s*\+\s*[\"']t:")


def test_tenant_keys_are_built_only_by_tenant_scope() -> None:
    """Invariant: no source file other than tenants/scope.py spells a tenant-scoped Redis key
    (``sb:t:``) or glues the tenant segment onto the prefix: TenantScope is the only way in."""
    sources = [p for pkg in ("broker", "workers", "tenants") for p in (ROOT / pkg).rglob("*")
               if p.suffix in (".py", ".lua") and p.is_file()]
    assert len(sources) > 30 and SCOPE_FILE in sources
    assert HAND_BUILT.search(SCOPE_FILE.read_text())  # the pattern does find what it looks for
    offenders = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
                 for p in sources if p != SCOPE_FILE
                 for i, line in enumerate(p.read_text().splitlines(), 1) if HAND_BUILT.search(line)]
    assert not offenders, offenders
    users = [p.relative_to(ROOT).as_posix() for p in sources if "TenantScope(" in p.read_text() and p != SCOPE_FILE]
    assert {"broker/sessions/repository.py", "tenants/repository.py"} <= set(users)
