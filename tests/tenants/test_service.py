"""TenantService against a real Redis: tenant records, admin input decoding and validation
(quotas, session defaults, overrides, avatar settings), listing, updates announced on pub/sub,
and API keys stored only as hashes, several per tenant, scoped to their tenant."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from broker.core.errors import InvalidInput, NotFound
from tenants.crypto import CredentialCipher, generate_secret_key
from tenants.models import Quotas, TenantPatch
from tenants.quotas import build_quotas
from tenants.scope import TENANT_CHANGED_CHANNEL, TENANTS_INDEX, TenantScope, api_key_lookup, tenant_record
from tenants.service import TenantService, decode_create, decode_patch

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
CONTRACT_BODY = {
    "name": "acme",
    "quotas": {"sessions_per_minute": 60, "max_concurrent_sessions": 10, "sessions_per_day": 1000,
               "max_session_seconds": 3600, "max_sessions_per_end_user": 1, "end_user_policy": "reject",
               "openai_requests_per_minute": 300},
    "openai": {"api_key": "sk-test-123",
               "session": {"model": "gpt-realtime", "instructions": "...", "audio": {"output": {"voice": "marin"}}},
               "allowed_overrides": ["instructions", "audio", "prompt"]},
    "avaturn": {"api_key": "avt-test-456", "avatar_id": "jane_20240829", "background": "default",
                "user_absent_timeout": 60},
}


@pytest.fixture
async def service(redis: aioredis.Redis) -> AsyncIterator[TenantService]:
    yield TenantService(redis, CredentialCipher([generate_secret_key()]))


def invalid(excinfo: pytest.ExceptionInfo[InvalidInput], field: str) -> InvalidInput:
    assert excinfo.value.status == 400 and excinfo.value.field == field, (excinfo.value.field, excinfo.value.message)
    return excinfo.value


# ---- create / get / list -------------------------------------------------------------------


async def test_create_from_the_contract_example(service: TenantService, redis: aioredis.Redis) -> None:
    tenant = await service.create(decode_create(json.dumps(CONTRACT_BODY).encode()))
    assert re.fullmatch(r"ten_[A-Za-z0-9]{22}", tenant.id)
    assert RFC3339.match(tenant.created_at) and tenant.created_at == tenant.updated_at
    assert tenant.status == "active" and tenant.quotas == Quotas()
    assert tenant.openai.session == {"type": "realtime", "model": "gpt-realtime", "instructions": "...",
                                     "audio": {"output": {"voice": "marin"}}}
    assert tenant.avaturn.avatar_id == "jane_20240829"
    assert await service.get(tenant.id) == tenant
    assert await redis.zscore(TENANTS_INDEX, tenant.id) is not None
    assert await redis.exists(tenant_record(tenant.id))


async def test_minimal_create_takes_documented_defaults(service: TenantService) -> None:
    tenant = await service.create(decode_create(b'{"name": "  solo  "}'))
    assert tenant.name == "solo" and tenant.quotas == Quotas()
    assert tenant.openai.session == {"type": "realtime", "model": "gpt-realtime"}
    assert tenant.openai.allowed_overrides == ["instructions", "audio", "prompt"]
    assert tenant.openai.api_key_enc is None and tenant.avaturn.api_key_enc is None
    # a session default without a model gets the default model
    other = await service.create(decode_create({"name": "x", "openai": {"session": {"instructions": "hi"}}}))
    assert other.openai.session == {"type": "realtime", "instructions": "hi", "model": "gpt-realtime"}


async def test_unknown_tenant_is_not_found(service: TenantService) -> None:
    for tenant_id in ("ten_doesnotexist", "nope", "ten_a:b", ""):
        with pytest.raises(NotFound) as exc:
            await service.get(tenant_id)
        assert exc.value.code == "tenant_not_found"
    with pytest.raises(NotFound):
        await service.update("ten_doesnotexist", TenantPatch(name="x"))


async def test_list_pages_cover_every_tenant_once(service: TenantService) -> None:
    created = [(await service.create(decode_create({"name": f"t{i}"}))).id for i in range(7)]
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        page, cursor = await service.list(limit=3, cursor=cursor)
        assert len(page) <= 3
        seen += [t.id for t in page]
        if cursor is None:
            break
    assert sorted(seen) == sorted(created) and len(seen) == 7
    with pytest.raises(InvalidInput) as exc:
        await service.list(limit=0)
    invalid(exc, "limit")
    with pytest.raises(InvalidInput) as exc:
        await service.list(limit=5, cursor="%%%garbage")
    assert invalid(exc, "cursor").code == "invalid_cursor"


# ---- input validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"name": 1}', "name"),
        (b"{}", "name"),
        (b'{"name": "a", "colour": "red"}', "colour"),
        (b'{"name": "a", "quotas": []}', "quotas"),
        (b'{"name": "a", "openai": {"apikey": "x"}}', "openai.apikey"),
        (b'{"name": "a", "openai": {"allowed_overrides": ["audio", 3]}}', "openai.allowed_overrides[1]"),
        (b'{"name": "a", "avaturn": {"user_absent_timeout": "60"}}', "avaturn.user_absent_timeout"),
    ],
)
def test_decode_errors_name_the_field(body: bytes, field: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        decode_create(body)
    assert field in invalid(exc, field).message
    with pytest.raises(InvalidInput) as exc:
        decode_create(json.loads(body))
    invalid(exc, field)


def test_malformed_json_and_patch_decoding() -> None:
    with pytest.raises(InvalidInput) as exc:
        decode_create(b"{not json")
    assert exc.value.code == "invalid_json"
    with pytest.raises(InvalidInput) as exc:
        decode_patch(b'{"status": "paused"}')
    invalid(exc, "status")
    assert decode_patch(b'{"quotas": {"sessions_per_minute": 5}}').quotas == {"sessions_per_minute": 5}


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"sessions_per_minute": 0}, "quotas.sessions_per_minute"),
        ({"sessions_per_minute": 100_001}, "quotas.sessions_per_minute"),
        ({"max_concurrent_sessions": 0}, "quotas.max_concurrent_sessions"),
        ({"max_concurrent_sessions": 100_001}, "quotas.max_concurrent_sessions"),
        ({"sessions_per_day": 10_000_001}, "quotas.sessions_per_day"),
        ({"max_session_seconds": 9}, "quotas.max_session_seconds"),
        ({"max_session_seconds": 7201}, "quotas.max_session_seconds"),
        ({"max_sessions_per_end_user": 1001}, "quotas.max_sessions_per_end_user"),
        ({"openai_requests_per_minute": 0}, "quotas.openai_requests_per_minute"),
        ({"end_user_policy": "queue"}, "quotas.end_user_policy"),
        ({"sessions_per_minute": True}, "quotas.sessions_per_minute"),
        ({"sessions_per_minute": 1.5}, "quotas.sessions_per_minute"),
        ({"max_sessions": 3}, "quotas.max_sessions"),
    ],
)
def test_quota_ranges(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        build_quotas(raw)
    invalid(exc, field)


def test_quota_bounds_are_inclusive_and_merge_over_base() -> None:
    low = build_quotas({"sessions_per_minute": 1, "max_concurrent_sessions": 1, "sessions_per_day": 1,
                        "max_session_seconds": 10, "max_sessions_per_end_user": 1, "openai_requests_per_minute": 1})
    high = build_quotas({"sessions_per_minute": 100_000, "max_concurrent_sessions": 100_000,
                         "sessions_per_day": 10_000_000, "max_session_seconds": 7200,
                         "max_sessions_per_end_user": 1000, "end_user_policy": "replace_oldest",
                         "openai_requests_per_minute": 100_000})
    assert low.max_session_seconds == 10 and high.end_user_policy == "replace_oldest"
    merged = build_quotas({"sessions_per_day": 5}, high)
    assert merged.sessions_per_day == 5 and merged.max_session_seconds == 7200
    assert build_quotas(None, high) is high and build_quotas(None) == Quotas()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"openai": {"session": {"temperature": 0.8}}}, "openai.session.temperature"),
        ({"openai": {"session": {"voice": "alloy"}}}, "openai.session.voice"),
        ({"openai": {"allowed_overrides": ["audio", "temperature"]}}, "openai.allowed_overrides[1]"),
        ({"openai": {"api_key": "sk with spaces"}}, "openai.api_key"),
        ({"avaturn": {"background": "green"}}, "avaturn.background"),
        ({"avaturn": {"user_absent_timeout": 9}}, "avaturn.user_absent_timeout"),
        ({"avaturn": {"avatar_id": ""}}, "avaturn.avatar_id"),
        ({"avaturn": {"avatar_id": "a" * 129}}, "avaturn.avatar_id"),
        ({"quotas": {"max_session_seconds": 7201}}, "quotas.max_session_seconds"),
        ({"name": ""}, "name"),
        ({"name": "n" * 129}, "name"),
    ],
)
async def test_invalid_tenant_config_is_refused_and_nothing_is_stored(
    service: TenantService, redis: aioredis.Redis, body: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidInput) as exc:
        await service.create(decode_create({"name": "acme", **body}))
    invalid(exc, field)
    assert await redis.dbsize() == 0


async def test_session_default_gets_the_beta_advice(service: TenantService) -> None:
    with pytest.raises(InvalidInput) as exc:
        await service.create(decode_create({"name": "a", "openai": {"session": {"temperature": 0.8}}}))
    assert "GA sessions have no temperature" in exc.value.message
    assert exc.value.code == "invalid_session_config"


# ---- update / disable ----------------------------------------------------------------------


async def test_update_merges_quotas_replaces_session_and_is_announced(
    service: TenantService, redis: aioredis.Redis
) -> None:
    tenant = await service.create(decode_create(CONTRACT_BODY))
    listener = redis.pubsub()
    await listener.subscribe(TENANT_CHANGED_CHANNEL)
    try:
        assert (await listener.get_message(timeout=1.0))["type"] == "subscribe"  # type: ignore[index]
        updated = await service.update(tenant.id, decode_patch({
            "quotas": {"sessions_per_minute": 5},
            "openai": {"session": {"instructions": "new"}, "api_key": ""},
            "avaturn": {"background": "transparent"},
        }))
        message = await listener.get_message(ignore_subscribe_messages=True, timeout=1.0)
        assert message is not None and message["data"] == tenant.id.encode()
    finally:
        await listener.aclose()
    assert updated.quotas == msgspec.structs.replace(tenant.quotas, sessions_per_minute=5)
    assert updated.openai.session == {"type": "realtime", "instructions": "new", "model": "gpt-realtime"}
    assert updated.openai.api_key_enc is None  # "" cleared it
    assert updated.avaturn.api_key_enc == tenant.avaturn.api_key_enc  # untouched
    assert updated.avaturn.background == "transparent" and updated.created_at == tenant.created_at
    assert await service.get(tenant.id) == updated


async def test_invalid_patch_changes_nothing(service: TenantService, redis: aioredis.Redis) -> None:
    tenant = await service.create(decode_create({"name": "acme"}))
    before = await redis.get(tenant_record(tenant.id))
    with pytest.raises(InvalidInput) as exc:
        await service.update(tenant.id, decode_patch({"name": "ok", "quotas": {"sessions_per_day": 0}}))
    invalid(exc, "quotas.sessions_per_day")
    assert await redis.get(tenant_record(tenant.id)) == before


async def test_concurrent_updates_lose_nothing(service: TenantService) -> None:
    """Invariant: parallel PATCHes of different quota fields all land (WATCH/MULTI retries)."""
    tenant = await service.create(decode_create({"name": "acme"}))
    fields = ["sessions_per_minute", "max_concurrent_sessions", "sessions_per_day", "max_sessions_per_end_user",
              "openai_requests_per_minute"]
    await asyncio.gather(*(service.update(tenant.id, TenantPatch(quotas={f: 7})) for f in fields))
    quotas = (await service.get(tenant.id)).quotas
    assert all(getattr(quotas, f) == 7 for f in fields)


async def test_disable_and_enable(service: TenantService) -> None:
    tenant = await service.create(decode_create({"name": "acme"}))
    assert (await service.disable(tenant.id)).status == "disabled"
    assert not (await service.get(tenant.id)).active
    assert (await service.enable(tenant.id)).active


# ---- API keys ------------------------------------------------------------------------------


async def dump_all(redis: aioredis.Redis) -> bytes:
    parts: list[bytes] = []
    async for key in redis.scan_iter():
        parts.append(key)
        kind = (await redis.type(key)).decode()
        if kind == "string":
            parts.append(await redis.get(key))
        elif kind == "hash":
            parts += [b for kv in (await redis.hgetall(key)).items() for b in kv]
        elif kind == "zset":
            parts += await redis.zrange(key, 0, -1)
    return b"\n".join(parts)


async def test_keys_are_stored_only_as_hashes(service: TenantService, redis: aioredis.Redis) -> None:
    """Invariant: no Redis key or value contains a key's plaintext; its sha256 is the lookup."""
    tenant = await service.create(decode_create({"name": "acme"}))
    created = [await service.create_key(tenant.id) for _ in range(3)]
    blob = await dump_all(redis)
    for key in created:
        assert key.key.encode() not in blob and key.key[4:].encode() not in blob
        lookup = await service.repo.lookup(hashlib.sha256(key.key.encode()).hexdigest())
        assert lookup is not None and (lookup.tenant_id, lookup.key_id) == (tenant.id, key.id)
    assert await redis.hlen(TenantScope(tenant.id).keys_meta()) == 3


