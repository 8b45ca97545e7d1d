"""Every metric of the API process, declared in one place, on a registry owned by the app
(one process = one /metrics; no multiprocess mode). Labels are bounded: route templates,
methods, status codes; tenant labels go through ``TenantLabels`` (top N + "other")."""

from __future__ import annotations

import threading
from collections import Counter as _Counter

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class TenantLabels:
    """Maps a tenant id to a bounded label: the first ``top_n`` tenants seen by volume keep
    their id, the rest are ``other``. Exact per-tenant numbers come from GET /v1/usage."""

    def __init__(self, top_n: int) -> None:
        self.top_n = top_n
        self._counts: _Counter[str] = _Counter()
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, tenant_id: str) -> str:
        if self.top_n <= 0:
            return "other"
        with self._lock:
            self._counts[tenant_id] += 1
            if tenant_id in self._named:
                return tenant_id
            if len(self._named) < self.top_n:
                self._named.add(tenant_id)
                return tenant_id
        return "other"


class ApiMetrics:
    def __init__(self, top_tenants: int = 20) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.tenant_label = TenantLabels(top_tenants)
        self.http_requests = Counter(
            "broker_http_requests_total", "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"], registry=self.registry,
        )
        self.http_duration = Histogram(
            "broker_http_request_duration_seconds", "HTTP request duration, by route template and method.",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.admissions = Counter(
            "broker_admissions_total",
            "Session admission outcomes by tenant (top N, else 'other') and outcome "
            "(admitted, replayed, rate_limited, concurrency_limit, daily_quota_exhausted, end_user_limit, rejected).",
            ["tenant", "outcome"], registry=self.registry,
        )
        self.redis_errors = Counter(
            "broker_redis_errors_total", "Requests that failed because Redis was unreachable.",
            ["process"], registry=self.registry,
        )
