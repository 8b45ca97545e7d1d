"""Mint pacing at admission, against a real redis-server: the slot is reserved by the
admission script (GCRA: the burst at once, then one per emission interval, FIFO), a session
whose slot would come after its window is refused ``provisioning_backlog`` writing nothing,
the refusal's Retry-After works when honoured, and the provisioning schedule (the tenant's
zset, the ring of tenants, the wake-up list) is written with the admission."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.core.settings import Settings, SettingsError
from tenants.admission import AdmissionRequest, Admitted, Refused, Replayed, admit
from tenants.mint_rate import schedule
from tenants.models import Quotas
from tenants.scope import PROVISION_TENANTS, PROVISION_WAKE, PROVISION_WAKE_CAP, TenantScope
from tests.tenants.test_admission import T0, dump_all, quotas

WINDOW_MS = 40_000


def req(sid: str, now: int, q: Quotas, *, tenant: str = "ten_a", window_ms: int = WINDOW_MS,
        idem: str | None = None, **kw: Any) -> AdmissionRequest:
    return AdmissionRequest(
        tenant_id=tenant, session_id=sid, now_ms=now, quotas=q, idempotency_digest=idem,
        body_digest="body" if idem else None, session_fields={"id": sid, "status": "queued"},
        lease_until_ms=now + 600_000, mint_window_ms=window_ms, **kw,
    )


def fits(per_minute: int, window_ms: int) -> int:
    """Sessions admitted at once from an idle schedule: the burst (tau / T + 1 slots at now),
    then one per emission interval T up to now + window (inclusive)."""
    interval, tau = schedule(per_minute)
    return tau // interval + 1 + window_ms // interval


async def test_sequential_admissions_get_fifo_slots_and_the_rest_is_refused(redis: aioredis.Redis) -> None:
    """Invariant: one after the other, the k-th admission gets the k-th GCRA slot (the burst
    at now, then strictly increasing by T), stored as mint_at and in the schedule; exactly
    the sessions whose slot is within the window are admitted; the first refused one is
    provisioning_backlog with limit = openai_requests_per_minute, current = the backlog and
    Retry-After = ceil((slot - (now + window)) / 1000), and writes nothing."""
    q = quotas(openai_requests_per_minute=60)  # T = 1000 ms, burst 10
    interval, tau = schedule(60)
    window = 25_500
    n = fits(60, window)
    assert n == 10 + 25
    s = TenantScope("ten_a")
    slots = []
    for k in range(n):
        out = await admit(redis, req(f"ses_{k:03d}", T0, q, window_ms=window))
        assert isinstance(out, Admitted), k
        slots.append(out.mint_at)
        assert await redis.hget(s.session(out.session_id), "mint_at") == str(out.mint_at).encode()
        assert out.mint.used == max(0, k + 1 - 10)          # sessions waiting after this one
        assert out.mint.remaining == n - k - 1
    assert slots == [T0] * 10 + [T0 + i * interval for i in range(1, n - 9)]
    assert slots == sorted(slots) and len(set(slots[9:])) == len(slots[9:])
    assert await redis.zrange(s.provision_schedule(), 0, -1, withscores=True) == [
        (f"ses_{k:03d}".encode(), float(slot)) for k, slot in enumerate(slots)
    ]
    before = await dump_all(redis)
    out = await admit(redis, req("ses_late", T0, q, window_ms=window))
    assert isinstance(out, Refused)
    next_slot = T0 + (n - 9) * interval
    assert (out.code, out.limit, out.current) == ("provisioning_backlog", 60, n - 10)
    assert out.retry_after_s == -(-(next_slot - T0 - window) // 1000) == 1
    assert (out.mint.remaining, out.mint.used, out.mint.reset_s) == (0, n - 10, 1)
    assert await dump_all(redis) == before
    # honoured: Retry-After later the same slot is within the window
    later = T0 + out.retry_after_s * 1000
    out = await admit(redis, req("ses_late", later, q, window_ms=window))
    assert isinstance(out, Admitted) and out.mint_at == next_slot


async def test_parallel_admissions_share_one_fifo_schedule(redis_url: str, redis: aioredis.Redis) -> None:
    """Invariant: k parallel admissions of one tenant over 6 connections are granted exactly
    the GCRA schedule (burst at now, then one slot per T, no slot shared or skipped); each
    admitted session's backlog matches its slot's place in the queue; exactly the ones that
    fit the window are admitted, every other one is refused provisioning_backlog."""
    q = quotas(openai_requests_per_minute=120)  # T = 500 ms
    interval, tau = schedule(120)
    window = 10_000
    n = fits(120, window)
    k = n + 17
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(6)]
    try:
        outs = await asyncio.gather(
            *(admit(clients[i % 6], req(f"ses_{i:03d}", T0, q, window_ms=window)) for i in range(k))
        )
    finally:
        for c in clients:
            await c.aclose()
    admitted = [o for o in outs if isinstance(o, Admitted)]
    refused = [o for o in outs if isinstance(o, Refused)]
    assert len(admitted) == n and len(refused) == k - n
    assert {r.code for r in refused} == {"provisioning_backlog"}
    by_slot = sorted(admitted, key=lambda o: (o.mint_at, o.mint.used))
    assert [o.mint_at for o in by_slot] == [T0] * 10 + [T0 + i * interval for i in range(1, n - 9)]
    # FIFO: the j-th granted slot saw exactly j - burst sessions waiting (itself included)
    assert [o.mint.used for o in by_slot] == [0] * 10 + list(range(1, n - 9))
    s = TenantScope("ten_a")
    sched = await redis.zrange(s.provision_schedule(), 0, -1, withscores=True)
    assert {m.decode(): int(v) for m, v in sched} == {o.session_id: o.mint_at for o in admitted}
    assert len(await redis.keys(s.session("*"))) == n


async def test_thousand_concurrent_at_300_per_minute(redis_url: str, redis: aioredis.Redis) -> None:
    """Invariant: 1,000 concurrent requests of one tenant at openai_requests_per_minute=300
    (T = 200 ms, burst 10) with a 40 s window admit exactly burst + window / T = 210 (the
    GCRA parameters' count); the other 790 are refused provisioning_backlog with Retry-After
    1 s (the next slot is T0 + 40.2 s) and the backlog of 200 in their body fields; after
    waiting that Retry-After a request fits, and only as many as the elapsed time frees."""
    q = quotas(openai_requests_per_minute=300)
    interval, tau = schedule(300)
    n = fits(300, WINDOW_MS)
    assert n == 210
    pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=16)
    client = aioredis.Redis(connection_pool=pool)
    try:
        outs = await asyncio.gather(*(admit(client, req(f"ses_{i:04d}", T0, q)) for i in range(1000)))
    finally:
        await client.aclose()
        await pool.disconnect()
    kinds = Counter(o.code if isinstance(o, Refused) else type(o).__name__ for o in outs)
    assert kinds == {"Admitted": n, "provisioning_backlog": 1000 - n}
    refused = [o for o in outs if isinstance(o, Refused)]
    assert {(r.limit, r.current, r.retry_after_s) for r in refused} == {(300, n - 10, 1)}
    assert max(o.mint_at for o in outs if isinstance(o, Admitted)) == T0 + (n - 10) * interval
    s = TenantScope("ten_a")
    assert await redis.zcard(s.provision_schedule()) == n
    assert await redis.zscore(PROVISION_TENANTS, "ten_a") == T0
    # Retry-After (1 s) later: 1000 / T = 5 more slots came within reach, and no more
    later = T0 + refused[0].retry_after_s * 1000
    more = [await admit(redis, req(f"ses_more_{i}", later, q)) for i in range(7)]
    assert [type(o).__name__ for o in more] == ["Admitted"] * 5 + ["Refused"] * 2
    assert [o.mint_at for o in more if isinstance(o, Admitted)] == [
        T0 + (n - 10 + i) * interval for i in range(1, 6)
    ]


async def test_replay_takes_no_slot_and_checks_come_first(redis: aioredis.Redis) -> None:
    """Invariant: an Idempotency-Key replay answers the first session without touching the
    mint schedule (every key identical), even when the schedule is full; when another quota
    is exhausted too, that quota's refusal is reported (the backlog check is the last one)."""
    q = quotas(openai_requests_per_minute=1, max_concurrent_sessions=2)  # T = 60 s, burst 1
    first = await admit(redis, req("ses_1", T0, q, idem="k" * 64))
    assert isinstance(first, Admitted) and first.mint_at == T0
    before = await dump_all(redis)
    again = await admit(redis, req("ses_2", T0 + 5, q, idem="k" * 64))
    assert again == Replayed(session_id="ses_1")
    assert await dump_all(redis) == before
    full = await admit(redis, req("ses_2", T0 + 5, q))
    assert isinstance(full, Refused) and full.code == "provisioning_backlog"
    assert full.retry_after_s == 20 and full.current == 0  # nobody waits: the next slot is T0 + 60 s
    assert await dump_all(redis) == before
    out = await admit(redis, req("ses_2", T0 + 20_000, q))
    assert isinstance(out, Admitted) and out.mint_at == T0 + 60_000
    # concurrency exhausted and schedule full: concurrency_limit is what is reported
    out = await admit(redis, req("ses_3", T0 + 20_001, q))
    assert isinstance(out, Refused) and out.code == "concurrency_limit"


async def test_schedule_ring_and_wakeups(redis: aioredis.Redis) -> None:
    """Invariant: the tenant's ring score is its earliest slot (ZADD LT: a later slot does not
    raise it, a lower one lowers it, an absent tenant is added); a wake-up token is pushed
    only for a slot due within 1 s of now, and the list never exceeds PROVISION_WAKE_CAP;
    tenants have separate schedules."""
    q = quotas(openai_requests_per_minute=6)  # T = 10 s, burst 6
    for i in range(6):
        assert isinstance(await admit(redis, req(f"ses_{i}", T0, q)), Admitted)
    assert await redis.llen(PROVISION_WAKE) == 6
    out = await admit(redis, req("ses_6", T0, q))
    assert isinstance(out, Admitted) and out.mint_at == T0 + 10_000
    assert await redis.llen(PROVISION_WAKE) == 6  # due in 10 s: no token
    assert await redis.zscore(PROVISION_TENANTS, "ten_a") == T0
    # the scheduler moved the ring score on (e.g. the tenant's due work was claimed)
    await redis.zadd(PROVISION_TENANTS, {"ten_a": T0 + 10_000})
    out = await admit(redis, req("ses_7", T0 + 9_500, q))
    assert isinstance(out, Admitted) and out.mint_at == T0 + 20_000
    assert await redis.zscore(PROVISION_TENANTS, "ten_a") == T0 + 10_000  # not raised
    out = await admit(redis, req("ses_8", T0 + 29_200, q))
    assert isinstance(out, Admitted) and out.mint_at == T0 + 30_000  # due in 0.8 s
    assert await redis.llen(PROVISION_WAKE) == 7
    await redis.zrem(PROVISION_TENANTS, "ten_a")
    out = await admit(redis, req("ses_9", T0 + 40_000, q))
    assert isinstance(out, Admitted) and out.mint_at == T0 + 40_000
    assert await redis.zscore(PROVISION_TENANTS, "ten_a") == T0 + 40_000  # added back
    # another tenant: its own schedule and ring entry; many due slots keep the list capped
    burst = quotas(openai_requests_per_minute=100_000)
    for i in range(PROVISION_WAKE_CAP + 10):
        assert isinstance(await admit(redis, req(f"ses_b{i}", T0, burst, tenant="ten_b")), Admitted)
    assert await redis.llen(PROVISION_WAKE) == PROVISION_WAKE_CAP
    assert await redis.zscore(PROVISION_TENANTS, "ten_b") == T0
    assert await redis.zcard(TenantScope("ten_a").provision_schedule()) == 10
    assert await redis.zcard(TenantScope("ten_b").provision_schedule()) == PROVISION_WAKE_CAP + 10


async def test_a_zero_window_admits_the_burst_only(redis: aioredis.Redis) -> None:
    """Invariant: with no time to wait (window 0), exactly the burst is admitted (slots at
    now), the next is refused with Retry-After = until its slot."""
    q = quotas(openai_requests_per_minute=60)
    outs = [await admit(redis, req(f"ses_{i}", T0, q, window_ms=0)) for i in range(11)]
    assert [type(o).__name__ for o in outs] == ["Admitted"] * 10 + ["Refused"]
    last = outs[-1]
    assert isinstance(last, Refused) and last.retry_after_s == 1 and last.current == 0


@pytest.mark.parametrize(
    ("env", "window_s"),
    [
        ({}, 40.0),                                                       # 60 s - 2 x 10 s
        ({"BROKER_UPSTREAM_TIMEOUT_SECONDS": "5"}, 50.0),                 # the margin follows the timeout
        ({"BROKER_PROVISION_MARGIN_SECONDS": "5"}, 55.0),
        ({"BROKER_PROVISION_MARGIN_SECONDS": "0"}, 60.0),
        ({"BROKER_UPSTREAM_TIMEOUT_SECONDS": "30"}, 10.0),                # at least 10 s
        ({"BROKER_PROVISION_DEADLINE_SECONDS": "8"}, 8.0),                # never past the deadline
        ({"BROKER_PROVISION_DEADLINE_SECONDS": "300", "BROKER_PROVISION_MARGIN_SECONDS": "30"}, 270.0),
    ],
)
def test_mint_window_setting(env: dict[str, str], window_s: float) -> None:
    """Invariant: the mint window is the provisioning deadline minus the margin (default twice
    the upstream timeout: one full mint and one full create), at least 10 s, at most the
    deadline."""
    assert Settings.from_env(env).mint_window_seconds() == window_s


def test_bad_margin_names_the_variable() -> None:
    """Invariant: a malformed or out-of-range margin stops the process naming the variable."""
    for value in ("soon", "-1", "4000"):
        with pytest.raises(SettingsError, match="BROKER_PROVISION_MARGIN_SECONDS"):
            Settings.from_env({"BROKER_PROVISION_MARGIN_SECONDS": value})
