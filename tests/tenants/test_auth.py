"""KeyAuthenticator against a real Redis, with two authenticators standing for two API
processes (each with its own Redis connection): cached lookups, revocation and tenant
changes seen by the other process within 1 s, rotation overlap, expiry, disabled tenants,
reconnecting listener, and last_used_at written at most once a minute."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from broker.core.errors import Forbidden, Unauthorized
from tenants.apikeys import generate_api_key, hash_key
from tenants.auth import KeyAuthenticator
from tenants.models import Tenant, TenantPatch
from tenants.scope import TenantScope, api_key_lookup
from tenants.service import TenantService, decode_create
from tests.fixtures.wait import wait_until_async

BIG_TTL = 3600.0  # caches that only pub/sub can invalidate within a test
Factory = Callable[..., Awaitable[KeyAuthenticator]]


@pytest.fixture
async def service(redis: aioredis.Redis) -> TenantService:
    return TenantService(redis)


@pytest.fixture
async def other_process(redis_url: str) -> AsyncIterator[Factory]:
    """Factory of started authenticators, each on its own Redis client (another 'process')."""
    started: list[tuple[KeyAuthenticator, aioredis.Redis]] = []

    async def make(**kw: float) -> KeyAuthenticator:
        client = aioredis.Redis.from_url(redis_url)
        auth = KeyAuthenticator(client, TenantService(client), **{"tenant_ttl": BIG_TTL, "key_ttl": BIG_TTL, **kw})
        await auth.start()
        assert auth.listening
        started.append((auth, client))
        return auth

    yield make
    for auth, client in started:
        await auth.stop()
        await client.aclose()


async def refused_within(auth: KeyAuthenticator, key: str, exc_type: type[Exception], limit: float = 1.0) -> float:
    """Seconds until ``auth`` refuses ``key`` with ``exc_type``; fails after ``limit``."""
    started = time.monotonic()

    async def refused() -> bool:
        try:
            await auth.authenticate(key)
        except exc_type:
            return True
        return False

    await wait_until_async(refused, limit, f"{exc_type.__name__} for the key", interval=0.01)
    return time.monotonic() - started


async def tenant_with_key(service: TenantService, name: str = "acme") -> tuple[Tenant, str, str]:
    tenant = await service.create(decode_create({"name": name}))
    created = await service.create_key(tenant.id)
    return tenant, created.key, created.id


async def test_valid_keys_authenticate_to_their_own_tenant(service: TenantService, other_process: Factory) -> None:
    auth = await other_process()
    a, key_a, _ = await tenant_with_key(service, "a")
    b, key_b, _ = await tenant_with_key(service, "b")
    extra = (await service.create_key(a.id)).key
    assert (await auth.authenticate(key_a)).id == a.id
    assert (await auth.authenticate(extra)).id == a.id
    assert (await auth.authenticate(key_b)).id == b.id


async def test_unknown_key_is_unauthorized_without_echo(service: TenantService, other_process: Factory) -> None:
    auth = await other_process()
    key, _ = generate_api_key()  # well formed, never stored
    with pytest.raises(Unauthorized) as exc:
        await auth.authenticate(key)
    assert exc.value.code == "invalid_api_key" and exc.value.status == 401
    assert key not in exc.value.message and key[4:12] not in exc.value.message


async def test_revocation_reaches_another_process_within_a_second(
    service: TenantService, redis: aioredis.Redis, other_process: Factory
) -> None:
    """Invariant: once revoke_key returns, every started authenticator refuses the key within
    1 s, even one whose cache would otherwise keep it for an hour. The cache is shown to be in
    use first: deleting the lookup behind its back (no announcement) does not stop the key."""
    tenant, key, key_id = await tenant_with_key(service)
    first, second = await other_process(), await other_process()
    assert (await first.authenticate(key)).id == tenant.id
    assert (await second.authenticate(key)).id == tenant.id

    raw = await redis.hgetall(api_key_lookup(hash_key(key)))
    await redis.delete(api_key_lookup(hash_key(key)))
    assert (await second.authenticate(key)).id == tenant.id  # served from the cache
    await redis.hset(api_key_lookup(hash_key(key)), mapping=raw)

    await service.revoke_key(tenant.id, key_id)
    assert await refused_within(second, key, Unauthorized) < 1.0
    assert await refused_within(first, key, Unauthorized) < 1.0


async def test_rotation_keeps_the_old_key_for_the_overlap_only(service: TenantService, other_process: Factory) -> None:
    """Invariant: during the overlap both keys work (in a process that had the old key cached
    without a deadline); after it only the new one does."""
    tenant, old, old_id = await tenant_with_key(service)
    auth = await other_process()
    await auth.authenticate(old)  # cached with no not_after
    new = (await service.rotate_key(tenant.id, old_id, overlap_seconds=1)).key
    assert (await auth.authenticate(old)).id == tenant.id
    assert (await auth.authenticate(new)).id == tenant.id
    await refused_within(auth, old, Unauthorized, limit=3.0)
    assert (await auth.authenticate(new)).id == tenant.id


async def test_rotation_without_overlap_revokes_at_once(service: TenantService, other_process: Factory) -> None:
    tenant, old, old_id = await tenant_with_key(service)
    auth = await other_process()
    await auth.authenticate(old)
    new = (await service.rotate_key(tenant.id, old_id, overlap_seconds=0)).key
    assert await refused_within(auth, old, Unauthorized) < 1.0
    assert (await auth.authenticate(new)).id == tenant.id


async def test_key_past_not_after_is_refused(service: TenantService, other_process: Factory) -> None:
    tenant = await service.create(decode_create({"name": "acme"}))
    key = (await service.create_key(tenant.id, not_after=datetime.now(UTC) + timedelta(seconds=1))).key
    auth = await other_process()
    assert (await auth.authenticate(key)).id == tenant.id
    await refused_within(auth, key, Unauthorized, limit=3.0)


async def test_disabled_tenant_is_forbidden_in_every_process(service: TenantService, other_process: Factory) -> None:
    tenant, key, _ = await tenant_with_key(service)
    auth = await other_process()
    await auth.authenticate(key)  # tenant record cached for an hour
    await service.disable(tenant.id)
    assert await refused_within(auth, key, Forbidden) < 1.0
    with pytest.raises(Forbidden) as exc:
        await auth.authenticate(key)
    assert exc.value.code == "tenant_disabled" and exc.value.status == 403
    await service.enable(tenant.id)
    await wait_until_async(lambda: auth.authenticate(key), 1.0, "the tenant enabled again", interval=0.01,
                           ignoring=(Forbidden,))
    assert (await auth.authenticate(key)).active


async def test_quota_change_applies_to_the_next_request(service: TenantService, other_process: Factory) -> None:
    tenant, key, _ = await tenant_with_key(service)
    auth = await other_process()
    assert (await auth.authenticate(key)).quotas.sessions_per_minute == 60
    await service.update(tenant.id, TenantPatch(quotas={"sessions_per_minute": 7}))
    async def new_quota() -> bool:
        return (await auth.authenticate(key)).quotas.sessions_per_minute == 7

    await wait_until_async(new_quota, 1.0, "the new quotas served", interval=0.01)


async def test_listener_reconnects_and_bypasses_caches_meanwhile(
    service: TenantService, redis: aioredis.Redis, other_process: Factory
) -> None:
    """Invariant: after its pub/sub connection is killed the listener resubscribes, and a
    revocation announced after that is still seen within 1 s."""
    tenant, key, key_id = await tenant_with_key(service)
    auth = await other_process()
    await auth.authenticate(key)
    assert auth.subscriptions == 1
    assert await redis.client_kill_filter(_type="pubsub") >= 1
    await wait_until_async(lambda: auth.subscriptions >= 2 and auth.listening, 5.0, "the listener resubscribed")
    await auth.authenticate(key)
    await service.revoke_key(tenant.id, key_id)
    assert await refused_within(auth, key, Unauthorized) < 1.0


async def test_stopped_authenticator_uses_no_cache(service: TenantService, redis: aioredis.Redis) -> None:
    """Invariant: without a subscribed listener every check reads Redis, so nothing stale is served."""
    tenant, key, _ = await tenant_with_key(service)
    auth = KeyAuthenticator(redis, service, key_ttl=BIG_TTL, tenant_ttl=BIG_TTL)
    assert (await auth.authenticate(key)).id == tenant.id
    await redis.delete(api_key_lookup(hash_key(key)))
    with pytest.raises(Unauthorized):
        await auth.authenticate(key)
    await auth.stop()


async def test_last_used_is_written_at_most_once_per_interval(
    service: TenantService, redis: aioredis.Redis, other_process: Factory
) -> None:
    tenant, key, key_id = await tenant_with_key(service)
    used = TenantScope(tenant.id).keys_last_used()
    auth = await other_process()
    for _ in range(5):
        await auth.authenticate(key)
    await wait_until_async(lambda: redis.hexists(used, key_id), 2.0, "the key's last use written")  # written within USE_FLUSH_DELAY
    [meta] = await service.list_keys(tenant.id)
    assert meta.last_used_at is not None
    await redis.hdel(used, key_id)
    for _ in range(5):
        await auth.authenticate(key)
    await auth.flush_uses()
    assert not await redis.hexists(used, key_id)  # no write within the interval
    eager = await other_process(touch_interval=0.0)
    await eager.authenticate(key)
    await eager.flush_uses()
    assert await redis.hexists(used, key_id)


async def test_last_used_writes_are_batched_and_flushed_on_stop(
    service: TenantService, redis: aioredis.Redis, redis_url: str
) -> None:
    """Many keys' first uses become one pipelined write; stop() writes what is still queued."""
    pairs = [await tenant_with_key(service, f"batch-{i}") for i in range(5)]
    client = aioredis.Redis.from_url(redis_url)
    auth = KeyAuthenticator(client, TenantService(client), tenant_ttl=BIG_TTL, key_ttl=BIG_TTL, use_flush_delay=60)
    await auth.start()
    try:
        for _, key, _ in pairs:
            await auth.authenticate(key)
        for tenant, _, key_id in pairs:  # not on the request path
            assert not await redis.hexists(TenantScope(tenant.id).keys_last_used(), key_id)
    finally:
        await auth.stop()  # long before the flush delay: the queued uses are written now
        await client.aclose()
    for tenant, _, key_id in pairs:
        assert await redis.hexists(TenantScope(tenant.id).keys_last_used(), key_id)


