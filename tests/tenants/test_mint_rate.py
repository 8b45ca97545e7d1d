"""Worker-side mint pacing (GCRA in Redis): the burst goes at once, then one slot per
emission interval; concurrent callers from several connections never share a slot nor
exceed the rate; reservations are FIFO; tenants have separate schedules."""

from __future__ import annotations

import asyncio
import random

import pytest
import redis.asyncio as aioredis

from tenants.mint_rate import MAX_BURST, reserve_mint, schedule
from tenants.scope import TenantScope

NOW = 1_795_000_000_000


def assert_within_rate(grants_ms: list[int], per_minute: int) -> None:
    """GCRA bound: any two grants i < j are at least (j - i) * T - tau apart, i.e. any
    window of W ms holds at most burst + floor(W / T) grants."""
    interval, tau = schedule(per_minute)
    g = sorted(grants_ms)
    for i in range(len(g)):
        for j in range(i + 1, len(g)):
            assert g[j] - g[i] >= (j - i) * interval - tau, (i, j, g[i], g[j])


def test_schedule() -> None:
    """Invariant: T = ceil(60000 / per_minute) ms, burst = min(per_minute, 10)."""
    assert schedule(60) == (1000, 9000)
    assert schedule(300) == (200, 1800)
    assert schedule(7) == (8572, 6 * 8572)
    assert schedule(1) == (60000, 0)
    assert schedule(1_000_000) == (1, MAX_BURST - 1)
    with pytest.raises(ValueError):
        schedule(0)


async def test_burst_then_one_per_interval(redis: aioredis.Redis) -> None:
    """Invariant: after idling, `burst` mints go now; each further one waits one more
    emission interval; once time passes the wait shrinks accordingly."""
    delays = [await reserve_mint(redis, "ten_a", 60, NOW) for _ in range(13)]
    assert delays == [0.0] * 10 + [1.0, 2.0, 3.0]
    # 2.5 s later: the next free slot is at NOW + 4 s
    assert await reserve_mint(redis, "ten_a", 60, NOW + 2500) == 1.5
    assert await redis.pttl(TenantScope("ten_a").mint_bucket()) > 0
    # another tenant has its own schedule
    assert await reserve_mint(redis, "ten_b", 60, NOW) == 0.0
    # after a long idle period the burst is available again
    later = NOW + 600_000
    assert [await reserve_mint(redis, "ten_a", 60, later) for _ in range(11)] == [0.0] * 10 + [1.0]


async def test_concurrent_callers_share_one_schedule(redis_url: str, redis: aioredis.Redis) -> None:
    """Invariant: 120 concurrent reservations over 6 connections get 120 distinct slots,
    exactly the GCRA schedule (burst at now, then one per T), never above the rate."""
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(6)]
    try:
        delays = await asyncio.gather(
            *(reserve_mint(clients[i % 6], "ten_c", 300, NOW) for i in range(120))
        )
    finally:
        for c in clients:
            await c.aclose()
    grants = sorted(NOW + round(d * 1000) for d in delays)
    interval, tau = schedule(300)
    assert grants == [NOW + max(0, k * interval - tau) for k in range(120)]
    assert_within_rate(grants, 300)


async def test_fifo_even_with_skewed_clocks(redis: aioredis.Redis) -> None:
    """Invariant: a later reservation never gets an earlier slot than an earlier one, even
    when the later caller's clock is behind; the rate bound holds throughout."""
    rng = random.Random(7)
    now = NOW
    interval, _ = schedule(120)
    grants: list[int] = []
    waited = 0
    for _ in range(300):
        now += rng.choice([0, 0, 50, 400, 3000])
        caller_now = now - rng.choice([0, 0, 0, 700])  # some workers' clocks lag
        delay = await reserve_mint(redis, "ten_f", 120, caller_now)
        assert delay >= 0
        waited += delay > 0
        grant = caller_now + round(delay * 1000)
        if grants:
            # no capacity is wasted: never later than one interval after the previous slot
            assert grant <= max(caller_now, grants[-1] + interval)
        grants.append(grant)
    assert grants == sorted(grants)
    assert_within_rate(grants, 120)
    assert 0 < waited < len(grants)  # the sequence both waited and went at once
