"""Health endpoints as Kubernetes probes see them: the worker's /healthz (on its metrics
port) follows its Redis heartbeat; the API's /healthz is liveness only, /readyz follows
Redis. Uses a private redis-server, stopped and restarted on the same port."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import workers.main as worker_main
from broker.embedded_redis import EmbeddedRedis, free_port
from tests.fixtures.stack import Admin, ApiServer, make_settings, tenant_client
from tests.fixtures.threads import LoopThread
from workers.main import Health, build_worker
from workers.metrics import WorkerMetrics

from .helpers import sample, scrape, value, wait_for


class ServedWorker:
    """An arq worker plus the metrics/health server ``session-broker worker --metrics-port`` runs."""

    def __init__(self, settings: Any) -> None:
        self.metrics, self.health = WorkerMetrics(), Health()
        self.port = free_port()
        self.thread = LoopThread("obs-worker")

        async def make() -> Any:
            return build_worker(settings, self.metrics, self.health, handle_signals=False)

        self.worker = self.thread.call(make())
        self.runner = self.thread.call(worker_main._serve_metrics(self.metrics, self.health, "127.0.0.1", self.port))
        self.thread.start(self.worker.async_run)

    def status(self) -> int:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code
        except httpx.HTTPError:
            return 0

    def stop(self) -> None:
        task = self.thread.task
        if task is not None and not task.done():
            self.thread.loop.call_soon_threadsafe(task.cancel)
            try:
                task.result(15)
            except BaseException:  # noqa: BLE001 - cancelled: we are stopping
                pass
        self.thread.call(self.worker.close(), timeout=15)
        self.thread.call(self.runner.cleanup(), timeout=15)
        self.thread.stop()


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(aof=False)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def test_health_follows_redis(private_redis: EmbeddedRedis, sandbox, monkeypatch) -> None:
    """Invariant: the worker's /healthz answers 200 only while its Redis heartbeat succeeds
    (503 within HEALTH_STALE_S of losing Redis, 200 again once it is back); the API's
    /readyz says 503 without Redis while its /healthz stays 200; Redis errors are counted."""
    monkeypatch.setattr(worker_main, "HEALTH_STALE_S", 3)  # 15 s in production
    settings = make_settings(private_redis.url, sandbox)
    api = ApiServer(settings).start()
    worker = ServedWorker(settings)
    admin = Admin(api.url)
    try:
        _, key = admin.tenant("acme")
        wait_for(lambda: worker.status() == 200, 10, "worker healthy")
        assert "broker_worker_jobs_total" in scrape(f"http://127.0.0.1:{worker.port}/metrics")
        assert httpx.get(f"{api.url}/readyz").status_code == 200

        private_redis.stop()
        wait_for(lambda: worker.status() == 503, 10, "worker unhealthy without Redis")
        assert value(worker.metrics.registry, "broker_redis_errors_total", source="heartbeat") >= 1
        assert httpx.get(f"{api.url}/readyz").status_code == 503
        assert httpx.get(f"{api.url}/healthz").status_code == 200
        with tenant_client(api.url, key) as c:
            assert c.post("/v1/sessions").status_code == 503
        text = scrape(f"{api.url}/metrics")
        assert (sample(text, "broker_redis_errors_total", {"source": "readyz"}) or 0) >= 1
        assert (sample(text, "broker_redis_errors_total", {"source": "request"}) or 0) >= 1

        private_redis.start()
        wait_for(lambda: worker.status() == 200, 10, "worker healthy again")
        assert httpx.get(f"{api.url}/readyz").status_code == 200
    finally:
        admin.close()
        worker.stop()
        api.stop()
