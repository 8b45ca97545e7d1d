"""broker/core/tracing.py in one process: the OTEL_* settings, what the helpers do on and off, the
upstream clients' client spans (no credential header, no key), trace ids in log lines, and
exceptions recorded without their message."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from broker.core import tracing
from broker.core.logs import JsonFormatter
from broker.core.settings import Settings, SettingsError
from workers.upstreams.avaturn import AvaturnClient
from workers.upstreams.errors import UpstreamRejected
from workers.upstreams.openai import OpenAIMinter


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test, into memory; off again afterwards."""
    exporter = InMemorySpanExporter()
    assert tracing.configure(Settings(), "session-broker-test", exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def _spans(exporter: InMemorySpanExporter) -> list[Any]:
    assert tracing.force_flush()
    return list(exporter.get_finished_spans())


def _strings(span: Any) -> list[str]:
    out = [span.name]
    for attrs in (span.attributes, *(link.attributes for link in span.links), *(e.attributes for e in span.events)):
        for key, value in (attrs or {}).items():
            out += [key, str(value)]
    return out


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "none"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "otlp"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, "otlp"),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),
    ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "none"),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "none"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "otlp"),
])
def test_tracing_is_off_unless_the_standard_variables_ask(env: dict[str, str], expected: str) -> None:
    assert Settings.from_env(env).otel_traces_exporter == expected


