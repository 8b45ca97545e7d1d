"""The endpoint repository (``broker/webhooks/endpoints.py``) on real Redis: its scripts act only
on endpoints that exist (a hash left by a late write of the delivery is not one), the limit holds
under parallel creates, and without ``BROKER_SECRET_KEY`` nothing is stored in clear."""

from __future__ import annotations

import asyncio

import pytest

from broker.core.errors import Conflict, InvalidInput, NotFound
from broker.webhooks.endpoints import MAX_ENDPOINTS, EndpointCreate, EndpointPatch, WebhookEndpoints
from tenants.crypto import CredentialCipher, generate_secret_key
from tenants.scope import WEBHOOK_TENANTS, TenantScope

URL = "https://93.184.216.34/hook"


@pytest.fixture
def repo(redis) -> WebhookEndpoints:
    return WebhookEndpoints(redis, CredentialCipher([generate_secret_key()]), allow_private=False)


@pytest.mark.asyncio
async def test_parallel_creates_stop_at_the_limit(repo: WebhookEndpoints, redis) -> None:
    """Invariant: 30 concurrent creates for one tenant create exactly MAX_ENDPOINTS."""
    results = await asyncio.gather(*(repo.create("t_a", EndpointCreate(url=URL)) for _ in range(30)),
                                   return_exceptions=True)
    created = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, Conflict)]
    assert len(created) == MAX_ENDPOINTS and len(refused) == 30 - MAX_ENDPOINTS
    assert {r.code for r in refused} == {"webhook_endpoint_limit"}
    assert await redis.scard(TenantScope("t_a").webhook_endpoints()) == MAX_ENDPOINTS
    assert len(await repo.list("t_a")) == MAX_ENDPOINTS
    # another tenant has its own ten
    await repo.create("t_b", EndpointCreate(url=URL))
    assert await redis.smembers(WEBHOOK_TENANTS) == {b"t_a", b"t_b"}


@pytest.mark.asyncio
async def test_a_deleted_endpoint_is_not_brought_back(repo: WebhookEndpoints, redis) -> None:
    """A field written by the delivery after the delete (failing_since) leaves a hash without url:
    it is not an endpoint for any route, and no update, rotation or ping revives it."""
    weid = (await repo.create("t_a", EndpointCreate(url=URL))).id
    await repo.delete("t_a", weid)
    key = TenantScope("t_a").webhook_endpoint(weid)
    await redis.hset(key, "failing_since", "1700000000000")
    for call in (repo.get("t_a", weid), repo.update("t_a", weid, EndpointPatch(description="x")),
                 repo.update("t_a", weid, EndpointPatch(disabled=False)), repo.rotate_secret("t_a", weid),
                 repo.ping("t_a", weid), repo.attempts("t_a", weid, limit=10, cursor=None)):
        with pytest.raises(NotFound):
            await call
    assert await redis.hgetall(key) == {b"failing_since": b"1700000000000"}
    assert await repo.list("t_a") == []
    assert await redis.xlen(TenantScope("t_a").events()) == 0  # no ping was recorded
    with pytest.raises(NotFound):  # deleting it again is a 404, and removes the leftover
        await repo.delete("t_a", weid)
    assert not await redis.exists(key)


@pytest.mark.asyncio
async def test_without_a_secret_key_nothing_is_created(redis) -> None:
    repo = WebhookEndpoints(redis, None, allow_private=False)
    with pytest.raises(InvalidInput) as caught:
        await repo.create("t_a", EndpointCreate(url=URL))
    assert caught.value.code == "secret_key_missing"
    assert await redis.keys("*") == []


