"""Live events as Server-Sent Events (contract section 11, issue 20): ``GET /v1/events/stream``
(the tenant's new events) and ``GET /v1/sessions/{id}/events`` (one session's events, from its
first; the stream ends after its terminal event).

A stream reads the tenant's outbox stream after its cursor (``Last-Event-ID`` resumes after that
event) and then waits for a wake-up from the API process's one pub/sub subscription
(``SessionEvents.reader``), never a subscription of its own; while that subscription is down it
re-reads every second. A comment line every 15 s keeps proxies from closing an idle stream. At
most ``MAX_STREAMS_PER_TENANT`` streams per tenant are open in one API process: one more is a 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

import msgspec
import redis.asyncio as aioredis

from broker.core.errors import QuotaExceeded
from broker.sessions.events import SessionEvents
from broker.sessions.outbox import Event, EventLog, entry_id
from tenants.scope import TenantScope

MAX_STREAMS_PER_TENANT = 10
KEEPALIVE_S = 15.0
DEGRADED_POLL_S = 1.0
TERMINAL_EVENTS = frozenset({"session.failed", "session.terminated"})
MEDIA_TYPE = "text/event-stream"


class StreamSlots:
    """Open streams per tenant in this process, bounded."""

    def __init__(self, limit: int = MAX_STREAMS_PER_TENANT) -> None:
        self.limit = limit
        self.open: dict[str, int] = defaultdict(int)

    def take(self, tenant_id: str) -> _Slot:
        if self.open[tenant_id] >= self.limit:
            raise QuotaExceeded(
                f"at most {self.limit} event streams per tenant are open at once; close one",
                code="too_many_streams", headers={"Retry-After": "1"},
                extra={"limit": self.limit, "current": self.open[tenant_id]},
            )
        self.open[tenant_id] += 1
        return _Slot(self, tenant_id)

    def _give_back(self, tenant_id: str) -> None:
        self.open[tenant_id] -= 1
        if self.open[tenant_id] <= 0:
            self.open.pop(tenant_id, None)


class _Slot:
    """Given back once: by the stream when it ends, or when it is dropped without ever running
    (a client gone before the first byte)."""

    def __init__(self, slots: StreamSlots, tenant_id: str) -> None:
        self._release: Callable[[], None] = weakref.finalize(self, slots._give_back, tenant_id)

    def release(self) -> None:
        self._release()


def block(event: Event) -> bytes:
    """One SSE block: ``event:``, ``id:``, ``data:`` (the event JSON, one line)."""
    return b"event: %s\nid: %s\ndata: %s\n\n" % (event.type.encode(), event.id.encode(), msgspec.json.encode(event))


async def latest(redis: aioredis.Redis, tenant_id: str) -> str | None:
    """The tenant's newest event's entry id (a new stream starts after it), None when none."""
    rows = await redis.xrevrange(TenantScope(tenant_id).events(), count=1)
    return rows[0][0].decode() if rows else None


async def blocks(
    redis: aioredis.Redis,
    events: SessionEvents,
    slot: _Slot,
    tenant_id: str,
    after: str | None,
    *,
    session_id: str | None = None,
    from_latest: bool = False,
) -> AsyncIterator[bytes]:
    log = EventLog(redis)
    try:
        with events.reader(tenant_id) as wake:
            cursor = await latest(redis, tenant_id) if from_latest and after is None else after
            yield b": stream open\n\n"
            while True:
                wake.clear()  # before the read: an event appended after it sets it again
                page = await log.page(tenant_id, after=cursor, session_id=session_id, limit=100)
                for event in page.data:
                    yield block(event)
                    cursor = entry_id(event.id)
                    if session_id is not None and event.type in TERMINAL_EVENTS:
                        return
                if page.next_cursor is not None:
                    cursor = entry_id(page.next_cursor)
                    continue
                timeout = KEEPALIVE_S if events.healthy else DEGRADED_POLL_S
                try:
                    await asyncio.wait_for(wake.wait(), timeout)
                except TimeoutError:
                    if events.healthy:
                        yield b": keepalive\n\n"
    finally:
        with contextlib.suppress(Exception):
            slot.release()
