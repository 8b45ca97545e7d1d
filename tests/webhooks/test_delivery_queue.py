"""The delivery queues (broker/webhooks/queue.py) on a real Redis: enqueue keeps per-session order
per endpoint, a new queue is due at once, and nothing is queued for a missing endpoint or entry."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from broker.webhooks.queue import enqueue
from tenants.crypto import CredentialCipher, generate_secret_key
from tenants.scope import WEBHOOK_PENDING, WEBHOOK_RING, WEBHOOK_WAKE, TenantScope

from .helpers import create_endpoint, session_event, tenant_event

TID = "ten_q"


@pytest.fixture
def cipher() -> CredentialCipher:
    return CredentialCipher([generate_secret_key()])


async def test_enqueue_orders_per_session_and_schedules_the_head(redis: aioredis.Redis, cipher: CredentialCipher) -> None:
    weid, _ = await create_endpoint(redis, cipher, TID, "https://example.com/hook")
    scope = TenantScope(TID)
    a1 = await session_event(redis, TID, "sess_a", "session.created")
    b1 = await session_event(redis, TID, "sess_b", "session.created")
    a2 = await session_event(redis, TID, "sess_a", "session.ready", status="ready")
    ping = await tenant_event(redis, TID, "test.ping", {}, weid)

    pubsub = redis.pubsub()
    await pubsub.subscribe(WEBHOOK_WAKE)
    await pubsub.get_message(timeout=1.0)  # the subscribe confirmation

    for eid, sid in ((a1, "sess_a"), (b1, "sess_b"), (a2, "sess_a"), (ping, None)):
        assert await enqueue(redis, TID, weid, eid, sid)

    assert await redis.lrange(scope.webhook_queue(weid, "sess_a"), 0, -1) == [a1.encode(), a2.encode()]
    assert await redis.lrange(scope.webhook_queue(weid, "sess_b"), 0, -1) == [b1.encode()]
    assert await redis.lrange(scope.webhook_queue(weid, "-"), 0, -1) == [ping.encode()]
    due = dict(await redis.zrange(scope.webhook_due(weid), 0, -1, withscores=True))
    assert set(due) == {b"sess_a", b"sess_b", b"-"}
    ring = await redis.zrange(WEBHOOK_RING, 0, -1, withscores=True)
    assert ring == [(f"{TID}:{weid}".encode(), min(due.values()))]
    assert int(await redis.get(WEBHOOK_PENDING)) == 4
    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
    assert msg is not None and msg["data"] == TID.encode()
    await pubsub.aclose()


async def test_nothing_is_queued_for_a_missing_endpoint_or_entry(redis: aioredis.Redis, cipher: CredentialCipher) -> None:
    weid, _ = await create_endpoint(redis, cipher, TID, "https://example.com/hook")
    eid = await session_event(redis, TID, "sess_a", "session.created")
    assert not await enqueue(redis, TID, "we_" + "0" * 24, eid, "sess_a")
    assert not await enqueue(redis, TID, weid, "1-0", "sess_a")
    assert await redis.get(WEBHOOK_PENDING) is None
    assert await redis.zcard(WEBHOOK_RING) == 0


async def test_fanout_filters_and_moves_the_cursor_once(redis: aioredis.Redis, cipher: CredentialCipher) -> None:
    from broker.webhooks.queue import DeliveryQueue
    q = DeliveryQueue(redis)
    old = await session_event(redis, TID, "sess_a", "session.created")  # before both endpoints
    all_, _ = await create_endpoint(redis, cipher, TID, "https://a.example/h", since=old)
    ready, _ = await create_endpoint(redis, cipher, TID, "https://b.example/h", events="session.ready", since=old)
    off, _ = await create_endpoint(redis, cipher, TID, "https://c.example/h", since=old, disabled="1")
    a2 = await session_event(redis, TID, "sess_a", "session.ready", status="ready")
    ping = await tenant_event(redis, TID, "test.ping", {}, ready)  # targeted: ignores the filter
    scope = TenantScope(TID)
    assert await q.fanout(TID, 1000) == (2, 3)
    assert await q.fanout(TID, 1000) == (0, 0)  # nothing twice
    assert await redis.lrange(scope.webhook_queue(all_, "sess_a"), 0, -1) == [a2.encode()]
    assert await redis.lrange(scope.webhook_queue(ready, "sess_a"), 0, -1) == [a2.encode()]
    assert await redis.lrange(scope.webhook_queue(ready, "-"), 0, -1) == [ping.encode()]
    assert await redis.exists(scope.webhook_queue(all_, "-"), scope.webhook_queue(off, "sess_a")) == 0
    assert await redis.get(scope.webhook_cursor()) == ping.encode()


async def test_claim_serves_one_head_per_queue_caps_endpoints_and_completes(
        redis: aioredis.Redis, cipher: CredentialCipher) -> None:
    from broker.webhooks.queue import DeliveryQueue
    q = DeliveryQueue(redis)
    slow, _ = await create_endpoint(redis, cipher, TID, "https://slow.example/h")
    fast, _ = await create_endpoint(redis, cipher, TID, "https://fast.example/h")
    for i in range(4):
        await session_event(redis, TID, f"sess_{i}", "session.created")
        await session_event(redis, TID, f"sess_{i}", "session.ready", status="ready")
    assert await q.fanout(TID, 1000) == (8, 16)
    # slow already has 2 in flight in this worker, cap 3: it gets 1 more, fast gets the rest
    nxt, got = await q.claim(1000, 4000, room=10, cap=3, busy={f"{TID}:{slow}": 2}, token="t1")
    by_ep: dict[str, list] = {}
    for d in got:
        by_ep.setdefault(d.endpoint_id, []).append(d)
    assert len(by_ep[slow]) == 1 and len(by_ep[fast]) == 3  # fast is capped at 3 too
    assert all(d.attempt == 1 and d.fields[b"type"] == b"session.created" for d in got)
    assert nxt is None  # both endpoints at their cap: nothing for this worker until a completion
    # the heads are leased: a second claim gets nothing of those queues (only the 4th fast session)
    _, again = await q.claim(1001, 4001, room=10, cap=8, busy={}, token="t2")
    assert {(d.endpoint_id, d.session) for d in again}.isdisjoint({(d.endpoint_id, d.session) for d in got})
    d = by_ep[fast][0]
    assert await q.complete(d, "ok", now=1100, retry_at=0, give_up=False, status=200, error="",
                            latency_ms=3, response="ok") == "delivered"
    # the next head of that session is due at once, with the same ordering
    _, nxt_heads = await q.claim(1200, 4200, room=10, cap=8, busy={}, token="t3")
    mine = [x for x in nxt_heads if (x.endpoint_id, x.session) == (fast, d.session)]
    assert len(mine) == 1 and mine[0].fields[b"type"] == b"session.ready"
    # a stale token changes nothing
    assert await q.complete(mine[0], "ok", now=1300, retry_at=0, give_up=False, status=200, error="",
                            latency_ms=3, response="") == "delivered"
    assert await q.complete(mine[0], "ok", now=1300, retry_at=0, give_up=False, status=200, error="",
                            latency_ms=3, response="") == "stale"
    log = await redis.xrevrange(TenantScope(TID).webhook_attempts(fast), count=1)
    assert log[0][1][b"event_type"] == b"session.ready" and log[0][1][b"status"] == b"200"


async def test_a_deleted_endpoints_queues_are_dropped_by_the_claim(redis: aioredis.Redis, cipher: CredentialCipher) -> None:
    from broker.webhooks.queue import DeliveryQueue
    q = DeliveryQueue(redis)
    weid, _ = await create_endpoint(redis, cipher, TID, "https://example.com/hook")
    for i in range(3):
        await session_event(redis, TID, f"sess_{i}", "session.created")
    assert await q.fanout(TID, 1000) == (3, 3)
    scope = TenantScope(TID)
    await redis.delete(scope.webhook_endpoint(weid))
    await redis.srem(scope.webhook_endpoints(), weid)
    nxt, got = await q.claim(2000, 5000, room=10, cap=8, busy={}, token="t")
    assert got == [] and nxt is None
    assert await q.pending() == 0
    assert await redis.zcard(WEBHOOK_RING) == 0
    assert await redis.exists(scope.webhook_due(weid), scope.webhook_heads(weid), scope.webhook_attempts(weid),
                              *(scope.webhook_queue(weid, f"sess_{i}") for i in range(3))) == 0


async def test_one_tenants_ten_slow_endpoints_cannot_take_every_slot_of_a_worker(
        redis: aioredis.Redis, cipher: CredentialCipher) -> None:
    """Invariant: the per-endpoint cap bounds one receiver, the per-tenant cap one tenant: a
    tenant with 10 endpoints (10 x 32 = 320 >= the worker's 256 slots) answering after 15 s
    would otherwise hold every slot of every worker and starve the other tenants' deliveries."""
    from broker.webhooks.queue import DeliveryQueue
    from workers.webhooks import MAX_IN_FLIGHT, PER_ENDPOINT, PER_TENANT

    assert PER_TENANT < MAX_IN_FLIGHT // 2 and PER_ENDPOINT <= PER_TENANT
    q = DeliveryQueue(redis)
    hog = "ten_hog"
    eps = [(await create_endpoint(redis, cipher, hog, f"https://tarpit{i}.example/h"))[0] for i in range(10)]
    for s in range(40):
        await session_event(redis, hog, f"sess_{s}", "session.created")
    other, _ = await create_endpoint(redis, cipher, TID, "https://fast.example/h")
    for s in range(5):
        await session_event(redis, TID, f"sess_o{s}", "session.created")
    assert (await q.fanout(hog, 1000))[1] == 400 and (await q.fanout(TID, 1000))[1] == 5
    _, got = await q.claim(1000, 4000, room=MAX_IN_FLIGHT, cap=PER_ENDPOINT, busy={}, token="t1",
                           tenant_cap=PER_TENANT)
    hogs = [d for d in got if d.tenant_id == hog]
    assert len(hogs) == PER_TENANT
    assert len([d for d in got if d.tenant_id == TID]) == 5
    # with the hog's deliveries still in flight, a later claim gives it nothing more
    busy: dict[str, int] = {}
    for d in hogs:
        busy[d.member] = busy.get(d.member, 0) + 1
    assert sum(busy.values()) == PER_TENANT and set(busy) <= {f"{hog}:{e}" for e in eps}
    await session_event(redis, TID, "sess_late", "session.created")
    await q.fanout(TID, 1100)
    nxt, later = await q.claim(1100, 4100, room=MAX_IN_FLIGHT - len(got), cap=PER_ENDPOINT, busy=busy,
                               token="t2", tenant_cap=PER_TENANT)
    assert [d.tenant_id for d in later] == [TID]
    assert nxt == 4000  # the other tenant's first lease end; not the hog's heads, due now but capped
