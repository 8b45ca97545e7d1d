"""Each metric moves when it should, against a real stack (API on loopback, arq worker,
Redis, sandbox upstreams). API metrics are read from its /metrics; worker metrics from the
worker's registry (the same object its /metrics serves)."""

from __future__ import annotations

import time

import httpx

from tests.fixtures.stack import PLATFORM_AVATURN_KEY, PLATFORM_OPENAI_KEY, Admin, ApiServer, make_settings, tenant_client, wait_status
from tenants.scope import DUE_EXPIRY, PROVISION_TENANTS, TenantScope

from .helpers import sample, samples, scrape, value, wait_for

BAD_OPENAI_KEY = "sk-invalid-obs-key-0123456789abcdef"


def _api(api: ApiServer, name: str, **labels: str) -> float:
    return sample(scrape(f"{api.url}/metrics"), name, labels) or 0.0


def test_red_metrics_record_401_404_by_route_template(api, admin: Admin) -> None:
    """Invariant: 401s and 404s are recorded with their real status, labelled by route
    template (never the raw path), and every answer carries an X-Request-Id."""
    _, key = admin.tenant("acme")
    r = httpx.get(f"{api.url}/v1/sessions")
    assert r.status_code == 401 and len(r.headers["x-request-id"]) == 16
    assert httpx.get(f"{api.url}/no/such/path").status_code == 404
    with tenant_client(api.url, key) as c:
        assert c.get("/v1/sessions/ses_doesnotexist00000").status_code == 404
        assert c.get("/v1/sessions").status_code == 200
    text = scrape(f"{api.url}/metrics")
    assert sample(text, "broker_http_requests_total", {"route": "/v1/sessions", "method": "GET", "status": "401"}) == 1
    assert sample(text, "broker_http_requests_total", {"route": "/v1/sessions", "method": "GET", "status": "200"}) == 1
    assert sample(text, "broker_http_requests_total", {"route": "unmatched", "method": "GET", "status": "404"}) == 1
    assert sample(text, "broker_http_requests_total",
                  {"route": "/v1/sessions/{session_id}", "method": "GET", "status": "404"}) == 1
    assert sample(text, "broker_http_request_duration_seconds_count", {"route": "/v1/sessions", "method": "GET"}) == 2
    assert "ses_doesnotexist" not in text and "/no/such/path" not in text
    assert sample(text, "broker_http_requests_in_progress") == 1  # the scrape itself


def test_admission_outcomes_by_tenant_and_reason(api, admin: Admin) -> None:
    tenant, key = admin.tenant("acme", quotas={"max_concurrent_sessions": 2})
    tid = tenant["id"]
    with tenant_client(api.url, key) as c:
        first = c.post("/v1/sessions", headers={"Idempotency-Key": "k1"}, json={"ttl_seconds": 60})
        assert first.status_code == 202
        replay = c.post("/v1/sessions", headers={"Idempotency-Key": "k1"}, json={"ttl_seconds": 60})
        assert replay.json()["id"] == first.json()["id"]
        assert c.post("/v1/sessions", headers={"Idempotency-Key": "k1"}, json={"ttl_seconds": 61}).status_code == 422
        assert c.post("/v1/sessions").status_code == 202
        refused = c.post("/v1/sessions")
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "concurrency_limit"
        assert c.post("/v1/sessions", json={"ttl_seconds": 5}).status_code == 400
    got = {(lab["tenant"], lab["outcome"], lab["reason"]): v for n, lab, v in samples(scrape(f"{api.url}/metrics"))
           if n == "broker_admissions_total"}
    assert got == {(tid, "admitted", "none"): 2, (tid, "replayed", "none"): 1,
                   (tid, "refused", "idempotency_key_reused"): 1, (tid, "refused", "concurrency_limit"): 1,
                   (tid, "rejected", "invalid_request"): 1}


def test_tenant_label_bounded_by_setting(redis_server, sandbox) -> None:
    """Invariant: with BROKER_METRICS_TOP_TENANTS=1 only one tenant id appears in labels;
    the other tenant's admissions are counted under 'other'."""
    import redis as sync_redis

    sync_redis.Redis.from_url(redis_server.url).flushall()
    server = ApiServer(make_settings(redis_server.url, sandbox, BROKER_METRICS_TOP_TENANTS=1)).start()
    admin = Admin(server.url)
    try:
        t1, k1 = admin.tenant("first")
        t2, k2 = admin.tenant("second")
        for key in (k1, k2, k2):
            with tenant_client(server.url, key) as c:
                assert c.post("/v1/sessions").status_code == 202
        text = scrape(f"{server.url}/metrics")
        tenants = {lab["tenant"] for n, lab, _ in samples(text) if n == "broker_admissions_total"}
        assert tenants == {t1["id"], "other"} and t2["id"] not in text
        assert sample(text, "broker_admissions_total", {"tenant": "other", "outcome": "admitted", "reason": "none"}) == 2
    finally:
        admin.close()
        server.stop()


