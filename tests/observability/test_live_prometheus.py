"""THE live test: a real Prometheus scrapes a real API process and two real worker processes
(started with ``session-broker api|worker``) while sessions are created, refused, failed,
replayed, stopped and expired; then every dashboard panel query and every alert expression
is evaluated through Prometheus' HTTP API, and the counters are checked against what the
driver did and what the sandbox upstreams saw.

Skipped (with how to install it) when Prometheus is missing, failed instead when $CI is set."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from broker.embedded_redis import EmbeddedRedis, free_port
from tests.fixtures.stack import (ADMIN_TOKEN, PLATFORM_AVATURN_KEY, PLATFORM_OPENAI_KEY, Admin, tenant_client,
                                  wait_status)
from workers.gauges import LIVE_STATS_KEY
from tests.fixtures.wait import wait_until

from .helpers import prometheus_binaries
from .live import PROM_DIR, ROOT, Prometheus, Proc, broker, broker_env, prometheus_config

BAD_OPENAI_KEY = "sk-invalid-live-obs-key-0123456789"
RATE_INTERVAL = "5m"   # longer than the whole test: every event is inside the window


@pytest.fixture
def stack(redis_server: EmbeddedRedis, sandbox: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    prom_bin, _ = prometheus_binaries()
    import redis as sync_redis

    sync_redis.Redis.from_url(redis_server.url).flushall()
    # arq's per-job lines are off by default (BROKER_LIBRARY_LOG_LEVEL=WARNING): turned back on
    # here, the logs must show them with the job's ids bound (checked in _check_process_logs)
    env = {**broker_env(redis_server.url, sandbox), "BROKER_LIBRARY_LOG_LEVEL": "INFO"}
    api_port, api_metrics, w1, w2 = free_port(), free_port(), free_port(), free_port()
    procs: list[Proc] = []
    prom: Prometheus | None = None
    try:
        procs.append(broker(["api", "--host", "127.0.0.1", "--port", str(api_port), "--metrics-port", str(api_metrics)],
                            env, tmp_path / "api.log"))
        for i, port in enumerate((w1, w2)):
            procs.append(broker(["worker", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"], env,
                                tmp_path / f"worker{i}.log"))
        # the API's /metrics is on its --metrics-port (the tenant port answers 404 for it)
        config = prometheus_config(tmp_path, f"127.0.0.1:{api_metrics}", [f"127.0.0.1:{w1}", f"127.0.0.1:{w2}"])
        prom = Prometheus(prom_bin, config, tmp_path)
        procs[0].wait_http(f"http://127.0.0.1:{api_port}/readyz")
        procs[1].wait_http(f"http://127.0.0.1:{w1}/healthz")
        procs[2].wait_http(f"http://127.0.0.1:{w2}/healthz")
        prom.ready()
        yield {"api": f"http://127.0.0.1:{api_port}", "prom": prom, "logs": tmp_path, "redis": redis_server.url}
    finally:
        for proc in reversed(procs):
            proc.stop()
        if prom is not None:
            prom.stop()


def drive(api: str, sandbox: Any, prom: Prometheus) -> dict[str, Any]:
    """Sessions created (one after a transient mint failure), replayed, refused (quota, budget), rejected,
    failed upstream, stopped (after a failed DELETE) and expired; a 401 and a 404; alpha's events
    delivered to the sandbox's webhook receiver (its first answer a 503: one retry), which feeds
    the Webhooks row.

    rate() only sees increments between two scrapes: the driver waits for Prometheus' first
    scrape of every target (it starts scraping a few seconds after it is ready), and for the
    first scrape of the tenant's series (created by its first admission) before going on."""
    prom.wait_value("count(broker_time_to_ready_seconds_count)", 2)
    prom.wait_value("count(broker_http_requests_in_progress)", 1)
    admin = Admin(api)
    try:
        alpha, alpha_key = admin.tenant("alpha", quotas={"max_concurrent_sessions": 3})
        beta, beta_key = admin.tenant("beta", openai={"api_key": BAD_OPENAI_KEY})
    finally:
        admin.close()
    sandbox.configure({"mint": {"fail": [{"status": 503, "count": 1}]}})
    with tenant_client(api, alpha_key) as c:
        # alpha's events go to the sandbox's receiver, whose first answer is a 503 (one retry)
        hook = c.post("/v1/webhook_endpoints", json={"url": sandbox.webhook_url("live")})
        assert hook.status_code == 201, hook.text
        sandbox.configure_webhooks("live", {"secrets": [hook.json()["secret"]], "fail": [{"status": 503, "count": 1}]})
        short = c.post("/v1/sessions?wait=10", json={"ttl_seconds": 10})  # first: it expires while we go on
        assert short.status_code == 201, short.text
        prom.wait_value(f'count(broker_admissions_total{{tenant="{alpha["id"]}"}})', 1)
        first = c.post("/v1/sessions?wait=10", json={"ttl_seconds": 60})
        assert first.status_code == 201, first.text
        keyed = c.post("/v1/sessions?wait=10", headers={"Idempotency-Key": "k"})
        assert keyed.status_code == 201, keyed.text
        assert c.post("/v1/sessions", headers={"Idempotency-Key": "k"}).json()["id"] == keyed.json()["id"]
        assert c.post("/v1/sessions").status_code == 429
        assert c.post("/v1/sessions", json={"ttl_seconds": 5}).status_code == 400
        assert c.get("/v1/sessions/ses_doesnotexist00000").status_code == 404
        sandbox.configure({"delete": {"fail": [{"status": 503, "count": 1}]}})
        c.delete(f"/v1/sessions/{first.json()['id']}")
        wait_status(c, first.json()["id"], {"terminated"})
        assert wait_status(c, short.json()["id"], {"terminated"}, timeout=20)["termination_reason"] == "expired"
        # a budget below what alpha holds (keyed's default TTL is reserved): 402, seen by two scrapes
        patched = httpx.patch(f"{api}/admin/v1/tenants/{alpha['id']}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                              json={"quotas": {"session_seconds_per_month": 60}})
        assert patched.status_code == 200, patched.text
        wait_until(lambda: c.get("/v1/usage").json()["quotas"]["session_seconds_per_month"] == 60, 10,
                   "the API's tenant cache has the new quota")
        assert c.post("/v1/sessions").status_code == 402
        prom.wait_value("count(broker_budget_refusals_total)", 1)
        assert c.post("/v1/sessions").status_code == 402
        events = c.get("/v1/events", params={"limit": 100}).json()["data"]
        wait_until(lambda: {e["id"] for e in events} <= {d["webhook_id"] for d in sandbox.webhook_deliveries("live")
                                                         if d["status"] == 204 and d["verified"]},
                   30, "every event delivered to the live receiver (the failed first one is retried after 5 s)",
                   interval=0.2, state=lambda: sandbox.webhook_deliveries("live"))
    with tenant_client(api, beta_key) as c:
        assert c.post("/v1/sessions?wait=10").status_code == 502
    assert httpx.get(f"{api}/v1/sessions").status_code == 401
    return {"alpha": alpha["id"], "beta": beta["id"], "keys": (alpha_key, beta_key), "audit": sandbox.audit(),
            "webhook_events": len(events)}


def panel_targets() -> list[tuple[str, str]]:
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "session-broker.json").read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