@pytest.mark.asyncio
async def test_events_recorded_while_disabled_are_not_delivered_after_enabling(repo: WebhookEndpoints, redis) -> None:
    """Invariant: an endpoint gets no event recorded while it was disabled, whether or not the
    tenant has another enabled endpoint (with none, the fan-out left its cursor behind and the
    re-enabled endpoint got up to 7 days of backlog; with one, it got nothing): the same rule
    both ways. A resend still delivers such an event on demand."""
    from broker.webhooks.queue import DeliveryQueue, enqueue

    from .helpers import tenant_event

    q = DeliveryQueue(redis)
    for other in (False, True):
        tid = f"t_dis_{other}"
        scope = TenantScope(tid)
        weid = (await repo.create(tid, EndpointCreate(url=URL))).id
        if other:
            await repo.create(tid, EndpointCreate(url=URL, events=["usage.threshold_reached"]))
        before = await tenant_event(redis, tid, "usage.threshold_reached", {"n": 0})
        await q.fanout(tid, 0)
        await repo.update(tid, weid, EndpointPatch(disabled=True))
        missed = await tenant_event(redis, tid, "usage.threshold_reached", {"n": 1})
        await q.fanout(tid, 0)
        await repo.update(tid, weid, EndpointPatch(disabled=False))
        after = await tenant_event(redis, tid, "usage.threshold_reached", {"n": 2})
        await q.fanout(tid, 0)
        queued = [x.decode() for x in await redis.lrange(scope.webhook_queue(weid, "-"), 0, -1)]
        assert queued == [before, after], (other, queued, missed)
        assert await enqueue(redis, tid, weid, missed, None)  # a resend delivers it on demand
        assert [x.decode() for x in await redis.lrange(scope.webhook_queue(weid, "-"), 0, -1)][-1] == missed


@pytest.mark.asyncio
async def test_the_fanout_cursor_goes_with_the_last_endpoint(repo: WebhookEndpoints, redis) -> None:
    """Nothing of a tenant's webhooks is left in Redis once its last endpoint is deleted."""
    from broker.webhooks.queue import DeliveryQueue

    from .helpers import tenant_event

    scope = TenantScope("t_c")
    first = (await repo.create("t_c", EndpointCreate(url=URL))).id
    second = (await repo.create("t_c", EndpointCreate(url=URL))).id
    await tenant_event(redis, "t_c", "usage.threshold_reached", {"n": 1})
    await DeliveryQueue(redis).fanout("t_c", 0)
    assert await redis.exists(scope.webhook_cursor())
    await repo.delete("t_c", first)
    assert await redis.exists(scope.webhook_cursor())  # still needed by the other endpoint
    await repo.delete("t_c", second)
    assert not await redis.exists(scope.webhook_cursor())


@pytest.mark.asyncio
async def test_an_event_in_the_same_millisecond_as_the_create_or_enable_is_delivered(
        repo: WebhookEndpoints, redis) -> None:
    """Invariant: every event recorded after the create (or the enable) goes to the endpoint,
    also one whose id is "{that millisecond}-0" (``since`` was "{ms}-0" from TIME, and the
    fan-out takes only ids after it: a test.ping right after the create could be lost)."""
    from broker.webhooks.queue import DeliveryQueue

    from .helpers import tenant_event

    scope = TenantScope("t_ms")
    await tenant_event(redis, "t_ms", "usage.threshold_reached", {"n": 0})  # an older event
    weid = (await repo.create("t_ms", EndpointCreate(url=URL))).id
    created_ms = int(await redis.hget(scope.webhook_endpoint(weid), "created_at"))
    same_ms = f"{created_ms}-0"
    last = (await redis.xrevrange(scope.events(), count=1))[0][0].decode()
    if last.split("-")[0] == str(created_ms):  # (the older event took that millisecond: the next one)
        same_ms = f"{created_ms}-{int(last.split('-')[1]) + 1}"
    await redis.xadd(scope.events(), {"type": "test.ping", "data": "{}", "endpoint_id": weid}, id=same_ms)
    await DeliveryQueue(redis).fanout("t_ms", 0)
    assert [x.decode() for x in await redis.lrange(scope.webhook_queue(weid, "-"), 0, -1)] == [same_ms]

    await repo.update("t_ms", weid, EndpointPatch(disabled=True))
    await repo.update("t_ms", weid, EndpointPatch(disabled=False))
    since = (await redis.hget(scope.webhook_endpoint(weid), "since")).decode()
    assert since == same_ms  # the last event when it was enabled again
    ms, seq = since.split("-")
    nxt = f"{ms}-{int(seq) + 1}"
    await redis.xadd(scope.events(), {"type": "test.ping", "data": "{}", "endpoint_id": weid}, id=nxt)
    await DeliveryQueue(redis).fanout("t_ms", 0)
    assert [x.decode() for x in await redis.lrange(scope.webhook_queue(weid, "-"), 0, -1)] == [same_ms, nxt]
