"""Outermost ASGI wrapper: RED metrics for every answer the app gives (401s and 404s
included, labelled by route template, or 'unmatched'), and a request id header."""

from __future__ import annotations

import secrets
import time
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from broker.metrics import ApiMetrics


def metrics_middleware(app: ASGIApp, metrics: ApiMetrics) -> ASGIApp:
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        request_id = secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id  # type: ignore[typeddict-item]

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers: list[Any] = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers  # type: ignore[typeddict-unknown-key]
            await send(message)

        try:
            await app(scope, receive, send_wrapper)
        finally:
            route = scope.get("path_template") or "unmatched"  # type: ignore[misc]
            method = scope.get("method", "GET")
            metrics.http_requests.labels(route, method, str(status)).inc()
            metrics.http_duration.labels(route, method).observe(time.perf_counter() - start)

    return wrapped
