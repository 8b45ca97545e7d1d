"""The alert rules of Session Broker as data: thresholds, expressions, annotations (with the
runbook) and the promtool test cases of each alert (a firing and a quiet one at least),
built around the thresholds so that overridden thresholds keep being tested.
Rendered by ``generate.py``."""

from __future__ import annotations

from dataclasses import dataclass, field

API_JOB, WORKER_JOB = "session-broker-api", "session-broker-worker"
# Must be a bucket boundary of broker_time_to_ready_seconds (workers/metrics.py LATENCY_BUCKETS).
TTR_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30, 60)

THRESHOLDS: dict[str, float] = {
    "admission_error_ratio": 0.05,           # share of POST /v1/sessions that fail with an error
    "ttr_slo_seconds": 5,                    # time-to-ready SLO: this fast ...
    "ttr_slo_target": 0.99,                  # ... for this share of sessions
    "queue_oldest_due_seconds": 10,          # a due job waited this long for a worker
    "termination_lateness_p99_seconds": 5,   # expires_at -> upstream DELETE done, p99
    "termination_overdue_seconds": 30,       # a due termination nobody acted on for this long
    "termination_failure_ratio": 0.1,        # failed upstream DELETE attempts / attempts
    "upstream_error_ratio": 0.1,             # transient upstream errors / calls, per upstream+operation
    "provision_failure_ratio": 0.2,          # failed / (ready + failed) provisionings
    "redis_errors_per_second": 0.05,         # per process job
    "shared_state_stale_seconds": 30,        # shared-state gauges older than this
    "budget_refusals_per_second": 0.1,       # 402 budget_exhausted answers per tenant (issue 21)
    "webhook_failure_ratio": 0.25,           # (retry + gave_up) / all webhook delivery attempts
    "webhook_pending_high": 10000,           # events waiting for delivery: too many, whatever the trend
    "webhook_pending_rising_floor": 100,     # ... or more than this and still rising
}


def le(value: float) -> str:
    """prometheus-client's rendering of a bucket bound (5 -> "5.0")."""
    return repr(float(value))


@dataclass
class Case:
    series: list[tuple[str, str]]            # (series selector, values)
    eval_time: str
    fires: list[dict[str, str]] = field(default_factory=list)   # labels of each expected alert (besides severity)
    interval: str = "1m"                     # spacing of the input samples


@dataclass
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    runbook: str
    cases: list[Case]


