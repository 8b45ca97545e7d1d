"""Serving the API with uvicorn (uvloop + httptools), optionally with the admin API on
its own port, and running coroutines on uvloop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import uvicorn

from .core.gc_tuning import tune_gc
from .core.settings import Settings


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)


def _config(app: Any, host: str, port: int, settings: Settings) -> uvicorn.Config:
    """uvicorn with httptools, through the protocol class that adds the header/body limits
    (:mod:`broker.api.http_guard`)."""
    from .api.http_guard import guarded_protocol

    protocol = guarded_protocol(settings.http_max_header_bytes, settings.http_header_timeout_seconds,
                                settings.http_body_timeout_seconds)
    return uvicorn.Config(
        app, host=host, port=port, loop="uvloop", http=protocol, lifespan="on",
        access_log=False, log_config=None, timeout_graceful_shutdown=10,
    )


def serve_api(settings: Settings, host: str, port: int, *, admin_port: int | None = None,
              metrics_port: int | None = None, metrics_host: str | None = None) -> None:
    """One API process (scale out by running more of them: each has its own /metrics). The
    tenant port serves the tenant API and /healthz, /readyz (and the admin API unless
    ``admin_port``); /metrics is served on ``metrics_port`` only (with /healthz), never on the
    tenant port. The apps of the ports share one set of metrics."""
    from .api.app import ADMIN_SURFACES, METRICS_SURFACES, PUBLIC_SURFACES, asgi_app
    from .api.metrics import ApiMetrics

    metrics = ApiMetrics(settings.metrics_top_tenants)
    main_surfaces = PUBLIC_SURFACES if admin_port else (*PUBLIC_SURFACES, "admin")
    servers = [uvicorn.Server(_config(asgi_app(settings, main_surfaces, metrics), host, port, settings))]
    if admin_port:
        servers.append(uvicorn.Server(_config(asgi_app(settings, ADMIN_SURFACES, metrics), host, admin_port, settings)))
    if metrics_port:
        servers.append(uvicorn.Server(_config(asgi_app(settings, METRICS_SURFACES, metrics),
                                              metrics_host or host, metrics_port, settings)))

    async def run_all() -> None:
        tasks = [asyncio.ensure_future(s.serve()) for s in servers]
        while not all(s.started for s in servers) and not any(t.done() for t in tasks):
            await asyncio.sleep(0.05)
        tune_gc()
        await asyncio.gather(*tasks)

    run_async(run_all())