def substitute(expr: str, tenant: str) -> str:
    return (expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__range", RATE_INTERVAL)
            .replace("$tenant", tenant))


def test_dashboards_and_alerts_on_a_live_prometheus(stack: dict[str, Any], sandbox: Any) -> None:
    prom: Prometheus = stack["prom"]
    done = drive(stack["api"], sandbox, prom)
    audit = done["audit"]

    # Counts agree with what the driver did and with what the upstream fakes saw.
    exact = {
        'sum(broker_admissions_total{outcome="admitted"})': 4,
        f'sum(broker_admissions_total{{tenant="{done["alpha"]}",outcome="admitted"}})': 3,
        'sum(broker_admissions_total{outcome="replayed"})': 1,
        'sum(broker_admissions_total{outcome="refused",reason="concurrency_limit"})': 1,
        'sum(broker_admissions_total{outcome="refused",reason="budget_exhausted"})': 2,
        f'sum(broker_budget_refusals_total{{tenant="{done["alpha"]}",budget="session_seconds_per_month"}})': 2,
        'sum(broker_admissions_total{outcome="rejected"})': 1,
        'sum(broker_http_requests_total{status="429"})': 1,
        'sum(broker_http_requests_total{route="/v1/sessions",status="401"})': 1,
        'sum(broker_http_requests_total{route="/v1/sessions/{session_id}",status="404"})': 1,
        'sum(broker_provisions_total{outcome="ready"})': 3,
        'sum(broker_provisions_total{outcome="failed",code="openai_invalid_api_key"})': 1,
        'sum(broker_worker_job_retries_total{function="provision"})': 1,
        'sum(broker_terminations_total{reason="expired"})': 1,
        'sum(broker_terminations_total{reason="requested"})': 1,
        'sum(broker_termination_failures_total{code="upstream_unavailable"})': 1,
        "sum(broker_termination_lateness_seconds_count)": 1,
        "sum(broker_time_to_ready_seconds_count)": 3,
        'sum(broker_upstream_requests_total{upstream="openai",operation="mint",outcome="ok"})': len(audit["secrets"]),
        'sum(broker_upstream_requests_total{upstream="avaturn",operation="create",outcome="ok"})': len(audit["sessions"]),
        'sum(broker_upstream_requests_total{upstream="avaturn",operation="delete",outcome="ok"})':
            sum(1 for s in audit["sessions"] if s.get("ended_by") == "delete"),
        'count(up{job="session-broker-worker"} == 1)': 2,
        'count(up{job="session-broker-api"} == 1)': 1,
        "count(broker_provisioning_backlog)": 2,   # one per worker: dashboards take max()
        'sum(broker_webhook_deliveries_total{outcome="delivered"})': done["webhook_events"],
        'sum(broker_webhook_deliveries_total{outcome="retry"})': 1,
        "sum(broker_webhook_delivery_lateness_seconds_count)": done["webhook_events"],
    }
    assert len(audit["sessions"]) == 3 and len(audit["secrets"]) == 3
    for expr, expected in exact.items():
        prom.wait_value(expr, expected)

    # Every dashboard panel query: no error, and data (a finite value) where the scenario made some.
    live_stats = _live_stats_maintained(stack["redis"])
    queries = [(title, substitute(expr, tenant)) for tenant in (".*", done["alpha"])
               for title, expr in panel_targets() if tenant == ".*" or "$tenant" in expr]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda q: prom.query(q[1]), queries))   # a query error fails here
    problems = []
    for (title, expr), result in zip(queries, results, strict=True):
        if title.startswith("Live sessions") and not live_stats:
            continue  # sb:stats:live is not maintained (yet): the panel has nothing to show
        if not result:
            problems.append(f"no data: {title!r}: {expr}")
        elif not any(math.isfinite(float(r["value"][1])) for r in result):
            problems.append(f"only NaN/Inf: {title!r}: {expr} -> {result}")
    assert not problems, "\n".join(problems)

    # The tenant variable lists the tenants.
    r = httpx.get(f"{prom.url}/api/v1/label/tenant/values", params={"match[]": "broker_admissions_total"}).json()
    assert {done["alpha"], done["beta"]} <= set(r["data"])

    # Every alert and recording rule expression evaluates, and Prometheus ran them all without error.
    rules_doc = yaml.safe_load((PROM_DIR / "rules" / "session-broker.rules.yml").read_text())
    rules = [rule for group in rules_doc["groups"] for rule in group["rules"]]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(prom.query, [rule["expr"] for rule in rules]))   # a query error fails here
    def evaluated() -> list[dict[str, Any]] | None:
        groups = httpx.get(f"{prom.url}/api/v1/rules").json()["data"]["groups"]
        loaded = [rule for g in groups for rule in g["rules"]]
        return loaded if len(loaded) == len(rules) and all(
            rule.get("lastEvaluation", "").startswith("2") and rule["health"] != "unknown" for rule in loaded) else None

    loaded = wait_until(evaluated, 10, "every rule loaded and evaluated once", interval=0.25)
    assert all(rule["health"] == "ok" for rule in loaded), [(r["name"], r.get("lastError")) for r in loaded]
    assert prom.scalar("broker:time_to_ready_slow:ratio_rate5m") is not None

    _check_process_logs(stack["logs"], done)


