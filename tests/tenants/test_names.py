"""Tenant names are unique per deployment, on a real Redis: a duplicate create or a rename onto a
taken name is 409 ``tenant_name_taken``; parallel creates of one name (each with its own
connection, so they really interleave in Redis) admit exactly one; names of tenants stored
before the names hash existed are taken into it; ``apply`` plans every entry before writing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
import redis.asyncio as aioredis

from broker.errors import Conflict, InvalidInput
from tenants.apply import apply
from tenants.crypto import CredentialCipher, generate_secret_key
from tenants.models import TenantPatch
from tenants.repository import TENANT_NAMES
from tenants.scope import TENANTS_INDEX, tenant_record
from tenants.service import TenantService, decode_create


@pytest.fixture
async def service(redis: aioredis.Redis) -> AsyncIterator[TenantService]:
    yield TenantService(redis, CredentialCipher([generate_secret_key()]))


async def test_a_second_tenant_with_a_taken_name_is_a_409_naming_the_owner(service: TenantService) -> None:
    first = await service.create(decode_create({"name": "acme"}))
    with pytest.raises(Conflict) as excinfo:
        await service.create(decode_create({"name": " acme "}))  # names are compared once trimmed
    err = excinfo.value
    assert err.status == 409 and err.code == "tenant_name_taken" and err.field == "name" and first.id in err.message
    listed, _ = await service.list(limit=100)
    assert [t.id for t in listed] == [first.id]


async def test_renames_take_the_new_name_and_free_the_old_one(service: TenantService) -> None:
    a = await service.create(decode_create({"name": "a"}))
    b = await service.create(decode_create({"name": "b"}))
    with pytest.raises(Conflict):
        await service.update(b.id, TenantPatch(name="a"))
    assert (await service.get(b.id)).name == "b"  # nothing written
    await service.update(a.id, TenantPatch(name="a2"))
    await service.update(b.id, TenantPatch(name="a"))  # "a" is free again
    assert (await service.find_by_name("a")).id == b.id  # type: ignore[union-attr]
    assert (await service.find_by_name("a2")).id == a.id  # type: ignore[union-attr]
    assert await service.find_by_name("b") is None
    await service.update(b.id, TenantPatch(name="a"))  # renaming to its own name is no conflict


async def test_parallel_creates_of_one_name_admit_exactly_one(redis_url: str, redis: aioredis.Redis) -> None:
    """Invariant: N concurrent creates of one name through N connections -> exactly 1 tenant."""
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(12)]
    try:
        services = [TenantService(c) for c in clients]
        for _round in range(5):
            name = f"race-{_round}"
            outcomes = await asyncio.gather(*(s.create(decode_create({"name": name})) for s in services),
                                            return_exceptions=True)
            won = [o for o in outcomes if not isinstance(o, BaseException)]
            lost = [o for o in outcomes if isinstance(o, BaseException)]
            assert len(won) == 1, outcomes
            assert all(isinstance(o, Conflict) and o.code == "tenant_name_taken" for o in lost), lost
            stored = [t for t, _ in [await services[0].list(limit=100)]][0]
            assert [t.name for t in stored].count(name) == 1
            assert (await redis.hget(TENANT_NAMES, name)).decode() == won[0].id  # type: ignore[union-attr]
    finally:
        for c in clients:
            await c.aclose()


async def test_names_of_tenants_stored_before_the_names_hash_are_taken_into_it(
    service: TenantService, redis: aioredis.Redis
) -> None:
    """A deployment upgraded from a version without the names hash: its tenants (two of them
    sharing a name, which that version allowed) keep working; the older one holds the name."""
    old = [service.build(decode_create({"name": n})) for n in ("legacy", "legacy", "other")]
    for i, tenant in enumerate(old):
        await redis.set(tenant_record(tenant.id), msgspec.json.encode(tenant))
        await redis.zadd(TENANTS_INDEX, {tenant.id: 1_000 + i})
    assert not await redis.exists(TENANT_NAMES)
    with pytest.raises(Conflict) as excinfo:
        await service.create(decode_create({"name": "legacy"}))
    assert old[0].id in excinfo.value.message
    with pytest.raises(Conflict):
        await service.create(decode_create({"name": "other"}))
    assert (await service.find_by_name("legacy")).id == old[0].id  # type: ignore[union-attr]
    # the newer duplicate can still be changed, and renamed onto a free name
    renamed = await service.update(old[1].id, TenantPatch(name="legacy-2"))
    assert renamed.name == "legacy-2" and (await service.find_by_name("legacy")).id == old[0].id  # type: ignore[union-attr]


async def test_apply_writes_nothing_when_one_entry_is_invalid(service: TenantService, redis: aioredis.Redis) -> None:
    await service.create(decode_create({"name": "kept", "quotas": {"sessions_per_day": 3}}))
    before = {k: await redis.dump(k) for k in sorted(await redis.keys("*"))}
    with pytest.raises(InvalidInput) as excinfo:
        await apply(service, [{"name": "new-one"}, {"name": "kept", "quotas": {"sessions_per_day": 4}},
                              {"name": "bad", "quotas": {"max_concurrent_sessions": -1}}])
    assert "entry 2 ('bad')" in excinfo.value.message and excinfo.value.field == "[2].quotas.max_concurrent_sessions"
    after = {k: await redis.dump(k) for k in sorted(await redis.keys("*"))}
    assert after == before


async def test_apply_reports_created_updated_unchanged_per_entry(service: TenantService) -> None:
    entries = [{"name": "one", "avaturn": {"api_key": "avt-key-0001"}}, {"name": "two"}]
    assert [r["action"] for r in await apply(service, entries)] == ["created", "created"]
    assert [r["action"] for r in await apply(service, entries)] == ["unchanged", "unchanged"]
    two = await service.find_by_name("two")
    assert two is not None
    results = await apply(service, [{"id": two.id, "name": "two-renamed"}, {"name": "one"}])
    assert [r["action"] for r in results] == ["updated", "unchanged"]
    assert results[0]["tenant"]["name"] == "two-renamed" and results[0]["tenant"]["id"] == two.id
    # a key set to another value is a change, even though both are stored encrypted
    assert [r["action"] for r in await apply(service, [{"name": "one", "avaturn": {"api_key": "avt-key-0002"}}])] \
        == ["updated"]
