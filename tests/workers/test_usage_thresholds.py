"""broker_usage_thresholds_total in the worker: a session billed past its reservation crosses a
budget threshold in the settle of its terminal transition (tenants/budget.lua), and both
terminal paths of the worker (finish_terminated: transition.lua; the expiry loop's batch:
finish.lua) learn it from the script's answer and count it, with the event in the stream."""

from __future__ import annotations

import redis.asyncio as aioredis

from broker.sessions.models import now_ms
from broker.sessions.outbox import EventLog
from tenants.admission import AdmissionRequest, Admitted, admit
from tenants.models import Quotas
from workers.context import WorkerContext
from workers.jobs.claim import FinishBatch
from workers.jobs.common import finish_terminated

BIG = 1_000_000


async def admitted_ready(redis: aioredis.Redis, ctx: WorkerContext, tenant: str, sid: str, *, ttl: int,
                         ran_ms: int) -> None:
    """A session admitted under a 1,000 s monthly budget with ``ttl`` reserved, ready since ``ran_ms`` ago."""
    q = Quotas(sessions_per_minute=BIG, sessions_per_day=BIG, max_concurrent_sessions=BIG,
               max_sessions_per_end_user=BIG, max_session_seconds=3600, session_seconds_per_month=1000)
    now = now_ms()
    got = await admit(redis, AdmissionRequest(
        tenant_id=tenant, session_id=sid, now_ms=now, quotas=q,
        session_fields={"id": sid, "tenant_id": tenant, "status": "queued", "created_at": str(now), "end_user": ""},
        lease_until_ms=now + 600_000, mint_window_ms=3_600_000, ttl_seconds=ttl))
    assert isinstance(got, Admitted) and got.budget is not None and got.budget.thresholds == 0  # 49.9 %
    rec = await ctx.repo.get(tenant, sid)
    assert rec is not None
    res = await ctx.repo.transition(rec, allowed="queued", status="ready",
                                    fields={"ready_at": now - ran_ms, "expires_at": now - ran_ms + ttl * 1000})
    assert res.applied


def counted(ctx: WorkerContext) -> float:
    return ctx.metrics.registry.get_sample_value("broker_usage_thresholds_total") or 0.0


async def percents(redis: aioredis.Redis, tenant: str) -> list[int]:
    page = await EventLog(redis).page(tenant, types=frozenset({"usage.threshold_reached"}))
    return [e.data["percent"] for e in page.data]


async def test_a_settle_past_the_reservation_is_counted_by_both_terminal_paths(redis: aioredis.Redis,
                                                                               ctx: WorkerContext) -> None:
    """Invariant: every crossing recorded at settle is counted once, by the process whose
    transition recorded it; a session that stays within its reservation crosses nothing."""
    await admitted_ready(redis, ctx, "ten_a", "ses_a", ttl=499, ran_ms=499_500)  # billed 500 s: 50 %
    rec = await ctx.repo.get("ten_a", "ses_a")
    assert rec is not None
    res = await finish_terminated(ctx, rec, "expired")
    assert res.applied and res.thresholds == 1
    assert counted(ctx) == 1
    assert await percents(redis, "ten_a") == [50]

    await admitted_ready(redis, ctx, "ten_b", "ses_b", ttl=499, ran_ms=499_500)
    await admitted_ready(redis, ctx, "ten_c", "ses_c", ttl=499, ran_ms=100_000)  # billed 100 s of 499 reserved
    batch = FinishBatch(ctx.redis, ctx.metrics)
    recs = [await ctx.repo.get(t, s) for t, s in (("ten_b", "ses_b"), ("ten_c", "ses_c"))]
    assert [await batch.finish(r, "expired") for r in recs if r is not None] == [True, True]
    assert counted(ctx) == 2
    assert await percents(redis, "ten_b") == [50]
    assert await percents(redis, "ten_c") == []
    assert not await batch.finish(recs[0], "expired")  # already terminal: nothing settled again
    assert counted(ctx) == 2
