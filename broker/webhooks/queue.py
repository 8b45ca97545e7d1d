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

from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis

from broker.core.redis_mux import Execute, evalsha
from broker.sessions.models import now_ms
from tenants.outbox import lua_functions as outbox_lua
from tenants.scope import WEBHOOK_PENDING, WEBHOOK_RING, WEBHOOK_TENANTS, WEBHOOK_WAKE, TenantScope

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
_FANOUT = script("fanout.lua")
_CLAIM = script("claim.lua")
_COMPLETE = script("complete.lua", outbox_lua())

FANOUT_BATCH = 200     # outbox entries fanned out per call (a tenant with more gets more calls)
DROP_BATCH = 100       # queues of a disabled or deleted endpoint dropped per claim call
# The contract's retry schedule: after the first failure 5 s, then 5 min, ... 24 h; a delivery
# whose 10th attempt fails is given up.
RETRY_SCHEDULE_S = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
FAILING_DISABLE_MS = 5 * 86400 * 1000   # failing this long (since the first failure after a success) disables
OUTCOMES = ("delivered", "retry", "gave_up", "endpoint_gone", "endpoint_failing")


@dataclass
class Delivery:
    """A claimed delivery: the head of one (endpoint, session) queue."""

    tenant_id: str
    endpoint_id: str
    session: str            # the queue's session part ('-' for a tenant event)
    entry_id: str
    attempt: int            # 1 for the first attempt
    fields: dict[bytes, bytes]  # the outbox entry (broker/sessions/outbox.py renders it)
    url: str
    secret_enc: str
    prev_secret_enc: str
    prev_secret_until: int  # ms; 0 when none
    token: str

    @property
    def member(self) -> str:
        """The endpoint's member of the ring (and the key of the per-endpoint concurrency cap)."""
        return f"{self.tenant_id}:{self.endpoint_id}"

    @property
    def created_ms(self) -> int:
        return int(self.entry_id.split("-", 1)[0])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class DeliveryQueue:
    """The delivery side of the queues: fan-out, claim, completion (one Lua step each)."""

    def __init__(self, redis: aioredis.Redis, execute: Execute | None = None) -> None:
        self.redis = redis
        self.execute: Execute = execute or redis.execute_command
        self._fanout = redis.register_script(_FANOUT)
        self._claim = redis.register_script(_CLAIM)
        self._complete = redis.register_script(_COMPLETE)

    async def _run(self, script: Any, args: list[Any]) -> Any:
        return await evalsha(self.execute, script, KEYS, [*TEMPLATES, *args])

    async def tenants(self) -> list[str]:
        return [_text(t) for t in await self.redis.smembers(WEBHOOK_TENANTS)]

    async def fanout(self, tenant_id: str, now: int, batch: int = FANOUT_BATCH) -> tuple[int, int]:
        """Fan out up to ``batch`` new outbox entries of the tenant: (entries read, deliveries queued)."""
        read, queued = await self._run(self._fanout, [tenant_id, now, batch])
        return int(read), int(queued)

    async def claim(self, now: int, lease_until: int, room: int, cap: int, busy: dict[str, int],
                    token: str, drop_batch: int = DROP_BATCH,
                    tenant_cap: int | None = None) -> tuple[int | None, list[Delivery]]:
        """Claim up to ``room`` due deliveries, at most ``cap`` in flight per endpoint and
        ``tenant_cap`` per tenant (None: no tenant cap) counting ``busy`` (ring member ->
        deliveries this worker has in flight), round robin over the endpoints; returns the
        earliest ring score of an endpoint not at a cap (None: none) and the deliveries."""
        pairs: list[Any] = []
        for member, n in busy.items():
            pairs += [member, n]
        if tenant_cap is not None:
            pairs.append(tenant_cap)
        raw = await self._run(self._claim, [now, lease_until, room, cap, token, drop_batch, len(busy), *pairs])
        out = []
        for i in range(1, len(raw), 7):
            flat, ep = raw[i + 5], raw[i + 6]
            out.append(Delivery(
                tenant_id=_text(raw[i]), endpoint_id=_text(raw[i + 1]), session=_text(raw[i + 2]),
                entry_id=_text(raw[i + 3]), attempt=int(raw[i + 4]),
                fields=dict(zip(flat[::2], flat[1::2], strict=True)),
                url=_text(ep[0]), secret_enc=_text(ep[1]), prev_secret_enc=_text(ep[2]),
                prev_secret_until=int(_text(ep[3]) or 0), token=token))
        head = raw[0]
        return (int(float(head)) if head not in (b"", "") else None), out

    async def complete(self, d: Delivery, result: str, *, now: int, retry_at: int, give_up: bool,
                       status: int | None, error: str, latency_ms: int, response: str,
                       failing_ms: int = FAILING_DISABLE_MS) -> str:
        """Record the attempt (``result`` ok | fail | gone); the outcome (see complete.lua)."""
        etype = _text(d.fields.get(b"type", b""))
        res = await self._run(self._complete, [
            d.tenant_id, d.endpoint_id, d.session, d.entry_id, d.token, result, now, retry_at,
            "1" if give_up else "0", failing_ms, d.attempt, etype, "" if status is None else status, error,
            latency_ms, response])
        return _text(res)

    async def pending(self) -> int:
        value = await self.redis.get(WEBHOOK_PENDING)
        return int(value or 0)


def due_entry(tenant_id: str, queue_ref: str) -> tuple[str, str]:
    """(key, member) of a claimed queue in its endpoint's due zset, for the ClaimKeeper:
    ``queue_ref`` is ``"{endpoint id}:{session}"``."""
    endpoint_id, _, session = queue_ref.partition(":")
    return TenantScope(tenant_id).webhook_due(endpoint_id), session
