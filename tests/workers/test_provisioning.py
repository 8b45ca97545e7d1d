"""The provisioning schedule and loop (broker/sessions/schedule.py, provision_claim.lua,
workers/provisioning.py) on a real Redis: claims are leased and fair across tenants, a due
session starts on its slot (woken by a token or by its own timer), a retry reuses the slot,
two loops never run one session twice, a full loop leaves a wake-up to an idle one.

Sessions are written here as admission writes them (record, schedule entry, ring, token)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from broker.sessions.models import SessionRecord, now_ms
from broker.sessions.repository import SessionRepository
from broker.sessions.schedule import WAKE_CAP, Claimed, ProvisionSchedule
from tenants.crypto import CredentialCipher
from tenants.models import TenantCreate
from tenants.session_config import merge_session
from tenants.scope import PROVISION_TENANTS, PROVISION_WAKE, STATS_LIVE, TenantScope
from tenants.service import TenantService
from tests.fixtures.wait import wait_until_async
from workers import provisioning as provisioning_mod
from workers.context import WorkerContext
from workers.provisioning import ProvisioningLoop

LEASE = 3_000


def _admit(pipe: Any, tid: str, sid: str, slot: int, status: str, created_at: int | None, token: bool,
           config: str) -> None:
    scope = TenantScope(tid)
    pipe.hset(scope.session(sid), mapping={
        "id": sid, "tenant_id": tid, "status": status, "ttl_seconds": 60, "mint_at": slot, "config": config,
        "created_at": created_at if created_at is not None else now_ms()})
    pipe.hincrby(STATS_LIVE, status, 1)
    pipe.zadd(scope.provision_schedule(), {sid: slot})
    pipe.zadd(PROVISION_TENANTS, {tid: slot}, lt=True)
    if token:
        pipe.lpush(PROVISION_WAKE, "1")
        pipe.ltrim(PROVISION_WAKE, 0, WAKE_CAP - 1)


async def admit(redis: aioredis.Redis, tid: str, sid: str, slot: int, *, status: str = "queued",
                created_at: int | None = None, token: bool = True, config: str = "{}") -> None:
    """What admission (issue 15a) writes for a session: record with its mint slot, the tenant's
    schedule entry at the slot, the ring entry (LT), the live-status count, a wake-up token."""
    async with redis.pipeline(transaction=True) as pipe:
        _admit(pipe, tid, sid, slot, status, created_at, token, config)
        await pipe.execute()


def _stats(raw: dict[bytes, bytes]) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in raw.items() if int(v)}


# ---- the claim script ------------------------------------------------------------------------


async def test_a_claim_leases_the_session_and_starts_it(redis: aioredis.Redis) -> None:
    """Invariant: a due session is claimed once: queued -> provisioning (counts kept), attempts
    + 1, its entry moved to the lease; a session not due yet is left alone; the reply says
    when the next work is due."""
    sched = ProvisionSchedule(redis)
    now = now_ms()
    await admit(redis, "ten_a", "ses_due", now - 5)
    await admit(redis, "ten_a", "ses_later", now + 700)
    nxt, claims = await sched.claim(now, now + LEASE, 10)
    assert [(c.tenant_id, c.before, c.record.id, c.record.status, c.record.attempts, c.record.mint_at)
            for c in claims] == [("ten_a", "queued", "ses_due", "provisioning", 1, now - 5)]
    assert await sched.entries("ten_a") == [("ses_later", now + 700), ("ses_due", now + LEASE)]
    assert nxt == now + 700 and await redis.zscore(PROVISION_TENANTS, "ten_a") == now + 700
    assert _stats(await redis.hgetall(STATS_LIVE)) == {"queued": 1, "provisioning": 1}
    assert (await sched.claim(now + 1, now + 1 + LEASE, 10))[1] == []  # leased: nobody else takes it
    nxt, again = await sched.claim(now + LEASE, now + 2 * LEASE, 10)    # the lease ran out: taken again
    assert sorted((c.record.id, c.before, c.record.attempts) for c in again) == [
        ("ses_due", "provisioning", 2), ("ses_later", "queued", 1)]
    assert _stats(await redis.hgetall(STATS_LIVE)) == {"provisioning": 2}


async def test_claims_are_round_robin_across_tenants(redis: aioredis.Redis) -> None:
    """Invariant: with tenant A's 200 sessions due and B's and C's one each, a claim of 3 takes
    one of each; a claim of 10 takes B's and C's and 8 of A's; with room for one session at a
    time (a saturated worker), the tenants take turns by how long they waited since last served,
    never A's whole backlog first."""
    sched = ProvisionSchedule(redis)
    now = now_ms() - 10_000
    for i in range(200):
        await admit(redis, "ten_a", f"ses_a{i:03d}", now + i, token=False)
    await admit(redis, "ten_b", "ses_b0", now + 500, token=False)
    await admit(redis, "ten_c", "ses_c0", now + 900, token=False)
    t = now + 5_000
    _, claims = await sched.claim(t, t + LEASE, 3)
    assert sorted(c.record.id for c in claims) == ["ses_a000", "ses_b0", "ses_c0"]

    await redis.flushall()
    for i in range(200):
        await admit(redis, "ten_a", f"ses_a{i:03d}", now + i, token=False)
    await admit(redis, "ten_b", "ses_b0", now + 500, token=False)
    await admit(redis, "ten_c", "ses_c0", now + 900, token=False)
    _, claims = await sched.claim(t, t + LEASE, 10)
    ids = [c.record.id for c in claims]
    assert "ses_b0" in ids and "ses_c0" in ids and ids.count("ses_b0") == 1
    assert [i for i in ids if i.startswith("ses_a")] == [f"ses_a{i:03d}" for i in range(8)]  # FIFO within A

    await redis.flushall()
    for i in range(200):
        await admit(redis, "ten_a", f"ses_a{i:03d}", now + i, token=False)
    for i in range(4):
        await admit(redis, "ten_b", f"ses_b{i}", now + 500 + i, token=False)
    order = []
    for k in range(8):  # one free slot per call, a millisecond apart
        _, claims = await sched.claim(t + k, t + k + LEASE, 1)
        order.append(claims[0].tenant_id)
    assert order == ["ten_a", "ten_b"] * 4


