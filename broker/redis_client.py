"""Building Redis clients from settings (the API and the workers use the same function)."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .settings import Settings


def create_redis(settings: Settings, *, max_connections: int = 256) -> aioredis.Redis:
    """A pooled client that retries briefly on connection errors, so a Redis restart costs
    a few failed requests (503) rather than a process restart."""
    return aioredis.Redis.from_url(
        settings.redis_url,
        max_connections=max_connections,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
