"""The application factory: ``create_app(settings)`` owns every client (Redis, arq, the
key authenticator, the session events listener) in its lifespan and hands them to the
handlers through ``app.state``. ``asgi_app(settings)`` adds the outermost metrics wrapper."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from litestar import Litestar, Router
from litestar.openapi import OpenAPIConfig
from litestar.types import ASGIApp

from broker.core import tracing
from broker.api.metrics import ApiMetrics
from broker.core.redis_check import ping, unreachable_line
from broker.core.redis_client import create_redis
from broker.core.redis_mux import RedisMux
from broker.sessions.events import SessionEvents
from broker.sessions.jobs import JobQueue, new_arq_redis
from broker.sessions.repository import SessionRepository
from broker.sessions.service import SessionService
from broker.core.settings import Settings
from broker.webhooks.endpoints import WebhookEndpoints
from tenants.auth import KeyAuthenticator
from tenants.crypto import CredentialCipher
from tenants.service import TenantService

from .admin_routes import admin_router
from .console_routes import console_routers
from .docs_viewer import assets_router, render_plugins
from .errors import EXCEPTION_HANDLERS, docs_error_hook
from .middleware import metrics_middleware
from .openapi import document_openapi
from .ops_routes import healthz, metrics_handlers, ops_handlers
from .tenant_routes import tenant_router
from .event_routes import event_router
from .event_stream import StreamSlots
from .usage_routes import admin_usage_router, tenant_usage_router
from .webhook_routes import webhook_router

MAX_BODY = 64 * 1024
ALL_SURFACES = ("tenant", "admin", "ops", "metrics")
# What each port of `session-broker api` serves: the tenant port never /metrics (CONTRACT.md
# section 14: it names tenants); the admin API on --admin-port when given, else on the tenant
# port; /metrics (and /healthz) on --metrics-port only.
PUBLIC_SURFACES = ("tenant", "ops")
ADMIN_SURFACES = ("admin", "ops")
METRICS_SURFACES = ("metrics",)
SCHEMA_PATH = "/schema"
log = logging.getLogger("broker.api")


def openapi_config() -> OpenAPIConfig:
    """Litestar's documentation endpoints under /schema (openapi.json/.yaml/.yml and the HTML
    viewers), on a router of our own only to add :func:`docs_error_hook`: Litestar answers an
    unknown ``/schema/<name>`` with an HTML page of its own, every other error of the API has
    the contract's JSON shape. The plugin registers its handlers on this router as it would on
    its default one (same path, not in the schema)."""
    router = Router(SCHEMA_PATH, route_handlers=[], include_in_schema=False, after_request=docs_error_hook)
    return OpenAPIConfig(title="Session Broker", version="1.0.0", path=SCHEMA_PATH, openapi_router=router,
                         render_plugins=render_plugins(SCHEMA_PATH))  # one viewer, served offline: docs_viewer.py


def create_app(settings: Settings, surfaces: Iterable[str] = ALL_SURFACES, metrics: ApiMetrics | None = None) -> Litestar:
    """``metrics``: the process's metrics, shared by the apps of its ports (one /metrics)."""
    surfaces = tuple(surfaces)
    metrics = metrics if metrics is not None else ApiMetrics(settings.metrics_top_tenants)
    if set(surfaces) <= {"metrics"}:
        return _metrics_only_app(metrics)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        redis = create_redis(settings)
        mux = RedisMux(redis)  # the admission and transition scripts share one pipelined connection
        arq = new_arq_redis(redis.connection_pool)
        cipher = CredentialCipher(settings.secret_keys) if settings.secret_keys else None
        tenants = TenantService(redis, cipher)
        auth = KeyAuthenticator(redis, tenants)
        events = SessionEvents(redis)
        app.state.update(
            settings=settings,
            redis=redis,
            tenants=tenants,
            auth=auth,
            events=events,
            event_streams=StreamSlots(),  # open SSE streams per tenant (issue 20)
            webhooks=WebhookEndpoints(redis, cipher, settings.webhook_allow_private),  # issue 20
            metrics=metrics,
            sessions=SessionService(
                SessionRepository(redis, mux), JobQueue(arq), provision_deadline_s=settings.provision_deadline_seconds,
                mint_window_s=settings.mint_window_seconds(), cipher=cipher,
            ),
        )
        # issue 18: Redis down at start is one line, and no 5 s wait for the subscription that cannot come
        redis_down = await ping(redis)
        if redis_down is not None:
            log.warning(unreachable_line(settings, redis_down, hint=(
                "the API starts anyway and answers 503 redis_unavailable until Redis is back; check BROKER_REDIS_URL")))
        await auth.start(ready_timeout=0.0 if redis_down else 5.0)
        await events.start()
        try:
            yield
        finally:
            await events.stop()
            await auth.stop()
            await mux.aclose()
            await redis.aclose()

    handlers: list[object] = [assets_router(SCHEMA_PATH)]
    if "tenant" in surfaces:
        handlers.append(tenant_router)
        handlers.append(tenant_usage_router)  # GET /v1/usage/history (issue 21)
        handlers.append(event_router)  # GET /v1/events (issue 20)
        handlers.append(webhook_router)  # /v1/webhook_endpoints, POST /v1/events/{id}/resend (issue 20)
        handlers.extend(console_routers)  # the web console: its page, files and sign-in (tenant surface)
    if "admin" in surfaces and settings.admin_token:
        handlers.append(admin_router)
        handlers.append(admin_usage_router)  # GET /admin/v1/usage (issue 21)
    if "ops" in surfaces:
        handlers.extend(ops_handlers)
    if "metrics" in surfaces:
        handlers.extend(metrics_handlers)
    app = Litestar(
        route_handlers=handlers,  # type: ignore[arg-type]
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        request_max_body_size=MAX_BODY,
        openapi_config=openapi_config(),
        debug=False,
        logging_config=None,  # Litestar's default would replace our JSON root handler (broker/core/logs.py)
        plugins=tracing.litestar_plugins(),  # tracing on: Litestar's OpenTelemetry plugin (else none)
        before_send=tracing.before_send_hooks(),  # names the request span after its route
    )
    document_openapi(app)  # request bodies, query params, errors, security (handlers read raw input)
    app.state.metrics = metrics
    app.state.settings = settings
    return app


def _metrics_only_app(metrics: ApiMetrics) -> Litestar:
    """The --metrics-port app: /metrics and /healthz (like the worker's metrics port), no
    clients of its own (nothing there reads Redis)."""
    app = Litestar(
        route_handlers=[healthz, *metrics_handlers],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        openapi_config=None,
        debug=False,
        logging_config=None,
    )
    app.state.metrics = metrics
    return app


def asgi_app(settings: Settings, surfaces: Iterable[str] = ALL_SURFACES, metrics: ApiMetrics | None = None) -> ASGIApp:
    app = create_app(settings, surfaces, metrics)
    return metrics_middleware(app, app.state.metrics, settings.access_log)
