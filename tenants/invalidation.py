"""The pub/sub listener behind every in-process tenant/key cache (the API's
``tenants.auth.KeyAuthenticator`` and the worker's ``workers.tenant_cache.TenantCache``).

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
from typing import Any

import redis.asyncio as aioredis

IDLE_PING_S = 5.0


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


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
                    on_message(_text(message["channel"]), _text(message["data"]))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reconnect; meanwhile the cache is bypassed
            log.warning("tenant invalidation listener lost its connection (%s); reconnecting", type(exc).__name__)
        finally:
            on_lost()
            with contextlib.suppress(Exception):
                await pubsub.aclose()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 2.0)