async def test_entries_no_longer_the_schedulers_are_dropped_without_using_room(redis: aioredis.Redis) -> None:
    """Invariant: a due entry whose session is terminating, terminal or gone is dropped (the
    termination path owns it), takes no room, and a tenant left with nothing scheduled leaves
    the ring."""
    sched = ProvisionSchedule(redis)
    now = now_ms()
    await admit(redis, "ten_a", "ses_stopped", now - 3, status="terminating")
    await admit(redis, "ten_a", "ses_failed", now - 2, status="failed")
    await admit(redis, "ten_a", "ses_ok", now - 1)
    await redis.zadd(TenantScope("ten_b").provision_schedule(), {"ses_ghost": now - 5})
    await redis.zadd(PROVISION_TENANTS, {"ten_b": now - 5})
    nxt, claims = await sched.claim(now, now + LEASE, 1)
    assert [c.record.id for c in claims] == ["ses_ok"]
    assert await sched.entries("ten_a") == [("ses_ok", now + LEASE)]
    assert await sched.entries("ten_b") == [] and await redis.zscore(PROVISION_TENANTS, "ten_b") is None
    assert nxt == now + LEASE


async def test_a_session_waiting_for_a_replaced_one_is_deferred_until_it_ended(redis: aioredis.Redis) -> None:
    """Invariant (issue 17, item 4): a session admitted by replace_oldest that waits for a
    replaced session still live (``waits_for``) is not claimed: it stays queued, no attempt
    counted, its same entry moved to now + recheck (no new mint slot), and another tenant's
    session is claimed meanwhile; once the replaced session is terminated it is claimed (its
    ``waits_for`` dropped); past its deadline it is claimed anyway (the worker fails it)."""
    sched = ProvisionSchedule(redis)
    now = now_ms()
    await admit(redis, "ten_a", "ses_old", now - 10, status="terminating")
    await redis.zrem(TenantScope("ten_a").provision_schedule(), "ses_old")
    await admit(redis, "ten_a", "ses_new", now - 5)
    await redis.hset(TenantScope("ten_a").session("ses_new"), "waits_for", "ses_old")
    await admit(redis, "ten_b", "ses_b", now - 1)
    nxt, claims = await sched.claim(now, now + LEASE, 10, deadline_ms=60_000, recheck_ms=250)
    assert [c.record.id for c in claims] == ["ses_b"]
    assert await sched.entries("ten_a") == [("ses_new", now + 250)]
    rec = SessionRecord.from_hash(await redis.hgetall(TenantScope("ten_a").session("ses_new")))
    assert (rec.status, rec.attempts, rec.waits_for, rec.mint_at) == ("queued", 0, "ses_old", now - 5)
    assert nxt == now + 250
    # still live at the recheck: deferred again
    _, claims = await sched.claim(now + 250, now + 250 + LEASE, 10, deadline_ms=60_000, recheck_ms=250)
    assert claims == [] and await sched.entries("ten_a") == [("ses_new", now + 500)]
    # the replaced session ended: claimed, the wait forgotten
    await redis.hset(TenantScope("ten_a").session("ses_old"), "status", "terminated")
    _, [claimed] = await sched.claim(now + 500, now + 500 + LEASE, 10, deadline_ms=60_000, recheck_ms=250)
    assert claimed.record.id == "ses_new" and claimed.record.attempts == 1 and claimed.record.waits_for == ""
    # past its deadline, a waiting session is claimed anyway (the worker fails it)
    await admit(redis, "ten_c", "ses_late", now - 5, created_at=now - 61_000)
    await admit(redis, "ten_c", "ses_live", now - 20_000, status="ready")
    await redis.hset(TenantScope("ten_c").session("ses_late"), "waits_for", "ses_live")
    await redis.zrem(TenantScope("ten_c").provision_schedule(), "ses_live")
    _, [late] = await sched.claim(now, now + LEASE, 10, deadline_ms=60_000, recheck_ms=250)
    assert late.record.id == "ses_late" and late.record.waits_for == "ses_live"

