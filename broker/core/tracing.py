"""Tracing with OpenTelemetry: one trace per session creation (the API request, its admission,
the provisioning in a worker, the OpenAI mint and the Avaturn create), and the termination as
a trace of its own linked to it (CONTRACT.md section 13).

Off unless OpenTelemetry's standard variables ask for it (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_TRACES_EXPORTER``, read by
:mod:`broker.core.settings`); the other ``OTEL_*`` variables (sampler, batch sizes, headers,
resource attributes) are read by the SDK itself. When off, nothing of OpenTelemetry is
imported and every helper here returns at once: no span, no context object, no exporter.

The W3C context travels in the session record (field ``traceparent``, written with the session
by the admission step), not in the job payload: a worker that predates it ignores the field,
and a record without it (written by an older API) gets a provisioning span of its own.

Tracing is process-wide by OpenTelemetry's design (spans find their parent through a
contextvar), so its state is one module-level :class:`_Tracing`, set once by
:func:`configure` when a process starts (``broker/cli.py``). The tracer provider is ours, not
OpenTelemetry's global one, and is handed explicitly to Litestar's middleware and to the
aiohttp instrumentation, so tests can configure and reset it.

Span attributes: ``tenant.id``, ``session.id``, ``error.code`` (a broker error code), the
outcome of a step; never a key, a secret, a token or a request header (the instrumentations
capture no header unless told to, and we tell them none).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

    from broker.core.settings import Settings

T = TypeVar("T")

TRACER_NAME = "session-broker"
TRACEPARENT_FIELD = "traceparent"
# Routes that never get a span (scraped every few seconds; nothing to follow).
UNTRACED_PATHS = ("/metrics", "/healthz", "/readyz")


class _Tracing:
    def __init__(self, provider: TracerProvider, tracer: Tracer) -> None:
        self.provider = provider
        self.tracer = tracer


_state: _Tracing | None = None


def enabled() -> bool:
    return _state is not None


def configure(settings: Settings, service_name: str, *, exporter: SpanExporter | None = None) -> bool:
    """Turn tracing on for this process if ``settings`` ask for it (or an ``exporter`` is given:
    tests); returns whether it is on. ``service_name`` (``session-broker-api`` / ``-worker``) is
    the resource's ``service.name`` unless ``OTEL_SERVICE_NAME`` names another."""
    global _state
    if exporter is None and settings.otel_traces_exporter == "none":
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from broker.core import logs

    if exporter is None:
        exporter = _exporter(settings.otel_traces_exporter)
    shutdown()
    # Resource.create() adds OTEL_RESOURCE_ATTRIBUTES; the name given here wins over it, so
    # OTEL_SERVICE_NAME is applied explicitly (read by the settings).
    resource = Resource.create({SERVICE_NAME: settings.otel_service_name or service_name})
    provider = TracerProvider(resource=resource, shutdown_on_exit=True)  # sampler: OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(exporter))          # OTEL_BSP_* variables
    _state = _Tracing(provider, provider.get_tracer(TRACER_NAME))
    logs.set_trace_id_source(current_trace_id)
    return True


def _exporter(kind: str) -> SpanExporter:
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout, compression: OTEL_EXPORTER_OTLP_*


def shutdown() -> None:
    """Export what is buffered and turn tracing off (process exit does the same by itself)."""
    global _state
    state, _state = _state, None
    if state is not None:
        from broker.core import logs

        logs.set_trace_id_source(None)
        state.provider.shutdown()


def force_flush(timeout_ms: int = 5000) -> bool:
    return _state.provider.force_flush(timeout_ms) if _state is not None else True


# ---- the W3C context carried by the session record --------------------------------------------


def traceparent() -> str | None:
    """The current context as a W3C ``traceparent`` value to store, or None (off, no span)."""
    if _state is None:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def stamp(fields: dict[str, str]) -> None:
    """Add ``traceparent`` to the fields of a session being admitted (nothing when off). Called
    inside the request's span: that span is the provisioning's parent."""
    if _state is not None:
        value = traceparent()
        if value:
            fields[TRACEPARENT_FIELD] = value


