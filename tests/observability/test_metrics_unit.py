"""Unit tests of the metric declarations: naming conventions, the tenant-label bound, the
classification of admission and job outcomes."""

from __future__ import annotations

import asyncio
import re

import pytest
from arq.worker import Retry
from prometheus_client import generate_latest
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.core.errors import InvalidInput, QuotaExceeded, Unprocessable
from broker.api.metrics import ApiMetrics, TenantLabels
from workers.metrics import WorkerMetrics
from workers.upstreams.errors import UpstreamRejected, UpstreamUnavailable

from .helpers import samples, value

NAME = re.compile(r"^broker_[a-z_]+$")


@pytest.mark.parametrize("registry", [ApiMetrics().registry, WorkerMetrics().registry], ids=["api", "worker"])
def test_names_follow_prometheus_conventions(registry) -> None:
    """Invariant: every broker metric has the broker_ prefix, counters end in _total, time is
    in _seconds, and no *_created series doubles the series count."""
    text = generate_latest(registry).decode()
    families = {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")}
    ours = {n: t for n, t in families.items() if n.startswith("broker_")}
    assert len(ours) >= 5
    for name, kind in ours.items():
        assert NAME.match(name), name
        if kind == "counter":
            assert name.endswith("_total"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
        assert "_ms" not in name and "millis" not in name, name
    assert "_created" not in text
    assert "process_cpu_seconds_total" in text  # one process = one /metrics keeps process metrics


def test_tenant_labels_bounded_with_promotion() -> None:
    """Invariant: at most N tenants are named at any time; a much busier tenant takes the
    slot of the smallest one, whose series are then removed."""
    labels = TenantLabels(2)
    demoted: list[str] = []
    labels.on_demote.append(demoted.append)
    assert labels("a") == "a" and labels("b") == "b"
    assert labels("c") == "other"
    for _ in range(5):
        labels("a")
    for _ in range(8):  # c: 9 events, below PROMOTE_MIN
        assert labels("c") == "other"
    assert labels("c") == "c"  # 10th event, > 2x b's single event
    assert demoted == ["b"] and labels.named == {"a", "c"}
    assert labels("b") == "other"
    assert TenantLabels(0)("a") == "other"


def test_demoted_tenant_series_are_removed() -> None:
    """Invariant: the number of tenant-labelled series never exceeds top_n x combinations."""
    m = ApiMetrics(top_tenants=1)
    m.count_admission("small", "admitted")
    m.count_admission("small", "refused", "rate_limited")
    for _ in range(12):
        m.count_admission("big", "admitted")
    tenants = {lab["tenant"] for n, lab, _ in samples(generate_latest(m.registry).decode())
               if n == "broker_admissions_total"}
    assert tenants == {"big", "other"}
    # big: 9 events as "other", promoted on the 10th (>= PROMOTE_MIN and > 2x small's 2), then 3 named.
    assert value(m.registry, "broker_admissions_total", tenant="big", outcome="admitted", reason="none") == 3
    assert value(m.registry, "broker_admissions_total", tenant="other", outcome="admitted", reason="none") == 9


def test_admission_failures_are_classified() -> None:
    m = ApiMetrics()
    m.admission_failed("t", QuotaExceeded("x", code="concurrency_limit"))
    m.admission_failed("t", Unprocessable("x"))
    m.admission_failed("t", InvalidInput("x", code="invalid_ttl"))
    m.admission_failed("t", RedisConnectionError("down"))
    m.admission_failed("t", RuntimeError("bug"))
    m.admission_result("t", replayed=True)
    got = {(lab["outcome"], lab["reason"]): v for n, lab, v in samples(generate_latest(m.registry).decode())
           if n == "broker_admissions_total"}
    assert got == {("refused", "concurrency_limit"): 1, ("refused", "idempotency_key_reused"): 1,
                   ("rejected", "invalid_request"): 1, ("error", "redis_unavailable"): 1,
                   ("error", "internal"): 1, ("replayed", "none"): 1}


def test_job_outcomes_and_upstream_classes() -> None:
    m = WorkerMetrics()
    for exc in (None, Retry(defer=1), asyncio.CancelledError(), RedisConnectionError("x"), ValueError("bug")):
        m.job_finished("provision", m.job_started("provision"), exc)
    r = m.registry
    assert [value(r, "broker_worker_jobs_total", function="provision", outcome=o)
            for o in ("ok", "retry", "cancelled", "error")] == [1, 1, 1, 2]
    assert value(r, "broker_worker_job_retries_total", function="provision") == 1
    assert value(r, "broker_redis_errors_total", source="job") == 1
    assert value(r, "broker_worker_jobs_in_progress", function="provision") == 0
    assert value(r, "broker_worker_job_duration_seconds_count", function="provision") == 5
    m.observe_upstream("openai", "mint", 0.1)
    m.observe_upstream("openai", "mint", 0.2, UpstreamRejected(upstream="openai", operation="mint", status=401,
                                                             code="openai_invalid_api_key", message="m"))
    m.observe_upstream("avaturn", "create", 0.3, UpstreamUnavailable(upstream="avaturn", operation="create",
                                                                   status=503, code="upstream_unavailable", message="m"))
    m.observe_upstream("avaturn", "delete", 0.3, KeyError("bug"))
    assert value(r, "broker_upstream_requests_total", upstream="openai", operation="mint", outcome="ok", code="none") == 1
    assert value(r, "broker_upstream_requests_total", upstream="openai", operation="mint", outcome="rejected",
                 code="openai_invalid_api_key") == 1
    assert value(r, "broker_upstream_requests_total", upstream="avaturn", operation="create", outcome="unavailable",
                 code="upstream_unavailable") == 1
    assert value(r, "broker_upstream_requests_total", upstream="avaturn", operation="delete", outcome="error",
                 code="internal") == 1
    assert value(r, "broker_upstream_request_duration_seconds_count", upstream="openai", operation="mint") == 2


def test_every_metric_is_documented() -> None:
    """The metrics table (docs/observability.md) names every broker metric."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    docs = (root / "docs" / "observability.md").read_text()
    for registry in (ApiMetrics().registry, WorkerMetrics().registry):
        text = generate_latest(registry).decode()
        names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE broker_")}
        assert names and all(f"`{name}`" in docs for name in names), sorted(n for n in names if f"`{n}`" not in docs)
