"""The tenant's events (contract section 11), read from the outbox stream that the state
scripts append to (``tenants/outbox.lua``: the event is written in the same atomic step as
the state change it describes).

An event's id is ``evt_`` + its stream entry id (``<ms>-<n>``, increasing per tenant), so a
cursor is an entry id and "after the cursor" is an exclusive XRANGE. A session event carries
``data.sequence`` and ``data.session``, the session object rendered from the fields the
script copied into the entry (the session as of the event, not as it is now).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import redis.asyncio as aioredis

from broker.core.text import text
from tenants.scope import TenantScope

from .models import SessionRecord, SessionView, iso

EVENT_TYPES: tuple[str, ...] = (
    "session.created", "session.ready", "session.failed", "session.expiring", "session.terminated",
    "usage.threshold_reached", "webhook_endpoint.disabled", "test.ping",
)
_ID = re.compile(r"evt_(\d{1,20})-(\d{1,20})")
SCAN_PAGE = 200          # entries read per XRANGE while filtering
SCAN_BUDGET = 2000       # entries examined at most by one listing call (then a cursor to go on)


class Event(msgspec.Struct):
    id: str
    type: str
    created_at: str | None
    data: dict[str, Any]


class EventPage(msgspec.Struct):
    data: list[Event]
    next_cursor: str | None


def event_id(entry_id: bytes | str) -> str:
    return "evt_" + text(entry_id)


def entry_id(evt_id: str) -> str | None:
    """The stream entry id of ``evt_id``, or None when it is not an event id (both parts of a
    stream id are 64-bit: Redis refuses a larger one, which must be a 4xx, not a 500)."""
    m = _ID.fullmatch(evt_id)
    if m is None or int(m[1]) >= 2**64 or int(m[2]) >= 2**64:
        return None
    return f"{int(m[1])}-{int(m[2])}"


def render(tenant_id: str, eid: bytes | str, raw: dict[bytes, bytes]) -> Event:
    """The event of one stream entry."""
    eid_text = text(eid)
    # a session event lists every field, '' for those the session had not got yet (outbox.lua)
    fields = {k.decode(): v.decode() for k, v in raw.items() if v}
    at_ms = int(eid_text.split("-", 1)[0])
    etype = fields.pop("type", "")
    sid = fields.pop("session_id", "")
    seq = int(fields.pop("sequence", "0"))
    data: dict[str, Any] = {}
    if not sid and "data" in fields:  # a tenant event (outbox.lua append_tenant_event)
        data = msgspec.json.decode(fields["data"])
    if sid:
        rec = msgspec.convert({"id": sid, "tenant_id": tenant_id, **fields}, SessionRecord, strict=False)
        data = {"sequence": seq, "session": msgspec.to_builtins(SessionView.of(rec, at_ms))}
    return Event(id=event_id(eid_text), type=etype, created_at=iso(at_ms), data=data)


class EventLog:
    """Reads a tenant's events (tenant scoped by construction: the stream is the tenant's)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def page(
        self,
        tenant_id: str,
        *,
        after: str | None = None,
        types: frozenset[str] | None = None,
        session_id: str | None = None,
        limit: int = 100,
    ) -> EventPage:
        """Oldest first after ``after`` (an entry id); at most ``limit`` events, examining at most
        ``SCAN_BUDGET`` entries: ``next_cursor`` is where to go on when more may follow."""
        key = TenantScope(tenant_id).events()
        start = f"({after}" if after else "-"
        out: list[Event] = []
        examined = 0
        last: str | None = None
        while examined < SCAN_BUDGET:
            want = limit - len(out) if types is None and session_id is None else SCAN_PAGE
            rows = await self.redis.xrange(key, min=start, max="+", count=max(1, want))
            for eid, raw in rows:
                examined += 1
                last = eid.decode()
                etype = raw.get(b"type", b"").decode()
                if types is not None and etype not in types:
                    continue
                if session_id is not None and raw.get(b"session_id", b"").decode() != session_id:
                    continue
                out.append(render(tenant_id, eid, raw))
                if len(out) >= limit:
                    return EventPage(out, event_id(last))
            if len(rows) < max(1, want):
                return EventPage(out, None)
            start = f"({last}"
        return EventPage(out, event_id(last) if last else None)
