"""The provisioning scheduler's rows (issue 15): a noisy neighbour, the lateness of a burst's
sessions against their mint slots, and the takeover of a SIGKILLed worker's provisionings.
Real processes (the stack's API and worker), the sandbox's upstreams, 300 + 500 ms."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.fixtures.wait import wait_until

from .load import closed_loop
from .scenarios import _dist, _ms
from .stack import Stack

MINT_MS, CREATE_MS = 300, 500
LEASE_S = 3.0  # workers.jobs.claim.HELD_LEASE_MS


def _pending(stack: Stack) -> int:
    return sum(int(v or 0) for v in stack.r.hmget("sb:stats:live", "queued", "provisioning"))


def _wait_pending(stack: Stack, at_most: int, timeout: float) -> None:
    wait_until(lambda: _pending(stack) <= at_most, timeout, f"at most {at_most} sessions pending", interval=0.05)


def _b_times(stack: Stack, key: str, total: int, concurrency: int) -> dict[str, Any]:
    url = stack.procs["api"].url + "/v1/sessions?wait=30"
    answers, _ = asyncio.run(closed_loop(url, [key], total, concurrency, {"ttl_seconds": 3600},
                                         stagger=(MINT_MS + CREATE_MS) / 1000))
    ready = [a for a in answers if a.status == 201]
    ttr = [_ms(a.body.get("ready_at")) - _ms(a.body.get("created_at")) for a in ready]
    return {"ok": len(ready), "failed": len(answers) - len(ready), "time_to_ready_ms": _dist(ttr)}


def noisy_neighbour(stack: Stack, a_sessions: int = 5_000, b_sessions: int = 200) -> dict[str, Any]:
    """Tenant B's time to ready (``b_sessions`` from 10 callers waiting for ready) alone, then
    while tenant A has ``a_sessions`` queued at 6,000 mints/min (admitted just before, their
    slots 10 ms apart: A keeps the worker busy the whole time B is measured)."""
    stack.latency(MINT_MS, CREATE_MS)
    b = stack.tenant("bench-quiet")
    a = stack.tenant("bench-noisy", openai_requests_per_minute=6_000)
    alone = _b_times(stack, b.key, b_sessions, 10)
    _wait_pending(stack, 0, 60)
    url = stack.procs["api"].url + "/v1/sessions"
    answers, took = asyncio.run(closed_loop(url, [a.key], a_sessions, 64, {"ttl_seconds": 3600}))
    admitted = sum(1 for x in answers if x.status == 202)
    backlog_before = _pending(stack)
    beside = _b_times(stack, b.key, b_sessions, 10)
    backlog_after = _pending(stack)
    stack.flush_sessions()
    return {"alone": alone, "beside": beside, "a_admitted": admitted, "a_admission_s": round(took, 1),
            "a_pending_before": backlog_before, "a_pending_after": backlog_after}


def burst_lateness(stack: Stack, n: int = 1_000, per_minute: int = 6_000) -> dict[str, Any]:
    """``n`` sessions posted at once (64 callers) at ``per_minute`` mints/min: each session's
    ready_at minus its mint slot minus the injected upstream latency."""
    stack.latency(MINT_MS, CREATE_MS)
    t = stack.tenant("bench-burst", openai_requests_per_minute=per_minute)
    url = stack.procs["api"].url + "/v1/sessions"
    answers, took = asyncio.run(closed_loop(url, [t.key], n, 64, {"ttl_seconds": 3600}))
    ids = [x.body["id"] for x in answers if x.status == 202]
    _wait_pending(stack, 0, 120)
    rows = stack.session_fields(t.id, ids, "status", "mint_at", "ready_at")
    late = [int(r[2]) - int(r[1]) - (MINT_MS + CREATE_MS) for r in rows if r[0] == "ready"]
    slots = sorted(int(r[1]) for r in rows if r[1])
    stack.flush_sessions()
    return {"admitted": len(ids), "ready": len(late), "posting_s": round(took, 1),
            "slot_span_s": round((slots[-1] - slots[0]) / 1000, 1) if slots else 0.0,
            "lateness_ms": _dist([float(x) for x in late])}


def takeover(stack: Stack, n: int = 20) -> dict[str, Any]:
    """A second worker process beside the first; the second paused (SIGSTOP) while ``n``
    sessions are admitted, so the first claims them all, inside a 5 s mint; SIGKILL of the
    first, the second resumed, upstreams back to 0 ms: seconds from the kill to each ready."""
    stack.sandbox.configure({"mint": {"latency_ms": 5_000}})
    t = stack.tenant("bench-takeover")
    second = stack.start_worker("worker_takeover")
    second.pause()
    first = stack.procs["worker"]
    try:
        url = stack.procs["api"].url + "/v1/sessions"
        answers, _ = asyncio.run(closed_loop(url, [t.key], n, n, {"ttl_seconds": 3600}))
        ids = [x.body["id"] for x in answers if x.status == 202]
        wait_until(lambda: int(stack.r.hget("sb:stats:live", "provisioning") or 0) >= len(ids), 10,
                   "the first worker claimed the sessions")
        time.sleep(1.5)  # the claims live past a renewal before the kill: the takeover measured is a lapse
        first.popen.kill()
        killed_at = time.time() * 1000
        first.popen.wait()
        stack.procs.pop("worker")
        stack.latency(0, 0)
        second.resume()
        _wait_pending(stack, 0, 30)
        rows = stack.session_fields(t.id, ids, "status", "ready_at")
        after = [(int(r[1]) - killed_at) / 1000 for r in rows if r[1]]
    finally:
        second.resume()
    stack.procs["worker"] = stack.procs.pop("worker_takeover")  # the survivor is the worker from now on
    stack.flush_sessions()
    return {"sessions": n, "ready": len(after), "seconds_after_kill": _dist(after),
            "bound_s": LEASE_S + 1}


def run(stack: Stack, m: dict[str, Any]) -> None:
    m["noisy_neighbour"] = noisy_neighbour(stack)
    m["burst_lateness"] = burst_lateness(stack)
    m["takeover"] = takeover(stack)