async def test_transitions_schedule_and_unschedule_with_the_ring(redis: aioredis.Redis) -> None:
    """Invariant: a reschedule moves the same entry (the ring never later than it); a terminal
    transition removes the entry, and the tenant's ring entry with its last one."""
    repo = SessionRepository(redis)
    sched = ProvisionSchedule(redis)
    now = now_ms()
    await admit(redis, "ten_a", "ses_1", now)
    await admit(redis, "ten_a", "ses_2", now + 10_000)
    _, [claimed] = await sched.claim(now, now + LEASE, 5)
    rec = claimed.record
    assert (await repo.transition(rec, allowed="provisioning", due_provision=now + 1_500)).applied
    assert await sched.entries("ten_a") == [("ses_1", now + 1_500), ("ses_2", now + 10_000)]
    assert await redis.zscore(PROVISION_TENANTS, "ten_a") <= now + 1_500
    assert (await repo.transition(rec, allowed="provisioning", status="failed", due_provision="del")).applied
    assert await sched.entries("ten_a") == [("ses_2", now + 10_000)]
    rec2 = await repo.get("ten_a", "ses_2")
    assert rec2 is not None
    assert (await repo.transition(rec2, allowed="queued", status="terminated", due_provision="del")).applied
    assert await sched.entries("ten_a") == [] and await redis.zscore(PROVISION_TENANTS, "ten_a") is None
    assert _stats(await redis.hgetall(STATS_LIVE)) == {}


# ---- the loop --------------------------------------------------------------------------------


class Starts:
    """Replaces the provisioning of a claimed session: records when each one started."""

    def __init__(self, hold: float = 0.0) -> None:
        self.at: dict[str, list[float]] = {}
        self.hold = hold
        self.release = asyncio.Event()

    async def __call__(self, ctx: WorkerContext, claimed: Claimed) -> str:
        self.at.setdefault(claimed.record.id, []).append(time.time())
        if self.hold:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.hold):
                    await self.release.wait()
        await ctx.repo.transition(claimed.record, allowed="provisioning", status="ready", due_provision="del")
        return "ready"


IDLE_FOR_A_MINUTE = 60.0  # a loop's longest sleep when told so: what starts meanwhile was woken, or timed