def alerts(t: dict[str, float]) -> list[Alert]:
    bad = 1 - t["ttr_slo_target"]
    ttr_bucket = f'broker_time_to_ready_seconds_bucket{{le="{le(t["ttr_slo_seconds"])}"}}'
    fast, slow = round(14.4 * bad, 6), round(6 * bad, 6)
    # A good share whose bad share is 3x the fast-burn bound (capped), and one far below it.
    burning_good = max(0.0, 1 - min(1.0, 3 * fast))
    ok_good = 1 - bad / 10
    up = lambda job, inst, v: (f'up{{job="{job}",instance="{inst}"}}', v)  # noqa: E731
    return [
        Alert("BrokerTargetDown", f'up{{job=~"{API_JOB}|{WORKER_JOB}"}} == 0', "2m", "warning",
              "{{ $labels.job }} target {{ $labels.instance }} is down",
              "Prometheus cannot scrape this Session Broker process.",
              "Check that the process/pod runs (docker compose ps, kubectl get pods) and read its JSON logs. "
              "A worker that lost Redis keeps running but answers 503 on /healthz; an API without Redis answers "
              "503 on /readyz. If it runs, check the network between Prometheus and its port.",
              [Case([up(API_JOB, "api:8000", "1 1 0x10"), up(WORKER_JOB, "w1:9100", "1x12")], "8m",
                    [{"job": API_JOB, "instance": "api:8000"}]),
               Case([up(API_JOB, "api:8000", "1x12"), up(WORKER_JOB, "w1:9100", "1 0x11")], "8m",
                    [{"job": WORKER_JOB, "instance": "w1:9100"}]),
               Case([up(API_JOB, "api:8000", "1x12"), up("other-job", "x:1", "0x12")], "8m")]),
        Alert("BrokerNoWorkers", f'sum(up{{job="{WORKER_JOB}"}}) == 0 or absent(up{{job="{WORKER_JOB}"}})', "1m",
              "critical", "No Session Broker worker is running",
              "No worker answers: sessions are neither provisioned nor terminated at expiry.",
              "Start workers now (docker compose up -d worker-1, kubectl scale deploy/session-broker-worker). "
              "Sessions past expires_at keep running upstream until a worker ends them; the sweeper catches up "
              "as soon as one runs.",
              [Case([up(WORKER_JOB, "w1:9100", "0x10"), up(WORKER_JOB, "w2:9100", "0x10")], "5m", [{}]),
               Case([up(API_JOB, "api:8000", "1x10")], "5m", [{"job": WORKER_JOB}]),
               Case([up(WORKER_JOB, "w1:9100", "0x10"), up(WORKER_JOB, "w2:9100", "1x10")], "5m")]),
        Alert("BrokerAdmissionErrorRatioHigh",
              'sum(rate(broker_admissions_total{outcome="error"}[5m])) / sum(rate(broker_admissions_total[5m])) '
              f'> {t["admission_error_ratio"]}', "5m", "critical",
              "Session creations are failing with errors",
              f"More than {t['admission_error_ratio']:.1%} of POST /v1/sessions end in an error (not a quota refusal).",
              "Look at broker_admissions_total{outcome=\"error\"} by reason: redis_unavailable -> check Redis "
              "(memory, maxclients, failover) and broker_redis_errors_total; internal -> a bug: find the traceback "
              "in the API logs by request_id.",
              [Case([('broker_admissions_total{tenant="t1",outcome="admitted",reason="none"}', "0+80x20"),
                     ('broker_admissions_total{tenant="t1",outcome="error",reason="redis_unavailable"}', "0+20x20")],
                    "15m", [{}]),
               Case([('broker_admissions_total{tenant="t1",outcome="admitted",reason="none"}', "0+100x20"),
                     ('broker_admissions_total{tenant="t1",outcome="error",reason="internal"}', "0+0x20")], "15m")]),
        Alert("BrokerTimeToReadySLOFastBurn",
              f"broker:time_to_ready_slow:ratio_rate1h > {fast} and broker:time_to_ready_slow:ratio_rate5m > {fast}",
              "2m", "critical", "Time-to-ready SLO error budget burning fast",
              f"Over 1h and 5m, more than 14.4x the allowed share of sessions took longer than "
              f"{t['ttr_slo_seconds']} s to be ready (SLO: {t['ttr_slo_target']:.2%}).",
              "Split the time: broker_queue_wait_seconds (workers saturated? scale out, see queue depth) vs "
              "broker_upstream_request_duration_seconds (OpenAI mint / Avaturn create slow? check their status "
              "pages) vs mint deferrals (tenant openai_requests_per_minute too low).",
              _ttr_cases(ttr_bucket, burning_good, ok_good, "75m")),
        Alert("BrokerTimeToReadySLOSlowBurn",
              f"broker:time_to_ready_slow:ratio_rate6h > {slow} and broker:time_to_ready_slow:ratio_rate30m > {slow}",
              "15m", "warning", "Time-to-ready SLO error budget burning",
              f"Over 6h and 30m, more than 6x the allowed share of sessions took longer than "
              f"{t['ttr_slo_seconds']} s to be ready (SLO: {t['ttr_slo_target']:.2%}).",
              "Same investigation as BrokerTimeToReadySLOFastBurn, with less urgency: compare queue wait with "
              "upstream latency on the dashboard over the last hours.",
              _ttr_cases(ttr_bucket, burning_good, ok_good, "75m")),
        Alert("BrokerQueueBackingUp", f"max(broker_queue_oldest_due_age_seconds) > {t['queue_oldest_due_seconds']}",
              "2m", "warning", "Jobs wait for a worker",
              f"The oldest due job has waited more than {t['queue_oldest_due_seconds']} s for a worker.",
              "Workers are saturated or stuck: check broker_worker_jobs_in_progress against BROKER_WORKER_MAX_JOBS, "
              "job durations (slow upstreams hold slots) and worker health; add workers.",
              [Case([("broker_queue_oldest_due_age_seconds{instance=\"w1:9100\"}",
                      f"{3 * t['queue_oldest_due_seconds']}x10")], "5m", [{}]),
               Case([("broker_queue_oldest_due_age_seconds{instance=\"w1:9100\"}",
                      f"{t['queue_oldest_due_seconds'] / 2}x10")], "5m")]),
        Alert("BrokerTerminationsLate",
              "histogram_quantile(0.99, sum by (le) (rate(broker_termination_lateness_seconds_bucket[10m]))) "
              f"> {t['termination_lateness_p99_seconds']} or max(broker_due_terminations_oldest_seconds) "
              f"> {t['termination_overdue_seconds']}", "5m", "warning",
              "Sessions are terminated late",
              f"Expired sessions are deleted upstream more than {t['termination_lateness_p99_seconds']} s late (p99), "
              f"or a due termination has waited more than {t['termination_overdue_seconds']} s.",
              "Late terminations cost upstream minutes. Check the queue (BrokerQueueBackingUp), worker count and "
              "health, and Avaturn DELETE latency/errors on the dashboard's upstream row.",
              _lateness_cases(t)),
        Alert("BrokerTerminationsFailing",
              "sum(rate(broker_termination_failures_total[10m])) / (sum(rate(broker_termination_failures_total[10m])) "
              f"+ sum(rate(broker_terminations_total[10m]))) > {t['termination_failure_ratio']}", "10m", "critical",
              "Upstream session deletes keep failing",
              f"More than {t['termination_failure_ratio']:.0%} of termination attempts fail upstream; "
              "sessions stay alive at Avaturn while retried.",
              "broker_termination_failures_total by code: avaturn_invalid_api_key -> a tenant/platform key was "
              "revoked; upstream_unavailable/timeout -> Avaturn outage (retries continue with backoff, Avaturn's "
              "max_duration ends them at worst). Check the Avaturn status page.",
              [Case([("broker_termination_failures_total{code=\"upstream_unavailable\"}", "0+5x30"),
                     ("broker_terminations_total{reason=\"expired\"}", "0+5x30")], "25m", [{}]),
               Case([("broker_termination_failures_total{code=\"upstream_unavailable\"}", "0+0x30"),
                     ("broker_terminations_total{reason=\"expired\"}", "0+5x30")], "25m")]),
        Alert("BrokerUpstreamErrorRatioHigh",
              'sum by (upstream, operation) (rate(broker_upstream_requests_total{outcome="unavailable"}[5m])) '
              "/ sum by (upstream, operation) (rate(broker_upstream_requests_total[5m])) "
              f"> {t['upstream_error_ratio']}", "5m", "warning",
              "{{ $labels.upstream }} {{ $labels.operation }} calls are failing",
              f"More than {t['upstream_error_ratio']:.0%} of calls fail transiently (5xx, 429, timeouts).",
              "Check the upstream's status page and broker_upstream_requests_total by code; 429 -> the platform "
              "key's rate limit; timeouts -> BROKER_UPSTREAM_TIMEOUT_SECONDS vs upstream latency. Sessions are "
              "retried until BROKER_PROVISION_DEADLINE_SECONDS.",
              [Case([('broker_upstream_requests_total{upstream="avaturn",operation="create",outcome="ok",code="none"}', "0+6x20"),
                     ('broker_upstream_requests_total{upstream="avaturn",operation="create",outcome="unavailable",code="upstream_timeout"}', "0+4x20"),
                     ('broker_upstream_requests_total{upstream="openai",operation="mint",outcome="ok",code="none"}', "0+10x20")],
                    "15m", [{"upstream": "avaturn", "operation": "create"}]),
               Case([('broker_upstream_requests_total{upstream="openai",operation="mint",outcome="ok",code="none"}', "0+10x20"),
                     ('broker_upstream_requests_total{upstream="openai",operation="mint",outcome="rejected",code="openai_invalid_api_key"}', "0+10x20")],
                    "15m")]),
        Alert("BrokerProvisioningFailuresHigh",
              'sum(rate(broker_provisions_total{outcome="failed"}[10m])) / sum(rate(broker_provisions_total[10m])) '
              f"> {t['provision_failure_ratio']}", "10m", "warning", "Many sessions fail to provision",
              f"More than {t['provision_failure_ratio']:.0%} of provisionings end failed.",
              "broker_provisions_total{outcome=\"failed\"} by code: openai_*/avaturn_* rejections are usually one "
              "tenant's credentials or config (find it in the worker logs by tenant_id); "
              "provision_deadline_exceeded -> upstream outage or saturated workers.",
              [Case([('broker_provisions_total{outcome="ready",code=""}', "0+5x30"),
                     ('broker_provisions_total{outcome="failed",code="openai_invalid_api_key"}', "0+5x30")], "25m", [{}]),
               Case([('broker_provisions_total{outcome="ready",code=""}', "0+50x30"),
                     ('broker_provisions_total{outcome="failed",code="openai_invalid_api_key"}', "0+1x30")], "25m")]),
        Alert("BrokerJobsErroring", 'sum by (function) (rate(broker_worker_jobs_total{outcome="error"}[5m])) > 0',
              "10m", "warning", "{{ $labels.function }} jobs end in errors",
              "Worker jobs raise unexpected exceptions (arq records them failed; the sweeper re-drives sessions).",
              "Find the traceback in the worker logs (job_id, session_id are on every line) and fix the bug.",
              [Case([('broker_worker_jobs_total{function="provision",outcome="error"}', "0+1x20"),
                     ('broker_worker_jobs_total{function="provision",outcome="ok"}', "0+10x20")], "15m",
                    [{"function": "provision"}]),
               Case([('broker_worker_jobs_total{function="provision",outcome="error"}', "0x20")], "15m")]),
        Alert("BrokerRedisErrors", f"sum by (job) (rate(broker_redis_errors_total[5m])) > {t['redis_errors_per_second']}",
              "2m", "critical", "{{ $labels.job }} cannot reach Redis",
              "Processes see Redis errors: admissions answer 503, workers pause.",
              "Check Redis (up? failover? maxclients, memory with noeviction) and the network; "
              "broker_redis_errors_total by source shows where it hurts.",
              [Case([(f'broker_redis_errors_total{{job="{WORKER_JOB}",source="heartbeat"}}', "0+30x20")], "10m",
                    [{"job": WORKER_JOB}]),
               Case([(f'broker_redis_errors_total{{job="{WORKER_JOB}",source="heartbeat"}}', "0x20")], "10m")]),
        Alert("BrokerSessionsReaped", 'sum(increase(broker_sweeper_actions_total{action="reaped"}[15m])) > 0', "0m",
              "warning", "Sessions were stuck and reaped",
              "The sweeper failed sessions still queued/provisioning at the provisioning deadline.",
              "Something held them: saturated or crashed workers, or an upstream hanging until the deadline. "
              "Check queue wait, upstream latency and worker restarts around that time.",
              [Case([('broker_sweeper_actions_total{action="reaped"}', "0 0 1x10")], "5m", [{}]),
               Case([('broker_sweeper_actions_total{action="reaped"}', "0x10")], "5m")]),
        Alert("BrokerBudgetRefusalsSpiking",
              f"sum by (tenant) (rate(broker_budget_refusals_total[5m])) > {t['budget_refusals_per_second']}",
              "10m", "warning", "Tenant {{ $labels.tenant }} is being refused for its session-second budget",
              f"More than {t['budget_refusals_per_second']} POST /v1/sessions per second answer 402 "
              "budget_exhausted for this tenant (tenant 'other': the tenants outside the top N).",
              "Expected when a tenant used its monthly budget: GET /v1/usage (budgets) or GET /admin/v1/usage "
              "shows used/reserved. If the budget is too low, raise session_seconds_per_month (or the per-end-user "
              "budget) with PATCH /admin/v1/tenants/{id}; it applies to the next admission. If not, tell the tenant "
              "its client retries without honouring Retry-After (the budget renews at period_end).",
              [Case([('broker_budget_refusals_total{tenant="t1",budget="session_seconds_per_month"}',
                      f"0+{round(120 * t['budget_refusals_per_second'], 4)}x30")], "20m", [{"tenant": "t1"}]),
               Case([('broker_budget_refusals_total{tenant="t1",budget="session_seconds_per_month"}',
                      f"0+{round(6 * t['budget_refusals_per_second'], 4)}x30")], "20m")]),
        Alert("BrokerWebhookDeliveriesFailing",
              'sum(rate(broker_webhook_deliveries_total{outcome=~"retry|gave_up"}[10m])) '
              f"/ sum(rate(broker_webhook_deliveries_total[10m])) > {t['webhook_failure_ratio']}", "15m", "warning",
              "Webhook deliveries are failing",
              f"More than {t['webhook_failure_ratio']:.0%} of webhook delivery attempts fail (retried or given up).",
              "Tenants' receivers answer errors or time out, or the workers cannot reach them. One tenant's broken "
              "receiver is its own business (GET /v1/webhook_endpoints/{id}/attempts shows status, error and "
              "response; after 5 days it is disabled): check whether the failures span many endpoints. If they do, "
              "look at the workers' outbound network (DNS, egress proxy, firewall) and the errors in the attempt log "
              "(timeout, connect_error, address_not_public).",
              _webhook_failing_cases(t)),
        Alert("BrokerWebhookBacklogGrowing",
              f"max(broker_webhook_pending_deliveries) > {t['webhook_pending_high']} or "
              "(deriv(max(broker_webhook_pending_deliveries)[15m:1m]) > 0 and "
              f"max(broker_webhook_pending_deliveries) > {t['webhook_pending_rising_floor']})", "15m", "warning",
              "Webhook deliveries are piling up",
              f"More than {t['webhook_pending_high']:g} events wait for delivery, or more than "
              f"{t['webhook_pending_rising_floor']:g} and the number keeps rising.",
              "Either the workers do not keep up (check broker_webhook_delivery_lateness_seconds, worker count and "
              "health, BrokerQueueBackingUp) or receivers fail and their events wait for retries (see "
              "BrokerWebhookDeliveriesFailing and broker_webhook_deliveries_total by outcome). Events are kept 7 "
              "days; tenants can reconcile with GET /v1/events.",
              _webhook_backlog_cases(t)),
        Alert("BrokerSharedStateStale", f"min(broker_shared_state_age_seconds) > {t['shared_state_stale_seconds']}",
              "2m", "warning", "Queue and session gauges are stale",
              "No worker could read the shared state from Redis recently; queue and live-session panels lag.",
              "Usually Redis trouble (see BrokerRedisErrors) or workers whose event loop is blocked.",
              [Case([("broker_shared_state_age_seconds{instance=\"w1:9100\"}",
                      f"{2 * t['shared_state_stale_seconds']}x10")], "5m", [{}]),
               Case([("broker_shared_state_age_seconds{instance=\"w1:9100\"}", "1x10")], "5m")]),
    ]


