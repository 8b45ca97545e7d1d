"""Processes started with the project's commands ride out a Redis restart: neither the worker
nor the API exits, and the same worker process serves jobs once Redis is back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.embedded_redis import EmbeddedRedis
from tests.fixtures.stack import Admin, tenant_client, wait_status
from tests.fixtures.wait import wait_until

from .procs import BrokerProcess, broker_env


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(data_dir=str(tmp_path / "redis"))
    (tmp_path / "redis").mkdir()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.mark.slow
def test_worker_survives_a_redis_restart(own_redis: EmbeddedRedis, sandbox: Any, tmp_path: Path) -> None:
    """Invariant: Redis down for 3 s (AOF kept) does not end the worker or API process; a
    session created before is still there and one created after is provisioned by the same
    worker process."""
    env = broker_env(own_redis.url, sandbox)
    api = BrokerProcess.api("api", env, tmp_path).start()
    worker = BrokerProcess.worker("worker", env, tmp_path).start()
    try:
        api.wait_healthy()
        worker.wait_healthy()
        admin = Admin(api.url)
        try:
            _, key = admin.tenant("restart")
        finally:
            admin.close()
        with tenant_client(api.url, key) as c:
            before = c.post("/v1/sessions?wait=10")
            assert before.status_code == 201, before.text
            own_redis.stop()  # SIGTERM: Redis writes and fsyncs its AOF on the way out
            time.sleep(3)  # the outage under test: both processes live through 3 s without Redis
            assert worker.alive and api.alive
            own_redis.start()
            wait_until(lambda: httpx.get(api.health_url, timeout=2).status_code == 200, 20,
                       "the API healthy again after the restart", ignoring=(httpx.HTTPError,))
            assert c.get(f"/v1/sessions/{before.json()['id']}").json()["status"] == "ready"
            after = c.post("/v1/sessions")
            assert after.status_code == 202, after.text
            assert wait_status(c, after.json()["id"], {"ready"}, timeout=30)["avaturn"]["token"]
        assert worker.alive, worker.tail()
        worker.wait_healthy(20)
    except BaseException:
        print(f"--- api\n{api.tail()}\n--- worker\n{worker.tail()}")
        raise
    finally:
        worker.stop()
        api.stop()