@contextlib.asynccontextmanager
async def running_loop(ctx: WorkerContext, **kw: Any) -> AsyncIterator[ProvisioningLoop]:
    loop = ProvisioningLoop(ctx, **kw).start()

    async def idle() -> bool:  # one iteration done (now on its timer), its listener blocked on the wake-up list
        return loop.last_run > 0 and int((await ctx.redis.info("clients"))["blocked_clients"]) >= 1

    await wait_until_async(idle, 5, "the loop idle, blocked on the wake-up list")
    try:
        yield loop
    finally:
        await loop.stop(patience=5)


async def _until(predicate: Callable[[], bool], timeout: float) -> None:
    await wait_until_async(predicate, timeout, "the session started", interval=0.002)  # 2 ms: latencies are measured


@pytest.fixture
def starts(monkeypatch: pytest.MonkeyPatch) -> Starts:
    fake = Starts()
    monkeypatch.setattr(provisioning_mod, "provision_claimed", fake)
    return fake


async def test_an_idle_loop_starts_a_new_session_at_once(ctx: WorkerContext, starts: Starts) -> None:
    """Invariant: a session due now is started because its admission token wakes the loop, not
    at the end of the loop's own sleep: the loop here sleeps a minute when idle, so each of the
    20 sessions starts only through its wake-up. (How soon, in milliseconds, under load: the
    bench's time-to-ready and burst-lateness rows; a unit test asserts no wall-clock bound.)"""
    async with running_loop(ctx, max_sleep=IDLE_FOR_A_MINUTE) as loop:
        for i in range(20):
            await admit(ctx.redis, "ten_a", f"ses_{i}", now_ms())
            await _until(lambda i=i: f"ses_{i}" in starts.at, 5)
        assert loop.wakeups >= 20


async def test_a_session_starts_at_its_slot(ctx: WorkerContext, starts: Starts) -> None:
    """Invariant: a session whose slot is 0.4 s ahead starts at its slot, not earlier, and not at
    a poll: the loop (which would sleep a minute) sleeps on an asyncio timer until the ring's
    next score. (Lateness against the slot under load: the bench's burst-lateness row.)"""
    async with running_loop(ctx, max_sleep=IDLE_FOR_A_MINUTE):
        slot = now_ms() + 400
        await admit(ctx.redis, "ten_a", "ses_later", slot)
        await _until(lambda: "ses_later" in starts.at, 5)
        late = starts.at["ses_later"][0] - slot / 1000
        assert late >= -0.002, late


async def test_sessions_due_a_millisecond_apart_all_start_on_time(ctx: WorkerContext, starts: Starts) -> None:
    """Invariant: 300 sessions (3 tenants) whose slots are 1 ms apart all start, each at its slot
    and never before it, from a loop that would otherwise sleep a minute. (Lateness p50/p99 under
    load: the bench's burst-lateness row.)"""
    async with running_loop(ctx, max_sleep=IDLE_FOR_A_MINUTE):
        first = now_ms() + 300
        slots = {f"ses_{i}": first + i for i in range(300)}
        async with ctx.redis.pipeline(transaction=False) as pipe:
            for i, (sid, slot) in enumerate(slots.items()):  # due within 1 s: admission pushes a token
                _admit(pipe, f"ten_{i % 3}", sid, slot, "queued", None, True, "{}")
            await pipe.execute()
        assert now_ms() < first
        await _until(lambda: len(starts.at) == 300, 5)
    late = [starts.at[sid][0] - slot / 1000 for sid, slot in slots.items()]
    assert min(late) > -0.002, (min(late), max(late))


async def test_two_loops_never_run_a_session_twice(ctx: WorkerContext, starts: Starts) -> None:
    """Invariant: with two loops claiming from one schedule, each of 300 sessions runs once."""
    starts.hold = 0.01
    other = WorkerContext.build(ctx.settings, ctx.metrics)
    try:
        async with running_loop(ctx, max_in_flight=20), running_loop(other, max_in_flight=20) as second:
            now = now_ms()
            for i in range(300):
                await admit(ctx.redis, f"ten_{i % 4}", f"ses_{i}", now, token=i % 10 == 0)
            await _until(lambda: len(starts.at) == 300, 20)
            assert second.claimed > 0  # counted at the claim, before the start
    finally:
        await other.close()
    assert sorted(len(v) for v in starts.at.values()) == [1] * 300


