"""Issue 20's two bench rows.

- Admission throughput of a tenant with one webhook endpoint against a tenant without, in the
  same run, in alternating saturation slices (as the admission row: whatever else the machine
  does weighs on both alike), the worker paused: the API's own cost of a tenant with an
  endpoint (the outbox write rides on the admission script either way).
- Delivery lateness (event recorded -> the receiver got it) at ~300 events/s with one worker:
  sessions admitted at 150/s with 0 ms upstreams each record ``session.created`` and
  ``session.ready``; the sandbox's receiver (verifying, never failing) records when each
  delivery arrived; lateness = arrival - the event's ``created_at``. A 2 s warm-up at the same
  rate, delivered before the measured 10 s, lets the worker open its connections first.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import httpx

from tests.fixtures.wait import wait_until

from .load import RunStats, fixed_rate, merge, pct, saturate
from .scenarios import CREATE_BODY
from .stack import BenchTenant, Stack

EVENTS_PER_S = 300
ADMISSION_SLICES = 8                      # per side
ADMISSION_SLICE_S = 1.5
LATENESS_SECONDS = 10.0
WARMUP_S = 2.0
DELIVERY_WAIT_S = 60.0


def _endpoint(stack: Stack, tenant: BenchTenant, receiver: str) -> str:
    """Registers the sandbox receiver ``receiver`` for ``tenant`` (the real API) with its secret."""
    api = stack.procs["api"].url
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {tenant.key}"}, timeout=30) as c:
        made = c.post("/v1/webhook_endpoints", json={"url": stack.sandbox.webhook_url(receiver)})
        made.raise_for_status()
    stack.sandbox.configure_webhooks(receiver, {"secrets": [made.json()["secret"]]})
    return str(made.json()["id"])


def admission_with_endpoint(stack: Stack, worker: str = "worker") -> dict[str, Any]:
    """POST /v1/sessions at saturation for a tenant with one webhook endpoint and for one
    without, alternating slices, the worker paused (no delivery competes for the CPU)."""
    without = stack.tenant("bench-no-webhook")
    with_ep = stack.tenant("bench-webhook")
    _endpoint(stack, with_ep, "bench-admission")
    url = stack.procs["api"].url + "/v1/sessions"
    proc = stack.procs[worker]
    proc.pause()
    try:
        saturate(url, [without.key], method="POST", body=CREATE_BODY, seconds=2)  # warm-ups
        saturate(url, [with_ep.key], method="POST", body=CREATE_BODY, seconds=2)
        plain: list[RunStats] = []
        hooked: list[RunStats] = []
        # ABBA order in short slices: the machine's speed drifts (other processes on 2 shared cores
        # moved one side's 2 s slices from 1,800 to 3,500 req/s within a run); each side gets as
        # many first and second places, and the drift within a pair cancels
        for i in range(ADMISSION_SLICES):
            order = [(plain, without.key), (hooked, with_ep.key)]
            for runs, key in order if i % 2 == 0 else reversed(order):
                runs.append(saturate(url, [key], method="POST", body=CREATE_BODY, seconds=ADMISSION_SLICE_S))
    finally:
        proc.resume()
    # the queued sessions, their events and both endpoints go: the lateness run starts clean
    stack.flush_sessions()
    return {"without": merge(plain).as_dict(), "with_endpoint": merge(hooked).as_dict(),
            "slices_rps": {"without": [round(r.rps, 1) for r in plain], "with_endpoint": [round(r.rps, 1) for r in hooked]}}


def _ms(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp() * 1000


def delivery_lateness(stack: Stack, events_per_s: float = EVENTS_PER_S, seconds: float = LATENESS_SECONDS) -> dict[str, Any]:
    """Sessions admitted at ``events_per_s / 2`` per second (two events each: created, ready) for
    ``seconds``, one worker; lateness of each event's first 2xx delivery to the sandbox receiver."""
    stack.latency(0, 0)
    tenant = stack.tenant("bench-lateness")
    receiver = "bench-lateness"
    _endpoint(stack, tenant, receiver)
    url = stack.procs["api"].url + "/v1/sessions"
    api = stack.procs["api"].url
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {tenant.key}"}, timeout=30) as c:
        # warm-up at the same rate, delivered before the measured run: the worker's first POSTs to
        # a new endpoint open its connections (the first second's median was 370 ms, then 4 ms)
        warm = fixed_rate(url, [tenant.key], events_per_s / 2, method="POST", body=CREATE_BODY, seconds=WARMUP_S)
        warm_events = _events(c, wait_for=2 * (warm.requests - warm.errors))
        _wait_delivered(stack, receiver, {e["id"] for e in warm_events})
        load = fixed_rate(url, [tenant.key], events_per_s / 2, method="POST", body=CREATE_BODY, seconds=seconds)
        stack_events = _events(c, wait_for=len(warm_events) + 2 * (load.requests - load.errors))
    stack_events = stack_events[len(warm_events):]  # oldest first: the measured run's
    expected = {e["id"]: e for e in stack_events}
    deadline = time.monotonic() + DELIVERY_WAIT_S
    first: dict[str, float] = {}   # webhook-id -> when the receiver got it (ms)
    after = 0

    def all_received() -> bool:
        nonlocal after
        for d in stack.sandbox.webhook_deliveries(receiver, after=after):
            after = d["seq"]
            if d["verified"] and d["status"] == 204 and d["webhook_id"] not in first:
                first[d["webhook_id"]] = d["received_at"] * 1000
        return set(expected) <= set(first)

    try:
        wait_until(all_received, deadline - time.monotonic(), "every expected event received", interval=0.5)
    except AssertionError:
        pass  # what was not delivered is counted and reported below
    late: dict[str, list[float]] = {}
    for eid, received in first.items():
        if eid in expected:
            late.setdefault(expected[eid]["type"], []).append(received - _ms(expected[eid]["created_at"]))
    lateness = [x for xs in late.values() for x in xs]
    # deliveries about one claim lease (3 s) late: counted apart, to tell them from load
    lease_late = sum(1 for x in lateness if x >= 2900)
    created = sorted(_ms(e["created_at"]) for e in stack_events)
    span = (created[-1] - created[0]) / 1000 if len(created) > 1 else float("nan")
    return {"admitted": load.requests - load.errors, "admission_errors": load.errors,
            "events_expected": len(expected), "events_delivered": len(set(expected) & set(first)),
            "events_per_s": round(len(created) / span, 1) if span == span else span,
            "lateness_ms": _dist(lateness), "late_by_a_lease": lease_late, "lateness_ms_by_type": {t: _dist(xs) for t, xs in sorted(late.items())}}


