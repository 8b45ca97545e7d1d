"""Admission latency with 10 and with 10,000 tenants, at the same request rate.

The 10,000 tenants (and one key each) are created through the admin API; every key is used
once before the timed run (as a live deployment's would be). Run with the worker paused, like
the admission runs; the sessions are flushed afterwards."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from .baselines import SESSION
from .load import fixed_rate
from .scenarios import CREATE_BODY, SAT_SECONDS
from .stack import Stack

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


def tenants_scaling(stack: Stack, n_many: int, rate: float) -> dict[str, Any]:
    api = stack.procs["api"].url
    url = api + "/v1/sessions"
    keys = asyncio.run(_make_tenants(api, stack.admin_token, n_many))
    few = keys[:10]
    out: dict[str, Any] = {"rate": round(rate), "tenants_many": len(keys)}
    asyncio.run(_touch_all(url, few))
    out["tenants_10"] = fixed_rate(url, few, rate, method="POST", body=CREATE_BODY, seconds=SAT_SECONDS).as_dict()
    asyncio.run(_touch_all(url, keys))
    out["tenants_10000"] = fixed_rate(url, keys, rate, method="POST", body=CREATE_BODY,
                                      seconds=SAT_SECONDS).as_dict()
    stack.flush_sessions()
    return out
