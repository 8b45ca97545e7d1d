"""The expiry loop (workers/expiry.py) and the claim it shares with the stop jobs
(workers/jobs/claim.py), against a real redis-server and the HTTP sandbox.

Sessions are seeded as the ready transition leaves them (record, lease, due entry, stats
count) with a real upstream session behind each (minted and created in the sandbox), for two
tenants, so the sandbox audit tells which upstream sessions were deleted and when."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis

from broker.embedded_redis import EmbeddedRedis
from broker.sessions.models import SessionRecord, new_session_id, now_ms
from tenants.scope import DUE_EXPIRY, STATS_LIVE, TenantScope, due_member
from tests.fixtures.stack import make_settings
from tests.fixtures.wait import wait_until_async
from workers.context import WorkerContext
from workers.expiry import ExpiryLoop
from workers.jobs.terminate import terminate_session
from workers.metrics import WorkerMetrics

TENANTS = ("tenant_a", "tenant_b")


async def seed_ready(ctx: WorkerContext, tenant_id: str, expires_at: int, ttl: int = 60) -> tuple[str, str]:
    """A ready session as the provisioning job records it, with its upstream session."""
    sid = new_session_id()
    minted = await ctx.minter.mint(ctx.settings.openai_api_key or "", {"type": "realtime", "instructions": sid}, expires_seconds=600)
    created = await ctx.avaturn.create_session(ctx.settings.avaturn_api_key or "", minted.value,
                                               avatar_id="jane_20240829", background="default",
                                               user_absent_timeout=60, max_duration=max(60, ttl))
    scope = TenantScope(tenant_id)
    now = now_ms()
    await ctx.redis.hset(scope.session(sid), mapping={
        "id": sid, "tenant_id": tenant_id, "status": "ready", "created_at": now - 1000, "ttl_seconds": ttl,
        "ready_at": now - 500, "expires_at": expires_at, "avaturn_session_id": created.session_id,
        "avaturn_token": created.token, "create_state": "done", "config": "{}", "metadata": "{}",
    })
    await ctx.redis.zadd(scope.live(), {sid: expires_at + 120_000})
    await ctx.redis.zadd(DUE_EXPIRY, {due_member(tenant_id, sid): expires_at})
    await ctx.redis.hincrby(STATS_LIVE, "ready", 1)
    return sid, created.session_id


async def record(ctx: WorkerContext, tenant_id: str, sid: str) -> SessionRecord:
    rec = await ctx.repo.get(tenant_id, sid)
    assert rec is not None
    return rec


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    await wait_until_async(predicate, timeout, what)


def _sample(ctx: WorkerContext, name: str, **labels: str) -> float:
    return ctx.metrics.registry.get_sample_value(name, labels) or 0.0


def upstream(sandbox: Any) -> dict[str, dict[str, Any]]:
    return {u["session_id"]: u for u in sandbox.audit()["sessions"]}


async def all_final(ctx: WorkerContext, seeded: list[tuple[str, str, str]]) -> bool:
    return all([(await record(ctx, tid, sid)).status == "terminated" for tid, sid, _ in seeded])


async def test_due_sessions_of_both_tenants_are_ended_and_the_others_are_not(ctx: WorkerContext, sandbox: Any) -> None:
    """Invariant: every due session (both tenants) ends terminated (reason expired), its
    upstream session deleted, its slot released, counted once; a session due later is
    left ready with its slot and its due entry; publishing announces each change."""
    now = now_ms()
    due = [(tid, *await seed_ready(ctx, tid, now - 200 + i)) for i, tid in enumerate(TENANTS * 3)]
    later_tid = TENANTS[1]
    later, later_up = await seed_ready(ctx, later_tid, now + 60_000)
    pubsub = ctx.redis.pubsub()
    await pubsub.psubscribe("sb:events:*")
    loop = ExpiryLoop(ctx).start()
    try:
        await wait_for(lambda: all_final(ctx, due), 5, "the due sessions terminated")
    finally:
        await loop.stop()
    ups = upstream(sandbox)
    for tid, sid, up in due:
        rec = await record(ctx, tid, sid)
        assert rec.termination_reason == "expired" and rec.terminated_at >= rec.expires_at
        assert not rec.avaturn_token
        assert 0 < await ctx.redis.ttl(TenantScope(tid).session(sid)) <= 7 * 24 * 3600  # retention, like every terminal record
        assert not ups[up]["live"]
        assert await ctx.redis.zscore(TenantScope(tid).live(), sid) is None
        assert await ctx.redis.zscore(DUE_EXPIRY, due_member(tid, sid)) is None
    assert (await record(ctx, later_tid, later)).status == "ready"
    assert ups[later_up]["live"]
    assert await ctx.redis.zscore(TenantScope(later_tid).live(), later) is not None
    assert await ctx.redis.zscore(DUE_EXPIRY, due_member(later_tid, later)) == now + 60_000
    assert await ctx.redis.hget(STATS_LIVE, "ready") == b"1"
    assert await ctx.redis.hget(STATS_LIVE, "terminating") == b"0"
    assert _sample(ctx, "broker_terminations_total", reason="expired") == len(due)
    seen: list[str] = []
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if msg is not None:
            seen.append(msg["data"].decode())
    await pubsub.aclose()
    assert seen.count("terminating") == seen.count("terminated") == len(due)


async def test_a_session_is_ended_at_its_time_not_before(ctx: WorkerContext, sandbox: Any) -> None:
    """Invariant: the loop ends a session that becomes due while it sleeps at its expires_at,
    never before: the sleep it takes ends no later than the next due time, and the upstream
    DELETE comes at or after it. (How late under load, p50/p99/max: the bench's expiry scenario,
    tests/bench/expiry.py; a unit test asserts no wall-clock bound.)"""
    loop = ExpiryLoop(ctx).start()
    try:
        await wait_until_async(lambda: loop.last_run > 0, 5, "the loop read an empty set (and sleeps)")
        expires_at = now_ms() + 1500
        sid, up = await seed_ready(ctx, TENANTS[0], expires_at)
        stepped_at = now_ms()
        # what a loop decides now, even one allowed to sleep a minute: nothing due, so sleep until the due time
        delay = await ExpiryLoop(ctx, max_sleep=60).step()
        assert 0 < delay <= (expires_at - stepped_at) / 1000, delay
        assert (await record(ctx, TENANTS[0], sid)).status == "ready"
        await wait_for(lambda: _terminated(ctx, TENANTS[0], sid), 5, "the session terminated")
    finally:
        await loop.stop()
    ended_at = upstream(sandbox)[up]["ended_at"]
    assert expires_at / 1000 <= ended_at, ended_at - expires_at / 1000


async def _terminated(ctx: WorkerContext, tid: str, sid: str) -> bool:
    return (await record(ctx, tid, sid)).status == "terminated"


async def test_a_failing_delete_is_retried_with_backoff_not_dropped(ctx: WorkerContext, sandbox: Any) -> None:
    """Invariant: a DELETE answered 503 keeps the session terminating (slot held), counts the
    failure, schedules a retry in the due set, and the retry ends it once Avaturn answers."""
    sandbox.configure({"delete": {"fail": [{"status": 503, "count": 2}]}})
    tid = TENANTS[0]
    sid, up = await seed_ready(ctx, tid, now_ms() - 10)
    loop = ExpiryLoop(ctx).start()
    try:
        await wait_for(lambda: _attempts(ctx, tid, sid, 1), 3, "a first failed attempt")
        rec = await record(ctx, tid, sid)
        assert rec.status == "terminating"
        assert await ctx.redis.zscore(TenantScope(tid).live(), sid) is not None
        retry_at = await ctx.redis.zscore(DUE_EXPIRY, due_member(tid, sid))
        assert retry_at is not None and retry_at < now_ms() + 10_000  # the retry time, not the claim lease
        await wait_for(lambda: _terminated(ctx, tid, sid), 10, "the session terminated after the retries")
    finally:
        await loop.stop()
    rec = await record(ctx, tid, sid)
    assert rec.delete_attempts == 2 and rec.termination_reason == "expired"
    assert _sample(ctx, "broker_termination_failures_total", code="upstream_unavailable") == 2
    assert not upstream(sandbox)[up]["live"]
    assert await ctx.redis.zscore(TenantScope(tid).live(), sid) is None


async def _attempts(ctx: WorkerContext, tid: str, sid: str, n: int) -> bool:
    return (await record(ctx, tid, sid)).delete_attempts >= n


async def test_two_loops_and_a_stop_job_never_double_terminate(ctx: WorkerContext, redis_url: str,
                                                               sandbox: Any) -> None:
    """Invariant: two workers' loops on one Redis (plus the stop jobs of half the sessions,
    racing them) claim each session once: one DELETE per upstream session, one terminal
    transition (counted once across both), every slot released."""
    other = WorkerContext.build(make_settings(redis_url, sandbox), WorkerMetrics())
    now = now_ms()
    seeded = [(tid, *await seed_ready(ctx, tid, now + 300 + i)) for i, tid in enumerate(TENANTS * 100)]
    loops = [ExpiryLoop(ctx, batch=37).start(), ExpiryLoop(other, batch=41).start()]
    try:
        await asyncio.sleep(max(0.0, (now + 300 - now_ms()) / 1000))  # the sessions' TTLs run out: they become due
        stops = [terminate_session({"wc": c}, tid, sid) for (tid, sid, _), c in zip(seeded[::2], (ctx, other) * 100)]
        outcomes = await asyncio.gather(*stops)
        await wait_for(lambda: all_final(ctx, seeded), 10, "every session terminated")
    finally:
        for loop in loops:
            await loop.stop()
        await other.close()
    assert set(outcomes) <= {"terminated", "not-due"}, set(outcomes)
    counters = sandbox.audit(summary=True)["counters"]["delete"]
    assert int(counters.get("requests", 0)) == len(seeded), counters  # not one DELETE twice
    done = sum(_sample(c, "broker_terminations_total", reason="expired") for c in (ctx, other))
    assert done == len(seeded)
    assert not any(u["live"] for u in upstream(sandbox).values())
    for tid in TENANTS:
        assert await ctx.redis.zcard(TenantScope(tid).live()) == 0
    assert await ctx.redis.zcard(DUE_EXPIRY) == 0


async def test_a_stop_is_left_to_its_job_then_taken_when_late(ctx: WorkerContext, sandbox: Any) -> None:
    """Invariant: a stopped session (terminating, reason requested, due now) is its stop job's
    for the first second (the loop does not race it: no duplicate DELETE); if the job never
    comes (lost, or its worker died before claiming), the loop ends it after that."""
    tid = TENANTS[0]
    sid, up = await seed_ready(ctx, tid, now_ms() + 60_000)
    rec = await record(ctx, tid, sid)
    now = now_ms()
    stopped = await ctx.repo.transition(rec, allowed="ready", status="terminating", due_expiry=now,
                                        fields={"termination_reason": "requested", "terminating_at": now})
    assert stopped.applied
    loop = ExpiryLoop(ctx).start()
    try:
        await asyncio.sleep(0.7)  # inside the 1 s grace under test: the loop must leave the stop to its job
        assert (await record(ctx, tid, sid)).status == "terminating"
        assert upstream(sandbox)[up]["live"]
        await wait_for(lambda: _terminated(ctx, tid, sid), 3, "the stopped session terminated by the loop")
    finally:
        await loop.stop()
    rec = await record(ctx, tid, sid)
    assert rec.termination_reason == "requested" and rec.terminated_at - now >= 1000
    assert not upstream(sandbox)[up]["live"]


async def test_a_lapsed_claim_is_taken_again(ctx: WorkerContext, sandbox: Any) -> None:
    """Invariant: a session claimed by a worker that then died (claim recorded, nothing
    else) is ended by another loop once the claim lease has run out, not before."""
    tid = TENANTS[1]
    sid, up = await seed_ready(ctx, tid, now_ms() - 10)
    loop = ExpiryLoop(ctx)
    now = now_ms()
    [claim] = await loop.claims.claim([(tid, sid)], now=now, due_until=now, claim_until=now + 1500, lease=now + 120_000)
    assert claim.outcome == "claimed"  # ... and the claimer is gone
    assert (await record(ctx, tid, sid)).status == "terminating"
    loop.start()
    try:
        await asyncio.sleep(1.0)  # inside the 1.5 s claim lease under test: not taken before it lapses
        assert (await record(ctx, tid, sid)).status == "terminating"
        await wait_for(lambda: _terminated(ctx, tid, sid), 3, "the session terminated after the lease")
    finally:
        await loop.stop()
    assert not upstream(sandbox)[up]["live"]


async def test_the_loop_survives_a_redis_restart(sandbox: Any) -> None:
    """Invariant: Redis going away (killed, then restarted on the same port and data) pauses
    the loop, counts the errors, and the loop ends the due sessions once Redis is back."""
    server = EmbeddedRedis(aof=True)
    server.start()
    wc = WorkerContext.build(make_settings(server.url, sandbox), WorkerMetrics())
    loop = ExpiryLoop(wc).start()
    try:
        await wait_until_async(lambda: loop.last_run > 0, 5, "the loop ran once against Redis")
        server.stop(kill=True)
        await wait_until_async(lambda: _sample(wc, "broker_redis_errors_total", source="expiry") >= 1, 5,
                               "the loop counted a Redis error")
        server.start()
        sid, up = await seed_ready(wc, TENANTS[0], now_ms() - 10)
        await wait_for(lambda: _terminated(wc, TENANTS[0], sid), 5, "the session terminated after the restart")
        assert not upstream(sandbox)[up]["live"]
    finally:
        await loop.stop()
        await wc.close()
        server.cleanup()


async def test_a_live_claimer_renews_its_claim_while_the_delete_hangs(redis: aioredis.Redis, redis_url: str,
                                                                     sandbox: Any) -> None:
    """Invariant: a claim outlives its 1 s lease while its worker is alive: with the DELETE taking
    2.5 s in the sandbox, a second loop running meanwhile never takes the session (one DELETE in
    all), the keeper renewed the claim, and the session ends terminated once, by its claimer."""
    wc = WorkerContext.build(make_settings(redis_url, sandbox, BROKER_UPSTREAM_TIMEOUT_SECONDS=10), WorkerMetrics())
    tid = TENANTS[0]
    first = ExpiryLoop(wc, lease_ms=1000, renew_s=0.3)
    other = ExpiryLoop(wc, lease_ms=1000, renew_s=0.3)
    try:
        sid, up = await seed_ready(wc, tid, now_ms() - 10)
        sandbox.configure({"delete": {"latency_ms": 2500}})
        first.start()
        await wait_for(lambda: _deletes(sandbox, 1), 3, "the first DELETE in flight")
        other.start()
        await asyncio.sleep(1.8)  # well past the 1 s lease of the first claim
        assert (await record(wc, tid, sid)).status == "terminating"
        assert first.keeper.renewals >= 3
        score = await wc.redis.zscore(DUE_EXPIRY, due_member(tid, sid))
        assert score is not None and score > now_ms(), "the claim was renewed ahead of now"
        await wait_for(lambda: _terminated(wc, tid, sid), 5, "the session terminated by its claimer")
        assert _delete_requests(sandbox) == 1, "the other loop took a claim that was still held"
        assert not upstream(sandbox)[up]["live"]
        # counted by the claimer right after its finish step returns: the record can be read
        # terminated a moment before the counter moves

        async def counted() -> bool:
            return _sample(wc, "broker_terminations_total", reason="expired") >= 1

        await wait_for(counted, 5, "the termination counted")
        assert _sample(wc, "broker_terminations_total", reason="expired") == 1
    finally:
        await other.stop()
        await first.stop()
        await wc.close()


def _delete_requests(sandbox: Any) -> int:
    return int(sandbox.audit(summary=True)["counters"]["delete"].get("requests", 0))


async def _deletes(sandbox: Any, n: int) -> bool:
    return _delete_requests(sandbox) >= n