async def test_a_full_loop_leaves_the_wakeup_to_an_idle_one(ctx: WorkerContext, starts: Starts) -> None:
    """Invariant: while loop A is full (one slot, busy), a new session is started by idle loop B
    through a wake-up (A gives back a token it took): B would otherwise sleep a minute."""
    starts.hold = 10
    other = WorkerContext.build(ctx.settings, ctx.metrics)
    try:
        async with running_loop(ctx, max_in_flight=1) as a:
            await admit(ctx.redis, "ten_a", "ses_block", now_ms())
            await _until(lambda: "ses_block" in starts.at, 2)
            async with running_loop(other, max_in_flight=1, max_sleep=IDLE_FOR_A_MINUTE) as b:
                await admit(ctx.redis, "ten_a", "ses_next", now_ms())
                await _until(lambda: "ses_next" in starts.at, 5)
                assert b.claimed == 1 and a.claimed == 1
                starts.release.set()
    finally:
        await other.close()


async def test_a_claimers_lease_is_renewed_while_it_works_and_lapses_when_it_dies(
        ctx: WorkerContext, starts: Starts) -> None:
    """Invariant: a session held by a live loop longer than the lease is not taken by a second
    loop (the keeper renews it every second); once its loop is gone (cut off, nothing renews
    it), the other loop takes it. (How long after the cut, with processes: the bench's takeover row.)"""
    starts.hold = 30
    lease_ms, renew_s = 1_000, 0.3
    other = WorkerContext.build(ctx.settings, ctx.metrics)
    try:
        first = ProvisioningLoop(ctx, lease_ms=lease_ms, renew_s=renew_s).start()
        await admit(ctx.redis, "ten_a", "ses_long", now_ms())
        await _until(lambda: "ses_long" in starts.at, 2)
        async with running_loop(other, lease_ms=lease_ms, renew_s=renew_s) as second:
            await asyncio.sleep(2.5 * lease_ms / 1000)  # 2.5 leases pass: only the renewals keep the claim
            assert second.claimed == 0 and first.keeper.renewals >= 3
            await first.stop()  # like a SIGKILL for the session: its attempt is cut off, no renewal
            await _until(lambda: len(starts.at["ses_long"]) == 2, 5)
            assert second.claimed == 1
            starts.release.set()
    finally:
        await other.close()


async def test_an_idle_loop_costs_a_few_commands_a_second(ctx: WorkerContext, redis: aioredis.Redis) -> None:
    """Invariant: idle, a provisioning loop costs Redis about 5 commands/s: a claim call every
    0.75 s (the EVALSHA and the script's two reads of the ring, all counted by Redis), a blocking
    pop every second."""
    async with running_loop(ctx):
        before = int((await redis.info("stats"))["total_commands_processed"])
        await asyncio.sleep(3.0)  # the 3 s window the idle command rate is measured over
        sent = int((await redis.info("stats"))["total_commands_processed"]) - before - 1
    assert sent / 3.0 <= 5.5, sent


# ---- the real provisioning -------------------------------------------------------------------


async def _tenant(ctx: WorkerContext, per_minute: int = 6000) -> tuple[str, str]:
    """A tenant, and the session config its sessions are created with (its defaults)."""
    service = TenantService(ctx.redis, CredentialCipher(ctx.settings.secret_keys))
    tenant = await service.create(TenantCreate(name="acme", quotas={"openai_requests_per_minute": per_minute}))
    return tenant.id, msgspec.json.encode(merge_session(tenant.openai.session, None, ())).decode()


async def _wait_status(repo: SessionRepository, tid: str, sid: str, statuses: set[str], timeout: float) -> SessionRecord:
    async def reached() -> SessionRecord | None:
        rec = await repo.get(tid, sid)
        return rec if rec is not None and rec.status in statuses else None

    return await wait_until_async(reached, timeout, f"session {sid} {sorted(statuses)}")


