"""Redis HA through Sentinel, for real: a redis-server master, a replica and a sentinel
(``redis-server --sentinel``) on loopback. The API and a worker configured with
BROKER_REDIS_SENTINELS (and a BROKER_REDIS_URL whose host is deliberately wrong) admit and
provision sessions; the master is SIGKILLed, the sentinel promotes the replica, and the same
processes carry on against the new master without a restart."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis as sync_redis

from broker.core.redis_client import create_redis, create_worker_pool
from broker.core.settings import Settings, SettingsError
from tests.fixtures.stack import Admin, ApiServer, WorkerThread, make_settings, tenant_client, wait_status
from tests.fixtures.wait import wait_until

from .sentinel import SentinelSetup

UNREACHABLE_URL = "redis://127.0.0.1:1/0"  # host/port must be ignored in Sentinel mode


def test_sentinel_settings_parse() -> None:
    s = Settings.from_env({"BROKER_REDIS_SENTINELS": "s0:26379, s1.example:26380,[::1]:26381"})
    assert s.redis_sentinels == (("s0", 26379), ("s1.example", 26380), ("::1", 26381))
    assert s.redis_sentinel_service == "mymaster"
    s = Settings.from_env({"BROKER_REDIS_SENTINELS": "s0:26379", "BROKER_REDIS_SENTINEL_SERVICE": "broker-ha"})
    assert s.redis_sentinel_service == "broker-ha"
    assert Settings.from_env({}).redis_sentinels == ()


@pytest.mark.parametrize("name,value", [
    ("BROKER_REDIS_SENTINELS", "s0"),
    ("BROKER_REDIS_SENTINELS", "s0:notaport"),
    ("BROKER_REDIS_SENTINELS", "s0:26379,:26379"),
    ("BROKER_REDIS_SENTINELS", "s0:70000"),
    ("BROKER_REDIS_SENTINEL_SERVICE", "my master"),
])
def test_malformed_sentinel_settings_name_the_variable(name: str, value: str) -> None:
    env = {"BROKER_REDIS_SENTINELS": "s0:26379", name: value}
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    message = str(err.value)
    assert message.startswith(name) and "\n" not in message


@pytest.fixture(scope="module")
def ha() -> Iterator[SentinelSetup]:
    setup = SentinelSetup().start()
    try:
        yield setup
    finally:
        setup.stop()


async def test_clients_reach_the_master_through_the_sentinel(ha: SentinelSetup) -> None:
    settings = Settings.from_env({"BROKER_REDIS_URL": UNREACHABLE_URL, "BROKER_REDIS_SENTINELS": ha.sentinels})
    master = ha.master_port()
    for client in (create_redis(settings), create_worker_pool(settings)):
        try:
            assert await client.set("sb:test:sentinel", "1")
            info = await client.info("server")
            assert int(info["tcp_port"]) == master
            assert (await client.info("replication"))["role"] == "master"
        finally:
            await client.aclose()


def _post_until(client: httpx.Client, deadline_s: float, **kwargs: Any) -> httpx.Response:
    """POST /v1/sessions, retrying 503 (Redis unreachable, Retry-After) until the deadline."""
    last: list[httpx.Response] = []

    def answered() -> httpx.Response | None:
        last[:] = [client.post("/v1/sessions", **kwargs)]
        return last[0] if last[0].status_code != 503 else None

    try:
        return wait_until(answered, deadline_s, "POST /v1/sessions answered other than 503", interval=0.2)
    except AssertionError:
        return last[0]  # the caller asserts on the 503 it got


@pytest.mark.slow
def test_sessions_survive_a_sentinel_failover(ha: SentinelSetup, sandbox: Any) -> None:
    """Invariants: through Sentinel, admission is exact (limit 2: the third concurrent
    session is refused) and sessions are provisioned; after the master is SIGKILLed and the
    replica promoted, the same API and worker processes (no restart) read the old sessions,
    terminate them upstream, and admit and provision new ones on the new master."""
    settings = make_settings(UNREACHABLE_URL, sandbox, BROKER_REDIS_SENTINELS=ha.sentinels)
    master = sync_redis.Redis(port=ha.master_port())
    master.flushall()
    api = ApiServer(settings).start()
    worker = WorkerThread(settings).start()
    admin = Admin(api.url)
    try:
        _, key = admin.tenant("ha", quotas={"max_concurrent_sessions": 2})
        with tenant_client(api.url, key) as c:
            first = c.post("/v1/sessions?wait=10", json={"ttl_seconds": 300})
            assert first.status_code == 201, first.text
            second = c.post("/v1/sessions", json={"ttl_seconds": 300})
            assert second.status_code == 202, second.text
            assert c.post("/v1/sessions").json()["error"]["code"] == "concurrency_limit"
            wait_status(c, second.json()["id"], {"ready"})
            assert master.wait(1, 5000) == 1, "the replica has every write before the failover"
            master.close()

            new_port = ha.fail_master()
            wait_until(lambda: c.get("/readyz").status_code == 200, 20, "the API ready on the new master",
                       interval=0.2)

            # Old sessions are there, and still count against the limit.
            assert c.get(f"/v1/sessions/{first.json()['id']}").json()["status"] == "ready"
            refused = _post_until(c, 20)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "concurrency_limit"
            # The worker (same process) terminates them upstream through the new master.
            for sid in (first.json()["id"], second.json()["id"]):
                assert c.delete(f"/v1/sessions/{sid}").status_code == 202
                assert wait_status(c, sid, {"terminated"}, timeout=30)["termination_reason"] == "requested"
            third = _post_until(c, 20, json={"ttl_seconds": 300})
            assert third.status_code == 202, third.text
            assert wait_status(c, third.json()["id"], {"ready"}, timeout=30)["avaturn"]["token"]
        assert worker.thread.task is not None and not worker.thread.task.done(), "the worker kept running"
        promoted = sync_redis.Redis(port=new_port)
        assert promoted.info("replication")["role"] == "master" and promoted.dbsize() > 0
        promoted.close()
        audit = sandbox.audit()
        live = [s for s in audit["sessions"] if s["live"]]
        assert len(audit["sessions"]) == 3 and len(live) == 1
    finally:
        admin.close()
        worker.stop()
        api.stop()
