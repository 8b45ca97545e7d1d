"""The sweeper's trim of the tenants' sessions indexes (workers/jobs/sweep.py,
``SessionRepository.trim_indexes``), against a real redis-server.

Index entries are seeded as admission writes them (``sb:t:{tid}:sessions``, score =
created_at ms), with or without the session record behind them: a record that has passed its
retention is simply absent (Redis expired it), whatever its entry's score."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.sessions.models import new_session_id, now_ms
from broker.sessions.repository import RETENTION_SECONDS
from tenants.scope import SWEEP_INDEX_CURSOR, TENANTS_INDEX, TenantScope
from tests.fixtures.stack import make_settings
from workers.context import WorkerContext
from workers.jobs import sweep as sweep_module
from workers.jobs.sweep import sweep
from workers.metrics import WorkerMetrics

RETENTION_MS = RETENTION_SECONDS * 1000


@pytest.fixture(autouse=True)
def trim_on_every_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests look at the trim run by run: no 30 s between two trims of one worker."""
    monkeypatch.setattr(sweep_module, "INDEX_TRIM_EVERY_S", 0.0)


class Seeded:
    """What one tenant's index holds: ``dead`` entries must go, ``kept`` ones must stay."""

    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        self.scope = TenantScope(tenant_id)
        self.dead: set[str] = set()
        self.kept: set[str] = set()


async def seed(redis: aioredis.Redis, tenant_id: str, *, dead: int = 0, live: int = 0, ended_late: int = 0,
               stuck: int = 0, young_orphans: int = 0, rank_ms: int | None = None) -> Seeded:
    """A tenant whose index has ``dead`` entries older than the retention with no record (expired),
    ``live`` ready sessions of today, ``ended_late`` sessions created more than the retention ago
    that ended recently (record still within its retention TTL), ``stuck`` ones as old that never
    ended (record without TTL), and ``young_orphans`` entries younger than the retention whose
    record is missing (not the trim's business: the listing forgets those it meets)."""
    s = Seeded(tenant_id)
    now = now_ms()
    await redis.zadd(TENANTS_INDEX, {tenant_id: rank_ms if rank_ms is not None else now})
    entries: dict[str, int] = {}
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(dead):
            sid = new_session_id()
            entries[sid] = now - RETENTION_MS - 3_600_000 - i * 1000
            s.dead.add(sid)
        for i in range(young_orphans):
            sid = new_session_id()
            entries[sid] = now - RETENTION_MS + 60_000 + i
            s.kept.add(sid)
        for kind, count in (("live", live), ("ended_late", ended_late), ("stuck", stuck)):
            for i in range(count):
                sid = new_session_id()
                created = now - 1000 if kind == "live" else now - RETENTION_MS - 1_800_000 - i * 1000
                status = {"live": "ready", "ended_late": "terminated", "stuck": "terminating"}[kind]
                pipe.hset(s.scope.session(sid), mapping={"id": sid, "tenant_id": tenant_id, "status": status,
                                                         "created_at": created, "config": "{}", "metadata": "{}"})
                if kind == "ended_late":
                    pipe.expire(s.scope.session(sid), RETENTION_SECONDS - 600)
                entries[sid] = created
                s.kept.add(sid)
        if entries:
            pipe.zadd(s.scope.sessions_index(), entries)
        await pipe.execute()
    return s


async def index(redis: aioredis.Redis, s: Seeded) -> set[str]:
    return {m.decode() for m in await redis.zrange(s.scope.sessions_index(), 0, -1)}


async def calls(redis: aioredis.Redis, command: str) -> int:
    entry = (await redis.info("commandstats")).get(f"cmdstat_{command}")
    return int(entry["calls"]) if entry else 0


def trimmed_metric(ctx: WorkerContext) -> float:
    return ctx.metrics.registry.get_sample_value("broker_sweeper_actions_total", {"action": "trimmed"}) or 0.0


async def test_sweep_removes_the_entries_of_expired_sessions_only(ctx: WorkerContext, redis: aioredis.Redis) -> None:
    """Invariant: after a sweep, a tenant's sessions index has lost exactly the entries whose
    session record has expired (created more than the retention ago, record gone); the entries
    of live sessions, of sessions that ended less than the retention ago, of a session that
    never ended, and entries younger than the retention stay, for both tenants; what was removed
    is counted in broker_sweeper_actions_total{action="trimmed"}, and a second sweep removes
    nothing (idempotent)."""
    a = await seed(redis, "ten_a", dead=300, live=5, ended_late=4, stuck=2, young_orphans=3)
    b = await seed(redis, "ten_b", dead=50, live=3, ended_late=1)
    assert trimmed_metric(ctx) == 0  # the series exists before the first trim
    counts = await sweep({"wc": ctx})
    assert counts["trimmed"] == 350
    for s in (a, b):
        assert await index(redis, s) == s.kept
    assert trimmed_metric(ctx) == 350
    again = await sweep({"wc": ctx})
    assert again["trimmed"] == 0 and trimmed_metric(ctx) == 350
    for s in (a, b):
        assert await index(redis, s) == s.kept