def _ttr_cases(bucket: str, burning_good: float, ok_good: float, at: str) -> list[Case]:
    count = "broker_time_to_ready_seconds_count"
    # 75 minutes of data: enough for every window (a 6h rate over 75 min of samples is the same
    # ratio), and cheap for promtool.
    return [Case([(bucket, f"0+{round(100 * burning_good, 4)}x80"), (count, "0+100x80")], at, [{}]),
            Case([(bucket, f"0+{round(100 * ok_good, 4)}x80"), (count, "0+100x80")], at)]


def _lateness_cases(t: dict[str, float]) -> list[Case]:
    late = t["termination_lateness_p99_seconds"]
    b = "broker_termination_lateness_seconds_bucket"
    slow = [(f'{b}{{le="{le(late / 10)}"}}', "0x20"), (f'{b}{{le="{le(late * 10)}"}}', "0+1x20"),
            (f'{b}{{le="+Inf"}}', "0+1x20")]
    fast = [(f'{b}{{le="{le(late / 10)}"}}', "0+1x20"), (f'{b}{{le="{le(late * 10)}"}}', "0+1x20"),
            (f'{b}{{le="+Inf"}}', "0+1x20")]
    overdue = ("broker_due_terminations_oldest_seconds", f"{2 * t['termination_overdue_seconds']}x20")
    fine = ("broker_due_terminations_oldest_seconds", "0x20")
    return [Case(slow + [fine], "15m", [{}]), Case(fast + [overdue], "15m", [{}]), Case(fast + [fine], "15m")]