async def test_several_keys_listed_with_prefix_and_no_secret(service: TenantService) -> None:
    tenant = await service.create(decode_create({"name": "acme"}))
    created = [await service.create_key(tenant.id) for _ in range(3)]
    listed = await service.list_keys(tenant.id)
    assert sorted(k.id for k in listed) == sorted(k.id for k in created)
    for meta in listed:
        match = next(c for c in created if c.id == meta.id)
        assert meta.prefix == match.key[:8] and meta.revoked_at is None and meta.not_after is None
        assert match.key not in msgspec.json.encode(meta).decode()


async def test_keys_are_scoped_to_their_tenant(service: TenantService) -> None:
    a = await service.create(decode_create({"name": "a"}))
    b = await service.create(decode_create({"name": "b"}))
    key_a = await service.create_key(a.id)
    with pytest.raises(NotFound) as exc:
        await service.revoke_key(b.id, key_a.id)
    assert exc.value.code == "api_key_not_found"
    with pytest.raises(NotFound):
        await service.rotate_key(b.id, key_a.id, 60)
    assert await service.list_keys(b.id) == []
    assert [k.revoked_at for k in await service.list_keys(a.id)] == [None]


async def test_revoke_deletes_the_lookup_is_idempotent_and_publishes_the_hash(
    service: TenantService, redis: aioredis.Redis
) -> None:
    tenant = await service.create(decode_create({"name": "acme"}))
    key = await service.create_key(tenant.id)
    key_hash = hashlib.sha256(key.key.encode()).hexdigest()
    assert await redis.exists(api_key_lookup(key_hash))
    first = await service.revoke_key(tenant.id, key.id)
    again = await service.revoke_key(tenant.id, key.id)
    assert first.revoked_at is not None and again.revoked_at == first.revoked_at
    assert not await redis.exists(api_key_lookup(key_hash))
    with pytest.raises(InvalidInput) as exc:
        await service.rotate_key(tenant.id, key.id, 60)
    assert exc.value.code == "api_key_inactive"


