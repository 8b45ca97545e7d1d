"""Tenant API key authentication with an in-process cache that revocations cannot outlive.

``authenticate(key)`` checks the format and checksum first (no Redis: a mistyped key never
costs a round trip), then looks the key's hash up, then the tenant. Two caches spare Redis on
the hot path: key hash -> (tenant id, key id, not_after), and tenant id -> record (TTL 60 s
like the keys: with 10,000 tenants a 5 s one missed on most requests; the worker's record cache,
:class:`tenants.tenant_cache.TenantRecords`, on this listener). Both are dropped at
once by a pub/sub listener: ``KEY_REVOCATIONS_CHANNEL`` (revoked or shortened keys) and
``TENANT_CHANGED_CHANNEL`` (status, quotas, config). While the listener is
not subscribed (starting, or reconnecting after an error) the caches are bypassed entirely, so
a missed message can never keep a revoked key alive; a generation counter stops a lookup that
raced with an invalidation from re-filling the cache with what it read before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec
import redis.asyncio as aioredis

from broker.core.errors import Forbidden, Unauthorized
from tenants.apikeys import KEY_LEN, hash_key, looks_valid
from tenants.invalidation import InvalidationSubscription
from tenants.models import Tenant
from tenants.repository import parse_rfc3339
from tenants.scope import KEY_REVOCATIONS_CHANNEL, TENANT_CHANGED_CHANNEL
from tenants.service import TenantService
from tenants.tenant_cache import TenantRecords

log = logging.getLogger(__name__)
USE_FLUSH_DELAY = 0.5  # seconds a key use waits to be written with the others (last_used_at)


class _CachedKey(msgspec.Struct, frozen=True, gc=False):
    """Atoms only, so not tracked by the cyclic GC (a NamedTuple instance always is)."""

    tenant_id: str
    key_id: str
    not_after: float | None  # unix seconds
    until: float  # monotonic expiry of this cache entry


class KeyIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """Who an API key is: its tenant, the key's id and hash, and when it stops (unix s, or None)."""

    tenant: Tenant
    key_id: str
    key_hash: str
    not_after: float | None


