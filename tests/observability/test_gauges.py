"""Shared-state gauges (workers/gauges.py) read from a real Redis."""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest

from broker.embedded_redis import free_port
from broker.sessions.jobs import QUEUE_NAME, JobQueue, new_arq_redis
from tenants.scope import DUE_EXPIRY, PROVISION_TENANTS, TenantScope
from workers.gauges import LIVE_STATS_KEY, SharedStateCollector, read_snapshot
from tests.fixtures.wait import wait_until_async

from .helpers import samples


async def test_snapshot_counts_shared_state(redis: aioredis.Redis) -> None:
    now = time.time()
    ms = int(now * 1000)
    # The arq queue (stop jobs) is a zset scored by run time (ms).
    await redis.zadd(QUEUE_NAME, {"running": ms - 30_000, "waiting": ms - 10_000, "later": ms + 60_000})
    queue = JobQueue(new_arq_redis(redis.connection_pool))
    assert await queue.terminate("t1", "ses_x")                          # due now
    await redis.zadd(QUEUE_NAME, {"retry": ms + 120_000})                # deferred
    await redis.zadd(DUE_EXPIRY, {"t1:ses_a": ms - 20_000, "t1:ses_b": ms - 5_000, "t1:ses_c": ms + 100_000})
    # The provisioning schedule: t1's p1 waits since its slot 10 s ago, p2 is claimed (its entry
    # is its lease), t2's q1 is due later; the ring's scores are lower bounds.
    await redis.zadd(TenantScope("t1").provision_schedule(), {"ses_p1": ms - 10_000, "ses_p2": ms + 3_000})
    await redis.zadd(TenantScope("t2").provision_schedule(), {"ses_q1": ms + 5_000})
    await redis.zadd(TenantScope("t3").provision_schedule(), {"ses_r1": ms + 2_000})
    await redis.zadd(PROVISION_TENANTS, {"t1": ms - 12_000, "t2": ms + 5_000, "t3": ms - 1_000})
    await redis.hset(LIVE_STATS_KEY, mapping={"ready": 4, "queued": 2, "provisioning": 1, "bad field!": 3,
                                              "terminating": "x"})

    snap = await read_snapshot(redis, now=time.time())
    assert (snap.queue_due, snap.queue_deferred) == (3, 2)
    assert 9.9 <= snap.queue_oldest_due_age <= 10.5       # p1; t3's ring entry lags, none of its entries is due
    assert snap.due_terminations == 2
    assert 19.9 <= snap.due_terminations_oldest_age <= 20.5
    assert snap.provisioning_backlog == 3                 # queued + provisioning
    assert snap.live == {"ready": 4, "queued": 2, "provisioning": 1}


async def test_empty_redis_gives_zeros(redis: aioredis.Redis) -> None:
    snap = await read_snapshot(redis)
    assert (snap.queue_due, snap.queue_deferred, snap.queue_oldest_due_age, snap.due_terminations,
            snap.due_terminations_oldest_age, snap.provisioning_backlog, snap.live) == (0, 0, 0.0, 0, 0.0, 0, {})


def _exported(collector: SharedStateCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return {(n, tuple(sorted(lab.items()))): v for n, lab, v in samples(generate_latest(registry).decode())}


async def test_every_worker_exports_the_same_values(redis: aioredis.Redis) -> None:
    """Invariant: two workers export identical shared gauges (dashboards take max(), so N
    workers never multiply them), and nothing is exported before the first read."""
    a, b = SharedStateCollector(), SharedStateCollector()
    assert _exported(a) == {}
    await redis.hset(LIVE_STATS_KEY, mapping={"ready": 2, "queued": 1})
    await a.refresh(redis)
    await b.refresh(redis)
    ea, eb = _exported(a), _exported(b)
    age = ("broker_shared_state_age_seconds", ())
    assert 0 <= ea.pop(age) < 5 and 0 <= eb.pop(age) < 5
    assert ea == eb
    assert ea[("broker_provisioning_backlog", ())] == 1
    assert ea[("broker_live_sessions", (("state", "ready"),))] == 2
    assert ea[("broker_queue_jobs", (("state", "due"),))] == 0


async def test_refresh_loop_counts_errors_and_keeps_running() -> None:
    """Invariant: a Redis that cannot be reached is counted, never crashes the refresher, and
    no stale or made-up value is exported."""
    errors: list[int] = []
    collector = SharedStateCollector(on_error=lambda: errors.append(1), interval=0.05)
    dead = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2)
    task = collector.start(dead)
    try:
        await wait_until_async(lambda: len(errors) >= 2, 5, "two failed collections counted")
        assert not task.done()
        assert collector.snapshot is None and _exported(collector) == {}
    finally:
        task.cancel()
        await dead.aclose()