async def test_rotation_sets_the_old_keys_deadline(service: TenantService, redis: aioredis.Redis) -> None:
    tenant = await service.create(decode_create({"name": "acme"}))
    old = await service.create_key(tenant.id)
    before = datetime.now(UTC)
    new = await service.rotate_key(tenant.id, old.id, overlap_seconds=300)
    metas = {m.id: m for m in await service.list_keys(tenant.id)}
    deadline = datetime.fromisoformat(metas[old.id].not_after.replace("Z", "+00:00"))  # type: ignore[union-attr]
    assert before + timedelta(seconds=299) <= deadline <= before + timedelta(seconds=302)
    assert metas[new.id].not_after is None and new.key != old.key
    ttl = await redis.pttl(api_key_lookup(hashlib.sha256(old.key.encode()).hexdigest()))
    assert 290_000 < ttl <= 302_000  # the lookup itself expires at the deadline
    with pytest.raises(InvalidInput) as exc:
        await service.rotate_key(tenant.id, old.id, overlap_seconds=-1)
    invalid(exc, "overlap_seconds")


async def test_create_key_with_not_after(service: TenantService) -> None:
    tenant = await service.create(decode_create({"name": "acme"}))
    with pytest.raises(InvalidInput) as exc:
        await service.create_key(tenant.id, not_after=datetime.now(UTC) - timedelta(seconds=1))
    invalid(exc, "not_after")
    with pytest.raises(NotFound):
        await service.create_key("ten_missing")
    key = await service.create_key(tenant.id, not_after=datetime.now(UTC) + timedelta(days=1))
    assert key.not_after is not None and RFC3339.match(key.not_after)