def _context_of(value: str | None) -> Any:
    """The OpenTelemetry context of a stored ``traceparent`` (an empty one if none/malformed)."""
    from opentelemetry.context import Context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if not value:
        return Context()
    return TraceContextTextMapPropagator().extract({"traceparent": value}, context=Context())


# ---- spans ---------------------------------------------------------------------------------------


class _Step:
    """What a traced step yields: ``outcome(x)`` records ``x`` as its outcome and returns it."""

    __slots__ = ("_cm", "span")

    def __init__(self, cm: Any = None) -> None:
        self._cm = cm
        self.span: Span | None = None

    def __enter__(self) -> _Step:
        if self._cm is not None:
            self.span = self._cm.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._cm is None:
            return
        span = self.span
        if exc is not None and span is not None:
            _record_exception(span, exc)
        self._cm.__exit__(exc_type, exc, tb)

    def outcome(self, value: T) -> T:
        if self.span is not None and isinstance(value, str):
            self.span.set_attribute("broker.outcome", value)
        return value


_NO_STEP = _Step()  # tracing off: a shared step that does nothing


def _record_exception(span: Span, exc: BaseException) -> None:
    """An exception leaving a step: its type and broker error code, never its message (an SDK's
    message may echo part of a key). A retry (``Rescheduled`` provisioning, ``TerminationPending``)
    is an outcome, not an error."""
    from opentelemetry.trace import Status, StatusCode

    name = type(exc).__name__
    if name in ("Rescheduled", "TerminationPending"):
        span.set_attribute("broker.outcome", "retry")
        return
    code = getattr(exc, "code", None)
    if isinstance(code, str):
        span.set_attribute("error.code", code)
    span.set_attribute("error.type", name)
    span.set_status(Status(StatusCode.ERROR, name))


def _span(name: str, kind: str, attributes: dict[str, str], *, parent: Any = None, links: Any = None) -> _Step:
    from opentelemetry.trace import SpanKind

    assert _state is not None
    cm = _state.tracer.start_as_current_span(
        name, context=parent, kind=getattr(SpanKind, kind), attributes=attributes, links=links,
        record_exception=False, set_status_on_exception=False,
    )
    return _Step(cm)


async def admission(tenant_id: str, session_id: str, step: Awaitable[T]) -> T:
    """Await the admission ``step`` inside an ``admission`` span (child of the request's span,
    which gets ``tenant.id``/``session.id`` too); its outcome: admitted, replayed, refused
    (``error.code``: the refusal's code) or key_reused."""
    if _state is None:
        return await step
    from opentelemetry import trace

    ids = {"tenant.id": tenant_id, "session.id": session_id}
    trace.get_current_span().set_attributes(ids)
    with _span("admission", "INTERNAL", ids) as traced:
        outcome = await step
        kind = {"Admitted": "admitted", "Replayed": "replayed", "Refused": "refused",
                "KeyReused": "key_reused"}.get(type(outcome).__name__, type(outcome).__name__)
        traced.outcome(kind)
        code = getattr(outcome, "code", None)
        if traced.span is not None and isinstance(code, str):
            traced.span.set_attribute("error.code", code)
        return outcome


def provisioning(tenant_id: str, session_id: str, stored_traceparent: str | None) -> _Step:
    """The consumer span around the provisioning of one session, child of the span that admitted
    it (the API request) when the record carries its ``traceparent``::

        with tracing.provisioning(rec.tenant_id, rec.id, rec.traceparent) as step:
            return step.outcome(await provision(...))

    The mint and create client spans (aiohttp instrumentation) open inside it."""
    if _state is None:
        return _NO_STEP
    attrs = {"tenant.id": tenant_id, "session.id": session_id}
    return _span("provision session", "CONSUMER", attrs, parent=_context_of(stored_traceparent))


