"""Every metric of the API process, declared in one place, on a registry owned by the app
(one process = one /metrics; no multiprocess mode). Labels are bounded: route templates,
methods, status codes, fixed outcome/reason sets; tenant labels go through
``TenantLabels`` (:mod:`broker.core.tenant_labels`: at most N named tenants, the rest ``other``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector, disable_created_metrics

from broker.core.tenant_labels import OTHER, TenantLabels

# No ``*_created`` series: they double the series count and nothing here uses them.
disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# Admission reasons (the admission script's refusal codes + the idempotency conflicts).
REFUSAL_REASONS = frozenset({
    "rate_limited", "concurrency_limit", "daily_quota_exhausted", "end_user_limit", "provisioning_backlog",
    "idempotency_key_reused", "idempotency_key_in_flight", "budget_exhausted",
})
BUDGETS = ("session_seconds_per_month", "session_seconds_per_end_user_per_month")


class ApiMetrics:
    def __init__(self, top_tenants: int = 20) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.tenant_label = TenantLabels(top_tenants)
        self.tenant_label.on_demote.append(self._forget_tenant)
        self._tenant_series: dict[str, set[tuple[str, str]]] = {}
        self._series_lock = threading.Lock()
        self._admission_children: dict[tuple[str, str, str], Any] = {}  # bounded like the series
        self.http_requests = Counter(
            "broker_http_requests_total", "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"], registry=r,
        )
        self.http_duration = Histogram(
            "broker_http_request_duration_seconds", "HTTP request duration, by route template and method.",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.http_in_progress = Gauge(
            "broker_http_requests_in_progress", "HTTP requests being answered by this process.", registry=r,
        )
        self.admissions = Counter(
            "broker_admissions_total",
            "POST /v1/sessions outcomes by tenant (top N, else 'other'), outcome (admitted, replayed, "
            "refused, rejected, abandoned, error) and reason (refusal code, invalid_request, client_disconnected, "
            "redis_unavailable, internal, none).",
            ["tenant", "outcome", "reason"], registry=r,
        )
        self.budget_refusals = Counter(
            "broker_budget_refusals_total",
            "Admissions refused with 402 budget_exhausted, by tenant (top N, else 'other') and budget "
            "(session_seconds_per_month, session_seconds_per_end_user_per_month).",
            ["tenant", "budget"], registry=r,
        )
        self.usage_thresholds = Counter(
            "broker_usage_thresholds_total",
            "usage.threshold_reached events (50/80/100 % of a budget, once per period) recorded by this process: "
            "by its admissions (API) or by the budget settle of the sessions it ended (worker).", registry=r,
        )
        self.redis_errors = Counter(
            "broker_redis_errors_total", "Redis errors seen by this process, by where they happened.",
            ["source"], registry=r,
        )
        for source in ("request", "readyz"):
            self.redis_errors.labels(source)

    # ---- requests ------------------------------------------------------------------------

    def request_observer(self) -> Callable[[str, str, int, float], None]:
        """``observe(route, method, status, seconds)`` for the middleware: counts the answer and
        observes its duration through children looked up once per label set (a ``labels()``
        call costs a lock, a tuple and a dict lookup on every request). Label sets are bounded
        (route templates or ``unmatched``, the server's methods, status codes), and so is the cache."""
        counters: dict[tuple[str, str, int], Any] = {}
        histograms: dict[tuple[str, str], Any] = {}
        requests, duration = self.http_requests, self.http_duration

        def observe(route: str, method: str, status: int, seconds: float) -> None:
            key = (route, method, status)
            counter = counters.get(key)
            if counter is None:
                counter = counters[key] = requests.labels(route, method, str(status))
            counter.inc()
            hkey = (route, method)
            histogram = histograms.get(hkey)
            if histogram is None:
                histogram = histograms[hkey] = duration.labels(route, method)
            histogram.observe(seconds)

        return observe

    # ---- admissions ----------------------------------------------------------------------

    def count_admission(self, tenant_id: str, outcome: str, reason: str = "none") -> None:
        label = self.tenant_label(tenant_id)
        key = (label, outcome, reason)
        child = self._admission_children.get(key)
        if child is None:
            child = self.admissions.labels(label, outcome, reason)
            if label != OTHER:
                with self._series_lock:
                    self._tenant_series.setdefault(label, set()).add((outcome, reason))
            self._admission_children[key] = child  # dropped with the series when the tenant is demoted
        child.inc()

    def admission_result(self, tenant_id: str, replayed: bool) -> None:
        self.count_admission(tenant_id, "replayed" if replayed else "admitted")

    def admission_failed(self, tenant_id: str, exc: BaseException) -> None:
        """Classify an exception raised while admitting a session (then re-raised)."""
        status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
        code = getattr(exc, "code", None)
        if isinstance(status, int) and 400 <= status < 500:
            if code == "budget_exhausted":
                self.count_admission(tenant_id, "refused", code)
                label = tenant_id if tenant_id in self.tenant_label.named else OTHER
                budget = str(getattr(exc, "extra", {}).get("budget", OTHER))
                self.budget_refusals.labels(label, budget if budget in BUDGETS else OTHER).inc()
            elif code in REFUSAL_REASONS:
                self.count_admission(tenant_id, "refused", str(code))
            elif status == 429:
                self.count_admission(tenant_id, "refused", OTHER)
            else:
                self.count_admission(tenant_id, "rejected", "invalid_request")
        elif _is_redis_error(exc):
            self.count_admission(tenant_id, "error", "redis_unavailable")
        else:
            self.count_admission(tenant_id, "error", "internal")

    def _forget_tenant(self, tenant_id: str) -> None:
        with self._series_lock:
            combos = self._tenant_series.pop(tenant_id, set())
        for outcome, reason in combos:
            self._admission_children.pop((tenant_id, outcome, reason), None)
            try:
                self.admissions.remove(tenant_id, outcome, reason)
            except KeyError:
                pass
        for budget in BUDGETS:
            try:
                self.budget_refusals.remove(tenant_id, budget)
            except KeyError:
                pass


def _is_redis_error(exc: BaseException) -> bool:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, ConnectionError))
