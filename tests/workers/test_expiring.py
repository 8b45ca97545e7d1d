"""session.expiring (contract section 11: 60 s before ``expires_at``, or at ready for a shorter
session) on real Redis: the ready transition schedules it (``sb:due:expiring``), the worker's
expiring loop (workers/expiry.py, broker/sessions/expiring.lua) records it once, only while the session is
still ready, with its ``data.sequence`` between ready and terminated; leaving ready unschedules
it. The lead time is injected (2 s on the real stack, via BROKER_SESSION_EXPIRING_LEAD_SECONDS;
the loop's constructor below) so the tests need no 70 s sessions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from broker.embedded_redis import EmbeddedRedis
from broker.sessions.models import now_ms
from broker.sessions.outbox import EventLog
from broker.core.settings import Settings
from tenants.admission import AdmissionRequest, Admitted, admit
from tenants.models import Quotas
from tenants.scope import DUE_EXPIRING, TenantScope, due_member
from tests.fixtures.stack import Admin, make_settings, tenant_client, wait_status
from tests.fixtures.wait import wait_until, wait_until_async
from workers.context import WorkerContext
from workers.expiry import ExpiringLoop

LEAD_S = 2
BIG = 1_000_000


# ---- the loop on real Redis (the ready transition as the provisioning job makes it) ------------


async def ready_session(ctx: WorkerContext, tenant: str, sid: str, ttl_s: float) -> int:
    """Admit ``sid`` and make it ready (transition.lua, as workers/jobs/provision.py does), expiring
    ``ttl_s`` from now; returns its expires_at."""
    q = Quotas(sessions_per_minute=BIG, sessions_per_day=BIG, max_concurrent_sessions=BIG,
               max_sessions_per_end_user=BIG, max_session_seconds=3600)
    now = now_ms()
    got = await admit(ctx.redis, AdmissionRequest(
        tenant_id=tenant, session_id=sid, now_ms=now, quotas=q,
        session_fields={"id": sid, "tenant_id": tenant, "status": "queued", "created_at": str(now), "end_user": ""},
        lease_until_ms=now + 600_000, mint_window_ms=3_600_000, ttl_seconds=max(10, int(ttl_s))))
    assert isinstance(got, Admitted)
    rec = await ctx.repo.get(tenant, sid)
    assert rec is not None
    expires_at = now + int(ttl_s * 1000)
    res = await ctx.repo.transition(rec, allowed="queued", status="ready", due_expiry=expires_at,
                                    fields={"ready_at": now, "expires_at": expires_at})
    assert res.applied
    assert await ctx.redis.zscore(DUE_EXPIRING, due_member(tenant, sid)) == expires_at
    return expires_at


async def events_of(redis: aioredis.Redis, tenant: str, sid: str) -> list[tuple[str, int]]:
    page = await EventLog(redis).page(tenant, session_id=sid)
    return [(e.type, e.data["sequence"]) for e in page.data]


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    await wait_until_async(predicate, timeout, what)


async def test_a_short_session_gets_its_event_at_once_and_only_once(ctx: WorkerContext) -> None:
    """Invariant: a session ready with less than the lead left is due at ready; two loops
    racing record its event once (the entry and the flag go in the event's own step)."""
    await ready_session(ctx, "ten_a", "ses_short", 30)   # 30 s left < 60 s lead
    loops = [ExpiringLoop(ctx, lead_s=60).start(), ExpiringLoop(ctx, lead_s=60).start()]
    try:
        async def recorded() -> bool:
            return ("session.expiring", 3) in await events_of(ctx.redis, "ten_a", "ses_short")
        await wait_for(recorded, 5, "the expiring event")
        assert await ctx.redis.zscore(DUE_EXPIRING, due_member("ten_a", "ses_short")) is None
    finally:
        for loop in loops:
            await loop.stop()
    assert await events_of(ctx.redis, "ten_a", "ses_short") == [
        ("session.created", 1), ("session.ready", 2), ("session.expiring", 3)]
    assert sum(loop.recorded for loop in loops) == 1
    page = await EventLog(ctx.redis).page("ten_a", types=frozenset({"session.expiring"}))
    assert page.data[0].data["session"]["status"] == "ready"
    assert page.data[0].data["session"]["id"] == "ses_short"


async def test_a_session_no_longer_ready_gets_no_event(ctx: WorkerContext) -> None:
    """Invariant: no session.expiring for a session that left ready: the transition out of
    ready drops its entry, and an entry left behind (admission's replace_oldest moves a ready
    session to terminating without it) is dropped by the loop's status check."""
    await ready_session(ctx, "ten_a", "ses_stop", 30)
    rec = await ctx.repo.get("ten_a", "ses_stop")
    assert rec is not None
    assert (await ctx.repo.transition(rec, allowed="ready", status="terminating")).applied
    assert await ctx.redis.zscore(DUE_EXPIRING, due_member("ten_a", "ses_stop")) is None
    await ready_session(ctx, "ten_a", "ses_left", 30)
    await ctx.redis.hset(TenantScope("ten_a").session("ses_left"), "status", "terminating")  # as replace_oldest does
    loop = ExpiringLoop(ctx, lead_s=60)
    assert await loop.step() > 0
    assert loop.recorded == 0
    assert await ctx.redis.zcard(DUE_EXPIRING) == 0
    for sid in ("ses_stop", "ses_left"):
        assert [t for t, _ in await events_of(ctx.redis, "ten_a", sid)] == ["session.created", "session.ready"]


async def test_an_entry_is_taken_at_its_lead_not_before(ctx: WorkerContext) -> None:
    """Invariant: the event is recorded no earlier than expires_at - lead, and the loop sleeps
    until then (bounded by its max sleep), so it is on time within that bound."""
    expires_at = await ready_session(ctx, "ten_a", "ses_later", 3.0)  # due at expires_at - 2 s
    loop = ExpiringLoop(ctx, lead_s=LEAD_S).start()
    try:
        async def recorded() -> bool:
            return loop.recorded == 1
        await wait_for(recorded, 5, "the expiring event")
    finally:
        await loop.stop()
    page = await EventLog(ctx.redis).page("ten_a", types=frozenset({"session.expiring"}))
    at = int(page.data[0].id.removeprefix("evt_").split("-")[0])
    due = expires_at - LEAD_S * 1000
    assert due <= at <= due + 1000, f"recorded {at - due} ms after it was due"


# ---- the real stack: API + arq worker + sandbox, lead 2 s ---------------------------------------


@pytest.fixture
def settings(redis_server: EmbeddedRedis, sandbox: Any) -> Settings:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return make_settings(redis_server.url, sandbox, BROKER_SESSION_EXPIRING_LEAD_SECONDS=LEAD_S)


def _events(c: httpx.Client, **params: str) -> list[dict[str, Any]]:
    r = c.get("/v1/events", params={"limit": "100", **params})
    assert r.status_code == 200, r.text
    return r.json()["data"]


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def test_expiring_comes_between_ready_and_terminated_and_not_for_a_stopped_session(
        api, worker, admin: Admin) -> None:
    """Invariants: a session that runs to its end has created < ready < expiring < terminated
    in data.sequence, the expiring one recorded lead seconds before expires_at (late by at most
    the loop's bound); a session stopped before its lead gets no expiring event."""
    _, key = admin.tenant("acme")
    with tenant_client(api.url, key) as c:
        stopped = c.post("/v1/sessions?wait=10", json={"ttl_seconds": 10})
        kept = c.post("/v1/sessions?wait=10", json={"ttl_seconds": 10})
        assert stopped.status_code == kept.status_code == 201, (stopped.text, kept.text)
        assert stopped.json()["status"] == kept.json()["status"] == "ready"
        assert c.delete(f"/v1/sessions/{stopped.json()['id']}").status_code in (200, 202)
        wait_status(c, stopped.json()["id"], {"terminated"})
        kid = kept.json()["id"]
        wait_until(lambda: any(e["type"] == "session.expiring" for e in _events(c, session_id=kid)), 20,
                   "a session.expiring for the session that runs to its end")
        final = wait_status(c, kid, {"terminated"}, timeout=20)
        events = _events(c, session_id=kid)
        stopped_events = _events(c, session_id=stopped.json()["id"])
    assert [(e["type"], e["data"]["sequence"]) for e in events] == [
        ("session.created", 1), ("session.ready", 2), ("session.expiring", 3), ("session.terminated", 4)]
    expiring = events[2]
    assert expiring["data"]["session"]["status"] == "ready"
    lateness = _ms(expiring["created_at"]) - (_ms(final["expires_at"]) - LEAD_S * 1000)
    print(f"session.expiring lateness: {lateness} ms")
    assert 0 <= lateness <= 1000
    assert final["termination_reason"] == "expired"
    # the stopped session was due (expires_at - lead) before the kept one's event, which came
    assert _ms(stopped.json()["expires_at"]) <= _ms(final["expires_at"])
    assert [e["type"] for e in stopped_events] == ["session.created", "session.ready", "session.terminated"]
