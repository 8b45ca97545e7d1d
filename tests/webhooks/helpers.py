"""Test helpers for the delivery: an endpoint written straight into Redis (the fields of
broker/webhooks/__init__.py), and outbox entries appended with the outbox's own Lua."""

from __future__ import annotations

import json
import secrets as _secrets

import redis.asyncio as aioredis

from broker.sessions.models import now_ms
from tenants.crypto import CredentialCipher
from tenants.outbox import lua_functions
from tenants.scope import WEBHOOK_TENANTS, TenantScope
from broker.webhooks.signing import new_secret


async def create_endpoint(redis: aioredis.Redis, cipher: CredentialCipher, tenant_id: str, url: str, *,
                          events: str = "", secret: str | None = None, since: str | None = None,
                          **fields: str) -> tuple[str, str]:
    """(endpoint id, secret) of a new enabled endpoint of ``tenant_id``."""
    weid = "we_" + _secrets.token_hex(12)
    secret = secret or new_secret()
    scope = TenantScope(tenant_id)
    now = now_ms()
    record = {"url": url, "description": "", "events": events, "secret_enc": cipher.encrypt(secret),
              "prev_secret_enc": "", "prev_secret_until": "", "disabled": "0", "disabled_reason": "",
              "disabled_at": "", "failing_since": "", "created_at": str(now),
              "since": since if since is not None else f"{now - 1}-0", **fields}
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(scope.webhook_endpoint(weid), mapping=record)
        pipe.sadd(scope.webhook_endpoints(), weid)
        pipe.sadd(WEBHOOK_TENANTS, tenant_id)
        await pipe.execute()
    return weid, secret


_TENANT_EVENT = lua_functions() + "\nreturn append_tenant_event(KEYS[1], ARGV[1], ARGV[2], ARGV[3])"


async def tenant_event(redis: aioredis.Redis, tenant_id: str, etype: str, data: dict, endpoint_id: str = "") -> str:
    """Append a tenant event (outbox.lua's append_tenant_event); its entry id."""
    eid = await redis.eval(_TENANT_EVENT, 1, TenantScope(tenant_id).base(), etype, json.dumps(data), endpoint_id)
    return eid.decode() if isinstance(eid, bytes) else eid


_SESSION_EVENT = lua_functions() + "\nreturn append_event(KEYS[1], ARGV[1])"


async def session_event(redis: aioredis.Redis, tenant_id: str, session_id: str, etype: str,
                        status: str = "queued") -> str:
    """Append a session event as the state scripts do (a minimal session hash)."""
    key = TenantScope(tenant_id).session(session_id)
    await redis.hset(key, mapping={"status": status, "created_at": str(now_ms()), "ttl_seconds": "600",
                                   "end_user": "", "metadata": "{}"})
    eid = await redis.eval(_SESSION_EVENT, 1, key, etype)
    return eid.decode() if isinstance(eid, bytes) else eid
