"""A loopback OTLP/HTTP receiver: the collector of the tracing tests. It accepts
``POST /v1/traces`` (protobuf, optionally gzip), decodes each export with ``opentelemetry-proto``
and keeps the spans and the raw bodies (scanned for secrets)."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                       ExportTraceServiceResponse)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto

from tests.fixtures.wait import wait_until

KINDS = {SpanProto.SPAN_KIND_INTERNAL: "internal", SpanProto.SPAN_KIND_SERVER: "server",
         SpanProto.SPAN_KIND_CLIENT: "client", SpanProto.SPAN_KIND_PRODUCER: "producer",
         SpanProto.SPAN_KIND_CONSUMER: "consumer"}


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which) if which else None


@dataclass
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    attributes: dict[str, Any]
    links: list[tuple[str, str, dict[str, Any]]]
    status_code: int
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def texts(self) -> list[str]:
        """Every string the span carries (names, keys and values of attributes, links, events)."""
        out = [self.service, self.name]
        for attrs in (self.attributes, *(link[2] for link in self.links), *(e[1] for e in self.events)):
            for key, value in attrs.items():
                out += [key, str(value)]
        out += [e[0] for e in self.events]
        return out


class OtlpReceiver:
    def __init__(self, decode: bool = True) -> None:
        """``decode=False``: count the exports and their bytes only (the bench: decoding in Python
        would take CPU from the processes measured)."""
        self.decode = decode
        self.received_bytes = 0
        self.spans: list[Span] = []
        self.bodies: list[bytes] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver._add(raw)
                body = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="otlp-receiver", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> OtlpReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _add(self, raw: bytes) -> None:
        if not self.decode:
            with self._lock:
                self.requests += 1
                self.received_bytes += len(raw)
            return
        request = ExportTraceServiceRequest.FromString(raw)
        spans = []
        for rs in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(Span(
                        service=str(resource.get("service.name", "")),
                        trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex(),
                        name=s.name, kind=KINDS.get(s.kind, str(s.kind)),
                        attributes={kv.key: _value(kv.value) for kv in s.attributes},
                        links=[(link.trace_id.hex(), link.span_id.hex(),
                                {kv.key: _value(kv.value) for kv in link.attributes}) for link in s.links],
                        status_code=s.status.code,
                        events=[(e.name, {kv.key: _value(kv.value) for kv in e.attributes}) for e in s.events],
                    ))
        with self._lock:
            self.requests += 1
            self.bodies.append(raw)
            self.spans.extend(spans)

    def snapshot(self) -> list[Span]:
        with self._lock:
            return list(self.spans)

    def wait_for(self, found: Callable[[list[Span]], Any], timeout: float = 20) -> Any:
        """Poll the received spans until ``found(spans)`` is truthy; returns it (fails at the deadline,
        listing the spans received)."""
        return wait_until(lambda: found(self.snapshot()), timeout, "the spans looked for were received",
                          state=lambda: [(s.service, s.name, s.trace_id) for s in self.snapshot()])


def main() -> None:
    """``python -m tests.tracing.receiver``: a receiver on its own for the bench's tracing-on runs
    (``OTEL_EXPORTER_OTLP_ENDPOINT=<printed endpoint> python -m tests.bench --only admission``):
    prints its endpoint, and at SIGTERM/SIGINT how many exports and bytes it received."""
    import signal

    receiver = OtlpReceiver(decode=False)
    print(receiver.endpoint, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        receiver.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        print(f"{receiver.requests} exports, {receiver.received_bytes} bytes", flush=True)


if __name__ == "__main__":
    main()
