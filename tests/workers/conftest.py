"""Fixtures of the worker tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.fixtures.stack import make_settings
from workers.context import WorkerContext
from workers.metrics import WorkerMetrics


@pytest.fixture
async def ctx(redis: aioredis.Redis, redis_url: str, sandbox: Any) -> AsyncIterator[WorkerContext]:
    """A worker's context (clients, caches, metrics) on the test Redis (flushed) and the sandbox."""
    wc = WorkerContext.build(make_settings(redis_url, sandbox), WorkerMetrics())
    try:
        yield wc
    finally:
        await wc.close()
