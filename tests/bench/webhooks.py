"""Issue 20's two bench rows.

- Admission throughput of a tenant with one webhook endpoint against a tenant without, in the
  same run, in alternating saturation slices (as the admission row: whatever else the machine
  does weighs on both alike), the worker paused: the API's own cost of a tenant with an
  endpoint (the outbox write rides on the admission script either way).
- Delivery lateness (event recorded -> the receiver got it) at ~300 events/s with one worker:
  sessions admitted at 150/s with 0 ms upstreams each record ``session.created`` and
  ``session.ready``; the sandbox's receiver (verifying, never failing) records when each
  delivery arrived; lateness = arrival - the event's ``created_at``.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import httpx

from .load import RunStats, fixed_rate, merge, pct, saturate
from .scenarios import CREATE_BODY, SAT_SECONDS, SAT_SLICES
from .stack import BenchTenant, Stack

EVENTS_PER_S = 300
LATENESS_SECONDS = 10.0
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
        for _ in range(SAT_SLICES):
            plain.append(saturate(url, [without.key], method="POST", body=CREATE_BODY, seconds=SAT_SECONDS / SAT_SLICES))
            hooked.append(saturate(url, [with_ep.key], method="POST", body=CREATE_BODY,
                                   seconds=SAT_SECONDS / SAT_SLICES))
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
    load = fixed_rate(url, [tenant.key], events_per_s / 2, method="POST", body=CREATE_BODY, seconds=seconds)
    expected = 2 * (load.requests - load.errors)
    deadline = time.monotonic() + DELIVERY_WAIT_S
    first: dict[str, tuple[float, float]] = {}   # webhook-id -> (created_at ms, received ms)
    after = 0
    while True:
        for d in stack.sandbox.webhook_deliveries(receiver, after=after):
            after = d["seq"]
            if d["verified"] and d["status"] == 204 and d["webhook_id"] not in first:
                body = json.loads(d["body"])
                first[d["webhook_id"]] = (_ms(body["created_at"]), d["received_at"] * 1000)
        if len(first) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    lateness = [received - created for created, received in first.values()]
    created = sorted(c for c, _ in first.values())
    span = (created[-1] - created[0]) / 1000 if len(created) > 1 else float("nan")
    return {"admitted": load.requests - load.errors, "admission_errors": load.errors, "events_expected": expected,
            "events_delivered": len(first), "events_per_s": round(len(first) / span, 1) if span == span else span,
            "lateness_ms": {"p50": round(pct(lateness, 50), 3), "p99": round(pct(lateness, 99), 3),
                            "max": round(max(lateness, default=float("nan")), 3)}}