def termination(tenant_id: str, session_id: str, stored_traceparent: str | None) -> _Step:
    """The termination of one session: a trace of its own (a session ends minutes or hours after
    its creation), linked to the creation's context."""
    if _state is None:
        return _NO_STEP
    from opentelemetry.context import Context
    from opentelemetry.trace import Link, get_current_span

    links = None
    if stored_traceparent:
        created = get_current_span(_context_of(stored_traceparent)).get_span_context()
        if created.is_valid:
            links = [Link(created, {"broker.link": "session.created"})]
    attrs = {"tenant.id": tenant_id, "session.id": session_id}
    return _span("terminate session", "INTERNAL", attrs, parent=Context(), links=links)


def set_error_code(code: str) -> None:
    """``error.code`` on the current span (an API error answer, a failed provisioning)."""
    if _state is None:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("error.code", code)


# ---- ids for logs and exemplars -------------------------------------------------------------------


def current_trace_id() -> str | None:
    """The current trace id (32 hex digits) when a sampled span is current, else None."""
    if _state is None:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid and ctx.trace_flags.sampled else None


def exemplar() -> dict[str, str] | None:
    """An OpenMetrics exemplar label set (``trace_id``) for a histogram observation, or None."""
    trace_id = current_trace_id()
    return {"trace_id": trace_id} if trace_id else None


# ---- instrumentations ---------------------------------------------------------------------------


def origin_only(url: Any) -> str:
    """A ``url_filter`` for :func:`aiohttp_trace_configs`: scheme, host and port of a yarl URL,
    without path, query or credentials (a tenant's webhook URL may carry its own token)."""
    return str(url.origin())


def aiohttp_trace_configs(upstream: str, url_filter: Callable[[Any], str] | None = None) -> list[Any]:
    """``trace_configs`` for an upstream client's ``aiohttp.ClientSession``: the contrib aiohttp
    instrumentation's client span per request (named ``<METHOD> <upstream>``, ``peer.service``),
    capturing no header; ``url_filter`` (a yarl URL -> the ``http.url`` recorded; e.g.
    :func:`origin_only`). Empty when tracing is off."""
    if _state is None:
        return []
    from opentelemetry.instrumentation.aiohttp_client import create_trace_config

    def name_span(span: Span, params: Any) -> None:
        if span.is_recording():
            span.update_name(f"{params.method} {upstream}")
            span.set_attribute("peer.service", upstream)

    return [create_trace_config(request_hook=name_span, tracer_provider=_state.provider, url_filter=url_filter)]


def litestar_plugins() -> list[Any]:
    """Litestar's own OpenTelemetry plugin (server span per request, ``traceresponse`` header,
    ops routes excluded), or nothing when tracing is off."""
    if _state is None:
        return []
    from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
    from opentelemetry.instrumentation.propagators import (TraceResponsePropagator,
                                                           set_global_response_propagator)

    # The W3C Trace Context level 2 response header, written by the ASGI middleware under Litestar's.
    set_global_response_propagator(TraceResponsePropagator())
    config = OpenTelemetryConfig(
        tracer_provider=_state.provider,
        exclude=[f"^{path}$" for path in UNTRACED_PATHS],
        exclude_spans=["receive", "send"],  # one span per request, not one per ASGI message
        scope_span_details_extractor=_request_span_details,
    )
    return [OpenTelemetryPlugin(config)]


def _request_span_details(scope: Any) -> tuple[str, dict[str, str]]:
    """The request span's first name: the method (the route is not matched yet; a raw path would
    put ids in span names); :func:`name_request_span` names it after the route."""
    return str(scope.get("method", "HTTP")), {}


async def name_request_span(message: Any, scope: Any) -> None:
    """Litestar ``before_send`` hook: name the request span ``<METHOD> <route template>`` once
    the router has matched (``http.route``)."""
    if _state is None or message.get("type") != "http.response.start":
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        route = scope.get("path_template") or "unmatched"
        span.update_name(f"{scope.get('method', 'HTTP')} {route}")
        span.set_attribute("http.route", route)


def before_send_hooks() -> list[Callable[[Any, Any], Awaitable[None]]]:
    return [name_request_span] if _state is not None else []
