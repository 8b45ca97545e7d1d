"""Every metric of a worker process, declared in one place on the worker's own registry,
served with /healthz on ``--metrics-port`` (one port per process: no multiprocess mode).

Per-process counters/histograms are summed across workers in dashboards; the shared-state
gauges (``workers/gauges.py``: queue depth, due terminations, live sessions) describe Redis,
are exported identically by every worker, and are aggregated with ``max()``."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import (CollectorRegistry, Counter, GCCollector, Gauge, Histogram, PlatformCollector,
                               ProcessCollector, disable_created_metrics)

from broker.core import tracing
from broker.core.tenant_labels import TenantLabels

from .gauges import SharedStateCollector

if TYPE_CHECKING:
    from broker.sessions.models import SessionRecord

TOP_TENANTS = 20  # named tenants in tenant-labelled worker series by default (BROKER_METRICS_TOP_TENANTS)

# No ``*_created`` series: they double the series count and nothing here uses them.
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30, 60)
LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)

JOB_FUNCTIONS = ("provision", "terminate", "sweep")
JOB_OUTCOMES = ("ok", "retry", "error", "cancelled")
UPSTREAM_OPERATIONS = (("openai", "mint"), ("avaturn", "create"), ("avaturn", "delete"))
TERMINATION_REASONS = ("requested", "expired", "replaced", "tenant_disabled")
SWEEPER_ACTIONS = ("requeued", "reaped", "dropped", "trimmed")
REDIS_ERROR_SOURCES = ("heartbeat", "poll", "job", "shared_state", "expiry", "provision", "webhooks")
WEBHOOK_OUTCOMES = ("delivered", "retry", "gave_up", "endpoint_gone", "endpoint_failing")
# event recorded -> 2xx received: from a few ms (the fan-out and one POST) to a day (retries)
WEBHOOK_LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800,
                            3600, 7200, 21600, 43200, 86400)


class TracedHistogram(Histogram):
    """A histogram whose observations carry the current trace id as their exemplar when tracing
    is on (``trace_id``: Grafana links a bucket to an example trace). Exemplars are exposed in
    the OpenMetrics format only: /metrics serves it to a scraper that asks for it."""

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        super().observe(amount, exemplar if exemplar is not None else tracing.exemplar())


class WorkerMetrics:
    def __init__(self, top_tenants: int = TOP_TENANTS) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.jobs = Counter("broker_worker_jobs_total", "Jobs finished by this worker, by function and outcome.",
                            ["function", "outcome"], registry=r)
        self.job_duration = Histogram("broker_worker_job_duration_seconds", "Job run time, by function.",
                                      ["function"], buckets=LATENCY_BUCKETS, registry=r)
        self.job_retries = Counter("broker_worker_job_retries_total", "Jobs deferred for a retry, by function.",
                                   ["function"], registry=r)
        self.jobs_in_progress = Gauge("broker_worker_jobs_in_progress", "Jobs running in this worker, by function.",
                                      ["function"], registry=r)
        self.provisions = Counter("broker_provisions_total",
                                  "Provisioning outcomes (ready or failed) with the error code of failures.",
                                  ["outcome", "code"], registry=r)
        self.queue_wait = Histogram("broker_queue_wait_seconds", "Time from admission to a worker starting the provisioning.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_ready = TracedHistogram("broker_time_to_ready_seconds", "Time from admission to ready.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_calls = Counter("broker_upstream_requests_total",
                                      "Upstream calls by upstream, operation, outcome (ok, rejected = permanent, "
                                      "unavailable = transient, error = not an upstream answer) and error code.",
                                      ["upstream", "operation", "outcome", "code"], registry=r)
        self.upstream_latency = Histogram("broker_upstream_request_duration_seconds",
                                          "Upstream call latency by upstream and operation.",
                                          ["upstream", "operation"], buckets=LATENCY_BUCKETS, registry=r)
        self.terminations = Counter("broker_terminations_total", "Sessions terminated, by reason.",
                                    ["reason"], registry=r)
        self.termination_lateness = Histogram("broker_termination_lateness_seconds",
                                              "Expired sessions: time from expires_at to the upstream DELETE done.",
                                              buckets=LATENESS_BUCKETS, registry=r)
        self.termination_failures = Counter("broker_termination_failures_total",
                                            "Upstream DELETE attempts that failed (retried), by error code.",
                                            ["code"], registry=r)
        self.sweeper_actions = Counter("broker_sweeper_actions_total", "Sweeper actions, by action.",
                                       ["action"], registry=r)
        self.mint_deferred = Counter("broker_mint_deferred_total",
                                     "Provisioning attempts claimed before their mint slot and rescheduled at it "
                                     "(only with clocks apart between API and workers).", registry=r)
        self.possible_orphans = Counter("broker_upstream_possible_orphans_total",
                                        "Avaturn creates whose outcome was unknown and were created again, or "
                                        "orphans whose delete failed (each bounded by user_absent_timeout/max_duration).",
                                        registry=r)
        # billable session seconds settled by this worker's terminal transitions (issue 21)
        self.tenant_label = TenantLabels(top_tenants)
        self.tenant_label.on_demote.append(self._forget_tenant)
        self.billable_seconds = Counter("broker_billable_seconds_total",
                                        "Billable session seconds (ready -> terminated) of the sessions this worker "
                                        "terminated, by tenant (top N, else 'other').", ["tenant"], registry=r)
        self.usage_thresholds = Counter("broker_usage_thresholds_total",
                                        "usage.threshold_reached events (50/80/100 % of a budget, once per period) "
                                        "recorded by this process: by the budget settle of the sessions it ended "
                                        "(a session billed past its reservation).", registry=r)
        self.redis_errors = Counter("broker_redis_errors_total", "Redis errors seen by this process, by where they happened.",
                                    ["source"], registry=r)
        # webhook delivery (workers/webhooks.py)
        self.webhook_deliveries = Counter("broker_webhook_deliveries_total",
                                          "Webhook delivery attempts by outcome: delivered (2xx), retry (failed, "
                                          "tried again later), gave_up (the last retry failed), endpoint_gone (410: "
                                          "endpoint disabled), endpoint_failing (failing 5 days: endpoint disabled).",
                                          ["outcome"], registry=r)
        self.webhook_lateness = Histogram("broker_webhook_delivery_lateness_seconds",
                                          "Time from an event's recording to its webhook's 2xx (retries included).",
                                          buckets=WEBHOOK_LATENESS_BUCKETS, registry=r)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.shared = SharedStateCollector(on_error=lambda: self.redis_errors.labels("shared_state").inc())
        r.register(self.shared)
        self._initialise_series()

    def count_billable(self, tenant_id: str, ready_at_ms: int, end_ms: int) -> None:
        """The session's billable seconds, as the settle computed them (tenants/budget.lua)."""
        if ready_at_ms:
            self.billable_seconds.labels(self.tenant_label(tenant_id)).inc(max(0, -(-(end_ms - ready_at_ms) // 1000)))

    def count_termination(self, rec: SessionRecord, reason: str, end_ms: int, thresholds: int = 0) -> None:
        """A session this worker recorded ``terminated`` at ``end_ms`` (both ways of recording
        it count here: one transition, or the expiry loop's batched finish): the termination by
        reason, the usage thresholds its settle crossed (tenants/budget.lua), its billable
        seconds as the settle computed them, and, for an expiry, how late it came."""
        self.terminations.labels(reason).inc()
        if thresholds:
            self.usage_thresholds.inc(thresholds)
        self.count_billable(rec.tenant_id, rec.ready_at, end_ms)
        if rec.expires_at and reason == "expired":
            self.termination_lateness.observe(max(0.0, (end_ms - rec.expires_at) / 1000))

    def _forget_tenant(self, tenant_id: str) -> None:
        try:
            self.billable_seconds.remove(tenant_id)
        except KeyError:
            pass

    def _initialise_series(self) -> None:
        """Known label sets start at 0, so rate() sees their first increment and dashboards
        show 0 rather than "no data"."""
        for fn in JOB_FUNCTIONS:
            self.job_retries.labels(fn)
            self.job_duration.labels(fn)
            self.jobs_in_progress.labels(fn)
            for outcome in JOB_OUTCOMES:
                self.jobs.labels(fn, outcome)
        for upstream, op in UPSTREAM_OPERATIONS:
            self.upstream_calls.labels(upstream, op, "ok", "none")
            self.upstream_latency.labels(upstream, op)
        for reason in TERMINATION_REASONS:
            self.terminations.labels(reason)
        for action in SWEEPER_ACTIONS:
            self.sweeper_actions.labels(action)
        for source in REDIS_ERROR_SOURCES:
            self.redis_errors.labels(source)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_deliveries.labels(outcome)

    # ---- helpers called by the job code ---------------------------------------------------
    # A few metric calls per job: the labelled children are looked up once (``labels()`` takes
    # a lock and builds a tuple on every call) and kept in small dicts; every label set here is
    # bounded (functions, outcomes, upstream operations, error codes).

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_upstream(self, upstream: str, operation: str, seconds: float, exc: BaseException | None = None) -> None:
        if exc is None:
            outcome, code = "ok", "none"
        else:
            code = getattr(exc, "code", None) or "none"
            if getattr(exc, "upstream", None) is None:       # not an UpstreamError
                outcome, code = ("cancelled", "cancelled") if isinstance(exc, asyncio.CancelledError) else ("error", "internal")
            else:
                outcome = "unavailable" if getattr(exc, "retryable", False) else "rejected"
        self._child(self.upstream_calls, upstream, operation, outcome, code).inc()
        self._child(self.upstream_latency, upstream, operation).observe(seconds)

    def webhook_delivery(self, outcome: str) -> None:
        self._child(self.webhook_deliveries, outcome).inc()

    def provision_outcome(self, outcome: str, code: str) -> None:
        self._child(self.provisions, outcome, code).inc()

    def job_started(self, function: str) -> float:
        self._child(self.jobs_in_progress, function).inc()
        return time.perf_counter()

    def job_finished(self, function: str, started: float, exc: BaseException | None) -> None:
        """Count one job run (a provisioning attempt counts as one): outcome ok / retry (arq
        ``Retry``, a provisioning rescheduled: also counted in
        ``job_retries``) / cancelled / error (a Redis error is also counted in ``redis_errors``)."""
        self._child(self.jobs_in_progress, function).dec()
        outcome = _job_outcome(exc)
        if outcome == "retry":
            self.job_retries.labels(function).inc()
        elif outcome == "error" and exc is not None and _is_redis_error(exc):
            self.redis_errors.labels("job").inc()
        self._child(self.jobs, function, outcome).inc()
        self._child(self.job_duration, function).observe(time.perf_counter() - started)


def _job_outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    from arq.worker import Retry

    from .jobs.provision import Rescheduled

    if isinstance(exc, (Retry, Rescheduled)):
        return "retry"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return "error"


def _is_redis_error(exc: Any) -> bool:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, ConnectionError))
