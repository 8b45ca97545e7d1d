"""Several processes of each kind on one Redis, started with the project's own commands:
2 APIs (`python -m broker.cli api`) and 3 workers (`python -m broker.cli worker`), against a
private redis-server and the sandbox upstreams. Bursts of concurrent requests go through both
APIs; one API is SIGKILLed in the middle of a burst and one worker while it holds in-flight
provisioning jobs.

Bound: a SIGKILLed worker's provisionings are claimed by another worker once their lease runs
out (3 s after its last renewal), so every admitted session is ready within LOSS_BOUND_S of
the kill (with a wide margin: the mint pacing of the burst comes on top).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis

from broker.embedded_redis import EmbeddedRedis
from tenants.scope import STATS_LIVE
from tests.fixtures.stack import Admin
from tests.fixtures.wait import wait_until

from .procs import BrokerProcess, broker_env, running

L_A, N_A = 8, 40          # tenant A: max_concurrent_sessions, burst size
DAY_B, N_B = 6, 20        # tenant B: sessions_per_day, burst size
MINT_LATENCY_MS = 2000    # the killed worker dies while its jobs wait on the OpenAI mint
LOSS_BOUND_S = 60
Outcome = tuple[str, int, dict[str, Any]]  # (api url, status or 0 for a connection error, body)


@pytest.fixture
def processes(
    request: pytest.FixtureRequest, redis_server: EmbeddedRedis, sandbox: Any, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    env = broker_env(redis_server.url, sandbox, BROKER_PROVISION_DEADLINE_SECONDS="90")
    procs = {
        "api1": BrokerProcess.api("api-1", env, tmp_path),
        "api2": BrokerProcess.api("api-2", env, tmp_path),
        "worker1": BrokerProcess.worker("worker-1", env, tmp_path),
        "worker2": BrokerProcess.worker("worker-2", env, tmp_path),
        "worker3": BrokerProcess.worker("worker-3", env, tmp_path),
    }
    with running(request, procs, client, start=("api1", "api2", "worker1")):
        yield {**procs, "redis": client}


def _post(url: str, key: str) -> Outcome:
    try:
        r = httpx.post(f"{url}/v1/sessions", headers={"Authorization": f"Bearer {key}"},
                       json={"ttl_seconds": 600}, timeout=20)
    except httpx.TransportError:
        return url, 0, {}
    return url, r.status_code, r.json()


def _burst(requests: list[tuple[str, str]], on_done: Any = None) -> list[Outcome]:
    done = 0
    lock = threading.Lock()

    def one(req: tuple[str, str]) -> Outcome:
        nonlocal done
        out = _post(*req)
        with lock:
            done += 1
            if on_done is not None:
                on_done(done)
        return out

    with ThreadPoolExecutor(max_workers=min(32, len(requests))) as pool:
        return list(pool.map(one, requests))


def _sessions(api: str, key: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{api}/v1/sessions", params={"limit": 100}, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    assert r.json().get("next_cursor") is None
    return data


def _wait_all(api: str, key: str, statuses: set[str], timeout: float) -> list[dict[str, Any]]:
    seen: list[list[dict[str, Any]]] = [[]]

    def reached() -> list[dict[str, Any]] | None:
        seen[0] = _sessions(api, key)
        return seen[0] if all(s["status"] in statuses for s in seen[0]) else None

    return wait_until(reached, timeout, f"every session {sorted(statuses)}", interval=0.25,
                      state=lambda: [(s["id"], s["status"], s.get("error")) for s in seen[0] if s["status"] not in statuses])


def _refusals(outcomes: list[Outcome]) -> Counter[str]:
    return Counter(o[2]["error"]["code"] for o in outcomes if o[1] == 429)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_exact_quotas_no_loss_no_leak_with_kills(processes: dict[str, Any], sandbox: Any) -> None:
    """Invariants, across 2 API and 3 worker processes with one API and one worker SIGKILLed:
    - exactness: a burst of N against a limit L admits exactly min(N, L) (concurrency limit for
      tenant A, daily quota for tenant B), counted on the server, whatever the killed API had
      answered; refusals are 429 with the quota's code;
    - no lost session: every admitted session is ready within LOSS_BOUND_S of the kills;
    - slots: after every session is deleted, usage shows 0 active and a new burst again
      admits exactly L; B's daily quota stays spent (a refusal consumes nothing);
    - no leaked upstream session: every Avaturn session ever created is deleted, and there
      are exactly as many as sessions that became ready (no orphan, no double create)."""
    started = time.monotonic()
    api1, api2, victim = processes["api1"], processes["api2"], processes["worker1"]
    sandbox.configure({"mint": {"latency_ms": MINT_LATENCY_MS}})
    admin = Admin(api2.url)
    try:
        _, key_a = admin.tenant("a", quotas={"max_concurrent_sessions": L_A, "sessions_per_minute": 1000,
                                             "sessions_per_day": 100000})
        _, key_b = admin.tenant("b", quotas={"max_concurrent_sessions": 1000, "sessions_per_minute": 1000,
                                             "sessions_per_day": DAY_B})
    finally:
        admin.close()
    # Workers 2 and 3 boot while worker 1 alone takes the burst's jobs: worker 1 is the one to kill.
    for name in ("worker2", "worker3"):
        processes[name].start()

    # Both tenants interleaved, alternating between the two APIs.
    requests = [(api1.url if i % 2 else api2.url, key_a if i % 3 else key_b) for i in range(N_A + N_B)]

    def kill_api_mid_burst(done: int) -> None:
        if done == (N_A + N_B) // 3:
            api1.kill()

    outcomes = _burst(requests, kill_api_mid_burst)
    assert not api1.alive
    by_tenant = {key_a: [o for o, r in zip(outcomes, requests, strict=True) if r[1] == key_a],
                 key_b: [o for o, r in zip(outcomes, requests, strict=True) if r[1] == key_b]}
    assert any(o[1] == 0 for o in outcomes), "the API was killed while requests were in flight"

    # worker 1's jobs are claimed, inside the 2 s mint: kill it then
    wait_until(lambda: int(processes["redis"].hget(STATS_LIVE, "provisioning") or 0) >= 1, 10,
               "worker 1 held provisioning jobs (claimed, inside the mint)")
    victim.kill()
    killed_at = time.monotonic()
    sandbox.configure({})
    for name in ("worker2", "worker3"):
        processes[name].wait_healthy()

    # Exactness, from the server's point of view (the killed API's answers may be lost).
    for key, limit, code in ((key_a, L_A, "concurrency_limit"), (key_b, DAY_B, "daily_quota_exhausted")):
        sessions = _sessions(api2.url, key)
        assert len(sessions) == limit, (len(sessions), Counter(o[1] for o in by_tenant[key]))
        accepted = {o[2]["id"] for o in by_tenant[key] if o[1] == 202}
        assert accepted <= {s["id"] for s in sessions}
        assert set(_refusals(by_tenant[key])) == {code}
        assert len(accepted) + sum(_refusals(by_tenant[key]).values()) + sum(o[1] == 0 for o in by_tenant[key]) \
            == len(by_tenant[key])
        assert all(o[1] in (0, 202, 429) for o in by_tenant[key])

    # No lost session: all ready within the bound, through the surviving processes.
    for key in (key_a, key_b):
        sessions = _wait_all(api2.url, key, {"ready"}, LOSS_BOUND_S - (time.monotonic() - killed_at))
        assert Counter(s["status"] for s in sessions) == Counter({"ready": len(sessions)}), \
            [(s["id"], s["status"], s.get("error")) for s in sessions if s["status"] != "ready"]
    assert time.monotonic() - killed_at <= LOSS_BOUND_S
    more = _burst([(api2.url, key_a)] * 5)
    assert _refusals(more) == Counter({"concurrency_limit": 5}), "still exact after the kills"

    # Delete everything; every slot comes back; the daily quota does not.
    headers = {key: {"Authorization": f"Bearer {key}"} for key in (key_a, key_b)}
    for key in (key_a, key_b):
        for s in _sessions(api2.url, key):
            assert httpx.delete(f"{api2.url}/v1/sessions/{s['id']}", headers=headers[key], timeout=10).status_code \
                in (200, 202)
        done = _wait_all(api2.url, key, {"terminated"}, 20)
        assert {s["status"] for s in done} == {"terminated"}
        usage = httpx.get(f"{api2.url}/v1/usage", headers=headers[key], timeout=10).json()
        assert usage["active_sessions"] == 0, usage
    again = _burst([(api2.url, key_a)] * 20)
    assert Counter(o[1] for o in again) == Counter({202: L_A, 429: 20 - L_A})
    assert _refusals(_burst([(api2.url, key_b)] * 5)) == Counter({"daily_quota_exhausted": 5})
    fresh = [s for s in _wait_all(api2.url, key_a, {"ready", "terminated"}, 20) if s["status"] != "terminated"]
    assert len(fresh) == L_A and {s["status"] for s in fresh} == {"ready"}
    for s in fresh:
        assert httpx.delete(f"{api2.url}/v1/sessions/{s['id']}", headers=headers[key_a], timeout=10).status_code \
            in (200, 202)
    assert {s["status"] for s in _wait_all(api2.url, key_a, {"terminated"}, 20)} == {"terminated"}

    # No leaked upstream session, no duplicate create.
    audit = sandbox.audit()
    upstream = audit["sessions"]
    assert [s for s in upstream if s["live"]] == []
    assert {s["ended_by"] for s in upstream} == {"delete"}
    assert len(upstream) == L_A + DAY_B + L_A
    assert all(p.alive for p in (api2, processes["worker2"], processes["worker3"]))
    assert time.monotonic() - started < 120
