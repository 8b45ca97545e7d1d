#!/usr/bin/env python3
"""Generates ``dashboards/session-broker.json`` (the committed Grafana dashboard).

    python deploy/grafana/generate.py          # rewrite the JSON
    python deploy/grafana/generate.py --check  # exit 1 if the committed JSON is stale

Every query here is evaluated against a live Prometheus by
``tests/observability/test_live_prometheus.py``. Conventions: per-process counters and
histograms are ``sum``med across processes; the shared-state gauges (queue depth, due
terminations, live sessions...) are exported identically by every worker and are
aggregated with ``max`` -- never ``sum``, which would multiply them by the number of workers.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "session-broker.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"
NOT_OPS = 'route!~"/metrics|/healthz|/readyz"'
JOBS = 'job=~"session-broker-api|session-broker-worker"'


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]          # (expr, legend)
    unit: str = "short"
    kind: str = "timeseries"                # timeseries | stat | table
    description: str = ""
    width: int = 8
    instant: bool = False
    exemplars: bool = False                 # the first query shows its series' exemplars (trace ids)


@dataclass
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


def rate(selector: str) -> str:
    return f"rate({selector}[{RI}])"


def srate(selector: str, by: str = "") -> str:
    return f"sum by ({by}) ({rate(selector)})" if by else f"sum({rate(selector)})"


def quantiles(metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99), sel: str = "") -> list[tuple[str, str]]:
    by_clause = f"le, {by}" if by else "le"
    prefix = "".join(f"{{{{{b.strip()}}}}} " for b in by.split(",") if b.strip())
    bucket = rate(f"{metric}_bucket{sel}")
    return [(f"histogram_quantile({q}, sum by ({by_clause}) ({bucket}))", f"{prefix}p{int(q * 100)}") for q in qs]


def ratio(num: str, den: str, by: str) -> str:
    """num/den by labels, 0 (not "no data") where the numerator has no series."""
    s = f"sum by ({by}) " if by else "sum "
    return f"({s}({rate(num)}) or {s}({rate(den)}) * 0) / {s}({rate(den)})"


ROWS = [
    Row("Overview", [
        Panel("Requests / s", [(srate('broker_http_requests_total{' + NOT_OPS + '}'), "requests/s")],
              "reqps", "stat", "API requests answered per second (ops routes excluded).", 6),
        Panel("Server errors (5xx)", [("(" + srate('broker_http_requests_total{status=~"5.."}') + " or vector(0))"
                                       " / " + srate("broker_http_requests_total"), "5xx ratio")],
              "percentunit", "stat", "Share of API answers with a 5xx status (502 = a session failed upstream with ?wait).", 6),
        Panel("Time to ready p95", quantiles("broker_time_to_ready_seconds", qs=(0.95,)), "s", "stat",
              "95th percentile of admission -> ready.", 6),
        Panel("Live sessions", [('sum(max by (state) (broker_live_sessions{state=~"queued|provisioning|ready|terminating"}))',
                                 "live")], "short", "stat",
              "Sessions queued, provisioning, ready or terminating (shared state: max across workers).", 6),
        Panel("Requests by status", [(srate('broker_http_requests_total{' + NOT_OPS + '}', "status"), "{{status}}")],
              "reqps", description="API answers per second by HTTP status (401 and 404 included)."),
        Panel("Request latency p95 by route",
              quantiles("broker_http_request_duration_seconds", "route", (0.95,), "{" + NOT_OPS + "}"), "s",
              description="95th percentile of API request duration by route template (POST /v1/sessions includes ?wait)."),
        Panel("Time to ready", quantiles("broker_time_to_ready_seconds"), "s",
              description="Admission -> ready: queue wait + OpenAI mint + Avaturn create. With tracing on, the "
                          "dots are exemplars: one observation each, with the trace id of its session's creation "
                          "(click one to open the trace).", exemplars=True),
        Panel("Live sessions by state", [("max by (state) (broker_live_sessions)", "{{state}}")], "short",
              description="From the sb:stats:live hash (shared state: max across workers)."),
        Panel("Sessions admitted, ready, failed", [
            (srate('broker_admissions_total{outcome="admitted"}') + " or vector(0)", "admitted"),
            (srate('broker_provisions_total{outcome="ready"}') + " or vector(0)", "ready"),
            (srate('broker_provisions_total{outcome="failed"}') + " or vector(0)", "failed"),
        ], "ops", description="Per second."),
        Panel("Targets up", [(f"sum by (job) (up{{{JOBS}}})", "{{job}}")], "short",
              description="Scraped processes that answer /metrics, by job."),
    ]),
    Row("Tenants", [
        Panel("Admissions by tenant", [(srate('broker_admissions_total{tenant=~"$tenant",outcome=~"admitted|replayed"}', "tenant"),
                                        "{{tenant}}")], "ops",
              description="Top-N tenants by volume, the rest as 'other' (exact numbers: GET /v1/usage)."),
        Panel("Refusals by tenant and reason", [(srate('broker_admissions_total{tenant=~"$tenant",outcome="refused"}', "tenant, reason"),
                                                 "{{tenant}} {{reason}}")], "ops",
              description="429s (quota: rate_limited, concurrency_limit, daily_quota_exhausted, end_user_limit) "
                          "and idempotency conflicts."),
        Panel("Refusal ratio by tenant", [(ratio('broker_admissions_total{tenant=~"$tenant",outcome="refused"}',
                                                 'broker_admissions_total{tenant=~"$tenant"}', "tenant"), "{{tenant}}")],
              "percentunit", description="Refused / all session creations."),
        Panel("Rejected and failed creations by reason",
              [(srate('broker_admissions_total{tenant=~"$tenant",outcome=~"rejected|error"}', "outcome, reason"),
                "{{outcome}} {{reason}}")], "ops",
              description="rejected = invalid request (400/413/415/422); error = Redis unavailable or a bug."),
        Panel("Billable seconds by tenant", [(srate('broker_billable_seconds_total{tenant=~"$tenant"}', "tenant"),
                                              "{{tenant}}")], "short",
              description="Billable session seconds settled per second (ready -> terminated, counted when a session "
                          "ends), top-N tenants, the rest as 'other' (exact: GET /v1/usage/history)."),
        Panel("Budget refusals by tenant", [(srate('broker_budget_refusals_total{tenant=~"$tenant"}', "tenant, budget"),
                                             "{{tenant}} {{budget}}")], "ops",
              description="402 budget_exhausted answers: a session-second budget of the month is used up."),
        Panel("Creations in range by tenant and outcome",
              [('sum by (tenant, outcome) (increase(broker_admissions_total{tenant=~"$tenant"}[$__range]))',
                "{{tenant}} {{outcome}}")], "short", "table", "Totals over the dashboard's time range.", 16, True),
    ]),
    Row("Queue and workers", [
        Panel("Queue depth", [("max by (state) (broker_queue_jobs)", "{{state}}")], "short",
              description="arq queue: due (running included) and deferred (expiry terminations, retries)."),
        Panel("Oldest waiting job", [("max(broker_queue_oldest_due_age_seconds)", "age")], "s",
              description="How long the oldest due job no worker has started has waited."),
        Panel("Queue wait", quantiles("broker_queue_wait_seconds"), "s",
              description="Admission -> a worker starts provisioning."),
        Panel("Provisioning backlog", [("max(broker_provisioning_backlog)", "queued + provisioning")], "short"),
        Panel("Provisioning outcomes", [(srate('broker_provisions_total', "outcome, code"),
                                         "{{outcome}} {{code}}")], "ops"),
        Panel("Jobs by function and outcome", [(srate('broker_worker_jobs_total', "function, outcome"),
                                                "{{function}} {{outcome}}")], "ops"),
        Panel("Job duration p95", quantiles("broker_worker_job_duration_seconds", "function", (0.95,)), "s"),
        Panel("Job retries", [(srate('broker_worker_job_retries_total', "function"), "{{function}}"),
                              (srate('broker_mint_deferred_total'), "mint rate deferrals")], "ops"),
        Panel("Jobs in progress by worker", [("sum by (instance) (broker_worker_jobs_in_progress)", "{{instance}}")],
              "short"),
        Panel("Redis errors", [(srate('broker_redis_errors_total', "job, source"), "{{job}} {{source}}")],
              "ops"),
        Panel("Possible upstream orphans", [(srate('broker_upstream_possible_orphans_total'), "orphans/s")],
              "ops", description="Avaturn creates with an unknown outcome (each ends by itself: user_absent_timeout)."),
        Panel("Shared-state snapshot age", [("max by (instance) (broker_shared_state_age_seconds)", "{{instance}}")],
              "s", description="Age of the Redis snapshot behind the shared gauges (refreshed every 2 s)."),
    ]),
    Row("Upstreams", [
        Panel("Upstream requests by outcome", [(srate('broker_upstream_requests_total', "upstream, operation, outcome"),
                                                "{{upstream}} {{operation}} {{outcome}}")], "ops"),
        Panel("Upstream error ratio", [(ratio('broker_upstream_requests_total{outcome!="ok"}',
                                              "broker_upstream_requests_total", "upstream, operation"),
                                        "{{upstream}} {{operation}}")], "percentunit",
              description="rejected (permanent) + unavailable (transient) / all calls."),
        Panel("Upstream errors by code", [(srate('broker_upstream_requests_total{outcome!="ok"}', "upstream, operation, code"),
                                           "{{upstream}} {{operation}} {{code}}")], "ops"),
        Panel("Upstream latency", quantiles("broker_upstream_request_duration_seconds", "upstream, operation", (0.5, 0.95)),
              "s", width=24),
    ]),
    Row("Terminations", [
        Panel("Terminations by reason", [(srate('broker_terminations_total', "reason"), "{{reason}}")], "ops"),
        Panel("Termination lateness", quantiles("broker_termination_lateness_seconds"), "s",
              description="Expired sessions: expires_at -> upstream DELETE done."),
        Panel("Termination failures by code", [(srate('broker_termination_failures_total', "code"), "{{code}}")],
              "ops", description="Upstream DELETEs that failed and are retried with backoff."),
        Panel("Overdue terminations", [("max(broker_due_terminations)", "overdue")], "short",
              description="Sessions past expires_at (or their retry time) not yet terminated."),
        Panel("Oldest overdue termination", [("max(broker_due_terminations_oldest_seconds)", "age")], "s"),
        Panel("Sweeper actions", [(srate('broker_sweeper_actions_total', "action"), "{{action}}")], "ops"),
    ]),
    Row("Webhooks", [
        Panel("Webhook deliveries by outcome", [(srate("broker_webhook_deliveries_total", "outcome"), "{{outcome}}")],
              "ops", description="Delivery attempts per second: delivered (2xx), retry (failed, retried later), "
                                 "gave_up (retries exhausted), endpoint_gone (410: endpoint disabled), "
                                 "endpoint_failing (failing for 5 days: endpoint disabled)."),
        Panel("Webhook delivery failure ratio",
              [(ratio('broker_webhook_deliveries_total{outcome=~"retry|gave_up"}', "broker_webhook_deliveries_total",
                      ""), "retry + gave_up")], "percentunit",
              description="Failed attempts / all attempts (alert: BrokerWebhookDeliveriesFailing)."),
        Panel("Webhook delivery lateness", quantiles("broker_webhook_delivery_lateness_seconds", qs=(0.5, 0.99)), "s",
              description="Event recorded -> the receiver's 2xx (retries included)."),
        Panel("Pending webhook deliveries", [("max(broker_webhook_pending_deliveries)", "pending")], "short",
              description="Events waiting for delivery, retries included (alert: BrokerWebhookBacklogGrowing)."),
    ]),
]


def _panel(p: Panel, pid: int, x: int, y: int) -> dict[str, object]:
    height = 4 if p.kind == "stat" else 8
    targets = [{"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(65 + i),
                **({"instant": True, "range": False, "format": "table"} if p.instant else {}),
                **({"exemplar": True} if p.exemplars and i == 0 else {})}  # once: all share the buckets
               for i, (expr, legend) in enumerate(p.targets)]
    out: dict[str, object] = {
        "id": pid, "type": p.kind, "title": p.title, "description": p.description, "datasource": DS,
        "gridPos": {"h": height, "w": p.width, "x": x, "y": y}, "targets": targets,
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
    }
    if p.kind == "timeseries":
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    elif p.kind == "stat":
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    return out


def dashboard() -> dict[str, object]:
    panels: list[dict[str, object]] = []
    pid, y = 1, 0
    for row in ROWS:
        panels.append({"id": pid, "type": "row", "title": row.title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y, x, row_h = pid + 1, y + 1, 0, 0
        for p in row.panels:
            if x + p.width > 24:
                x, y, row_h = 0, y + row_h, 0
            panels.append(_panel(p, pid, x, y))
            pid, x, row_h = pid + 1, x + p.width, max(row_h, 4 if p.kind == "stat" else 8)
        y += row_h
    tenant_query = "label_values(broker_admissions_total, tenant)"
    return {
        "uid": "session-broker", "title": "Session Broker", "tags": ["session-broker"], "editable": True,
        "schemaVersion": 39, "version": 1, "time": {"from": "now-1h", "to": "now"}, "refresh": "30s",
        "timezone": "", "graphTooltip": 1, "annotations": {"list": []}, "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "refresh": 1, "hide": 0, "regex": "", "current": {}},
            {"name": "tenant", "label": "Tenant", "type": "query", "datasource": DS,
             "definition": tenant_query, "query": {"query": tenant_query, "refId": "tenant"},
             "multi": True, "includeAll": True, "allValue": ".*", "refresh": 2, "sort": 1, "hide": 0,
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
