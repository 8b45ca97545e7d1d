"""Running one worker process: the arq Worker with our jobs, plus the metrics/health
HTTP endpoint on ``--metrics-port``."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web
from arq import cron
from arq.worker import Worker, func
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from broker.sessions.jobs import PROVISION, QUEUE_NAME, TERMINATE, job_deserializer, job_serializer
from broker.settings import Settings

from .context import WorkerContext
from .jobs.provision import provision_session
from .jobs.sweep import sweep
from .jobs.terminate import terminate_session
from .metrics import WorkerMetrics

log = logging.getLogger("workers")

JOB_TIMEOUT = 30          # seconds; short so a SIGKILLed job's in-progress key frees quickly
SWEEP_EVERY_S = 2
HEALTH_STALE_S = 15


class Health:
    def __init__(self) -> None:
        self.last_ok = 0.0

    def healthy(self) -> bool:
        return time.monotonic() - self.last_ok < HEALTH_STALE_S


def build_worker(
    settings: Settings, metrics: WorkerMetrics, health: Health, *, burst: bool = False, handle_signals: bool = True
) -> Worker:
    async def on_startup(ctx: dict[str, Any]) -> None:
        ctx["wc"] = WorkerContext.build(settings, metrics)
        ctx["heartbeat"] = asyncio.create_task(_heartbeat(ctx["wc"], health))

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        task = ctx.get("heartbeat")
        if task:
            task.cancel()
        wc: WorkerContext | None = ctx.get("wc")
        if wc:
            await wc.close()

    async def on_job_start(ctx: dict[str, Any]) -> None:
        ctx["_t0"] = time.perf_counter()

    async def after_job_end(ctx: dict[str, Any]) -> None:
        pass

    functions = [
        func(_instrumented(provision_session, metrics, "provision"), name=PROVISION, max_tries=1000, timeout=JOB_TIMEOUT),
        func(_instrumented(terminate_session, metrics, "terminate"), name=TERMINATE, max_tries=1000, timeout=JOB_TIMEOUT),
    ]
    from arq.connections import RedisSettings

    return Worker(
        functions=functions,  # type: ignore[arg-type]
        cron_jobs=[cron(_instrumented(sweep, metrics, "sweep"), name="sweep",  # type: ignore[arg-type]
                        second=set(range(0, 60, SWEEP_EVERY_S)), run_at_startup=True, timeout=20, unique=True)],
        queue_name=QUEUE_NAME,
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        on_job_start=on_job_start,
        after_job_end=after_job_end,
        max_jobs=settings.worker_max_jobs,
        job_timeout=JOB_TIMEOUT,
        keep_result=10,
        poll_delay=0.05,
        max_tries=1000,
        health_check_interval=5,
        job_serializer=job_serializer,
        job_deserializer=job_deserializer,
        job_completion_wait=20,
        burst=burst,
        handle_signals=handle_signals,
        retry_jobs=True,
    )


def _instrumented(fn: Any, metrics: WorkerMetrics, label: str) -> Any:
    async def run(ctx: dict[str, Any], *args: Any) -> Any:
        start = time.perf_counter()
        outcome = "error"
        try:
            result = await fn(ctx, *args)
            outcome = "ok"
            return result
        except BaseException as exc:
            outcome = "retry" if type(exc).__name__ == "Retry" else ("cancelled" if isinstance(exc, asyncio.CancelledError) else "error")
            raise
        finally:
            metrics.jobs.labels(label, outcome).inc()
            metrics.job_duration.labels(label).observe(time.perf_counter() - start)

    run.__name__ = fn.__name__
    run.__qualname__ = fn.__qualname__
    return run


async def _heartbeat(wc: WorkerContext, health: Health) -> None:
    while True:
        try:
            await wc.redis.ping()
            health.last_ok = time.monotonic()
        except Exception:
            wc.metrics.redis_errors.labels("worker").inc()
        await asyncio.sleep(2)


async def _serve_metrics(metrics: WorkerMetrics, health: Health, host: str, port: int) -> web.AppRunner:
    async def metrics_handler(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health_handler(_: web.Request) -> web.Response:
        if health.healthy():
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "redis_unreachable"}, status=503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", health_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def run_worker(settings: Settings, metrics_port: int | None, metrics_host: str = "0.0.0.0") -> None:
    metrics = WorkerMetrics()
    health = Health()
    runner = await _serve_metrics(metrics, health, metrics_host, metrics_port) if metrics_port else None
    worker = build_worker(settings, metrics, health)
    try:
        await worker.async_run()
    finally:
        await worker.close()
        if runner:
            await runner.cleanup()
