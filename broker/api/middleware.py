"""Outermost ASGI wrapper: RED metrics for every answer the app gives (401s and 404s
included, labelled by route template, or 'unmatched'), a request id (``X-Request-Id``
header, bound to the log context of everything the request logs) and one structured
access log line per request (ops routes at DEBUG). A client that disconnected mid-request
is logged and counted with status 499 and ``client_disconnected``, never as a 5xx.

It runs on every request, so it does the least it can: the metric children are looked up
once per (route, method, status) and cached, and the access line is a record handed to the
logger's handlers directly (no caller lookup: the caller is always this function), built
from a per-process template rather than by ``LogRecord.__init__``."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from broker.core import tracing
from broker.core.logs import bind_log_context, reset_log_context
from broker.api.metrics import ApiMetrics

access_log = logging.getLogger("broker.access")

OPS_ROUTES = frozenset({"/metrics", "/healthz", "/readyz"})
# A request whose client disconnected before its answer (mid-body, typically) is logged and
# counted with nginx's 499 "client closed request" instead of the 500 the app's body reader
# raises for it; the scope key tells the handlers (POST /v1/sessions counts it as abandoned).
CLIENT_CLOSED = 499
CLIENT_GONE = "broker.client_gone"
_ACCESS_FORMAT = "%s %s %d"


def metrics_middleware(app: ASGIApp, metrics: ApiMetrics, access: str = "all") -> ASGIApp:
    """``access`` (BROKER_ACCESS_LOG): ``all`` writes one access line per request, ``errors``
    only for answers >= 400, ``off`` none (metrics count every request regardless)."""
    observe = metrics.request_observer()
    min_status = {"all": 0, "errors": 400}.get(access, 1000)
    allow = _allow_headers(app)
    traced = tracing.enabled()  # the request's span ends inside: its trace id is read from traceresponse

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        trace_id = None
        request_id = os.urandom(8).hex()
        scope.setdefault("state", {})["request_id"] = request_id  # type: ignore[typeddict-item]
        token = bind_log_context(request_id=request_id)
        request_id_header = (b"x-request-id", request_id.encode())
        metrics.http_in_progress.inc()

        async def send_wrapper(message: Message) -> None:
            nonlocal status, trace_id
            if message["type"] == "http.response.start":
                status = message["status"]
                headers: list[Any] = list(message.get("headers", []))
                if traced:
                    trace_id = _trace_id_of(headers)
                headers.append(request_id_header)
                if status == 204 and scope["method"] == "OPTIONS":
                    allowed = allow.get(scope.get("path_template", ""))  # type: ignore[call-overload]
                    if allowed is not None:
                        headers = [h for h in headers if h[0].lower() != b"allow"]
                        headers.append((b"allow", allowed))
                message["headers"] = headers  # type: ignore[typeddict-unknown-key]
            await send(message)

        client_gone = False

        async def receive_wrapper() -> Message:
            nonlocal client_gone
            message = await receive()
            if message["type"] == "http.disconnect":
                client_gone = True
                scope[CLIENT_GONE] = True  # type: ignore[literal-required]
            return message

        try:
            await app(scope, receive_wrapper, send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            if client_gone and status >= 500:
                status = CLIENT_CLOSED  # the client left mid-request: not an error of the broker
            route = scope.get("path_template") or "unmatched"  # type: ignore[misc]
            method = scope.get("method", "GET")
            metrics.http_in_progress.dec()
            observe(route, method, status, elapsed)
            level = logging.DEBUG if route in OPS_ROUTES else logging.INFO
            if status >= min_status and access_log.isEnabledFor(level):
                access_log.handle(_access_record(level, method, route, status, elapsed, trace_id, client_gone))
            reset_log_context(token)

    return wrapped


def _allow_headers(app: ASGIApp) -> dict[str, bytes]:
    """``Allow`` of each route (by path template): every method its handlers serve. Litestar's
    own OPTIONS handler lists only the methods of the first handler registered on a path (the
    route is rebuilt when a second one is added, its OPTIONS handler is not), so an OPTIONS of
    /v1/sessions said "OPTIONS, POST", without GET; the answer is corrected on its way out."""
    routes = getattr(app, "routes", ())
    return {r.path_format: ", ".join(sorted(r.methods)).encode() for r in routes if isinstance(r, HTTPRoute)}


_template: dict[str, Any] = {}


def _trace_id_of(headers: list[Any]) -> str | None:
    """The trace id of a ``traceresponse`` header (``00-<trace id>-<span id>-<flags>``)."""
    for name, value in headers:
        if name == b"traceresponse" and len(value) >= 35:
            return bytes(value[3:35]).decode("ascii", "replace")
    return None


def _access_record(level: int, method: str, route: str, status: int, elapsed: float,
                   trace_id: str | None = None, client_gone: bool = False) -> logging.LogRecord:
    """The access line's record, as ``makeRecord`` would build it, from a template made once
    (``LogRecord.__init__`` looks up the thread, process and module names on every call: a
    quarter of what the access line cost); only the time, level, arguments and fields change."""
    if not _template:
        _template.update(access_log.makeRecord(
            access_log.name, logging.INFO, __file__, 0, _ACCESS_FORMAT, (), None).__dict__)
    record = logging.LogRecord.__new__(logging.LogRecord)
    d = record.__dict__
    d.update(_template)
    now = time.time()
    d["created"] = now
    d["msecs"] = int((now - int(now)) * 1000) + 0.0
    # ms since logging was loaded, as LogRecord computes it (the template holds its created/relativeCreated)
    d["relativeCreated"] = (now - _template["created"]) * 1000 + _template["relativeCreated"]
    d["levelno"] = level
    d["levelname"] = logging.getLevelName(level)
    d["args"] = (method, route, status)
    d["fields"] = {"method": method, "route": route, "status": status, "duration_ms": round(elapsed * 1000, 2)}
    if trace_id is not None:
        d["fields"]["trace_id"] = trace_id
    if client_gone:
        d["fields"]["client_disconnected"] = True
    return record
