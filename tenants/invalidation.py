"""The pub/sub listener behind every in-process tenant/key cache (the API's
``tenants.auth.KeyAuthenticator`` and the worker's ``tenants.tenant_cache.TenantCache``).

A cache may only serve entries while this listener is subscribed: ``on_subscribed`` runs once
every channel is confirmed (from then on no invalidation is missed), ``on_lost`` whenever the
subscription ends (the cache must clear and bypass itself until the next ``on_subscribed``).
The loop reconnects with capped backoff, pings an idle connection to notice a dead one, and
only ends by cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from broker.core.text import text

IDLE_PING_S = 5.0


async def listen_invalidations(
    redis: aioredis.Redis,
    channels: tuple[str, ...],
    *,
    on_subscribed: Callable[[], None],
    on_message: Callable[[str, str], None],
    on_lost: Callable[[], None],
    log: logging.Logger,
) -> None:
    backoff = 0.05
    while True:
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(*channels)
            confirmed, idle_since = 0, time.monotonic()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
                if message is None:
                    if time.monotonic() - idle_since > IDLE_PING_S:  # notice a dead connection when idle
                        await pubsub.ping()
                        idle_since = time.monotonic()
                    continue
                idle_since = time.monotonic()
                if message["type"] == "subscribe":
                    confirmed += 1
                    if confirmed == len(channels):  # every channel: from now on nothing is missed
                        on_subscribed()
                        backoff = 0.05
                elif message["type"] == "message":
                    on_message(text(message["channel"], "replace"), text(message["data"], "replace"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reconnect; meanwhile the cache is bypassed
            # one warning per outage (issue 18): the retries that follow are DEBUG, until subscribed again
            log.log(logging.WARNING if backoff == 0.05 else logging.DEBUG,
                    "tenant invalidation listener lost its connection (%s); reconnecting", type(exc).__name__)
        finally:
            on_lost()
            with contextlib.suppress(Exception):
                await pubsub.aclose()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 2.0)


class InvalidationSubscription:
    """One cache's side of :func:`listen_invalidations`: its listener task (start, wait, stop)
    and the two things the cache checks before serving or storing an entry.

    - ``listening``: entries may be served only while True (every channel confirmed);
    - ``generation``: moved by every invalidation (:meth:`bump`) and every reset, so a cache
      fill that raced one (read before it, stored after it) is not stored.

    ``on_message(channel, data)`` drops what a message names; ``on_reset()`` drops everything
    (on subscribing, and whenever the subscription is lost or stopped)."""

    def __init__(self, redis: aioredis.Redis, channels: tuple[str, ...], *, on_message: Callable[[str, str], None],
                 on_reset: Callable[[], None], name: str, log: logging.Logger) -> None:
        self._redis = redis
        self._channels = channels
        self._on_message = on_message
        self._on_reset = on_reset
        self._name = name
        self._log = log
        self.listening = False
        self.generation = 0
        self.subscriptions = 0  # successful (re)subscriptions, for health checks and tests
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def bump(self) -> None:
        self.generation += 1

    def start(self) -> None:
        """Start the listener (the cache is bypassed until it is subscribed)."""
        if self._task is None:
            self._subscribed.clear()
            self._task = asyncio.get_running_loop().create_task(self._listen(), name=self._name)

    async def wait_subscribed(self, timeout: float = 5.0) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), timeout)
        return self.listening

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._reset(listening=False)

    def _reset(self, listening: bool) -> None:
        self.generation += 1
        self._on_reset()
        self.listening = listening

    def _subscribed_now(self) -> None:
        self._reset(listening=True)
        self.subscriptions += 1
        self._subscribed.set()

    async def _listen(self) -> None:
        await listen_invalidations(
            self._redis, self._channels, on_subscribed=self._subscribed_now, on_message=self._on_message,
            on_lost=lambda: self._reset(listening=False), log=self._log,
        )
