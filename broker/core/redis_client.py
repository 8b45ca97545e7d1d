"""Building Redis clients from settings (the API, the workers and the CLI use these functions).

Two ways to reach Redis, chosen by the settings:

- a plain URL, ``BROKER_REDIS_URL`` (``redis://``, ``rediss://`` for TLS, ``unix://``), passed
  to redis-py untouched, so TLS query parameters (``ssl_cert_reqs``, ``ssl_ca_certs``...) work;
- Redis Sentinel, ``BROKER_REDIS_SENTINELS`` (+ ``BROKER_REDIS_SENTINEL_SERVICE``): the master is
  looked up through the sentinels on every (re)connect, so a failover costs a few retried
  commands, not a restart. The URL then supplies only username/password, db and TLS; the
  sentinels are reached with the same password and TLS setting (what Bitnami's chart does).

Redis Cluster is not supported: see deploy/README.md ("Redis Cluster").
"""

from __future__ import annotations

from typing import Any, cast

import redis.asyncio as aioredis
from arq.connections import ArqRedis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .settings import Settings

# The API answers 503 quickly rather than holding requests: a couple of short retries.
API_RETRIES = 2
# A worker rides out a Redis restart or a Sentinel failover (about 20 s of retrying per command).
WORKER_RETRIES = 14
WORKER_BACKOFF_CAP_S = 2.0

_SOCKET_OPTIONS: dict[str, Any] = {"socket_connect_timeout": 2, "socket_timeout": 5, "health_check_interval": 15}


def _retry_options(retries: int, cap: float) -> dict[str, Any]:
    return {
        "retry": Retry(ExponentialBackoff(cap=cap, base=0.05), retries),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }


class _SentinelPool(SentinelConnectionPool):
    """Closing the client also closes the connections to the sentinels themselves."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        for sentinel in self.sentinel_manager.sentinels:
            await sentinel.connection_pool.disconnect()


def _sentinel_client(settings: Settings, options: dict[str, Any], redis_class: type[aioredis.Redis]) -> aioredis.Redis:
    url = parse_url(settings.redis_url)
    if "path" in url:
        raise ValueError("BROKER_REDIS_URL must be redis:// or rediss:// when BROKER_REDIS_SENTINELS is set")
    tls = url.pop("connection_class", None) is SSLConnection
    for key in ("host", "port"):
        url.pop(key, None)  # the sentinels say where the master is
    auth = {k: url[k] for k in ("username", "password") if url.get(k)}
    tls_options = {k: v for k, v in url.items() if k.startswith("ssl_")}
    sentinel = Sentinel(
        list(settings.redis_sentinels),
        sentinel_kwargs={"socket_connect_timeout": 2, "socket_timeout": 5, "ssl": tls, **tls_options, **auth},
        ssl=tls,
        **url,
        **options,
    )
    client: aioredis.Redis = sentinel.master_for(
        settings.redis_sentinel_service, redis_class=redis_class, connection_pool_class=_SentinelPool
    )
    return client


def create_redis(
    settings: Settings, *, max_connections: int = 256, retries: int = API_RETRIES, backoff_cap: float = 0.5
) -> aioredis.Redis:
    """A pooled client that retries briefly on connection errors, so a Redis restart or a
    failover costs a few failed requests (503) rather than a process restart."""
    options = {**_SOCKET_OPTIONS, **_retry_options(retries, backoff_cap), "max_connections": max_connections}
    if settings.redis_sentinels:
        return _sentinel_client(settings, options, aioredis.Redis)
    return aioredis.Redis.from_url(settings.redis_url, **options)


def create_worker_pool(settings: Settings, **arq_options: Any) -> ArqRedis:
    """The arq worker's own pool (``Worker(redis_pool=...)``): same URL/Sentinel/TLS handling as
    the API, with generous retries so the worker survives a Redis restart or failover.

    Used instead of ``arq.connections.RedisSettings``, whose Sentinel mode passes neither a
    password to the sentinels nor a retry policy to the connections."""
    options = {
        **_SOCKET_OPTIONS,
        **_retry_options(WORKER_RETRIES, WORKER_BACKOFF_CAP_S),
        "socket_timeout": 10,
    }
    if settings.redis_sentinels:
        client = _sentinel_client(settings, options, ArqRedis)
    else:
        client = ArqRedis.from_pool(aioredis.ConnectionPool.from_url(settings.redis_url, **options))
    client = cast(ArqRedis, client)
    for name, value in arq_options.items():  # job_serializer, job_deserializer, default_queue_name
        setattr(client, name, value)
    return client