class KeyAuthenticator:
    def __init__(
        self,
        redis: aioredis.Redis,
        service: TenantService,
        *,
        tenant_ttl: float = 60.0,  # as long as the key cache: pub/sub invalidates both
        key_ttl: float = 60.0,
        touch_interval: float = 60.0,
        use_flush_delay: float = USE_FLUSH_DELAY,
        max_entries: int = 100_000,
    ) -> None:
        self._redis = redis
        self._service = service
        self._key_ttl = key_ttl
        self._touch_interval = touch_interval
        self._use_flush_delay = use_flush_delay
        self._max_entries = max_entries
        self._keys: dict[str, _CachedKey] = {}
        self._touched: dict[str, float] = {}
        self._uses: dict[tuple[str, str], str] = {}  # (tenant id, key id) -> key hash, to write
        self._flusher: asyncio.Task[None] | None = None
        self._flush_now = asyncio.Event()
        self._sub = InvalidationSubscription(
            redis, (KEY_REVOCATIONS_CHANNEL, TENANT_CHANGED_CHANNEL), on_message=self._on_message,
            on_reset=self._clear, name="tenant-key-invalidation", log=log,
        )
        self._tenants = TenantRecords(service, self._sub, ttl=tenant_ttl, max_entries=max_entries)

    @property
    def listening(self) -> bool:
        """True while the invalidation listener is subscribed (only then are caches used)."""
        return self._sub.listening

    @property
    def subscriptions(self) -> int:
        """Successful (re)subscriptions of the listener, for health checks."""
        return self._sub.subscriptions

    # ---- authentication --------------------------------------------------------------

    async def authenticate(self, key: str) -> Tenant:
        """The key's tenant, or Unauthorized (``invalid_api_key``) / Forbidden (``tenant_disabled``).

        No message ever contains the key. The format and checksum are checked before any
        Redis lookup; a key found in the cache passed them when it was cached (only keys that
        Redis knew are cached), so a cached key skips the checksum (~2 us)."""
        entry = None
        if type(key) is str and len(key) == KEY_LEN:
            key_hash = hash_key(key)
            entry = self._cached_key(key_hash)
        if entry is None:
            key_hash = _checked_hash(key)
            entry = await self._load_key(key_hash)
        return await self._admit(key_hash, entry)

    async def identify(self, key: str) -> KeyIdentity:
        """:meth:`authenticate`, also telling which key it was (a console sign-in records it)."""
        key_hash = _checked_hash(key)
        entry = self._cached_key(key_hash) or await self._load_key(key_hash)
        tenant = await self._admit(key_hash, entry)
        return KeyIdentity(tenant=tenant, key_id=entry.key_id, key_hash=key_hash, not_after=entry.not_after)

    async def authenticate_hash(self, key_hash: str, key_id: str) -> Tenant:
        """:meth:`authenticate` for a key known only by its hash and id (a console session holds
        no key): the same caches, the same revocation and tenant checks."""
        entry = self._cached_key(key_hash) or await self._load_key(key_hash)
        if entry.key_id != key_id:
            raise _invalid_key()
        return await self._admit(key_hash, entry)

    async def _load_key(self, key_hash: str) -> _CachedKey:
        generation = self._sub.generation
        found = await self._service.repo.lookup(key_hash)
        if found is None:
            raise _invalid_key()
        not_after = parse_rfc3339(found.not_after).timestamp() if found.not_after else None
        entry = _CachedKey(found.tenant_id, found.key_id, not_after, time.monotonic() + self._key_ttl)
        if self._cacheable(generation, self._keys):
            self._keys[key_hash] = entry
        return entry

    async def _admit(self, key_hash: str, entry: _CachedKey) -> Tenant:
        if entry.not_after is not None and entry.not_after <= time.time():
            raise _invalid_key()
        tenant = await self._tenants.get(entry.tenant_id)
        if tenant is None:
            raise _invalid_key()
        if not tenant.active:
            raise Forbidden("This tenant is disabled.", code="tenant_disabled")
        self._touch(key_hash, entry)
        return tenant

    def _cached_key(self, key_hash: str) -> _CachedKey | None:
        entry = self._keys.get(key_hash) if self._sub.listening else None
        if entry is not None and entry.until <= time.monotonic():
            self._keys.pop(key_hash, None)
            return None
        return entry

    def _cacheable(self, generation: int, cache: dict[str, Any]) -> bool:
        if not self._sub.listening or generation != self._sub.generation:
            return False
        if len(cache) >= self._max_entries:
            cache.clear()
        return True

    def _touch(self, key_hash: str, entry: _CachedKey) -> None:
        """Record ``last_used_at`` at most once per ``touch_interval`` per key and process, off
        the request path: the use is queued and a background task writes every queued use in
        one pipelined round trip ``USE_FLUSH_DELAY`` later (with 10,000 keys, one request in
        five or so used to wait for its own HSET)."""
        now = time.monotonic()
        last = self._touched.get(key_hash)
        if last is not None and now - last < self._touch_interval:
            return
        if len(self._touched) >= self._max_entries:
            self._touched.clear()
        self._touched[key_hash] = now
        self._uses[(entry.tenant_id, entry.key_id)] = key_hash
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_uses(), name="key-last-used")

    async def _flush_uses(self) -> None:
        with contextlib.suppress(TimeoutError):  # USE_FLUSH_DELAY, or sooner when flush_uses() asks
            await asyncio.wait_for(self._flush_now.wait(), self._use_flush_delay)
        self._flush_now.clear()
        await self._write_uses()

    async def _write_uses(self) -> None:
        uses, self._uses = self._uses, {}
        if not uses:
            return
        try:
            await self._service.keys.record_uses(list(uses))
        except Exception:  # a lost last_used_at write must never fail a request: retried on next use
            for key_hash in uses.values():
                self._touched.pop(key_hash, None)
            log.warning("could not record last_used_at for %d keys", len(uses), exc_info=True)

    async def flush_uses(self) -> None:
        """Write the queued ``last_used_at`` now (shutdown, tests)."""
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            self._flush_now.set()
            await flusher
        await self._write_uses()

    # ---- invalidation ----------------------------------------------------------------

    def invalidate_key(self, key_hash: str) -> None:
        self._sub.bump()
        self._keys.pop(key_hash, None)

    def invalidate_tenant(self, tenant_id: str) -> None:
        self._tenants.invalidate(tenant_id)

    def _clear(self) -> None:
        self._keys.clear()
        self._tenants.clear()

    async def start(self, ready_timeout: float = 5.0) -> None:
        """Start the listener; returns once subscribed (or after ``ready_timeout``: until then the
        caches are simply bypassed)."""
        self._sub.start()
        await self._sub.wait_subscribed(ready_timeout)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush_uses()
        await self._sub.stop()

    def _on_message(self, channel: str, data: str) -> None:
        if channel == KEY_REVOCATIONS_CHANNEL:
            self.invalidate_key(data)
        elif channel == TENANT_CHANGED_CHANNEL:
            self.invalidate_tenant(data)


def _checked_hash(key: str) -> str:
    if not looks_valid(key):
        raise Unauthorized(
            "The API key is malformed: tenant API keys start with sbk_ and carry a checksum; "
            "check it was copied whole.",
            code="invalid_api_key",
        )
    return hash_key(key)


def _invalid_key() -> Unauthorized:
    return Unauthorized("The API key is invalid, revoked or expired.", code="invalid_api_key")
