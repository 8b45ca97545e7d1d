"""Every metric of a worker process, declared in one place on the worker's own registry,
served with /healthz on ``--metrics-port`` (one port per process: no multiprocess mode)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, GCCollector, Histogram, PlatformCollector, ProcessCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30, 60)
LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)


class WorkerMetrics:
    def __init__(self) -> None:
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
        self.provisions = Counter("broker_provisions_total",
                                  "Provisioning outcomes (ready or failed) with the error code of failures.",
                                  ["outcome", "code"], registry=r)
        self.queue_wait = Histogram("broker_queue_wait_seconds", "Time from admission to a worker starting the provisioning.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_ready = Histogram("broker_time_to_ready_seconds", "Time from admission to ready.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_calls = Counter("broker_upstream_requests_total",
                                      "Upstream calls by upstream, operation and result ('ok' or an error code).",
                                      ["upstream", "operation", "result"], registry=r)
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
                                     "Provisioning jobs deferred by the per-tenant OpenAI mint rate.", registry=r)
        self.possible_orphans = Counter("broker_upstream_possible_orphans_total",
                                        "Avaturn creates whose outcome was unknown and were created again, or "
                                        "orphans whose delete failed (each bounded by user_absent_timeout/max_duration).",
                                        registry=r)
        self.redis_errors = Counter("broker_redis_errors_total", "Redis errors seen by this process.",
                                    ["process"], registry=r)