@pytest.mark.parametrize(("env", "named"), [
    ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
     "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
     "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
])
def test_an_exporter_or_protocol_not_shipped_is_refused_by_name(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    assert str(err.value).startswith(named + " ")


def test_off_every_helper_is_inert() -> None:
    """Invariant: with tracing off nothing is configured and no span or context object is made."""
    assert not tracing.configure(Settings(), "x")
    assert not tracing.enabled()
    fields: dict[str, str] = {}
    tracing.stamp(fields)
    assert fields == {}
    assert tracing.traceparent() is None and tracing.current_trace_id() is None and tracing.exemplar() is None
    step = tracing.provisioning("t", "ses_1", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    assert step is tracing.termination("t", "ses_1", "") and step.span is None  # the shared no-op step
    with step as s:
        assert s.outcome("ready") == "ready" and s.span is None
    assert tracing.aiohttp_trace_configs("avaturn") == [] and tracing.litestar_plugins() == []
    assert tracing.before_send_hooks() == []


def test_provisioning_is_a_child_of_the_stored_context_and_termination_a_linked_root(
        exported: InMemorySpanExporter) -> None:
    with tracing._state.tracer.start_as_current_span("request"):  # type: ignore[union-attr]
        fields: dict[str, str] = {}
        tracing.stamp(fields)
        stored = fields["traceparent"]
    with tracing.provisioning("ten_a", "ses_1", stored) as step:
        assert step.outcome("ready") == "ready"
    with tracing.termination("ten_a", "ses_1", stored) as step:
        step.outcome("terminated")
    with tracing.provisioning("ten_a", "ses_2", "") as step:  # a record written before tracing: a root
        step.outcome("ready")
    request, provision, terminate, orphan = _spans(exported)
    flags = int(request.context.trace_flags)
    assert stored == f"00-{request.context.trace_id:032x}-{request.context.span_id:016x}-{flags:02x}"
    assert provision.parent.span_id == request.context.span_id
    assert provision.context.trace_id == request.context.trace_id and provision.kind == SpanKind.CONSUMER
    assert dict(provision.attributes) == {"tenant.id": "ten_a", "session.id": "ses_1", "broker.outcome": "ready"}
    assert terminate.parent is None and terminate.context.trace_id != request.context.trace_id
    assert [link.context.span_id for link in terminate.links] == [request.context.span_id]
    assert orphan.parent is None


def test_an_exception_is_recorded_by_type_and_code_never_by_message(exported: InMemorySpanExporter) -> None:
    secret = "sk-" + secrets.token_hex(16)
    with pytest.raises(UpstreamRejected):
        with tracing.provisioning("ten_a", "ses_1", None):
            raise UpstreamRejected(upstream="openai", operation="mint", status=401, code="openai_invalid_api_key",
                                   message=f"Incorrect API key provided: {secret}")
    [span] = _spans(exported)
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.code"] == "openai_invalid_api_key"
    assert span.attributes["error.type"] == "UpstreamRejected"
    assert not span.events and secret not in " ".join(_strings(span)) and secret not in str(span.status.description)


def test_log_lines_carry_the_trace_id_inside_a_span(exported: InMemorySpanExporter) -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "hello", (), None)
    assert "trace_id" not in json.loads(JsonFormatter().format(record))
    with tracing._state.tracer.start_as_current_span("job") as span:  # type: ignore[union-attr]
        line = json.loads(JsonFormatter().format(record))
        assert line["trace_id"] == f"{span.get_span_context().trace_id:032x}"
        assert tracing.exemplar() == {"trace_id": line["trace_id"]}


async def test_upstream_calls_are_client_spans_without_credentials(exported: InMemorySpanExporter,
                                                                   sandbox: Any) -> None:
    """Invariant: the aiohttp instrumentation makes one client span per upstream call, child of
    the current span, and records neither the Authorization header nor the keys, the minted
    client secret or the Avaturn token."""
    openai_key, avaturn_key = "sk-unit-" + secrets.token_hex(16), "avt-unit-" + secrets.token_hex(16)
    minter = OpenAIMinter(sandbox.openai_base_url, timeout=5)
    avaturn = AvaturnClient(sandbox.avaturn_base_url, timeout=5)
    try:
        with tracing.provisioning("ten_a", "ses_1", None):
            minted = await minter.mint(openai_key, {"type": "realtime", "model": "gpt-realtime"}, expires_seconds=60)
            created = await avaturn.create_session(avaturn_key, minted.value, avatar_id="jane_20240829",
                                                   background="default", user_absent_timeout=60, max_duration=120)
            assert await avaturn.delete_session(avaturn_key, created.session_id)
    finally:
        await minter.aclose()
        await avaturn.aclose()
    spans = _spans(exported)
    [provision] = [s for s in spans if s.name == "provision session"]
    clients = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert [s.name for s in clients] == ["POST openai", "POST avaturn", "DELETE avaturn"]
    assert all(s.parent.span_id == provision.context.span_id for s in clients)
    assert [s.attributes.get("http.status_code") for s in clients] == [200, 200, 200]
    text = "\n".join(t for s in spans for t in _strings(s))
    for value in (openai_key, avaturn_key, minted.value, created.token):
        assert value not in text
    assert "authorization" not in text.lower() and "bearer" not in text.lower()


async def test_the_admission_span_records_the_outcome_and_a_refusal_code(exported: InMemorySpanExporter) -> None:
    from tenants.admission import Admitted, Refused
    from tenants.usage import QuotaUsage, UsageSnapshot

    usage = UsageSnapshot(minute=QuotaUsage.of(1, 1, 60), day=QuotaUsage.of(10, 1, 100),
                          concurrency=QuotaUsage.of(1, 1, 0), end_user=None)

    async def step(outcome: Any) -> Any:
        return outcome

    with tracing._state.tracer.start_as_current_span("POST /v1/sessions"):  # type: ignore[union-attr]
        admitted = Admitted(session_id="ses_1", replaced=[], usage=usage, mint_at=0, mint=QuotaUsage.of(300, 1, 60))
        assert await tracing.admission("ten_a", "ses_1", step(admitted)) is admitted
        refused = Refused(code="concurrency_limit", limit=1, current=1, retry_after_s=1, usage=usage,
                          mint=QuotaUsage.of(300, 1, 60))
        assert await tracing.admission("ten_a", "ses_2", step(refused)) is refused
    first, second, request = _spans(exported)
    assert first.name == second.name == "admission"
    assert first.parent.span_id == request.context.span_id
    assert first.attributes["broker.outcome"] == "admitted" and "error.code" not in first.attributes
    assert second.attributes["broker.outcome"] == "refused"
    assert second.attributes["error.code"] == "concurrency_limit"
    assert request.attributes["tenant.id"] == "ten_a"


def test_a_retry_is_an_outcome_not_an_error(exported: InMemorySpanExporter) -> None:
    from workers.jobs.provision import Rescheduled
    from workers.jobs.terminate import TerminationPending

    with pytest.raises(Rescheduled):
        with tracing.provisioning("ten_a", "ses_1", None):
            raise Rescheduled(1_000, "upstream_unavailable")
    with pytest.raises(TerminationPending):
        with tracing.termination("ten_a", "ses_1", None):
            raise TerminationPending(2.0)
    for span in _spans(exported):
        assert span.attributes["broker.outcome"] == "retry"
        assert span.status.status_code == StatusCode.UNSET and "error.type" not in span.attributes
