"""Exactness under real concurrency: 4 OS processes (multiprocessing 'spawn'), released
together by a Redis barrier, each fire their admissions concurrently (asyncio.gather over
their own connection pool) at one tenant. N parallel requests against a limit L admit
exactly min(N, L) - for the concurrency, per-minute, per-day and per-end-user caps - and
replays of one Idempotency-Key from every process create exactly one session."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections import Counter
from collections.abc import Iterator
from multiprocessing.pool import Pool
from typing import Any

import msgspec
import pytest
import redis
import redis.asyncio as aioredis

from tenants.admission import AdmissionRequest, Admitted, Refused, Replayed, admit
from tenants.budgets import BudgetExhausted
from tenants.models import Quotas
from tenants.scope import TenantScope
from tests.fixtures.wait import wait_until

PROCS = 4
PER_PROC = 12
N_TOTAL = PROCS * PER_PROC
NOW = 1_795_000_000_000
BIG = 1_000_000


async def _fire(
    url: str, tenant: str, quotas: dict[str, Any], proc: int, idem: bool, end_user: str | None
) -> list[list[str]]:
    client = aioredis.Redis.from_url(url)
    try:
        await client.incr(f"test:ready:{tenant}")
        if await client.blpop([f"test:go:{tenant}"], timeout=30) is None:
            raise RuntimeError("barrier never opened")
        q = msgspec.convert(quotas, Quotas)
        reqs = [
            AdmissionRequest(
                tenant_id=tenant,
                session_id=f"ses_{proc}_{i}",
                now_ms=NOW + i,
                quotas=q,
                end_user=end_user,
                idempotency_digest="f" * 64 if idem else None,
                body_digest="same-body" if idem else None,
                session_fields={"id": f"ses_{proc}_{i}", "status": "queued"},
                lease_until_ms=NOW + 600_000,
                mint_window_ms=30_000,
            )
            for i in range(PER_PROC)
        ]
        outs = await asyncio.gather(*(admit(client, r) for r in reqs))
    finally:
        await client.aclose()
    result = []
    for out in outs:
        if isinstance(out, Admitted):
            result.append(["admitted", out.session_id])
        elif isinstance(out, Refused):
            result.append(["refused", out.code])
        elif isinstance(out, Replayed):
            result.append(["replayed", out.session_id])
        elif isinstance(out, BudgetExhausted):
            result.append(["refused", "budget_exhausted"])
        else:
            result.append(["key_reused", ""])
    return result


def fire(url: str, tenant: str, quotas: dict[str, Any], proc: int, idem: bool, end_user: str | None) -> list[list[str]]:
    """Entry point of one worker process."""
    return asyncio.run(_fire(url, tenant, quotas, proc, idem, end_user))


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(PROCS) as p:
        yield p
        p.close()
        p.join()


def run_all(
    pool: Pool, url: str, tenant: str, quotas: dict[str, Any], *, idem: bool = False, end_user: str | None = None
) -> list[list[str]]:
    sync = redis.Redis.from_url(url)
    try:
        pending = pool.starmap_async(
            fire, [(url, tenant, quotas, p, idem, end_user) for p in range(PROCS)], chunksize=1
        )
        wait_until(lambda: int(sync.get(f"test:ready:{tenant}") or 0) >= PROCS, 60, "every worker process started",
                   interval=0.01)
        sync.rpush(f"test:go:{tenant}", *["go"] * PROCS)
        per_proc = pending.get(timeout=60)
    finally:
        sync.close()
    return [item for proc in per_proc for item in proc]


def big(**kw: int | str) -> dict[str, Any]:
    q: dict[str, Any] = {
        "sessions_per_minute": BIG,
        "sessions_per_day": BIG,
        "max_concurrent_sessions": BIG,
        "max_sessions_per_end_user": BIG,
    }
    q.update(kw)
    return q


@pytest.fixture
def url(redis_url: str) -> str:
    sync = redis.Redis.from_url(redis_url)
    sync.flushall()
    sync.close()
    return redis_url


@pytest.mark.parametrize(
    ("quota", "limit", "code"),
    [
        ("max_concurrent_sessions", 7, "concurrency_limit"),
        ("sessions_per_minute", 11, "rate_limited"),
        ("sessions_per_day", 5, "daily_quota_exhausted"),
        ("max_sessions_per_end_user", 3, "end_user_limit"),
        ("max_concurrent_sessions", 100, "concurrency_limit"),
    ],
)
def test_parallel_admissions_are_exact(pool: Pool, url: str, quota: str, limit: int, code: str) -> None:
    """Invariant: with N parallel requests from 4 processes against limit L, exactly
    min(N, L) are admitted, every other one is refused with that quota's code, and Redis
    holds exactly the admitted sessions (hashes, index, leases, rate log, day counter)."""
    tenant = f"ten_{quota}_{limit}".replace("_", "")
    end_user = "u1" if quota == "max_sessions_per_end_user" else None
    results = run_all(pool, url, tenant, big(**{quota: limit}), end_user=end_user)
    assert len(results) == N_TOTAL
    kinds = Counter(kind for kind, _ in results)
    expected = min(N_TOTAL, limit)
    assert kinds["admitted"] == expected
    refusals = Counter(v for k, v in results if k == "refused")
    expected_refusals = {code: N_TOTAL - expected} if expected < N_TOTAL else {}
    assert refusals == expected_refusals
    admitted = {v for k, v in results if k == "admitted"}
    sync = redis.Redis.from_url(url)
    try:
        s = TenantScope(tenant)
        assert {m.decode() for m in sync.zrange(s.live(), 0, -1)} == admitted
        assert {m.decode() for m in sync.zrange(s.sessions_index(), 0, -1)} == admitted
        assert {m.decode() for m in sync.zrange(s.rate_bucket(), 0, -1)} == admitted
        assert int(sync.get(s.day_counter("20261118")) or 0) == expected
        assert len(sync.keys(s.session("*"))) == expected
        if end_user:
            assert {m.decode() for m in sync.zrange(s.end_user(end_user), 0, -1)} == admitted
    finally:
        sync.close()


def test_parallel_replays_create_one_session(pool: Pool, url: str) -> None:
    """Invariant: one Idempotency-Key sent with the same body by 48 parallel requests from
    4 processes creates exactly one session; every other request replays that session's
    id; quota is consumed once."""
    tenant = "tenreplay"
    results = run_all(pool, url, tenant, big(), idem=True)
    kinds = Counter(kind for kind, _ in results)
    assert kinds == {"admitted": 1, "replayed": N_TOTAL - 1}
    (first,) = [v for k, v in results if k == "admitted"]
    assert {v for k, v in results if k == "replayed"} == {first}
    sync = redis.Redis.from_url(url)
    try:
        s = TenantScope(tenant)
        assert sync.keys(s.session("*")) == [s.session(first).encode()]
        assert sync.zcard(s.live()) == 1 and sync.zcard(s.rate_bucket()) == 1
        assert sync.get(s.day_counter("20261118")) == b"1"
    finally:
        sync.close()


@pytest.mark.parametrize("budget", [600, 590])
def test_parallel_admissions_never_reserve_more_than_the_budget(pool: Pool, url: str, budget: int) -> None:
    """Invariant (issue 21): 48 requests of 60 s from 4 processes against a monthly budget B
    reserve exactly B (10 full sessions, or 9 and one cut to the rest), every other request is
    refused budget_exhausted, and the sessions' ttl_seconds sum to the reserved seconds."""
    tenant = f"tenbudget{budget}"
    results = run_all(pool, url, tenant, big(max_session_seconds=60, session_seconds_per_month=budget))
    admitted = [sid for kind, sid in results if kind == "admitted"]
    assert len(admitted) == -(-budget // 60)
    assert Counter(code for kind, code in results if kind == "refused") == {"budget_exhausted": N_TOTAL - len(admitted)}
    sync = redis.Redis.from_url(url)
    try:
        scope = TenantScope(tenant)
        ttls = [int(sync.hget(scope.session(sid), "ttl_seconds") or 0) for sid in admitted]
        reserved = sync.hget(scope.budget_month("202611"), "reserved")
    finally:
        sync.close()
    assert sum(ttls) == budget == int(reserved or 0)
    assert sorted(ttls)[0] == (60 if budget % 60 == 0 else budget % 60)
