"""The worker's per-process tenant cache: the tenant record a provisioning job reads, and the
tenant's upstream credentials decrypted once, not on every job.

Same rule as the API's :class:`tenants.auth.KeyAuthenticator`: a record is kept at most
``ttl`` seconds and dropped at once when ``TENANT_CHANGED_CHANNEL`` says it changed (disabled,
quotas, config, credentials: :meth:`TenantService._modify` publishes every change); while the
listener is not subscribed (starting, reconnecting) the cache is bypassed entirely, and a
generation counter stops a read that raced with an invalidation from re-filling the cache with
what it read before. So a disabled tenant's sessions stop being provisioned as soon as today.

Decrypted credentials are keyed by their ciphertexts: a changed key is a different ciphertext,
so it can never be served stale; a credential that does not decrypt is never cached.
"""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis

from tenants.invalidation import InvalidationSubscription
from tenants.models import Tenant
from tenants.scope import TENANT_CHANGED_CHANNEL
from tenants.service import TenantService

log = logging.getLogger(__name__)

Credentials = tuple[str | None, str | None]


class TenantCache:
    def __init__(self, redis: aioredis.Redis, service: TenantService, *, ttl: float = 10.0,
                 max_entries: int = 10_000) -> None:
        self._redis = redis
        self._service = service
        self._ttl = ttl
        self._max_entries = max_entries
        self._tenants: dict[str, tuple[Tenant, float]] = {}
        self._credentials: dict[tuple[str | None, str | None], Credentials] = {}
        self._sub = InvalidationSubscription(
            redis, (TENANT_CHANGED_CHANNEL,), on_message=lambda _channel, tenant_id: self.invalidate(tenant_id),
            on_reset=self._tenants.clear, name="worker-tenant-invalidation", log=log,
        )

    @property
    def listening(self) -> bool:
        return self._sub.listening

    @property
    def subscriptions(self) -> int:
        """Successful (re)subscriptions of the listener, for tests."""
        return self._sub.subscriptions

    async def get(self, tenant_id: str) -> Tenant:
        """The tenant (cached while the listener is subscribed), or NotFound."""
        cached = self._tenants.get(tenant_id) if self._sub.listening else None
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        generation = self._sub.generation
        tenant = await self._service.get(tenant_id)
        if self._sub.listening and generation == self._sub.generation:
            if len(self._tenants) >= self._max_entries:
                self._tenants.clear()
            self._tenants[tenant_id] = (tenant, time.monotonic() + self._ttl)
        return tenant

    def credentials(self, tenant: Tenant) -> Credentials:
        """``TenantService.credentials`` (CredentialError included), decrypted once per ciphertext."""
        key = (tenant.openai.api_key_enc, tenant.avaturn.api_key_enc)
        if key == (None, None):
            return None, None
        found = self._credentials.get(key)
        if found is None:
            found = self._service.credentials(tenant)
            if len(self._credentials) >= self._max_entries:
                self._credentials.clear()
            self._credentials[key] = found
        return found

    def invalidate(self, tenant_id: str) -> None:
        self._sub.bump()
        self._tenants.pop(tenant_id, None)

    def start(self) -> TenantCache:
        """Start the listener (the cache is bypassed until it is subscribed)."""
        self._sub.start()
        return self

    async def wait_subscribed(self, timeout: float = 5.0) -> bool:
        return await self._sub.wait_subscribed(timeout)

    async def stop(self) -> None:
        await self._sub.stop()
        self._credentials.clear()


__all__ = ["TenantCache"]
