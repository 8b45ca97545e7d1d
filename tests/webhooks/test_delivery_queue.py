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
