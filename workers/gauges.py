"""Gauges that describe shared state in Redis (not this process): arq's queue depth (stop jobs),
the oldest due provisioning no worker has started, due terminations, the provisioning backlog,
live sessions by state and the webhook deliveries queued.

A background task (started in the worker's ``on_startup``) refreshes a snapshot every
``interval`` seconds with a few cheap reads; a scrape only formats the snapshot, so a slow
Redis never slows /metrics. Every worker exports the same values: dashboards and alerts
aggregate them with ``max()`` (never ``sum()``, which would multiply them by the number of
workers). Nothing is exported before the first successful read, and
``broker_shared_state_age_seconds`` says how old the numbers are.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.core.text import text
from broker.sessions.jobs import QUEUE_NAME
from tenants import scope

log = logging.getLogger("workers.gauges")

# Maintained by the session state-transition scripts (field = status, value = count).
LIVE_STATS_KEY: str = getattr(scope, "STATS_LIVE", scope.PREFIX + "stats:live")
OLDEST_SCAN = 100          # tenants of the provisioning ring looked at to find the oldest due session
DEFAULT_INTERVAL = 2.0
WARN_EVERY_S = 60.0
_STATE = re.compile(r"^[a-z_]{1,32}$")


@dataclass(frozen=True)
class Snapshot:
    taken_at: float                      # wall clock, seconds
    queue_due: int                       # arq jobs (stops) whose time has come (running ones included)
    queue_deferred: int                  # arq jobs scheduled for later (retries)
    queue_oldest_due_age: float          # seconds the oldest due provisioning not yet claimed has waited
    due_terminations: int                # sessions past expires_at / retry time, not terminated
    due_terminations_oldest_age: float   # seconds since the oldest of them was due
    provisioning_backlog: int            # sessions queued or provisioning
    live: dict[str, int] = field(default_factory=dict)
    webhook_pending: int = 0             # webhook deliveries queued (all tenants)


async def read_snapshot(redis: Any, now: float | None = None) -> Snapshot:
    now = time.time() if now is None else now
    now_ms = int(now * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcount(QUEUE_NAME, "-inf", now_ms)
        pipe.zcount(QUEUE_NAME, f"({now_ms}", "+inf")
        pipe.zrangebyscore(scope.PROVISION_TENANTS, "-inf", now_ms, start=0, num=OLDEST_SCAN)
        pipe.zcount(scope.DUE_EXPIRY, "-inf", now_ms)
        pipe.zrangebyscore(scope.DUE_EXPIRY, "-inf", now_ms, start=0, num=1, withscores=True)
        pipe.hgetall(LIVE_STATS_KEY)
        pipe.get(scope.WEBHOOK_PENDING)
        due, deferred, due_tenants, due_terms, oldest_term, live_raw, wh_pending = await pipe.execute()
    oldest_age = 0.0
    if due_tenants:
        # The ring's score is a lower bound, a claimed session's entry is its lease (later than
        # now): the oldest due entry of each due tenant is one nobody has started.
        async with redis.pipeline(transaction=False) as pipe:
            for tid in due_tenants:
                pipe.zrange(scope.TenantScope(text(tid)).provision_schedule(), 0, 0, withscores=True)
            firsts = await pipe.execute()
        scores = [float(first[0][1]) for first in firsts if first and float(first[0][1]) <= now_ms]
        if scores:
            oldest_age = max(0.0, now - min(scores) / 1000)
    term_age = max(0.0, now - float(oldest_term[0][1]) / 1000) if oldest_term else 0.0
    live: dict[str, int] = {}
    for key, value in (live_raw or {}).items():
        state = text(key)
        try:
            count = int(text(value))
        except ValueError:
            continue
        if _STATE.match(state):
            live[state] = count
    return Snapshot(
        taken_at=now, queue_due=int(due), queue_deferred=int(deferred), queue_oldest_due_age=oldest_age,
        due_terminations=int(due_terms), due_terminations_oldest_age=term_age,
        provisioning_backlog=live.get("queued", 0) + live.get("provisioning", 0), live=live,
        webhook_pending=max(0, int(text(wh_pending))) if wh_pending else 0,
    )


class SharedStateCollector(Collector):
    def __init__(self, on_error: Callable[[], None] | None = None, interval: float = DEFAULT_INTERVAL) -> None:
        self.interval = interval
        self.snapshot: Snapshot | None = None
        self._on_error = on_error

    async def refresh(self, redis: Any) -> Snapshot:
        self.snapshot = await read_snapshot(redis)
        return self.snapshot

    def start(self, redis: Any) -> asyncio.Task[None]:
        return asyncio.create_task(self._run(redis), name="shared-state-gauges")

    async def _run(self, redis: Any) -> None:
        failing_since: float | None = None
        last_warning = 0.0
        while True:
            try:
                await self.refresh(redis)
                if failing_since is not None:
                    log.info("shared-state gauges: Redis readable again after %.0f s", time.monotonic() - failing_since)
                    failing_since = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep refreshing; the age gauge shows staleness
                if self._on_error is not None:
                    self._on_error()      # every failure is counted ...
                now = time.monotonic()
                failing_since = now if failing_since is None else failing_since
                if now - last_warning >= WARN_EVERY_S:   # ... but logged at most once a minute
                    last_warning = now
                    log.warning("shared-state gauges: read failed (%s)", type(exc).__name__)
            await asyncio.sleep(self.interval)

    def describe(self) -> Iterable[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self.snapshot))

    def _families(self, snap: Snapshot | None) -> Iterable[Metric]:
        queue = GaugeMetricFamily("broker_queue_jobs", "Jobs in the arq queue (stops): due now (running ones included) "
                                  "or deferred. Shared state: aggregate with max().", labels=["state"])
        oldest = GaugeMetricFamily("broker_queue_oldest_due_age_seconds",
                                   "How long the oldest due provisioning (mint slot or retry time come) that no worker "
                                   "has started has waited. Shared state: max().")
        due = GaugeMetricFamily("broker_due_terminations",
                                "Sessions past their expiry (or retry) time and not yet terminated. Shared state: max().")
        due_age = GaugeMetricFamily("broker_due_terminations_oldest_seconds",
                                    "Seconds since the oldest due termination was due. Shared state: max().")
        backlog = GaugeMetricFamily("broker_provisioning_backlog",
                                    "Sessions queued or provisioning. Shared state: max().")
        live = GaugeMetricFamily("broker_live_sessions", "Sessions by state (from sb:stats:live). Shared state: max().",
                                 labels=["state"])
        wh_pending = GaugeMetricFamily("broker_webhook_pending_deliveries",
                                       "Webhook deliveries queued, all tenants (in flight and waiting for a retry "
                                       "included). Shared state: max().")
        age = GaugeMetricFamily("broker_shared_state_age_seconds",
                                "Age of the shared-state snapshot this worker exports.")
        if snap is not None:
            queue.add_metric(["due"], snap.queue_due)
            queue.add_metric(["deferred"], snap.queue_deferred)
            oldest.add_metric([], snap.queue_oldest_due_age)
            due.add_metric([], snap.due_terminations)
            due_age.add_metric([], snap.due_terminations_oldest_age)
            backlog.add_metric([], snap.provisioning_backlog)
            for state, count in sorted(snap.live.items()):
                live.add_metric([state], count)
            wh_pending.add_metric([], snap.webhook_pending)
            age.add_metric([], max(0.0, time.time() - snap.taken_at))
        return (queue, oldest, due, due_age, backlog, live, wh_pending, age)

