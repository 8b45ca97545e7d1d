"""Operational routes, no authentication: liveness and readiness (on every port of the API),
and the Prometheus metrics, served only on the operators' ``--metrics-port`` (they name the
busiest tenants and their counts: the public tenant port answers 404 for /metrics).

``/healthz`` and ``/readyz`` answer HEAD as GET (same status and headers, no body): load
balancers and uptime checks often probe with HEAD."""

from __future__ import annotations

from typing import Any

from litestar import HttpMethod, MediaType, Response, get, route
from litestar.datastructures import State
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


_GET_HEAD = [HttpMethod.GET, HttpMethod.HEAD]


@route("/healthz", http_method=_GET_HEAD, exclude_from_auth=True, include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@route("/readyz", http_method=_GET_HEAD, include_in_schema=False)
async def readyz(state: State) -> Response[Any]:
    try:
        await state.redis.ping()
    except Exception:
        state.metrics.redis_errors.labels("readyz").inc()
        return Response(
            {"error": {"code": "redis_unavailable", "message": "Redis is unreachable."}},
            status_code=503,
            headers={"Retry-After": "1"},
        )
    return Response({"status": "ready"}, status_code=200)


@get("/metrics", include_in_schema=False)
async def metrics(state: State) -> Response[bytes]:
    # as bytes with the whole content type in the header: Litestar adds "; charset=utf-8" to a
    # text/* media type that already carries one (it said charset=utf-8 twice)
    body = generate_latest(state.metrics.registry)
    return Response(body, media_type=MediaType.TEXT, headers={"content-type": CONTENT_TYPE_LATEST})


ops_handlers = [healthz, readyz]
metrics_handlers = [metrics]