async def test_stop_is_clean_and_idempotent(service: TenantService, redis: aioredis.Redis) -> None:
    auth = KeyAuthenticator(redis, service)
    await auth.start()
    assert auth.listening and (await redis.pubsub_numsub("sb:keys:revoked"))[0][1] == 1
    await auth.stop()
    await auth.stop()
    assert not auth.listening
    async def unsubscribed() -> bool:
        return (await redis.pubsub_numsub("sb:keys:revoked"))[0][1] == 0

    await wait_until_async(unsubscribed, 2.0, "no subscriber left on sb:keys:revoked")


async def test_cached_tenants_add_nothing_for_the_cyclic_gc_to_walk(
    service: TenantService, other_process: Factory
) -> None:
    """A full GC collection walks every tracked object: with 10,000 cached tenants at ~5 tracked
    objects each, its pause grew from 2 to 26 ms and stalled every request in flight. The
    caches must hold (almost) nothing the collector tracks, however many tenants they hold."""
    import gc

    auth = await other_process()
    keys = [(await tenant_with_key(service, f"gc-{i}"))[1] for i in range(300)]
    for key in keys:  # fill both caches (and last_used_at's bookkeeping)
        await auth.authenticate(key)
    served = [await auth.authenticate(key) for key in keys[:3]]  # served from the caches
    assert [t.name for t in served] == ["gc-0", "gc-1", "gc-2"]
    del served
    gc.collect()
    before = len(gc.get_objects())
    more = [(await tenant_with_key(service, f"gc-more-{i}"))[1] for i in range(300)]
    gc.collect()
    baseline = len(gc.get_objects()) - before  # what creating them left behind (the key strings...)
    for key in more:
        await auth.authenticate(key)
    gc.collect()
    cached = len(gc.get_objects()) - before - baseline
    assert cached < 60, f"{cached} GC-tracked objects for 300 more cached tenants"