def _wait_delivered(stack: Stack, receiver: str, ids: set[str]) -> None:
    wait_until(lambda: ids <= {d["webhook_id"] for d in stack.sandbox.webhook_deliveries(receiver) if d["status"] == 204},
               DELIVERY_WAIT_S, "the warm-up's events delivered", interval=0.5)


def _dist(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(pct(values, 50), 3), "p99": round(pct(values, 99), 3),
            "max": round(max(values, default=float("nan")), 3)}


def _events(c: httpx.Client, wait_for: int) -> list[dict[str, Any]]:
    """The tenant's events (GET /v1/events, every page), once there are at least ``wait_for``
    (the last sessions' ``session.ready`` may still be on its way)."""
    def listed() -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            r = c.get("/v1/events", params={"limit": 100, **({"after": after} if after else {})})
            r.raise_for_status()
            events.extend(r.json()["data"])
            after = r.json()["next_cursor"]
            if not after:
                return events

    seen: list[list[dict[str, Any]]] = [[]]

    def enough() -> list[dict[str, Any]] | None:
        seen[0] = listed()
        return seen[0] if len(seen[0]) >= wait_for else None

    try:
        return wait_until(enough, DELIVERY_WAIT_S, f"{wait_for} events listed", interval=0.5)
    except AssertionError:
        return seen[0]  # fewer: the caller counts what is missing
