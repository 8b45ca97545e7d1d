"""What every job needs, built once per worker process in ``on_startup`` by the same
functions the API uses (no module globals), and closed in ``on_shutdown``.

``tenants`` is the worker's tenant cache (:mod:`tenants.tenant_cache`): the same ``get`` and
``credentials`` as :class:`tenants.service.TenantService`, without a Redis read and two
decryptions per job."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis.asyncio as aioredis

from broker.core.redis_client import create_redis
from broker.core.redis_mux import RedisMux
from broker.sessions.repository import SessionRepository
from broker.core.settings import Settings
from tenants.crypto import CredentialCipher
from tenants.service import TenantService

from .metrics import WorkerMetrics
from broker.core.compat_redis import use_direct_sends
from tenants.tenant_cache import TenantCache
from .upstreams.avaturn import AvaturnClient
from .upstreams.openai import OpenAIMinter


@dataclass
class WorkerContext:
    settings: Settings
    redis: aioredis.Redis
    repo: SessionRepository
    tenants: TenantCache
    cipher: CredentialCipher
    minter: OpenAIMinter
    avaturn: AvaturnClient
    metrics: WorkerMetrics
    mux: RedisMux | None = None
    index_trim_due: float = 0.0  # time.monotonic() when this worker's sweep trims the indexes again (jobs/sweep.py)

    @classmethod
    def build(cls, settings: Settings, metrics: WorkerMetrics) -> WorkerContext:
        settings.require_secret_key()
        redis = use_direct_sends(create_redis(settings, max_connections=max(64, settings.worker_max_jobs + 32)))
        cipher = CredentialCipher(settings.secret_keys)
        logging.getLogger("workers").info("worker starting: %d job slots", settings.worker_max_jobs)
        mux = RedisMux(redis)  # the jobs' scripts share one pipelined connection (broker/core/redis_mux.py)
        return cls(
            settings=settings,
            redis=redis,
            mux=mux,
            repo=SessionRepository(redis, mux),
            tenants=TenantCache(redis, TenantService(redis, cipher)).start(),
            cipher=cipher,
            minter=OpenAIMinter(settings.openai_base_url, timeout=settings.upstream_timeout_seconds),
            avaturn=AvaturnClient(settings.avaturn_base_url, timeout=settings.upstream_timeout_seconds),
            metrics=metrics,
        )

    async def close(self) -> None:
        await self.tenants.stop()
        await self.minter.aclose()
        await self.avaturn.aclose()
        if self.mux is not None:
            await self.mux.aclose()
        await self.redis.aclose()
