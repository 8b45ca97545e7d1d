"""Issue 20's check, black box through HTTP and the sandbox's webhook receiver: 1,000 sessions go
through their lifecycle (created, ready, stopped -> terminated) on real processes (the API, two
workers, the sandbox, Redis with AOF) while the receiver fails 30 % of first deliveries (503;
an event's retry goes through, so that no event waits for the schedule's 5 min second retry)
and answers 3 % slowly (1.5 s), one worker is SIGKILLed and Redis is restarted (same data).

Invariants:
- ``GET /v1/events`` lists exactly the state changes: per session ``session.created``,
  ``session.ready``, ``session.terminated`` with ``data.sequence`` 1, 2, 3, for exactly the
  sessions created, and nothing else;
- every event it lists was received by the receiver and verified (with the ``standardwebhooks``
  package) at least once, and the receiver got nothing that the log does not list;
- a duplicate carries the same ``webhook-id`` and an identical body;
- per session, the first receipts of its events are in ``data.sequence`` order.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.embedded_redis import EmbeddedRedis
from tests.fixtures.stack import Admin, tenant_client
from tests.fixtures.wait import wait_until
from tests.multiprocess.procs import BrokerProcess, broker_env
from workers.sandbox import SandboxProcess

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]

SESSIONS = 1000
CLIENT_THREADS = 24
KILL_AT, RESTART_AT = 250, 550           # sessions created when the worker is killed / Redis restarted
REDIS_DOWN_S = 2.0
RECEIVER = "fault"
TTL_S = 600                               # far beyond the run: no session.expiring, stops end them all
SETTLE_S = 90                             # after the last stop: every session terminated, every event delivered
EXPECTED = ["session.created", "session.ready", "session.terminated"]
TRANSIENT = (httpx.TransportError,)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    (tmp_path / "redis").mkdir()
    redis = EmbeddedRedis(data_dir=str(tmp_path / "redis"), aof=True)
    redis.start()
    sandbox = SandboxProcess().start()
    env = broker_env(redis.url, sandbox, BROKER_WEBHOOK_ALLOW_PRIVATE="true",
                     BROKER_PROVISION_DEADLINE_SECONDS="120", BROKER_UPSTREAM_TIMEOUT_SECONDS="5")
    procs = {"api": BrokerProcess.api("api", env, tmp_path),
             "w1": BrokerProcess.worker("w1", env, tmp_path),
             "w2": BrokerProcess.worker("w2", env, tmp_path)}
    try:
        for p in procs.values():
            p.start()
        for p in procs.values():
            p.wait_healthy(60)
        yield {"redis": redis, "sandbox": sandbox, "procs": procs}
    except BaseException:
        for p in procs.values():
            print(f"--- {p.name} (log tail)\n{p.tail(40)}")
        raise
    finally:
        for p in procs.values():
            p.stop()
        sandbox.stop()
        redis.cleanup()


def call(fn: Any, *args: Any, ok: tuple[int, ...], retry: tuple[int, ...] = (503,), deadline_s: float = 60,
         **kwargs: Any) -> httpx.Response:
    """``fn(*args)`` until it answers one of ``ok``: ``retry`` (503: Redis away) and transport
    errors are retried."""
    def answered() -> httpx.Response | None:
        r: httpx.Response = fn(*args, **kwargs)
        assert r.status_code in ok + retry, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
        return r if r.status_code in ok else None

    return wait_until(answered, deadline_s, f"{fn.__name__} {args} answered {ok}", interval=0.2, ignoring=TRANSIENT)


def all_events(c: httpx.Client) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        r = call(c.get, "/v1/events", ok=(200,), params={"limit": 100, **({"after": after} if after else {})})
        page = r.json()
        events.extend(page["data"])
        after = page["next_cursor"]
        if not after:
            return events


def test_1000_sessions_every_event_delivered_verified_in_order_through_a_worker_kill_and_a_redis_restart(
        stack: dict[str, Any]) -> None:
    sandbox: SandboxProcess = stack["sandbox"]
    redis: EmbeddedRedis = stack["redis"]
    api, w1 = stack["procs"]["api"], stack["procs"]["w1"]
    admin = Admin(api.url)
    try:
        tenant, key = admin.tenant("hooks", quotas={
            "max_concurrent_sessions": SESSIONS, "sessions_per_minute": 100_000, "sessions_per_day": 100_000,
            "openai_requests_per_minute": 100_000, "max_session_seconds": TTL_S})
    finally:
        admin.close()
    c = tenant_client(api.url, key)
    made = c.post("/v1/webhook_endpoints", json={"url": sandbox.webhook_url(RECEIVER), "description": "fault test"})
    assert made.status_code == 201, made.text
    sandbox.configure_webhooks(RECEIVER, {
        "secrets": [made.json()["secret"]], "seed": 20, "first_attempt_only": True,
        "fail": [{"status": 503, "rate": 0.3}], "slow": {"rate": 0.03, "latency_ms": 1500}})

    created = Counter[str]()
    ids: list[str] = []
    lock = threading.Lock()
    faults: dict[str, float] = {}

    def lifecycle(i: int) -> None:
        with tenant_client(api.url, key) as cc:
            # a retried create (its answer lost to the Redis restart) replays the same session
            r = call(cc.post, "/v1/sessions?wait=10", ok=(201, 202), retry=(503, 409), json={"ttl_seconds": TTL_S},
                     headers={"Idempotency-Key": f"fault-{i}"})
            sid = r.json()["id"]
            with lock:
                ids.append(sid)
                created["n"] += 1
                n = created["n"]
            if n == KILL_AT:
                w1.kill()  # mid-run: its claimed deliveries are taken over by w2 after their lease
                faults["killed_at"] = time.monotonic()
            if n == RESTART_AT:
                redis.stop()  # SIGTERM: Redis writes its AOF; the same data comes back
                time.sleep(REDIS_DOWN_S)  # the outage itself: the processes see Redis gone
                redis.start()
                faults["redis_back_at"] = time.monotonic()
            wait_until(lambda: call(cc.get, f"/v1/sessions/{sid}", ok=(200,)).json()["status"] == "ready", 60,
                       f"{sid} ready", interval=0.1)
            call(cc.delete, f"/v1/sessions/{sid}", ok=(200, 202))

    started = time.monotonic()
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(lifecycle, range(SESSIONS)))
    driven = time.monotonic() - started
    assert not w1.alive and "killed_at" in faults and "redis_back_at" in faults
    assert api.alive and stack["procs"]["w2"].alive  # both rode out the Redis restart

    # every session terminated, then every event of the log received and verified
    deadline = time.monotonic() + SETTLE_S
    listed: list[list[dict[str, Any]]] = [[]]

    def all_terminated() -> list[dict[str, Any]] | None:
        listed[0] = all_events(c)
        return listed[0] if Counter(e["type"] for e in listed[0])["session.terminated"] >= SESSIONS else None

    events = wait_until(all_terminated, SETTLE_S, "every session terminated", interval=1,
                        state=lambda: Counter(e["type"] for e in listed[0]))
    missing: list[str] = []

    def all_delivered() -> list[dict[str, Any]] | None:
        got = sandbox.webhook_deliveries(RECEIVER)
        verified = {d["webhook_id"] for d in got if d["verified"]}
        missing[:] = [e["id"] for e in events if e["id"] not in verified]
        return None if missing else got

    receipts = wait_until(all_delivered, deadline - time.monotonic(), "every event of the log delivered and verified",
                          interval=1, state=lambda: f"{len(missing)} never delivered, e.g. {missing[:5]}")
    settled = time.monotonic() - started

    # GET /v1/events lists exactly the state changes: created, ready, terminated per session
    by_session: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_session[e["data"]["session"]["id"]].append(e)
    assert set(by_session) == set(ids) and len(ids) == SESSIONS
    for sid, evs in by_session.items():
        assert [e["type"] for e in evs] == EXPECTED, (sid, [e["type"] for e in evs])
        assert [e["data"]["sequence"] for e in evs] == [1, 2, 3], sid
        assert evs[2]["data"]["session"]["status"] == "terminated"
        assert evs[2]["data"]["session"]["termination_reason"] == "requested"
    assert len({e["id"] for e in events}) == len(events) == 3 * SESSIONS

    # what the receiver got: only logged events, each verified, duplicates identical
    logged = {e["id"]: e for e in events}
    bodies: dict[str, str] = {}
    for d in receipts:
        wid = d["webhook_id"]
        assert wid in logged, f"received an event the log does not list: {wid}"
        body = json.loads(d["body"])
        assert body["id"] == wid and body == logged[wid], wid  # the body is the logged event
        if wid in bodies:
            assert d["body"] == bodies[wid], f"a duplicate of {wid} with another body"
        bodies[wid] = d["body"]
        assert d["verified"], (wid, d["error"])

    # per session, first receipts in sequence order
    first: dict[str, int] = {}
    for d in receipts:
        first.setdefault(d["webhook_id"], d["seq"])
    for sid, evs in by_session.items():
        order = [first[e["id"]] for e in evs]
        assert order == sorted(order), (sid, order)

    # the faults happened
    statuses = Counter(d["status"] for d in receipts)
    acked: set[str] = set()
    duplicates = 0  # receipts of an event that the receiver had already answered 2xx
    for d in receipts:
        duplicates += d["webhook_id"] in acked
        if d["status"] == 204:
            acked.add(d["webhook_id"])
    assert statuses[503] >= 0.2 * len(events), statuses
    assert sum(1 for d in receipts if d["delay_ms"] > 0) > 0
    c.close()
    print(f"\n{SESSIONS} sessions driven in {driven:.1f}s, all delivered {settled:.1f}s after start; "
          f"{len(receipts)} receipts for {len(events)} events ({statuses}), {duplicates} redeliveries after a 2xx")
