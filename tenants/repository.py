"""All Redis access for tenants and their API keys (key names come from :mod:`tenants.scope`).

- tenant record: msgspec JSON string at ``tenant_record(id)``; index zset ``TENANTS_INDEX``
  (id -> created_at ms); names hash ``TENANT_NAMES`` (name -> id): a name belongs to one tenant
  of the deployment, checked and taken in the same transaction that writes the record.
- API key: lookup hash ``api_key_lookup(sha256)`` = {tenant_id, key_id, not_after} (expires at
  ``not_after``; deleted on revocation) and the key's record (with its hash, never the
  plaintext) in ``TenantScope.keys_meta()``; ``last_used_at`` in ``TenantScope.keys_last_used()``
  so that touching a key never races with a revocation.

Read-modify-write goes through WATCH/MULTI so concurrent admin calls never lose an update.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import WatchError

from broker.core.text import text
from tenants.models import ApiKeyMeta, Tenant
from tenants.scope import (
    KEY_REVOCATIONS_CHANNEL,
    PREFIX,
    TENANT_CHANGED_CHANNEL,
    TENANTS_INDEX,
    TenantScope,
    api_key_lookup,
    tenant_record,
)

_MAX_WATCH_RETRIES = 100
TENANT_NAMES = PREFIX + "tenants:names"
# A field of TENANT_NAMES that no name can be (names are printable): set once the hash holds
# the names of the tenants created before it existed (see ``_ensure_names``).
_NAMES_BUILT = "\x00built"


class TenantNameTaken(Exception):
    """The name belongs to another tenant (``owner_id``)."""

    def __init__(self, name: str, owner_id: str) -> None:
        super().__init__(name)
        self.name = name
        self.owner_id = owner_id


class KeyRecord(msgspec.Struct, kw_only=True):
    """What is stored about one API key (``ApiKeyMeta`` plus the hash used for lookups)."""

    id: str
    key_hash: str
    prefix: str
    created_at: str
    not_after: str | None = None
    revoked_at: str | None = None

    def meta(self, last_used_at: str | None = None) -> ApiKeyMeta:
        return ApiKeyMeta(
            id=self.id,
            prefix=self.prefix,
            created_at=self.created_at,
            not_after=self.not_after,
            revoked_at=self.revoked_at,
            last_used_at=last_used_at,
        )


class KeyLookup(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: str
    key_id: str
    not_after: str | None



def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def rfc3339(moment: datetime, *, round_up: bool = False) -> str:
    """The stored timestamp format: ``2026-11-23T19:30:00Z`` (``round_up``: to the next second)."""
    moment = moment.astimezone(timezone.utc)
    if round_up and moment.microsecond:
        moment += timedelta(seconds=1)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _epoch_ms(text: str) -> int:
    return int(parse_rfc3339(text).timestamp() * 1000)


class TenantRepository:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    # ---- tenants ---------------------------------------------------------------------

    async def insert(self, tenant: Tenant) -> None:
        """Store a new tenant and take its name, atomically (WATCH on the names hash): of two
        concurrent inserts of one name exactly one succeeds; the other raises
        :class:`TenantNameTaken` and writes nothing."""
        await self._ensure_names()
        async with self._redis.pipeline(transaction=True) as pipe:
            for _ in range(_MAX_WATCH_RETRIES):
                try:
                    await pipe.watch(TENANT_NAMES)
                    owner = text(await pipe.hget(TENANT_NAMES, tenant.name))
                    if owner is not None:
                        raise TenantNameTaken(tenant.name, owner)
                    pipe.multi()
                    pipe.hset(TENANT_NAMES, tenant.name, tenant.id)
                    pipe.set(tenant_record(tenant.id), msgspec.json.encode(tenant), nx=True)
                    pipe.zadd(TENANTS_INDEX, {tenant.id: _epoch_ms(tenant.created_at)})
                    _, created, _ = await pipe.execute()
                    break
                except WatchError:
                    continue
            else:
                raise RuntimeError("tenant names are being modified concurrently; try again")
        if not created:  # pragma: no cover - 131-bit random ids
            raise RuntimeError("tenant id collision")

    async def find_by_name(self, name: str) -> str | None:
        """The id of the tenant called ``name``, or None."""
        await self._ensure_names()
        return text(await self._redis.hget(TENANT_NAMES, name))

    async def _ensure_names(self) -> None:
        """Deployments older than the names hash: fill it once from the tenant records, oldest
        first (of two older tenants that share a name, the first keeps it in the hash; the
        other keeps its record's name until renamed). HSETNX only, so concurrent fillers and
        inserts agree; an insert watching the hash retries if a filler wrote meanwhile."""
        if await self._redis.hexists(TENANT_NAMES, _NAMES_BUILT):
            return
        after: tuple[int, str] | None = None
        while True:
            ids, after = await self.page(100, after)
            for tenant in await self.get_many(ids):
                await self._redis.hsetnx(TENANT_NAMES, tenant.name, tenant.id)
            if after is None:
                break
        await self._redis.hset(TENANT_NAMES, _NAMES_BUILT, "1")

    async def get(self, tenant_id: str) -> Tenant | None:
        raw = await self._redis.get(tenant_record(tenant_id))
        return None if raw is None else msgspec.json.decode(raw, type=Tenant)

    async def get_raw(self, tenant_id: str) -> bytes | None:
        """The tenant's stored record (JSON, as ``get`` decodes it), for caches that keep bytes."""
        raw = await self._redis.get(tenant_record(tenant_id))
        return None if raw is None else bytes(raw)

    async def get_many(self, tenant_ids: list[str]) -> list[Tenant]:
        if not tenant_ids:
            return []
        raws = await self._redis.mget([tenant_record(t) for t in tenant_ids])
        return [msgspec.json.decode(raw, type=Tenant) for raw in raws if raw is not None]

    async def modify(self, tenant_id: str, change: Callable[[Tenant], Tenant]) -> Tenant | None:
        """Apply ``change`` atomically (WATCH/MULTI, retried on a concurrent write).

        Returns the stored result, or None when the tenant does not exist. ``change`` may raise
        (e.g. InvalidInput): nothing is written then. A rename takes the new name in the same
        transaction (:class:`TenantNameTaken` when another tenant holds it) and frees the old one.
        """
        await self._ensure_names()
        key = tenant_record(tenant_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            for _ in range(_MAX_WATCH_RETRIES):
                try:
                    await pipe.watch(key, TENANT_NAMES)
                    raw = await pipe.get(key)
                    if raw is None:
                        return None
                    old = msgspec.json.decode(raw, type=Tenant)
                    new = change(old)
                    renamed = new.name != old.name
                    if renamed:
                        owner = text(await pipe.hget(TENANT_NAMES, new.name))
                        if owner is not None and owner != tenant_id:
                            raise TenantNameTaken(new.name, owner)
                        old_owner = text(await pipe.hget(TENANT_NAMES, old.name))
                    pipe.multi()
                    pipe.set(key, msgspec.json.encode(new))
                    if renamed:
                        if old_owner == tenant_id:
                            pipe.hdel(TENANT_NAMES, old.name)
                        pipe.hset(TENANT_NAMES, new.name, tenant_id)
                    await pipe.execute()
                    return new
                except WatchError:
                    continue
        raise RuntimeError(f"tenant {tenant_id} is being modified concurrently; try again")

    async def page(self, limit: int, after: tuple[int, str] | None) -> tuple[list[str], tuple[int, str] | None]:
        """Tenant ids oldest first, strictly after ``after`` = (created ms, id); and the next cursor."""
        found: list[tuple[int, str]] = []
        offset = 0
        low: float | str = after[0] if after else "-inf"
        while len(found) <= limit:
            batch = await self._redis.zrangebyscore(
                TENANTS_INDEX, low, "+inf", start=offset, num=limit + 1, withscores=True
            )
            if not batch:
                break
            offset += len(batch)
            for member, score in batch:
                item = (int(score), text(member) or "")
                if after is None or item > after:
                    found.append(item)
        page = found[:limit]
        next_cursor = page[-1] if len(found) > limit else None
        return [tid for _, tid in page], next_cursor

    async def iter_ids(self) -> AsyncIterator[str]:
        async for member, _score in self._redis.zscan_iter(TENANTS_INDEX):
            yield text(member) or ""

    async def publish_tenant_changed(self, tenant_id: str) -> None:
        await self._redis.publish(TENANT_CHANGED_CHANNEL, tenant_id)

    # ---- API keys --------------------------------------------------------------------

    async def insert_key(self, tenant_id: str, record: KeyRecord) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(TenantScope(tenant_id).keys_meta(), record.id, msgspec.json.encode(record))
            self._write_lookup(pipe, tenant_id, record)
            await pipe.execute()

    @staticmethod
    def _write_lookup(pipe: Any, tenant_id: str, record: KeyRecord) -> None:
        lookup = api_key_lookup(record.key_hash)
        pipe.delete(lookup)
        if record.revoked_at is not None:
            return
        pipe.hset(
            lookup, mapping={"tenant_id": tenant_id, "key_id": record.id, "not_after": record.not_after or ""}
        )
        if record.not_after is not None:
            pipe.pexpireat(lookup, _epoch_ms(record.not_after))

    async def get_key(self, tenant_id: str, key_id: str) -> KeyRecord | None:
        raw = await self._redis.hget(TenantScope(tenant_id).keys_meta(), key_id)
        return None if raw is None else msgspec.json.decode(raw, type=KeyRecord)

    async def list_keys(self, tenant_id: str) -> list[ApiKeyMeta]:
        scope = TenantScope(tenant_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(scope.keys_meta())
            pipe.hgetall(scope.keys_last_used())
            raw_meta, raw_used = await pipe.execute()
        used = {text(k): text(v) for k, v in raw_used.items()}
        records = [msgspec.json.decode(v, type=KeyRecord) for v in raw_meta.values()]
        records.sort(key=lambda r: (r.created_at, r.id))
        return [r.meta(used.get(r.id)) for r in records]

    async def modify_key(
        self, tenant_id: str, key_id: str, change: Callable[[KeyRecord], KeyRecord]
    ) -> tuple[KeyRecord, KeyRecord] | None:
        """Atomically change a key record and its lookup hash; returns (before, after) or None."""
        meta_key = TenantScope(tenant_id).keys_meta()
        async with self._redis.pipeline(transaction=True) as pipe:
            for _ in range(_MAX_WATCH_RETRIES):
                try:
                    await pipe.watch(meta_key)
                    raw = await pipe.hget(meta_key, key_id)
                    if raw is None:
                        return None
                    before = msgspec.json.decode(raw, type=KeyRecord)
                    after = change(msgspec.structs.replace(before))
                    pipe.multi()
                    pipe.hset(meta_key, key_id, msgspec.json.encode(after))
                    self._write_lookup(pipe, tenant_id, after)
                    await pipe.execute()
                    return before, after
                except WatchError:
                    continue
        raise RuntimeError(f"key {key_id} is being modified concurrently; try again")

    async def lookup(self, key_hash: str) -> KeyLookup | None:
        raw = await self._redis.hgetall(api_key_lookup(key_hash))
        fields = {text(k): text(v) for k, v in raw.items()}
        tenant_id, key_id = fields.get("tenant_id"), fields.get("key_id")
        if not tenant_id or not key_id:
            return None
        return KeyLookup(tenant_id=tenant_id, key_id=key_id, not_after=fields.get("not_after") or None)

    async def touch_key(self, tenant_id: str, key_id: str, when: str) -> None:
        await self._redis.hset(TenantScope(tenant_id).keys_last_used(), key_id, when)

    async def touch_keys(self, uses: list[tuple[str, str]], when: str) -> None:
        """``touch_key`` for many (tenant id, key id) pairs, pipelined (no transaction needed)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for tenant_id, key_id in uses:
                pipe.hset(TenantScope(tenant_id).keys_last_used(), key_id, when)
            await pipe.execute()

    async def publish_key_changed(self, key_hash: str) -> None:
        await self._redis.publish(KEY_REVOCATIONS_CHANNEL, key_hash)
