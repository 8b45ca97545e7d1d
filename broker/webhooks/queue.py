"""Webhook delivery queues (contract section 11): per endpoint and per session, the outbox
entries still to deliver, in order; the schedule of when each queue's head is tried next.

Layout (``tenants/scope.py``): for endpoint ``weid`` of tenant ``tid``,

- ``webhook_queue(weid, sid)``: a list of outbox entry ids, oldest first, for one session
  (``-`` for a tenant event: usage, endpoint disabled, test.ping). Only its head is deliverable:
  a later event of the session waits until the earlier one is delivered or given up, which is
  the per-session order per endpoint.
- ``webhook_due(weid)``: zset sid -> when the head of that queue is tried next (ms): now, a
  retry time, or the end of a claim's lease. A queue is in it exactly while it is not empty.
- ``webhook_heads(weid)``: hash ``{sid}:n`` -> failed attempts at the head so far, ``{sid}:c`` ->
  the token of the claim delivering it (a completion applies only with the current token).
- :data:`~tenants.scope.WEBHOOK_RING`: ``"{tid}:{weid}"`` -> a score no later than the earliest
  of the endpoint's due zset (the claim serves the endpoints round robin, like the tenant ring
  of the provisioning schedule); :data:`~tenants.scope.WEBHOOK_PENDING` counts the queued
  deliveries of all tenants.

Every change is one Lua step (``lib.lua`` is prepended to each script), so a process dying
between steps loses nothing: a claimed delivery whose worker died is claimed again when its
lease runs out.
"""

from __future__ import annotations

from importlib import resources

import redis.asyncio as aioredis

from broker.sessions.models import now_ms
from tenants.scope import WEBHOOK_PENDING, WEBHOOK_RING, WEBHOOK_WAKE, TenantScope

_FILES = resources.files(__package__)
LIB = _FILES.joinpath("lib.lua").read_text()
NO_SESSION = "-"  # the session part of a tenant event's queue


def script(name: str, *prefix: str) -> str:
    """The Lua file ``name`` of this package with ``lib.lua`` (and ``prefix`` sources) before it."""
    return "\n".join([*prefix, LIB, _FILES.joinpath(name).read_text()])


def _templates() -> list[str]:
    """The key templates of ``lib.lua`` (``string.format`` with %s for each id), from TenantScope."""
    s = TenantScope("%s")
    return [s.webhook_endpoints(), s.webhook_endpoint("%s"), s.webhook_attempts("%s"), s.webhook_cursor(),
            s.webhook_queue("%s", "%s"), s.webhook_due("%s"), s.webhook_heads("%s"), s.events(), s.base()]


TEMPLATES = _templates()
KEYS = [WEBHOOK_RING, WEBHOOK_PENDING]


def queue_session(session_id: str | None) -> str:
    return session_id or NO_SESSION


async def enqueue(redis: aioredis.Redis, tenant_id: str, endpoint_id: str, entry_id: str,
                  session_id: str | None) -> bool:
    """Queue ONE delivery of the existing outbox entry ``entry_id`` to ``endpoint_id``, behind
    that session's other deliveries to that endpoint (``session_id`` None or '' for a tenant
    event), and wake the delivery loops. False (nothing queued) when the endpoint or the entry
    does not exist. One round trip."""
    n = await redis.register_script(_ENQUEUE)(
        keys=KEYS, args=[*TEMPLATES, tenant_id, endpoint_id, entry_id, queue_session(session_id), now_ms(),
                         WEBHOOK_WAKE])
    return bool(n)


_ENQUEUE = script("enqueue.lua")
