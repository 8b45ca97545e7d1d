"""Admission latency with 10 and with 10,000 tenants, at the same request rate.

The 10,000 tenants (and one key each) are created through the admin API; every key is used
once before the timed run (as a live deployment's would be). Run with the worker paused, like
the admission runs; the sessions are flushed afterwards."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from .baselines import SESSION
from .load import fixed_rate, merge
from .scenarios import CREATE_BODY, SAT_SECONDS
from .stack import Stack

SLICES = 4  # alternating slices of SAT_SECONDS / SLICES each (see tenants_scaling)
QUOTAS = {"sessions_per_minute": 100_000, "max_concurrent_sessions": 100_000, "sessions_per_day": 10_000_000,
          "max_session_seconds": 7200, "openai_requests_per_minute": 100_000}


async def _make_tenants(api: str, admin_token: str, n: int, concurrency: int = 32) -> list[str]:
    keys: list[str] = []
    headers = {"Authorization": f"Bearer {admin_token}"}
    counter = 0
    async with aiohttp.ClientSession(base_url=api, headers=headers,
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        async def one() -> None:
            nonlocal counter
            while counter < n:
                i = counter
                counter += 1
                async with http.post("/admin/v1/tenants", json={"name": f"scale-{i}", "quotas": QUOTAS,
                                                                "openai": {"session": SESSION}}) as r:
                    r.raise_for_status()
                    tid = (await r.json())["id"]
                async with http.post(f"/admin/v1/tenants/{tid}/keys") as k:
                    k.raise_for_status()
                    keys.append((await k.json())["key"])

        await asyncio.gather(*(one() for _ in range(concurrency)))
    return keys


async def _touch_all(url: str, keys: list[str], concurrency: int = 64) -> None:
    counter = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        async def one() -> None:
            nonlocal counter
            while counter < len(keys):
                key = keys[counter]
                counter += 1
                async with http.post(url, data=CREATE_BODY, headers={"Authorization": f"Bearer {key}",
                                                                     "Content-Type": "application/json"}) as r:
                    await r.read()

        await asyncio.gather(*(one() for _ in range(concurrency)))


def _settle(stack: Stack, timeout: float = 60.0) -> None:
    """Wait until Redis has no AOF rewrite or snapshot running: creating 10,000 tenants and
    touching their keys grows the AOF enough to start a rewrite, whose fork and disk writes
    would land on whichever timed slice comes next."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = stack.r.info("persistence")
        if not info.get("aof_rewrite_in_progress") and not info.get("rdb_bgsave_in_progress") \
                and not info.get("aof_rewrite_scheduled"):
            return
        time.sleep(0.2)


def tenants_scaling(stack: Stack, n_many: int, rate: float) -> dict[str, Any]:
    api = stack.procs["api"].url
    url = api + "/v1/sessions"
    keys = asyncio.run(_make_tenants(api, stack.admin_token, n_many))
    few = keys[:10]
    out: dict[str, Any] = {"rate": round(rate), "tenants_many": len(keys)}
    asyncio.run(_touch_all(url, keys))  # every key used once (the 10 among them)
    _settle(stack)
    # 10 and N tenants in alternating slices (10, N, 10, N...): run one after the other, the first
    # run also absorbed what followed creating the 10,000 tenants (Redis's AOF rewrite, the
    # tenant-change messages), and the 10-tenant p99 came out above the 10,000-tenant one.
    few_runs, many_runs = [], []
    for _ in range(SLICES):
        few_runs.append(fixed_rate(url, few, rate, method="POST", body=CREATE_BODY, seconds=SAT_SECONDS / SLICES))
        many_runs.append(fixed_rate(url, keys, rate, method="POST", body=CREATE_BODY, seconds=SAT_SECONDS / SLICES))
    out["tenants_10"] = merge(few_runs).as_dict()
    out["tenants_10000"] = merge(many_runs).as_dict()
    out["tenants_10"]["slices_p99_ms"] = [round(r.p99, 3) for r in few_runs]
    out["tenants_10000"]["slices_p99_ms"] = [round(r.p99, 3) for r in many_runs]
    stack.flush_sessions()
    return out