async def test_each_run_keeps_to_its_budget_and_the_pass_reaches_every_tenant(
    ctx: WorkerContext, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: one sweep visits at most INDEX_TENANTS_PER_SWEEP tenants (a ZCOUNT each) and
    examines at most INDEX_ENTRIES_PER_SWEEP index entries (an EXISTS each), whatever the
    backlog; a tenant cut by the budget is resumed where it stopped, the cursor goes round the
    tenants, and the runs together remove every dead entry and nothing else."""
    monkeypatch.setattr(sweep_module, "INDEX_TENANTS_PER_SWEEP", 3)
    monkeypatch.setattr(sweep_module, "INDEX_ENTRIES_PER_SWEEP", 40)
    base = now_ms() - 10_000
    shapes = [dict(dead=100, live=2, ended_late=3), dict(live=4), dict(dead=30, stuck=1),
              dict(dead=10, young_orphans=2), dict(dead=55, live=1, ended_late=1)]
    tenants = [await seed(redis, f"ten_{i}", rank_ms=base + i, **shape) for i, shape in enumerate(shapes)]
    total = sum(len(s.dead) for s in tenants)
    removed = runs = 0
    while removed < total:
        runs += 1
        assert runs <= 12, f"{removed} of {total} removed after {runs - 1} runs"
        zcounts, exists = await calls(redis, "zcount"), await calls(redis, "exists")
        counts = await sweep({"wc": ctx})
        assert await calls(redis, "zcount") - zcounts <= 3
        assert await calls(redis, "exists") - exists <= 40
        assert counts["trimmed"] <= 40
        removed += counts["trimmed"]
        for s in tenants:
            assert s.kept <= await index(redis, s)
    assert runs >= total // 40  # the budget, not the backlog, sets the work per run
    assert removed == total
    for s in tenants:
        assert await index(redis, s) == s.kept
    assert await redis.get(SWEEP_INDEX_CURSOR) is not None


async def test_concurrent_sweeps_remove_each_entry_once(redis_url: str, redis: aioredis.Redis, sandbox: Any) -> None:
    """Invariant: sweeps running at the same time in several workers (own clients, one Redis)
    leave the same index as one sweep, and the removals they count add up to the number of
    dead entries exactly (each entry is counted by the ZREM that removed it)."""
    tenants = [await seed(redis, f"ten_{i}", dead=200, live=3, ended_late=2) for i in range(3)]
    workers = [WorkerContext.build(make_settings(redis_url, sandbox), WorkerMetrics()) for _ in range(3)]
    try:
        results = await asyncio.gather(*(sweep({"wc": w}) for w in workers for _ in range(2)))
    finally:
        for w in workers:
            await w.close()
    assert sum(r["trimmed"] for r in results) == 600
    for s in tenants:
        assert await index(redis, s) == s.kept


async def test_a_tenant_of_old_live_records_does_not_stall_the_pass(
    ctx: WorkerContext, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: a tenant whose oldest entries fill a whole run's budget with records that
    still exist, all of one score (sessions that never ended, created in the same millisecond),
    is not resumed at that score for ever: the cursor moves on and the next tenants are trimmed;
    those records keep their entries."""
    monkeypatch.setattr(sweep_module, "INDEX_TENANTS_PER_SWEEP", 2)
    monkeypatch.setattr(sweep_module, "INDEX_ENTRIES_PER_SWEEP", 5)
    base = now_ms() - 10_000
    stalled = await seed(redis, "ten_0", rank_ms=base)
    created = now_ms() - RETENTION_MS - 3_600_000
    for _ in range(8):
        sid = new_session_id()
        await redis.hset(stalled.scope.session(sid), mapping={"id": sid, "tenant_id": "ten_0", "status": "terminating",
                                                              "created_at": created})
        await redis.zadd(stalled.scope.sessions_index(), {sid: created})
        stalled.kept.add(sid)
    others = [await seed(redis, f"ten_{i}", dead=4, live=1, rank_ms=base + i) for i in (1, 2)]
    for _ in range(6):
        await sweep({"wc": ctx})
    for s in others:
        assert await index(redis, s) == s.kept
    assert await index(redis, stalled) == stalled.kept


async def test_a_worker_trims_at_most_once_per_period(ctx: WorkerContext, redis: aioredis.Redis,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant: the trim costs an idle deployment nothing between two periods: a second sweep
    of the same worker within INDEX_TRIM_EVERY_S leaves dead entries for the next period."""
    monkeypatch.setattr(sweep_module, "INDEX_TRIM_EVERY_S", 30.0)
    tid = "ten_period"
    await redis.zadd(TENANTS_INDEX, {tid: 1})
    old = now_ms() - RETENTION_MS - 60_000
    await redis.zadd(TenantScope(tid).sessions_index(), {new_session_id(): old})
    assert (await sweep({"wc": ctx}))["trimmed"] == 1
    await redis.zadd(TenantScope(tid).sessions_index(), {new_session_id(): old})
    assert (await sweep({"wc": ctx}))["trimmed"] == 0
    assert await redis.zcard(TenantScope(tid).sessions_index()) == 1


async def test_a_trim_that_used_its_budget_runs_again_at_the_next_sweep(
        ctx: WorkerContext, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant: a backlog is not held to one trim per period: a run that used up its entry
    budget is followed by another at the next sweep, until the backlog is gone."""
    monkeypatch.setattr(sweep_module, "INDEX_TRIM_EVERY_S", 30.0)
    monkeypatch.setattr(sweep_module, "INDEX_ENTRIES_PER_SWEEP", 5)
    tid = "ten_backlog"
    await redis.zadd(TENANTS_INDEX, {tid: 1})
    old = now_ms() - RETENTION_MS - 60_000
    await redis.zadd(TenantScope(tid).sessions_index(), {new_session_id(): old + i for i in range(12)})
    trimmed = [(await sweep({"wc": ctx}))["trimmed"] for _ in range(4)]
    assert trimmed == [5, 5, 2, 0], trimmed  # the third run had budget left: the fourth waits
    assert await redis.zcard(TenantScope(tid).sessions_index()) == 0