async def test_a_transient_failure_retries_the_same_session_on_its_slot(ctx: WorkerContext, sandbox: Any) -> None:
    """Invariant: an upstream 503 on the mint reschedules the same session at the retry time
    (Retry-After honoured): one schedule entry all along, its mint slot unchanged, no mint slot
    reserved by the worker (the tenant's mint pacing state is untouched), ready after the retry."""
    tid, config = await _tenant(ctx)
    sandbox.configure({"mint": {"fail": [{"status": 503, "count": 1, "retry_after": 1}]}})
    async with running_loop(ctx):
        slot = now_ms()
        await admit(ctx.redis, tid, "ses_retry", slot, config=config)
        rec = await _wait_status(ctx.repo, tid, "ses_retry", {"ready", "failed"}, 10)
    assert rec.status == "ready", rec.error_code
    assert rec.mint_at == slot and rec.attempts == 2
    assert rec.ready_at - slot >= 1_000  # not before the Retry-After
    assert not await ctx.redis.exists(TenantScope(tid).mint_bucket())
    assert await ProvisionSchedule(ctx.redis).entries(tid) == []
    assert ctx.metrics.registry.get_sample_value("broker_worker_job_retries_total", {"function": "provision"}) == 1


async def test_a_session_claimed_past_its_deadline_is_failed(ctx: WorkerContext, sandbox: Any) -> None:
    """Invariant: a session whose provisioning deadline passed while nothing ran it is failed
    provision_deadline_exceeded (reason reaped) when claimed, never sent upstream."""
    tid, config = await _tenant(ctx)
    old = now_ms() - int(ctx.settings.provision_deadline_seconds * 1000) - 1
    async with running_loop(ctx):
        await admit(ctx.redis, tid, "ses_old", old, created_at=old, config=config)
        rec = await _wait_status(ctx.repo, tid, "ses_old", {"failed"}, 5)
    assert (rec.error_code, rec.termination_reason) == ("provision_deadline_exceeded", "reaped")
    assert sandbox.audit()["sessions"] == []


async def test_a_drained_loop_claims_nothing_and_leaves_the_event_loop_free(ctx: WorkerContext, starts: Starts) -> None:
    """Invariant: after drain() (SIGTERM) the loop claims no new session, what was in flight
    ends by itself (wait_idle), and the event loop keeps running other work meanwhile."""
    starts.hold = 0.3
    async with running_loop(ctx) as loop:
        await admit(ctx.redis, "ten_a", "ses_running", now_ms())
        await _until(lambda: "ses_running" in starts.at, 2)
        loop.drain()
        await admit(ctx.redis, "ten_a", "ses_after", now_ms())
        ran = asyncio.Event()
        asyncio.get_running_loop().call_soon(ran.set)
        await asyncio.wait_for(ran.wait(), 5)  # the event loop runs other work: not held by a busy loop
        assert await loop.wait_idle(5)
        await asyncio.sleep(0.3)  # a window in which a loop not drained would have claimed the woken ses_after
        assert "ses_after" not in starts.at and loop.claimed == 1
        assert await ProvisionSchedule(ctx.redis).entries("ten_a") != []


async def test_lagging_ring_entries_are_corrected_and_never_hide_due_work(redis: aioredis.Redis) -> None:
    """Invariant: 100 tenants whose ring entries say "due" although their only sessions are
    leased (a lagging hint) cost a claim call no more than room + 32 of them each, are set to
    their true score as they are looked at, and the tenant with a really due session behind
    them is claimed within a few calls (each call reports work due, so the loop calls again)."""
    sched = ProvisionSchedule(redis)
    now = now_ms()
    for i in range(100):
        await admit(redis, f"ten_{i:03d}", f"ses_{i:03d}", now + 60_000, token=False)
        await redis.zadd(PROVISION_TENANTS, {f"ten_{i:03d}": now - 1_000 + i})  # lags: says due
    await admit(redis, "ten_zzz", "ses_due", now - 10, token=False)
    calls = 0
    while True:
        calls += 1
        nxt, claims = await sched.claim(now, now + LEASE, 1)
        if claims:
            break
        assert nxt is not None and nxt <= now  # the caller is told to claim again
    assert [c.record.id for c in claims] == ["ses_due"] and calls <= 4, calls
    assert await redis.zscore(PROVISION_TENANTS, "ten_000") == now + 60_000
