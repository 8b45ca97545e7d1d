"""Budgets end to end (issue 21) with the project's own processes: 2 API processes and a
worker process (``python -m broker.cli api|worker``), real Redis, the sandbox upstreams."""

from __future__ import annotations

import argparse
import io
import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis

from broker.cli_usage import export
from broker.embedded_redis import EmbeddedRedis
from tests.fixtures.stack import Admin, make_settings, tenant_client, wait_status

from .procs import BrokerProcess, broker_env, running

LATENESS_S = 1  # the expiry machinery's p99 lateness bound (CONTRACT.md, docs/performance.md)


@pytest.fixture
def processes(
    request: pytest.FixtureRequest, redis_server: EmbeddedRedis, sandbox: Any, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    env = broker_env(redis_server.url, sandbox)
    procs = {
        "api1": BrokerProcess.api("api-1", env, tmp_path),
        "api2": BrokerProcess.api("api-2", env, tmp_path),
        "worker": BrokerProcess.worker("worker-1", env, tmp_path),
    }
    with running(request, procs, client):
        yield {**procs, "redis": client, "settings": make_settings(redis_server.url, sandbox)}


def _ms(iso: str) -> int:
    return round(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def _billable(session: dict[str, Any]) -> int:
    """ready_at -> terminated_at in whole seconds, rounded up; 0 if never ready (CONTRACT.md 10)."""
    if not session["ready_at"]:
        return 0
    return -(-(_ms(session["terminated_at"]) - _ms(session["ready_at"])) // 1000)


def _post(url: str, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + "/v1/sessions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_two_api_processes_reserve_exactly_the_budget_and_a_stop_returns_the_rest(processes: dict[str, Any]) -> None:
    """Invariants: 50 parallel requests of 60 s through 2 API processes against 600 s admit
    exactly 10 (40 answers 402 budget_exhausted with budget/limit/used/reserved/period_end and
    Retry-After until the month ends); both processes report the same budget; stopping a
    session returns its unused seconds at once (the next request is admitted); the usage
    history, the admin usage and the CLI export sum to the sessions' billable seconds."""
    api1, api2 = processes["api1"], processes["api2"]
    admin = Admin(api1.url)
    try:
        tenant, key = admin.tenant("budgeted", quotas={"session_seconds_per_month": 600, "max_concurrent_sessions": 100})
    finally:
        admin.close()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: _post(api1.url if i % 2 else api2.url, key, {"ttl_seconds": 60}), range(50)))
    codes = Counter(a.status_code for a in answers)
    assert codes == {202: 10, 402: 40}, codes
    refusal = next(a for a in answers if a.status_code == 402)
    err = refusal.json()["error"]
    assert err["code"] == "budget_exhausted"
    assert (err["budget"], err["limit"], err["used"], err["reserved"]) == ("session_seconds_per_month", 600, 0, 600)
    now = datetime.now(UTC)
    next_month = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
    assert err["period_end"] == next_month.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert abs(int(refusal.headers["retry-after"]) - (next_month - now).total_seconds()) < 60
    views = []
    for api in (api1, api2):
        with tenant_client(api.url, key) as c:
            views.append(c.get("/v1/usage").json()["budgets"]["session_seconds_per_month"])
    assert views[0] == views[1]
    assert (views[0]["limit"], views[0]["used"], views[0]["reserved"], views[0]["remaining"]) == (600, 0, 600, 0)

    admitted = [a.json()["id"] for a in answers if a.status_code == 202]
    with tenant_client(api1.url, key) as c:
        wait_status(c, admitted[0], {"ready"}, timeout=30)
        assert c.delete(f"/v1/sessions/{admitted[0]}").status_code in (200, 202)
        ended = wait_status(c, admitted[0], {"terminated"}, timeout=30)
        assert ended["billable_seconds"] == _billable(ended) <= 60
        again = c.post("/v1/sessions", json={"ttl_seconds": 60})
        assert again.status_code == 202, again.text  # the unused part came back with the stop
        admitted.append(again.json()["id"])
        for sid in admitted:
            c.delete(f"/v1/sessions/{sid}")
        done = [wait_status(c, sid, {"terminated", "failed"}, timeout=60) for sid in admitted]
        assert [s["billable_seconds"] for s in done] == [_billable(s) for s in done]
        bills = [s["billable_seconds"] for s in done]
        usage = c.get("/v1/usage").json()["budgets"]["session_seconds_per_month"]
        assert (usage["used"], usage["reserved"]) == (sum(bills), 0)
        day = now.strftime("%Y-%m-%d")
        hist = c.get(f"/v1/usage/history?from={day}&to={day}&granularity=hour")
        assert hist.status_code == 200, hist.text
        assert sum(w["billable_seconds"] for w in hist.json()["data"]) == sum(bills)
        assert sum(w["sessions"] for w in hist.json()["data"]) == 11
        bad = c.get(f"/v1/usage/history?from={day}&to=2099-01-01&granularity=hour")
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "to"
    admin = Admin(api2.url)
    try:
        rows = admin.http.get(f"/admin/v1/usage?from={day}&to={day}&granularity=day").json()["data"]
    finally:
        admin.close()
    assert [(r["tenant_id"], r["sessions"], r["billable_seconds"]) for r in rows] == [(tenant["id"], 11, sum(bills))]
    out = io.StringIO()
    args = argparse.Namespace(date_from=day, date_to=day, tenant=None, format="ndjson")
    import asyncio

    assert asyncio.run(export(processes["settings"], args, out)) == 0
    assert [json.loads(line) for line in out.getvalue().splitlines()] == rows


def test_a_session_cut_to_the_budget_ends_at_its_cut_expiry(processes: dict[str, Any]) -> None:
    """Invariant: with 30 s of the budget left, a 60 s request is admitted cut to 30 s
    (ttl_limited_by=budget, expires_at = ready_at + 30 s); the worker process ends it as
    expired and it bills at most 30 s + the lateness bound (+1 for rounding up)."""
    api = processes["api1"]
    admin = Admin(api.url)
    try:
        _, key = admin.tenant("thirty", quotas={"session_seconds_per_month": 90})
    finally:
        admin.close()
    with tenant_client(api.url, key) as c:
        assert c.post("/v1/sessions", json={"ttl_seconds": 60}).status_code == 202
        r = c.post("/v1/sessions", json={"ttl_seconds": 60})
        assert r.status_code == 202, r.text
        assert r.json()["ttl_limited_by"] == "budget"
        ready = wait_status(c, r.json()["id"], {"ready"}, timeout=30)
        ready_at = datetime.fromisoformat(ready["ready_at"].replace("Z", "+00:00"))
        expires_at = datetime.fromisoformat(ready["expires_at"].replace("Z", "+00:00"))
        assert (expires_at - ready_at).total_seconds() == 30
        t0 = time.monotonic()
        ended = wait_status(c, r.json()["id"], {"terminated"}, timeout=60)
        assert time.monotonic() - t0 < 40
        assert ended["termination_reason"] == "expired"
        assert 30 <= ended["billable_seconds"] == _billable(ended) <= 30 + LATENESS_S + 1
        assert c.post("/v1/sessions", json={"ttl_seconds": 60}).status_code == 402
