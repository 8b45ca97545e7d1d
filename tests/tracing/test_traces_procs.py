"""One session created and stopped through REAL API and worker processes (``python -m broker.cli``)
with tracing on, exporting over OTLP/HTTP to a loopback receiver (tests/tracing/receiver.py).

Invariants:
- the creation is ONE trace: the API request (server span) → its admission span, and the
  worker's provisioning (consumer span, parent: the request's span) → the OpenAI mint and the
  Avaturn create (client spans); ``tenant.id`` and ``session.id`` on them;
- the termination is a trace of its own, linked to the request's span, holding the DELETE;
- the API answers carry ``traceresponse`` (``00-<trace id>-<span id>-<flags>``) naming that
  request span; health and metrics routes make no span;
- the API's access line carries the trace id; the worker's time-to-ready histogram carries it
  as an exemplar in the OpenMetrics exposition (and none in the Prometheus text format);
- no secret (tenant API key, the tenant's OpenAI and Avaturn keys, the platform keys, the admin
  token, the minted client secret, the Avaturn token) anywhere in what was exported.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis

from broker.embedded_redis import EmbeddedRedis, free_port
from tests.fixtures.stack import ADMIN_TOKEN, PLATFORM_AVATURN_KEY, PLATFORM_OPENAI_KEY, wait_status
from tests.fixtures.wait import wait_until
from tests.multiprocess.procs import BrokerProcess, broker_env, running
from tests.observability.helpers import prometheus_binaries
from tests.observability.live import ROOT, Proc, prometheus_config

from .receiver import OtlpReceiver, Span

TRACERESPONSE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
CLIENT_SECRET = re.compile(rb"ek_[A-Za-z0-9_\-]{8,}")


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver().start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def traced(request: pytest.FixtureRequest, redis_server: EmbeddedRedis, sandbox: Any, receiver: OtlpReceiver,
           tmp_path: Path) -> Iterator[dict[str, Any]]:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    env = broker_env(redis_server.url, sandbox, BROKER_LOG_LEVEL="INFO",
                     OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="100")
    procs = {"api": BrokerProcess.api("api", env, tmp_path), "worker": BrokerProcess.worker("worker", env, tmp_path)}
    with running(request, procs, client):
        yield {**procs, "env": env}


def _one(spans: list[Span], **match: Any) -> Span | None:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) <= 1, found
    return found[0] if found else None


def _children(spans: list[Span], parent: Span) -> list[Span]:
    return [s for s in spans if s.trace_id == parent.trace_id and s.parent_id == parent.span_id]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_one_trace_per_creation_and_a_linked_termination_trace(traced: dict[str, Any],
                                                               receiver: OtlpReceiver) -> None:
    api = traced["api"]
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10) as admin:
        _scenario(traced, receiver, admin)


def _scenario(traced: dict[str, Any], receiver: OtlpReceiver, admin: httpx.Client) -> None:
    api, worker = traced["api"], traced["worker"]
    openai_key, avaturn_key = "sk-tenant-" + secrets.token_hex(16), "avt-tenant-" + secrets.token_hex(16)
    r = admin.post("/admin/v1/tenants", json={"name": "traced", "openai": {"api_key": openai_key},
                                              "avaturn": {"api_key": avaturn_key}})
    assert r.status_code == 201, r.text
    tenant_id = r.json()["id"]
    k = admin.post(f"/admin/v1/tenants/{tenant_id}/keys")
    assert k.status_code == 201, k.text
    api_key = k.json()["key"]
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=20) as client:
        trace_id, request_span_id, sid, avaturn_token = _create_and_stop(api, client)
    _check(traced, receiver, worker, tenant_id, sid, trace_id, request_span_id,
           {"tenant API key": api_key, "tenant OpenAI key": openai_key, "tenant Avaturn key": avaturn_key,
            "Avaturn token": avaturn_token})


def _create_and_stop(api: BrokerProcess, client: httpx.Client) -> tuple[str, str, str, str]:
    created = client.post("/v1/sessions", json={"ttl_seconds": 600})
    assert created.status_code == 202, created.text
    sid = created.json()["id"]
    m = TRACERESPONSE.match(created.headers.get("traceresponse", ""))
    assert m, created.headers
    trace_id, request_span_id = m.groups()
    ready = wait_status(client, sid, {"ready", "failed"}, timeout=20)
    assert ready["status"] == "ready", ready
    avaturn_token = ready["avaturn"]["token"]
    stopped = client.delete(f"/v1/sessions/{sid}")
    assert stopped.status_code in (200, 202), stopped.text
    assert wait_status(client, sid, {"terminated"}, timeout=20)["status"] == "terminated"
    # every answer carries traceresponse, errors included; the health route is not traced
    missing = client.get("/v1/sessions/ses_doesnotexist000000000000")
    assert missing.status_code == 404 and TRACERESPONSE.match(missing.headers["traceresponse"])
    unauthorized = httpx.get(f"{api.url}/v1/sessions", timeout=5)
    assert unauthorized.status_code == 401 and TRACERESPONSE.match(unauthorized.headers["traceresponse"])
    assert "traceresponse" not in httpx.get(f"{api.url}/healthz", timeout=5).headers
    return trace_id, request_span_id, sid, avaturn_token


def _check(traced: dict[str, Any], receiver: OtlpReceiver, worker: BrokerProcess, tenant_id: str, sid: str,
           trace_id: str, request_span_id: str, secret_values: dict[str, str]) -> None:
    api = traced["api"]

    def creation(spans: list[Span]) -> dict[str, Span] | None:
        request = _one(spans, trace_id=trace_id, span_id=request_span_id)
        provision = _one(spans, trace_id=trace_id, name="provision session")
        if request is None or provision is None:
            return None
        admission = _one(spans, trace_id=trace_id, name="admission")
        mint = _one(spans, trace_id=trace_id, parent_id=provision.span_id, name="POST openai")
        create = _one(spans, trace_id=trace_id, parent_id=provision.span_id, name="POST avaturn")
        if admission is None or mint is None or create is None:
            return None
        return {"request": request, "admission": admission, "provision": provision, "mint": mint, "create": create}

    found = receiver.wait_for(creation)
    assert found, [(s.service, s.name, s.trace_id) for s in receiver.snapshot()]
    request, admission, provision = found["request"], found["admission"], found["provision"]
    assert request.kind == "server" and request.service == "session-broker-api"
    assert request.name == "POST /v1/sessions" and request.parent_id == ""
    assert admission.parent_id == request.span_id and admission.service == "session-broker-api"
    assert admission.attributes["broker.outcome"] == "admitted"
    assert provision.kind == "consumer" and provision.service == "session-broker-worker"
    assert provision.parent_id == request.span_id
    assert provision.attributes["broker.outcome"] == "ready"
    for span in (request, admission, provision):
        assert span.attributes["tenant.id"] == tenant_id and span.attributes["session.id"] == sid
    for name in ("mint", "create"):
        assert found[name].kind == "client" and found[name].service == "session-broker-worker"
    assert "/realtime/client_secrets" in str(found["mint"].attributes.get("http.url"))
    assert str(found["create"].attributes.get("http.url")).endswith("/sessions")

    def termination(spans: list[Span]) -> tuple[Span, Span] | None:
        ends = [s for s in spans if s.name == "terminate session" and s.attributes.get("session.id") == sid]
        if not ends:
            return None
        delete = [s for s in _children(spans, ends[0]) if s.name == "DELETE avaturn"]
        return (ends[0], delete[0]) if delete else None

    ended = receiver.wait_for(termination)
    assert ended, [(s.service, s.name, s.trace_id) for s in receiver.snapshot()]
    end, delete = ended
    assert end.trace_id != trace_id and end.parent_id == ""
    assert [(t, s) for t, s, _ in end.links] == [(trace_id, request_span_id)]
    assert end.attributes["tenant.id"] == tenant_id and end.attributes["broker.outcome"] == "terminated"
    assert delete.kind == "client"

    spans = receiver.snapshot()
    routes = {s.attributes.get("http.route") for s in spans if s.kind == "server"}
    assert not routes & {"/healthz", "/readyz", "/metrics"}, routes  # wait_healthy polled /readyz

    # no secret anywhere: every string of every span, and the raw export bodies
    forbidden = {**secret_values, "platform OpenAI key": PLATFORM_OPENAI_KEY,
                 "platform Avaturn key": PLATFORM_AVATURN_KEY, "admin token": ADMIN_TOKEN,
                 "secret key": traced["env"]["BROKER_SECRET_KEY"]}
    texts = "\n".join(t for s in spans for t in s.texts())
    raw = b"\n".join(receiver.bodies)
    for what, value in forbidden.items():
        assert value not in texts and value.encode() not in raw, what
    assert not CLIENT_SECRET.search(raw), "a minted client secret was exported"
    assert "authorization" not in texts.lower()

    # the trace id in the API's access line of the creation
    lines = [json.loads(line) for line in api.log_path.read_text().splitlines() if line.startswith("{")]
    access = [x for x in lines if x.get("logger") == "broker.access" and x.get("route") == "/v1/sessions"
              and x.get("method") == "POST"]
    assert access and access[0].get("trace_id") == trace_id, access

    # the exemplar of the time-to-ready observation: OpenMetrics only, when asked for it
    metrics_url = worker.health_url.replace("/healthz", "/metrics")
    text = httpx.get(metrics_url, timeout=5).text
    assert "# {" not in text
    om = httpx.get(metrics_url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}, timeout=5)
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    exemplars = [line for line in om.text.splitlines()
                 if line.startswith("broker_time_to_ready_seconds_bucket") and "# {" in line]
    assert len(exemplars) == 1 and f'trace_id="{trace_id}"' in exemplars[0], exemplars


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_prometheus_keeps_the_exemplar_that_the_time_to_ready_panel_shows(traced: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    """Invariant: a real Prometheus (exemplar storage on, as deploy/compose.yaml runs it) scraping
    the worker with the project's scrape config stores the time-to-ready observation's exemplar,
    whose trace_id is the creation's trace; the dashboard's "Time to ready" panel asks for
    exemplars, and its own queries return that one."""
    prom_bin, _ = prometheus_binaries()
    api, worker = traced["api"], traced["worker"]
    api_target = api.url.removeprefix("http://")
    worker_target = worker.health_url.removeprefix("http://").removesuffix("/healthz")
    config = prometheus_config(tmp_path, api_target, [worker_target])
    port = free_port()
    prom = Proc([prom_bin, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn", "--enable-feature=exemplar-storage"],
                tmp_path / "prometheus.log")
    try:
        prom.wait_http(f"http://127.0.0.1:{port}/-/ready")
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10) as admin:
            tenant = admin.post("/admin/v1/tenants", json={"name": "exemplar"}).json()
            key = admin.post(f"/admin/v1/tenants/{tenant['id']}/keys").json()["key"]
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=20) as client:
            created = client.post("/v1/sessions", json={"ttl_seconds": 600})
            assert created.status_code == 202, created.text
            m = TRACERESPONSE.match(created.headers["traceresponse"])
            assert m
            assert wait_status(client, created.json()["id"], {"ready", "failed"}, timeout=20)["status"] == "ready"
        trace_id = m.group(1)
        dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "session-broker.json").read_text())
        [panel] = [p for p in dashboard["panels"] if p.get("title") == "Time to ready"]
        flagged = [t for t in panel["targets"] if t.get("exemplar") is True]
        assert len(flagged) == 1, panel["targets"]  # the quantiles share one histogram: its dots once
        for target in flagged:
            expr = target["expr"].replace("$__rate_interval", "1m")

            def exemplar_trace_ids() -> set[str]:
                now = time.time()
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query_exemplars",
                              params={"query": expr, "start": now - 300, "end": now + 60}, timeout=10)
                assert r.status_code == 200, r.text
                return {e["labels"].get("trace_id", "") for series in r.json()["data"] for e in series["exemplars"]}

            seen = wait_until(lambda: ids if trace_id in (ids := exemplar_trace_ids()) else None, 30,
                              f"Prometheus had the exemplar of {expr}", interval=0.5)
            assert seen == {trace_id}, (expr, seen, prom.log.read_text()[-2000:])
    finally:
        prom.stop()
