"""Fixtures of the fault suite: a harness factory (API in-process, real worker processes)
on the shared Redis or on a private one that the test may stop, kill and restart."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

from broker.embedded_redis import EmbeddedRedis

from .harness import Harness
from .ledger import Ledger

MakeHarness = Callable[..., Harness]


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    """A redis-server of this test alone, with AOF (appendfsync everysec): restartable."""
    server = EmbeddedRedis(aof=True)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def make_harness(redis_server: EmbeddedRedis, sandbox: Any, tmp_path: Path) -> Iterator[MakeHarness]:
    made: list[Harness] = []

    def make(redis: EmbeddedRedis | None = None, **overrides: Any) -> Harness:
        server = redis or redis_server
        client = sync_redis.Redis.from_url(server.url)
        client.flushall()
        client.close()
        h = Harness(server.url, sandbox, tmp_path, **overrides).start_api()
        made.append(h)
        return h

    try:
        yield make
    finally:
        for h in made:
            h.close()


@pytest.fixture
def make_ledger() -> Iterator[Callable[[Harness, str], Ledger]]:
    made: list[Ledger] = []

    def make(h: Harness, name: str = "acme", **body: Any) -> Ledger:
        tenant, key = h.tenant(name, **body)
        ledger = Ledger(h.url, key, tenant["id"], h.settings.redis_url)
        made.append(ledger)
        return ledger

    try:
        yield make
    finally:
        for ledger in made:
            ledger.close()
