"""Session status events for ``POST /v1/sessions?wait=N`` (no polling of job results), and the
wake-ups of the SSE event streams (issue 20).

One pub/sub connection per API process subscribes to ``sb:events:*`` (the transition
script PUBLISHes every status change) and wakes the waiters of that session; the same
connection subscribes to ``OUTBOX_PATTERN`` (``tenants/outbox.lua`` PUBLISHes each event's id on
the channel named like the tenant's outbox stream) and wakes that tenant's stream readers, which then read the
outbox stream after their cursor (so a wake-up lost or doubled changes nothing). A waiter
re-reads the record after it registered, so an event published before the subscription
cannot be missed; if the pub/sub connection drops, waiters fall back to re-reading the
record every ``fallback_poll`` seconds until the listener reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator

import redis.asyncio as aioredis

from tenants.scope import EVENTS_PATTERN, OUTBOX_PATTERN, TenantScope

log = logging.getLogger("broker.events")


class SessionEvents:
    def __init__(self, redis: aioredis.Redis, fallback_poll: float = 0.25) -> None:
        self.redis = redis
        self.fallback_poll = fallback_poll
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._readers: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self._healthy = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="session-events")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        warned = False
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(EVENTS_PATTERN, OUTBOX_PATTERN)
                self._healthy.set()
                for readers in self._readers.values():  # what was appended while we were away
                    for ev in readers:
                        ev.set()
                warned = False
                async for msg in pubsub.listen():
                    channel = msg.get("channel")
                    if isinstance(channel, bytes):
                        channel = channel.decode()
                    tenant = TenantScope.tenant_of_events_channel(str(channel))
                    if tenant is not None:  # an event appended to the tenant's outbox
                        group, name = self._readers, tenant
                    else:                   # sb:events:{tid}:{sid}: a session's status changed
                        group, name = self._waiters, str(channel).rsplit(":", 1)[-1]
                    for ev in group.get(name, ()):
                        ev.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection lost: waiters poll until we are back
                self._healthy.clear()
                # one warning per outage (issue 18): the retries that follow are DEBUG, until subscribed again
                log.log(logging.DEBUG if warned else logging.WARNING,
                        "session events listener lost Redis (%s); reconnecting", type(exc).__name__)
                warned = True
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def wait_for(
        self,
        session_id: str,
        done: Callable[[], Awaitable[bool]],
        timeout: float,
    ) -> bool:
        """Wait until ``done()`` is true or ``timeout`` runs out; returns the last ``done()``."""
        ev = asyncio.Event()
        self._waiters[session_id].add(ev)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                if await done():
                    return True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                step = remaining if self._healthy.is_set() else min(remaining, self.fallback_poll)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), step)
                ev.clear()
        finally:
            waiters = self._waiters.get(session_id)
            if waiters is not None:
                waiters.discard(ev)
                if not waiters:
                    self._waiters.pop(session_id, None)

    @property
    def healthy(self) -> bool:
        return self._healthy.is_set()

    @contextlib.contextmanager
    def reader(self, tenant_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever the tenant's outbox gets an event (or the listener reconnects)."""
        ev = asyncio.Event()
        self._readers[tenant_id].add(ev)
        try:
            yield ev
        finally:
            readers = self._readers.get(tenant_id)
            if readers is not None:
                readers.discard(ev)
                if not readers:
                    self._readers.pop(tenant_id, None)