def _live_stats_maintained(redis_url: str) -> bool:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_url)
    try:
        return bool(client.exists(LIVE_STATS_KEY))
    finally:
        client.close()


def _check_process_logs(logs: Path, done: dict[str, Any]) -> None:
    """The real processes log one JSON object per line, with the ids bound, and no secret."""
    secrets = (*done["keys"], BAD_OPENAI_KEY, PLATFORM_OPENAI_KEY, PLATFORM_AVATURN_KEY)
    api_lines = _json_lines(logs / "api.log")
    worker_lines = _json_lines(logs / "worker0.log") + _json_lines(logs / "worker1.log")
    for line in api_lines + worker_lines:
        text = json.dumps(line)
        assert not any(s in text for s in secrets), text
    access = [line for line in api_lines if line.get("logger") == "broker.access" and line.get("status") == 201
              and line.get("route") == "/v1/sessions"]
    assert access and all(line["request_id"] and line["tenant_id"] == done["alpha"] and
                          line["session_id"].startswith("ses_") for line in access)
    arq_done = [line for line in worker_lines if line["logger"] == "arq.worker" and "←" in line["event"]]
    assert arq_done and all(line.get("job_id") for line in arq_done), arq_done   # arq's own job lines too
    assert any(line["job_id"].startswith("term:ses_") and line["job_id"] in line["event"] for line in arq_done)
    # provisioning is not an arq job (the worker's provisioning loop): its lines carry the ids
    provision = [line for line in worker_lines if line["logger"] == "workers.provision"]
    assert provision and all(line.get("tenant_id") and line.get("session_id", "").startswith("ses_")
                             for line in provision), provision
    failed_delete = [line for line in worker_lines if "upstream delete failed" in line["event"]]
    assert failed_delete and failed_delete[0]["job_id"].startswith("term:")
    assert failed_delete[0]["tenant_id"] == done["alpha"] and failed_delete[0]["session_id"].startswith("ses_")


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for raw in path.read_text().splitlines():
        if raw.strip():
            try:
                out.append(json.loads(raw))  # every line is one JSON event
            except json.JSONDecodeError:
                raise AssertionError(f"{path.name}: not a JSON log line: {raw[:300]}") from None
    return out
