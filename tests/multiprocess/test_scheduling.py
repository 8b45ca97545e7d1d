"""Accepted means delivered, end to end (issue 15, CONTRACT.md section 9): the API admits
through its admission script (the mint slot reserved there), real worker processes
(``python -m broker.cli worker``) provision from the schedule, a real Redis and the sandbox
upstreams (small latencies: the properties do not depend on them).

- a burst at the default pacing is admitted whole and every session is ready at about its slot;
- 1,000 at once at 300/min: what fits is admitted and all of it ready, the rest refused 429
  provisioning_backlog with a Retry-After that works when honoured;
- a tenant's time to ready does not move while another tenant has thousands queued."""

from __future__ import annotations

import asyncio
import statistics
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
from broker.sessions.models import SessionRecord
from tests.faults.harness import Harness, wait_until
from tests.faults.ledger import Ledger
from tests.fixtures import wait
from tenants.scope import STATS_LIVE, TenantScope

pytestmark = pytest.mark.slow

MINT_MS, CREATE_MS = 20, 30  # sandbox latencies


@pytest.fixture
def harness(redis_server: EmbeddedRedis, sandbox: Any, tmp_path: Path) -> Iterator[Any]:
    made: list[Harness] = []

    def make(**overrides: Any) -> Harness:
        client = sync_redis.Redis.from_url(redis_server.url)
        client.flushall()
        client.close()
        h = Harness(redis_server.url, sandbox, tmp_path, **{"BROKER_LOG_LEVEL": "WARNING",
                                                           "BROKER_LIBRARY_LOG_LEVEL": "WARNING", **overrides})
        made.append(h.start_api())
        return h

    try:
        yield make
    finally:
        for h in made:
            h.close()


def _post_all(url: str, key: str, n: int, threads: int = 32) -> list[httpx.Response]:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30,
                      limits=httpx.Limits(max_connections=threads)) as client, \
            ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda _: client.post("/v1/sessions", json={"ttl_seconds": 600}), range(n)))


def _records(redis: sync_redis.Redis, tid: str, sids: list[str]) -> list[SessionRecord]:
    pipe = redis.pipeline(transaction=False)
    for sid in sids:
        pipe.hgetall(TenantScope(tid).session(sid))
    return [SessionRecord.from_hash(raw) for raw in pipe.execute()]


def _wait_settled(redis: sync_redis.Redis, tid: str, sids: list[str], timeout: float) -> list[SessionRecord]:
    seen: list[list[SessionRecord]] = [[]]

    def settled() -> list[SessionRecord] | None:
        seen[0] = _records(redis, tid, sids)
        return seen[0] if all(r.status not in ("queued", "provisioning") for r in seen[0]) else None

    return wait.wait_until(settled, timeout, f"{len(sids)} sessions settled", interval=0.2,
                      state=lambda: Counter(r.status for r in seen[0]))


