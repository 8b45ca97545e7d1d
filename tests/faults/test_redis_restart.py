"""Redis goes away mid-run (SIGKILL of redis-server, AOF ``appendfsync everysec``) and comes
back on the same port and data dir: the API answers 503 meanwhile and recovers by itself, the
worker process survives, and every session admitted before, during or after ends cleanly."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import redis as sync_redis

from broker.embedded_redis import EmbeddedRedis

from .harness import counter, wait_until
from .ledger import FINAL, check_invariants

pytestmark = pytest.mark.fault


def _assert_503(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.elapsed.total_seconds() < 5  # refused quickly, not held until a timeout
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "redis_unavailable"


def _aof_buffer_empty(server: EmbeddedRedis) -> bool:
    client = sync_redis.Redis.from_url(server.url)
    try:
        return int(client.info("persistence")["aof_buffer_length"]) == 0
    finally:
        client.close()


def test_api_answers_503_while_redis_is_down_and_recovers_by_itself(private_redis: EmbeddedRedis, make_harness,
                                                                    make_ledger) -> None:
    """Invariant: while Redis is unreachable every Redis-backed endpoint answers 503 with
    Retry-After (never 500, never a hang), /readyz says not ready, /healthz stays up; when
    Redis returns the same API process serves requests again within a few seconds (no
    restart), with the data written before the outage (AOF)."""
    h = make_harness(private_redis)
    led = make_ledger(h)
    sid = led.create(ttl=30)
    # A SIGKILL keeps what Redis wrote to the AOF file; under load (appendfsync everysec, a slow
    # fsync in progress) Redis may hold the write back for up to 2 s: wait until it is written
    wait_until(lambda: _aof_buffer_empty(private_redis), 10, "the session written to the AOF file")
    private_redis.stop(kill=True)
    for r in (led.client.get(f"/v1/sessions/{sid}"), led.client.get("/v1/sessions"),
              led.client.post("/v1/sessions", json={}), led.client.delete(f"/v1/sessions/{sid}"),
              led.client.get("/v1/usage"), httpx.get(f"{h.url}/readyz")):
        _assert_503(r)
    assert httpx.get(f"{h.url}/healthz").status_code == 200
    private_redis.start()
    took = wait_until(lambda: led.client.get(f"/v1/sessions/{sid}").status_code == 200, 10, "API recovery",
                      state=lambda: led.client.get(f"/v1/sessions/{sid}").text)
    assert httpx.get(f"{h.url}/readyz").status_code == 200
    assert led.view(sid)["status"] == "queued"  # no worker here: admitted before the outage, kept by the AOF
    assert led.client.post("/v1/sessions", json={}).status_code == 202
    print(f"API recovered {took:.2f}s after Redis came back")


def test_redis_killed_and_restarted_mid_run(private_redis: EmbeddedRedis, make_harness, make_ledger,
                                            sandbox: Any) -> None:
    """Invariant: a Redis SIGKILL + restart (AOF) mid-run loses nothing and leaks nothing:
    the worker process stays up and resumes; every session admitted before, during (refused
    with 503) or after the outage ends terminated (none stuck); Avaturn creates that land
    while Redis is down are recorded once Redis is back (no second upstream session); every
    upstream session is deleted by expires_at + 15 s; every concurrency slot is released."""
    h = make_harness(private_redis, BROKER_PROVISION_DEADLINE_SECONDS=40)
    worker = h.worker()
    led = make_ledger(h)
    for _ in range(3):
        led.create(ttl=10, wait=10)
    sandbox.configure({"create": {"latency_ms": 1500}})
    for _ in range(4):
        led.create(ttl=10)
    wait_until(lambda: counter(sandbox, "create") >= 7, 10, "4 creates in flight")
    private_redis.stop(kill=True)
    down_at = time.monotonic()
    _assert_503(led.client.post("/v1/sessions", json={}))
    time.sleep(2.5)  # the in-flight creates answer while Redis is down
    private_redis.start()
    outage = time.monotonic() - down_at
    sandbox.configure({})
    wait_until(lambda: led.client.get("/v1/usage").status_code == 200, 10, "API recovery")
    for _ in range(2):
        led.create(ttl=10)
    assert worker.alive(), f"the worker died with Redis:\n{worker.log_text()[-3000:]}"
    wait_until(worker.healthy, 15, "worker health")
    took = led.wait_for(None, FINAL, timeout=60)
    report = check_invariants(led, sandbox.audit(), lateness_bound_s=15)
    assert report.statuses == {"terminated": 9}, report.statuses
    assert worker.alive()
    assert not report.orphans, "a create that landed while Redis was down was not recorded"
    h.assert_no_secret_logged()
    print(f"redis outage {outage:.1f}s; all settled {took:.1f}s after recovery; {report}")
