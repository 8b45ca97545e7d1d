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

from broker.core.errors import Conflict, InvalidInput
from tenants.apply import apply
from tenants.crypto import CredentialCipher, generate_secret_key
from tenants.models import TenantPatch
from tenants.repository import TENANT_NAMES
from tenants.scope import TENANTS_INDEX, tenant_record
from tenants.service import TenantService, decode_create
from tests.fixtures.stack import Admin, tenant_client


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


def test_the_admin_api_answers_409_and_the_shared_disable_and_revoke_shapes(admin: Admin, worker: object) -> None:
    """Over HTTP: a duplicate name is 409 tenant_name_taken in the contract's error shape (so is
    a rename onto it); disable answers the tenant with sessions_stopped (a live session of the
    tenant is stopped); revoke answers the key's record with revoked: true."""
    first = admin.http.post("/admin/v1/tenants", json={"name": "acme"})
    assert first.status_code == 201
    tid = first.json()["id"]
    again = admin.http.post("/admin/v1/tenants", json={"name": "acme"})
    assert again.status_code == 409, again.text
    assert again.json() == {"error": {"code": "tenant_name_taken", "field": "name",
                                      "message": again.json()["error"]["message"]}}
    other = admin.http.post("/admin/v1/tenants", json={"name": "other"}).json()
    renamed = admin.http.patch(f"/admin/v1/tenants/{other['id']}", json={"name": "acme"})
    assert renamed.status_code == 409 and renamed.json()["error"]["code"] == "tenant_name_taken"

    key = admin.http.post(f"/admin/v1/tenants/{tid}/keys").json()
    with tenant_client(admin.http.base_url.__str__().rstrip("/"), key["key"]) as client:
        session = client.post("/v1/sessions", json={"ttl_seconds": 60})
        assert session.status_code == 202, session.text
    disabled = admin.http.post(f"/admin/v1/tenants/{tid}/disable")
    assert disabled.status_code == 200
    body = disabled.json()
    assert body["id"] == tid and body["status"] == "disabled" and body["sessions_stopped"] == 1
    assert set(body) - {"sessions_stopped"} == set(admin.http.get(f"/admin/v1/tenants/{tid}").json())

    revoked = admin.http.delete(f"/admin/v1/tenants/{tid}/keys/{key['id']}")
    assert revoked.status_code == 200
    assert revoked.json()["id"] == key["id"] and revoked.json()["revoked"] is True
    assert revoked.json()["revoked_at"] is not None and revoked.json()["prefix"] == key["prefix"]
    assert admin.http.delete(f"/admin/v1/tenants/{tid}/keys/{key['id']}").json() == revoked.json()  # idempotent