def _webhook_failing_cases(t: dict[str, float]) -> list[Case]:
    d = "broker_webhook_deliveries_total"
    # failed share 3x the threshold (capped below 1), and a tenth of it
    bad = min(0.9, 3 * t["webhook_failure_ratio"])
    low = t["webhook_failure_ratio"] / 10
    return [Case([(f'{d}{{outcome="delivered"}}', f"0+{round(100 * (1 - bad), 4)}x40"),
                  (f'{d}{{outcome="retry"}}', f"0+{round(100 * bad * 0.8, 4)}x40"),
                  (f'{d}{{outcome="gave_up"}}', f"0+{round(100 * bad * 0.2, 4)}x40")], "30m", [{}]),
            Case([(f'{d}{{outcome="delivered"}}', f"0+{round(100 * (1 - low), 4)}x40"),
                  (f'{d}{{outcome="retry"}}', f"0+{round(100 * low, 4)}x40")], "30m"),
            # failing since minute 10, less than the 15 min `for` at minute 20: quiet
            Case([(f'{d}{{outcome="delivered"}}', f"0+{round(100 * (1 - bad), 4)}x40"),
                  (f'{d}{{outcome="retry"}}', f"0x10 0+{round(100 * bad, 4)}x30")], "20m")]


def _webhook_backlog_cases(t: dict[str, float]) -> list[Case]:
    g, high, floor = "broker_webhook_pending_deliveries", t["webhook_pending_high"], t["webhook_pending_rising_floor"]
    return [Case([(f'{g}{{instance="w1:9100"}}', f"{2 * high:g}x40")], "20m", [{}]),          # high
            Case([(f'{g}{{instance="w1:9100"}}', f"0+{floor / 5:g}x40")], "35m", [{}]),      # rising past the floor
            Case([(f'{g}{{instance="w1:9100"}}', f"{high / 2:g}x40")], "35m"),                # high-ish but flat
            Case([(f'{g}{{instance="w1:9100"}}', f"0+{floor / 100:g}x40")], "35m"),           # rising, still small
            Case([(f'{g}{{instance="w1:9100"}}', f"{2 * high:g}x10 0x30")], "35m")]           # drained


def recording_rules(t: dict[str, float]) -> list[dict[str, str]]:
    bucket = f'broker_time_to_ready_seconds_bucket{{le="{le(t["ttr_slo_seconds"])}"}}'
    return [{"record": f"broker:time_to_ready_slow:ratio_rate{w}",
             "expr": f"1 - (sum(rate({bucket}[{w}])) / sum(rate(broker_time_to_ready_seconds_count[{w}])))"}
            for w in ("5m", "30m", "1h", "6h")]
