"""10,000 live sessions expiring inside one 10 s window: lateness of their termination, and
the Redis memory each live session costs (measured just before the window opens).

The sessions are created through the API (``wait=30``, so admission, provisioning and the
scheduling of the termination (the due set) are the real ones) with per-session ``ttl_seconds`` chosen so
their ``expires_at`` spreads evenly over ``[T0, T0 + window]``."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import aiohttp

from tests.fixtures.wait import wait_until

from .load import pct
from .stack import BenchTenant, Stack


async def _create(url: str, key: str, n: int, concurrency: int, t0: float, window: float) -> tuple[list[str], int]:
    ids: list[str] = []
    failures = 0
    next_i = 0
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=aiohttp.ClientTimeout(total=60)) as http:
        async def caller() -> None:
            nonlocal next_i, failures
            while next_i < n:
                i = next_i
                next_i += 1
                target = t0 + window * (i + 0.5) / n
                ttl = max(10, round(target - time.time()))
                async with http.post(url, data=json.dumps({"ttl_seconds": ttl}), headers=headers) as resp:
                    body = await resp.json()
                    if resp.status in (201, 202):
                        ids.append(body["id"])
                    if resp.status != 201:
                        failures += 1

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return ids, failures


def _memory(stack: Stack, tenant: BenchTenant, ids: list[str], used_before: int) -> dict[str, Any]:
    used = int(stack.r.info("memory")["used_memory"])
    sample = ids[:: max(1, len(ids) // 100)]
    hashes = [int(stack.r.memory_usage(f"sb:t:{tenant.id}:s:{sid}") or 0) for sid in sample]
    return {
        "bytes_per_live_session": round((used - used_before) / len(ids)),
        "session_hash_bytes": round(sum(hashes) / len(hashes)),
        "session_hash_encoding": (stack.r.object("encoding", f"sb:t:{tenant.id}:s:{sample[0]}") or b"").decode(),
    }


def terminations(stack: Stack, n: int, window: float, create_rate_guess: float) -> dict[str, Any]:
    stack.latency(0, 0)
    tenant = stack.tenant("bench-expiry")
    stack.flush_sessions()
    used_before = int(stack.r.info("memory")["used_memory"])
    url = stack.procs["api"].url + "/v1/sessions?wait=30"
    start = time.time()
    # creating with wait=30 runs slower than one worker drains a backlog (the API shares the CPU)
    t0 = start + max(20.0, 2.2 * n / max(create_rate_guess, 50.0)) + 12.0
    ids, not_ready = asyncio.run(_create(url, tenant.key, n, 64, t0, window))
    created_s = time.time() - start
    if time.time() > t0 - 12:
        raise RuntimeError(f"creating {n} sessions took {created_s:.0f}s: the window was missed")
    # until just before the window: provisioning results (kept 10 s) are gone by now
    time.sleep(max(0.0, t0 - 2 - time.time()))
    memory = _memory(stack, tenant, ids, used_before)
    time.sleep(max(0.0, t0 + window - time.time()))  # the expiry window under measurement passes
    try:
        wait_until(lambda: not stack.r.zcard("sb:due:expiry"), 120, "every session left the due set", interval=0.1)
    except AssertionError:
        pass  # what is still not terminated is counted and reported below
    rows = stack.session_fields(tenant.id, ids, "expires_at", "terminated_at", "status", "termination_reason")
    late = [(int(t) - int(e)) / 1000 for e, t, s, _ in rows if e and t and s == "terminated"]
    expires = [int(e) / 1000 for e, *_ in rows if e]
    return {
        "sessions": n,
        "not_ready_within_30s": not_ready,
        "terminated": len(late),
        "not_terminated": len(ids) - len(late),
        "reasons": sorted({r for *_, r in rows if r}),
        "window_s": round(max(expires) - min(expires), 2) if expires else math.nan,
        "create_s": round(created_s, 1),
        "lateness_s": {"p50": round(pct(late, 50), 3), "p99": round(pct(late, 99), 3),
                       "max": round(max(late, default=math.nan), 3)},
        "memory": memory,
    }
