"""Saying "Redis is unreachable" the same way everywhere: one line that names the URL (its
password masked) and what to do. Used by the CLI (``tenants ...``), ``dev``, the API at start
and the worker while it waits for Redis."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .settings import Settings

# What a client raises when the server cannot be reached (the socket errors are wrapped by
# redis-py in ConnectionError; an OSError escapes only from a few paths, e.g. DNS).
UNREACHABLE_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)


def masked_url(url: str) -> str:
    """``redis://user:secret@host:6379/0`` -> ``redis://user:***@host:6379/0``."""
    parsed = urlparse(url)
    if not parsed.password:
        return url
    netloc = parsed.netloc
    userinfo, _, hostport = netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return parsed._replace(netloc=f"{user}:***@{hostport}").geturl()


def where(settings: Settings) -> str:
    """The Redis the settings point at, for a message: the URL, or the Sentinel service."""
    if settings.redis_sentinels:
        sentinels = ",".join(f"{h}:{p}" for h, p in settings.redis_sentinels)
        return f"the master {settings.redis_sentinel_service!r} of the sentinels {sentinels}"
    return masked_url(settings.redis_url)


def reason(exc: BaseException) -> str:
    """A short cause: ``Connection refused`` rather than redis-py's multi-part message."""
    seen: BaseException | None = exc
    for _ in range(5):  # the socket error redis-py wrapped, if any: its strerror is the short cause
        if seen is None:
            break
        if isinstance(seen, OSError) and (seen.strerror or seen.errno):
            # asyncio's "Connect call failed (...)" says less than the errno's own text
            return os.strerror(seen.errno) if seen.errno and seen.errno > 0 else str(seen.strerror)
        seen = seen.__cause__ or seen.__context__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # redis-py: "Error 111 connecting to 127.0.0.1:1. Connection refused."
    if "connecting to" in text and ". " in text:
        text = text.rsplit(". ", 1)[-1].rstrip(".") or text
    return text[:160]


def unreachable_line(settings: Settings, exc: BaseException, hint: str | None = None) -> str:
    hint = hint or ("start Redis there, or point BROKER_REDIS_URL at a running one "
                    "(for `make dev`'s instance: set -a; . .dev/env; set +a)")
    return f"Redis at {where(settings)} is unreachable ({reason(exc)}): {hint}"


async def ping(client: aioredis.Redis) -> BaseException | None:
    """None when Redis answers, else the error (never raises one of :data:`UNREACHABLE_ERRORS`)."""
    try:
        await client.ping()
    except UNREACHABLE_ERRORS as exc:
        return exc
    return None