@pytest.mark.timeout(120)
@pytest.mark.serial  # millisecond bounds: skipped under xdist, run after it (make test TEST_JOBS=2)
def test_a_burst_at_the_default_pacing_is_all_ready_each_at_its_slot(harness, sandbox: Any) -> None:
    """Invariant (the issue's first report, 150 at once at the default 300 mints/min, default
    deadline 60 s): all 150 are admitted and all become ready, none fails; the k-th admitted
    gets a slot of the tenant's pacing (a burst of 10, then one every 200 ms; nothing re-queued
    behind later sessions, no slot taken twice) and is
    ready at its slot + the upstream latency + a little (p90 of the lateness <= 50 ms, all
    within 0.5 s)."""
    h = harness(BROKER_PROVISION_DEADLINE_SECONDS=60, BROKER_UPSTREAM_TIMEOUT_SECONDS=10)
    h.worker()
    tenant, key = h.tenant("burst", quotas={"openai_requests_per_minute": 300, "max_concurrent_sessions": 1_000})
    sandbox.configure({"mint": {"latency_ms": MINT_MS}, "create": {"latency_ms": CREATE_MS}})
    answers = _post_all(h.url, key, 150)
    posted_at = int(time.time() * 1000)
    assert Counter(r.status_code for r in answers) == {202: 150}
    sids = [r.json()["id"] for r in answers]
    redis = sync_redis.Redis.from_url(h.settings.redis_url)
    try:
        recs = _wait_settled(redis, tenant["id"], sids, timeout=60)
    finally:
        redis.close()
    assert Counter(r.status for r in recs) == {"ready": 150}, Counter((r.status, r.error_code) for r in recs)
    slots = sorted(r.mint_at for r in recs)
    # the pacing (GCRA, burst 10, T = 200 ms): any k + 1 consecutive slots span >= k * T - 9 * T ...
    assert all(slots[j] - slots[i] >= (j - i) * 200 - 1_800 for i in range(150) for j in range(i + 1, 150))
    # ... and no slot is later than needed (none re-queued behind later ones, none taken twice)
    assert slots[-1] - slots[0] <= 140 * 200 + 1_000, slots[-1] - slots[0]
    lateness = sorted((r.ready_at - r.mint_at) / 1000 - (MINT_MS + CREATE_MS) / 1000 for r in recs)
    assert lateness[0] >= -0.005 and lateness[-1] <= 0.5, (lateness[0], lateness[-1])
    # Once the 150 POSTs are answered (the API, the sandbox and the 32 posting threads share this
    # test process: the first slots are served while it is flooded), p90 within 50 ms (the p99
    # target is the bench's burst-lateness row: on a shared 2-core machine a test of 150 sees a
    # few stalls of the machine itself; every session is still within 0.5 s above).
    steady = sorted((r.ready_at - r.mint_at) / 1000 - (MINT_MS + CREATE_MS) / 1000
                    for r in recs if r.mint_at >= posted_at + 200)
    assert len(steady) >= 100 and steady[int(0.9 * len(steady))] <= 0.05, (len(steady), steady[-5:])
    print(f"burst of 150 at 300/min: last slot {(slots[-1] - slots[0]) / 1000:.1f}s after the first; "
          f"ready minus slot minus upstream latency p50 {statistics.median(lateness) * 1000:.1f} ms, "
          f"max {lateness[-1] * 1000:.1f} ms; after the POSTs p90 {steady[int(0.9 * len(steady))] * 1000:.1f} ms, "
          f"p99 {steady[int(0.99 * len(steady))] * 1000:.1f} ms")


