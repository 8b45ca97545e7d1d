"""broker_billable_seconds_total: the settle's formula (ready -> end, rounded up; 0 if never
ready), by a bounded tenant label."""

from __future__ import annotations

from prometheus_client import generate_latest

from workers.metrics import WorkerMetrics


def value(m: WorkerMetrics, tenant: str) -> float | None:
    return m.registry.get_sample_value("broker_billable_seconds_total", {"tenant": tenant})


def test_billable_seconds_by_bounded_tenant() -> None:
    m = WorkerMetrics(top_tenants=1)
    m.count_billable("ten_a", 1_000, 62_500)   # 61.5 s -> 62
    m.count_billable("ten_a", 0, 9_000)        # never ready: nothing
    m.count_billable("ten_b", 5_000, 15_000)   # 10 s, beyond the top 1: "other"
    assert value(m, "ten_a") == 62
    assert value(m, "other") == 10
    assert value(m, "ten_b") is None
    assert b"broker_billable_seconds_total" in generate_latest(m.registry)