def test_provisioning_upstream_and_job_metrics(api, worker, admin: Admin, sandbox) -> None:
    r = worker.metrics.registry
    _, key = admin.tenant("acme")
    _, bad_key = admin.tenant("broken", openai={"api_key": BAD_OPENAI_KEY})
    with tenant_client(api.url, key) as c:
        assert c.post("/v1/sessions?wait=10").status_code == 201
        sandbox.configure({"mint": {"fail": [{"status": 503, "count": 1}]}})
        sid = c.post("/v1/sessions").json()["id"]
        wait_status(c, sid, {"ready"})
    with tenant_client(api.url, bad_key) as c:
        assert c.post("/v1/sessions?wait=10").status_code == 502
    # the answer leaves when the status is published; the worker counts its attempt just after
    wait_for(lambda: value(r, "broker_worker_jobs_total", function="provision", outcome="ok") == 3, 5, "attempts counted")
    assert value(r, "broker_provisions_total", outcome="ready", code="") == 2
    assert value(r, "broker_provisions_total", outcome="failed", code="openai_invalid_api_key") == 1
    assert value(r, "broker_time_to_ready_seconds_count") == 2
    assert value(r, "broker_queue_wait_seconds_count") == 3
    assert value(r, "broker_upstream_requests_total", upstream="openai", operation="mint", outcome="ok", code="none") == 2
    assert value(r, "broker_upstream_requests_total", upstream="openai", operation="mint", outcome="unavailable",
                 code="upstream_unavailable") == 1
    assert value(r, "broker_upstream_requests_total", upstream="openai", operation="mint", outcome="rejected",
                 code="openai_invalid_api_key") == 1
    assert value(r, "broker_upstream_requests_total", upstream="avaturn", operation="create", outcome="ok", code="none") == 2
    assert value(r, "broker_upstream_request_duration_seconds_count", upstream="openai", operation="mint") == 4
    assert value(r, "broker_worker_job_retries_total", function="provision") == 1
    assert value(r, "broker_worker_jobs_total", function="provision", outcome="retry") == 1
    assert value(r, "broker_worker_jobs_total", function="provision", outcome="ok") == 3
    assert value(r, "broker_worker_jobs_in_progress", function="provision") == 0
    for text in (scrape(f"{api.url}/metrics"), _registry_text(worker)):
        for secret in (BAD_OPENAI_KEY, key, bad_key, PLATFORM_OPENAI_KEY, PLATFORM_AVATURN_KEY, "ek_"):
            assert secret not in text


def test_termination_metrics(api, worker, admin: Admin, sandbox) -> None:
    r = worker.metrics.registry
    _, key = admin.tenant("acme")
    with tenant_client(api.url, key) as c:
        sid = c.post("/v1/sessions?wait=10").json()["id"]
        assert c.delete(f"/v1/sessions/{sid}").status_code in (200, 202)
        wait_status(c, sid, {"terminated"})
        sandbox.configure({"delete": {"fail": [{"status": 503, "count": 1}]}})
        sid = c.post("/v1/sessions?wait=10").json()["id"]
        c.delete(f"/v1/sessions/{sid}")
        wait_status(c, sid, {"terminated"})
    assert value(r, "broker_terminations_total", reason="requested") == 2
    assert value(r, "broker_termination_failures_total", code="upstream_unavailable") == 1
    # the failed DELETE is retried by the worker's expiry loop (workers/expiry.py), which owns
    # every termination retry: the stop job itself ends after its first attempt
    assert value(r, "broker_worker_job_retries_total", function="terminate") == 0
    assert value(r, "broker_upstream_requests_total", upstream="avaturn", operation="delete", outcome="ok", code="none") == 2
    assert value(r, "broker_termination_lateness_seconds_count") == 0  # only expiries are "late"


def test_sweeper_and_shared_gauges_run_in_the_worker(api, worker, admin: Admin, redis_server) -> None:
    """The sweeper runs (its first run at start-up is counted), a due provisioning entry whose
    session is gone is dropped with its tenant's ring entry (and the expiry loop drops an
    expiry entry); the worker's on_startup started the shared-state refresher (its gauges
    appear on the worker's /metrics)."""
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_server.url)
    client.zadd(DUE_EXPIRY, {"t_ghost:ses_ghost": int(time.time() * 1000) - 5_000})
    client.zadd(TenantScope("t_ghost").provision_schedule(), {"ses_ghost2": int(time.time() * 1000) - 5_000})
    client.zadd(PROVISION_TENANTS, {"t_ghost": int(time.time() * 1000) - 5_000})
    r = worker.metrics.registry
    wait_for(lambda: value(r, "broker_worker_jobs_total", function="sweep", outcome="ok") >= 1, 10, "the sweeper")
    wait_for(lambda: not client.exists(TenantScope("t_ghost").provision_schedule())
             and client.zscore(PROVISION_TENANTS, "t_ghost") is None, 10, "the provisioning loop")
    wait_for(lambda: client.zscore(DUE_EXPIRY, "t_ghost:ses_ghost") is None, 10, "the expiry loop")
    client.close()
    wait_for(lambda: r.get_sample_value("broker_queue_jobs", {"state": "deferred"}) is not None, 10, "shared gauges")
    assert 0 <= value(r, "broker_shared_state_age_seconds") < 10


def _registry_text(worker) -> str:
    from prometheus_client import generate_latest

    return generate_latest(worker.metrics.registry).decode()