@pytest.mark.timeout(120)
def test_what_cannot_be_ready_in_time_is_refused_and_the_rest_is_delivered(harness, sandbox: Any) -> None:
    """Invariant: of 1,000 sessions posted at once at 300 mints/min (deadline 20 s, margin 4 s:
    a 16 s mint window, so 10 + 16,000/200 = 90 fit), exactly what fits is admitted and every
    admitted session becomes ready before its deadline; the rest are 429 provisioning_backlog
    with Retry-After; once the backlog has drained by Retry-After seconds, a request fits again."""
    h = harness(BROKER_PROVISION_DEADLINE_SECONDS=20)
    h.worker()
    tenant, key = h.tenant("flood", quotas={"openai_requests_per_minute": 300, "sessions_per_minute": 2_000,
                                            "max_concurrent_sessions": 2_000})
    sandbox.configure({"mint": {"latency_ms": MINT_MS}, "create": {"latency_ms": CREATE_MS}})
    started = time.monotonic()
    answers = _post_all(h.url, key, 1_000)
    took = time.monotonic() - started
    codes = Counter(r.status_code for r in answers)
    admitted = [r.json()["id"] for r in answers if r.status_code == 202]
    refused = [r for r in answers if r.status_code == 429]
    # 90 at once, and one more per 200 ms that the 1,000 POSTs themselves took
    assert codes[202] + codes[429] == 1_000 and 90 <= codes[202] <= 90 + int(took / 0.2) + 1, (codes, took)
    assert {r.json()["error"]["code"] for r in refused} == {"provisioning_backlog"}
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    redis = sync_redis.Redis.from_url(h.settings.redis_url)
    try:
        recs = _wait_settled(redis, tenant["id"], admitted, timeout=40)
        assert Counter(r.status for r in recs) == {"ready": len(admitted)}, Counter(r.error_code for r in recs)
        assert all(r.ready_at <= r.created_at + 20_000 for r in recs)
        # honour the Retry-After of a refusal made now: the request then fits
        with httpx.Client(base_url=h.url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as client:
            r = client.post("/v1/sessions", json={"ttl_seconds": 600})
            while r.status_code == 429:
                retry_after = int(r.headers["retry-after"])
                assert r.json()["error"]["code"] == "provisioning_backlog" and retry_after >= 1
                time.sleep(retry_after)
                r = client.post("/v1/sessions", json={"ttl_seconds": 600})
            assert r.status_code == 202
            assert _wait_settled(redis, tenant["id"], [r.json()["id"]], 25)[0].status == "ready"
    finally:
        redis.close()
    print(f"1,000 at once at 300/min: {len(admitted)} admitted (all ready), {len(refused)} refused")


def _times_to_ready(h: Harness, key: str, tid: str, n: int) -> tuple[list[float], list[float]]:
    """Post ``n`` sessions one after the other, each once the previous one is ready. Returns
    per session the seconds from admission to ready (the record's created_at and ready_at), and
    from admission to the start of its mint (the sandbox's record of the mint, minus its latency)."""
    led = Ledger(h.url, key, tid, h.settings.redis_url)
    try:
        for _ in range(n):
            sid = led.create(ttl=600)
            led.wait_for([sid], {"ready", "failed"}, timeout=20)
        recs = {sid: led.record(sid) for sid in led.sessions}
        assert {r.status for r in recs.values()} == {"ready"}, [r.error_code for r in recs.values()]
        label = {t.label: sid for sid, t in led.sessions.items()}
        started = {}
        for secret in h.sandbox.audit()["secrets"]:
            sid = label.get((secret.get("session") or {}).get("instructions", ""))
            if sid is not None:
                started[sid] = secret["created_at"] - MINT_LATENCY_S - recs[sid].created_at / 1000
        return [(r.ready_at - r.created_at) / 1000 for r in recs.values()], list(started.values())
    finally:
        led.close()


async def _admit_many(h: Harness, tid: str, n: int) -> None:
    """``n`` sessions of one tenant through the API's own admission (SessionService.create, the
    admission script), without HTTP: 5,000 POSTs would take longer than the test."""
    from broker.core.redis_client import create_redis
    from broker.sessions.jobs import JobQueue, new_arq_redis
    from broker.sessions.models import CreateSessionRequest
    from broker.sessions.repository import SessionRepository
    from broker.sessions.service import SessionService
    from tenants.crypto import CredentialCipher
    from tenants.service import TenantService

    redis = create_redis(h.settings)
    try:
        cipher = CredentialCipher(h.settings.secret_keys)
        service = SessionService(SessionRepository(redis), JobQueue(new_arq_redis(redis.connection_pool)),
                                 provision_deadline_s=h.settings.provision_deadline_seconds,
                                 mint_window_s=h.settings.mint_window_seconds(), cipher=cipher)
        tenant = await TenantService(redis, cipher).get(tid)
        for start in range(0, n, 250):
            await asyncio.gather(*(service.create(tenant, CreateSessionRequest(ttl_seconds=600), body=b"{}",
                                                  idempotency_key=None) for _ in range(min(250, n - start))))
    finally:
        await redis.aclose()


MINT_LATENCY_S = 0.1
NOISY_QUOTAS = {"sessions_per_minute": 100_000, "max_concurrent_sessions": 100_000, "sessions_per_day": 100_000}


def _p(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))]


def _noisy_neighbour(harness: Any, sandbox: Any, *, a_per_minute: int, max_jobs: int) -> dict[str, Any]:
    h = harness(BROKER_PROVISION_DEADLINE_SECONDS=60, BROKER_WORKER_MAX_JOBS=max_jobs)
    h.worker()
    tenant_a, _ = h.tenant("noisy", quotas={"openai_requests_per_minute": a_per_minute, **NOISY_QUOTAS})
    tenant_b, key_b = h.tenant("quiet")
    sandbox.configure({"mint": {"latency_ms": int(MINT_LATENCY_S * 1000)}, "create": {"latency_ms": 150}})
    alone, alone_start = _times_to_ready(h, key_b, tenant_b["id"], 20)
    redis = sync_redis.Redis.from_url(h.settings.redis_url)
    try:
        asyncio.run(_admit_many(h, tenant_a["id"], 5_000))
        wait_until(lambda: int(redis.hget(STATS_LIVE, "provisioning") or 0) >= 5, 10, "A's sessions running")
        backlog_before = int(redis.zcard(TenantScope(tenant_a["id"]).provision_schedule()))
        beside, beside_start = _times_to_ready(h, key_b, tenant_b["id"], 20)
        backlog_after = int(redis.zcard(TenantScope(tenant_a["id"]).provision_schedule()))
        running = int(redis.hget(STATS_LIVE, "provisioning") or 0)
    finally:
        redis.close()
    assert backlog_after >= 1_000, (backlog_before, backlog_after)  # A had thousands queued the whole time
    return {"alone": alone, "beside": beside, "alone_start": alone_start, "beside_start": beside_start,
            "backlog": (backlog_before, backlog_after), "running": running}


@pytest.mark.timeout(150)
@pytest.mark.serial  # millisecond bounds: skipped under xdist, run after it (make test TEST_JOBS=2)
def test_a_tenants_time_to_ready_does_not_move_while_another_has_thousands_queued(harness, sandbox: Any) -> None:
    """Invariant (CONTRACT 9, fair across tenants, workers with free capacity): tenant B's time
    to ready (20 sessions, one after the other) while tenant A has 5,000 sessions queued at a
    high mint rate (100/s, their slots over the next 50 s) is within 100 ms of B's alone
    (median; 250 ms at the 90th percentile): B's due session is claimed at its slot, not behind A's
    backlog (one FIFO queue made B wait for all of A's sessions before it)."""
    got = _noisy_neighbour(harness, sandbox, a_per_minute=6_000, max_jobs=500)
    alone, beside = got["alone"], got["beside"]
    # the median within the contract's 100 ms; the 90th percentile (the 18th of 20) within 250 ms, as
    # the two cores also run A's 100 provisionings a second here (a FIFO queue made it tens of seconds)
    for q, bound in ((0.5, 0.1), (0.9, 0.25)):
        assert _p(beside, q) - _p(alone, q) <= bound, (q, _p(alone, q), _p(beside, q))
    print(f"noisy neighbour (free capacity): B's time to ready p50 {_p(alone, 0.5) * 1000:.0f} ms alone, "
          f"{_p(beside, 0.5) * 1000:.0f} ms beside A's backlog {got['backlog']}; "
          f"p90 {_p(alone, 0.9) * 1000:.0f} / {_p(beside, 0.9) * 1000:.0f} ms")


@pytest.mark.timeout(150)
@pytest.mark.serial  # millisecond bounds: skipped under xdist, run after it (make test TEST_JOBS=2)
def test_a_saturated_worker_shares_its_slots_round_robin(harness, sandbox: Any) -> None:
    """Invariant (CONTRACT 9, workers saturated): with A's 5,000 sessions due at once (1,000
    mints/s) and the worker's 10 slots all busy with A's 250 ms attempts, B's session is started
    at the first slot that frees (within one attempt's duration + 200 ms of its admission), not
    after A's backlog (minutes at 40 sessions/s)."""
    got = _noisy_neighbour(harness, sandbox, a_per_minute=60_000, max_jobs=10)
    assert got["running"] == 10  # saturated by A
    assert max(got["beside_start"]) <= 0.25 + 0.2, sorted(got["beside_start"])
    print(f"saturated worker: B's wait for a slot p50 {_p(got['beside_start'], 0.5) * 1000:.0f} ms, "
          f"max {max(got['beside_start']) * 1000:.0f} ms (attempts of 250 ms; alone "
          f"{_p(got['alone_start'], 0.5) * 1000:.0f} ms); A's backlog {got['backlog']}")
