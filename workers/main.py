"""Running one worker process: the arq Worker with our jobs, plus the metrics/health
HTTP endpoint on ``--metrics-port``."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from aiohttp import web
from arq import Retry, cron
from arq.utils import timestamp_ms
from arq.worker import Worker, func
from prometheus_client.exposition import choose_encoder

from broker.logs import bind_log_context, log_context
from broker.redis_client import create_worker_pool
from broker.serve import tune_gc
from broker.sessions.jobs import PROVISION, QUEUE_NAME, TERMINATE, job_deserializer, job_serializer
from broker.settings import Settings

from .context import WorkerContext
from .expiry import ExpiryLoop
from .jobs.common import REDIS_ERRORS
from .jobs.provision import provision_session
from .jobs.sweep import sweep
from .jobs.terminate import terminate_session
from .metrics import WorkerMetrics
from .redis_io import use_direct_sends
from .wakeup import WakeupWorker

log = logging.getLogger("workers")

JOB_TIMEOUT = 30          # seconds; short so a SIGKILLed job's in-progress key frees quickly
SWEEP_EVERY_S = 2
# The cyclic GC's thresholds after start-up (Python's defaults: 700, 10, 10). A busy worker holds
# the objects of a few hundred jobs in flight for ~1 s each, and every older collection walks all
# of them while finding almost nothing to free (what a job allocates dies by reference counting):
# measured in the bench's drain of 3,000 sessions, with everything alive at start-up frozen, the
# defaults ran 85-95 middle collections and 7-8 full ones (up to 53 ms each), 630-930 ms of GC in
# all; these ran 10 middle ones (35 ms at most) and no full one, 460 ms. Young collections stay
# as frequent (pauses under 5 ms); garbage cycles wait longer for the older collections, whose
# triggers are counts of young ones (in the drain the middle ones still ran about once a second).
GC_THRESHOLDS = (700, 100, 100)
HEALTH_STALE_S = 15
# Redis unreachable (restart, failover): the poll loop pauses this long and tries again; a
# job that hit it is retried after REDIS_RETRY_DEFER_S; a finished job's bookkeeping waits
# up to FINISH_PATIENCE_S for Redis instead of being lost.
REDIS_DOWN_PAUSE_S = 0.5
REDIS_RETRY_DEFER_S = 1.0
FINISH_PATIENCE_S = 120.0


class Health:
    def __init__(self) -> None:
        self.last_ok = 0.0

    def healthy(self) -> bool:
        return time.monotonic() - self.last_ok < HEALTH_STALE_S


class ResilientWorker(WakeupWorker):
    """arq's Worker, except that losing Redis does not end the process (arq's default: the
    poll loop raises and ``main()`` returns): the loop pauses and resumes when Redis is back,
    and a job's final bookkeeping (re-queue, result, in-progress key) waits for Redis instead
    of failing, so a job running through an outage is neither lost nor blocked for the
    in-progress key's 40 s."""

    metrics: WorkerMetrics | None = None
    _last_warning = 0.0

    def _redis_lost(self, exc: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.redis_errors.labels("poll").inc()
        if time.monotonic() - self._last_warning > 5:
            self._last_warning = time.monotonic()
            log.warning("redis unreachable (%s); the worker keeps retrying", type(exc).__name__)

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except REDIS_ERRORS as exc:
            self._redis_lost(exc)
            await asyncio.sleep(REDIS_DOWN_PAUSE_S)

    async def finish_job(self, *args: Any) -> None:
        await self._patiently(super().finish_job, *args)

    async def finish_failed_job(self, *args: Any) -> None:
        await self._patiently(super().finish_failed_job, *args)

    async def _patiently(self, step: Any, *args: Any) -> None:
        give_up = time.monotonic() + FINISH_PATIENCE_S
        while True:
            try:
                await step(*args)
                return
            except REDIS_ERRORS as exc:
                if time.monotonic() > give_up:
                    raise
                self._redis_lost(exc)
                await asyncio.sleep(REDIS_DOWN_PAUSE_S)

    async def close(self) -> None:
        """arq's ``close``, except that a job task cancelled at shutdown or Redis being away
        does not skip closing our clients (``on_shutdown``) and the pool."""
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        try:
            await self.pool.delete(self.health_check_key)
        except REDIS_ERRORS as exc:
            self._redis_lost(exc)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        await self.pool.aclose(close_connection_pool=True)
        self._pool = None


def build_worker(
    settings: Settings, metrics: WorkerMetrics, health: Health, *, burst: bool = False, handle_signals: bool = True,
    gc_thresholds: tuple[int, int, int] | None = None,
) -> Worker:
    """The arq worker of the broker; ``gc_thresholds``: tune the process's collector once started
    (``broker.serve.tune_gc``), as the worker process does with :data:`GC_THRESHOLDS` (a worker
    run inside another program, such as the tests, leaves that program's collector alone)."""

    async def on_startup(ctx: dict[str, Any]) -> None:
        ctx["wc"] = WorkerContext.build(settings, metrics)
        ctx["heartbeat"] = asyncio.create_task(_heartbeat(ctx["wc"], health))
        ctx["shared_gauges"] = metrics.shared.start(ctx["wc"].redis)  # workers/gauges.py snapshot refresher
        ctx["expiry"] = ExpiryLoop(ctx["wc"]).start()  # ends due sessions (workers/expiry.py)
        ctx["claims"] = ctx["expiry"].claims           # the stop jobs claim through the same script
        ctx["keeper"] = ctx["expiry"].keeper           # and their claims are renewed with the loop's
        mux = ctx["wc"].mux
        ctx["arq_worker"].script_execute = mux.execute if mux else None  # the claim and finish scripts too
        if gc_thresholds is not None:
            tune_gc(gc_thresholds)  # everything alive now (modules, SDK, clients) out of the collector's way

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        ctx["arq_worker"].script_execute = None  # the pool again: the mux closes with the context
        # cancelled and waited for: one cut off inside a pipeline must leave it (and give its
        # connection back) before the clients close, or the pipeline is left holding it
        background = [task for task in (ctx.get("heartbeat"), ctx.get("shared_gauges")) if task]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if ctx.get("expiry"):
            await ctx["expiry"].stop()  # before the clients close: its DELETEs in flight finish
        wc: WorkerContext | None = ctx.get("wc")
        if wc:
            await wc.close()

    async def on_job_start(ctx: dict[str, Any]) -> None:
        ctx["start_ms"] = timestamp_ms()  # arq's start time of the job, for a finish in the job's own script
        bind_log_context(job_id=ctx.get("job_id"))  # arq's own job lines too (run_job is one task per job)

    functions = [
        func(_instrumented(provision_session, metrics, "provision"), name=PROVISION, max_tries=1000, timeout=JOB_TIMEOUT),
        func(_instrumented(terminate_session, metrics, "terminate"), name=TERMINATE, max_tries=1000, timeout=JOB_TIMEOUT),
    ]
    worker = ResilientWorker(
        functions=functions,  # type: ignore[arg-type]
        cron_jobs=[cron(_instrumented(sweep, metrics, "sweep"), name="sweep",  # type: ignore[arg-type]
                        second=set(range(0, 60, SWEEP_EVERY_S)), run_at_startup=True, timeout=20, unique=True,
                        max_tries=3)],  # a sweep cut off by a killed worker is simply run again
        queue_name=QUEUE_NAME,
        # URL or Sentinel, TLS, generous retries (survives a Redis restart): broker/redis_client.py
        redis_pool=use_direct_sends(create_worker_pool(settings, job_serializer=job_serializer,
                                                       job_deserializer=job_deserializer,
                                                       default_queue_name=QUEUE_NAME)),  # workers/redis_io.py
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        on_job_start=on_job_start,
        max_jobs=settings.worker_max_jobs,
        job_timeout=JOB_TIMEOUT,
        keep_result=10,
        poll_delay=1.0,  # only the fallback: an idle worker blocks on the wake-up list (workers/wakeup.py)
        max_tries=1000,
        health_check_interval=5,
        job_serializer=job_serializer,
        job_deserializer=job_deserializer,
        # SIGTERM: stop taking jobs and let running ones end by themselves (a job never runs
        # longer than JOB_TIMEOUT), so none is cancelled mid-create (deploy/ grace: 75 s).
        job_completion_wait=JOB_TIMEOUT + 5,
        burst=burst,
        handle_signals=handle_signals,
        retry_jobs=True,
    )
    worker.metrics = metrics
    return worker


def _instrumented(fn: Any, metrics: WorkerMetrics, label: str) -> Any:
    async def run(ctx: dict[str, Any], *args: Any) -> Any:
        started = metrics.job_started(label)
        error: BaseException | None = None
        # every log line of the job carries them (its job_id is bound by on_job_start, in the task
        # of arq's run_job that this job's task was created from)
        ids = {"tenant_id": str(args[0]), "session_id": str(args[1])} if len(args) == 2 else {}
        with log_context(**ids):
            try:
                return await fn(ctx, *args)
            except REDIS_ERRORS:
                # Redis went away mid-job: run the job again (it stays queued) rather than let arq
                # record a final failure and drop it. Every step of our jobs is safe to repeat.
                metrics.redis_errors.labels("job").inc()
                error = Retry(defer=REDIS_RETRY_DEFER_S)
                raise error from None
            except BaseException as exc:
                error = exc
                raise
            finally:
                metrics.job_finished(label, started, error)  # outcome, duration, retries

    run.__name__ = fn.__name__
    run.__qualname__ = fn.__qualname__
    return run


async def _heartbeat(wc: WorkerContext, health: Health) -> None:
    while True:
        try:
            await wc.redis.ping()
            health.last_ok = time.monotonic()
        except Exception:
            wc.metrics.redis_errors.labels("heartbeat").inc()
        await asyncio.sleep(2)


async def _serve_metrics(metrics: WorkerMetrics, health: Health, host: str, port: int) -> web.AppRunner:
    async def metrics_handler(request: web.Request) -> web.Response:
        # OpenMetrics when the scraper asks for it (Prometheus does): the only format with exemplars
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(metrics.registry), headers={"Content-Type": content_type})

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
    metrics = WorkerMetrics(settings.metrics_top_tenants)  # tenant label of broker_billable_seconds_total
    health = Health()
    runner = await _serve_metrics(metrics, health, metrics_host, metrics_port) if metrics_port else None
    # --- issue 18: wait for Redis before arq starts (workers/startup.py); a signal meanwhile ends the process
    from .startup import wait_for_redis

    if not await wait_for_redis(settings):
        if runner:
            await runner.cleanup()
        return
    # --- end issue 18
    worker = build_worker(settings, metrics, health, gc_thresholds=GC_THRESHOLDS)
    try:
        await worker.async_run()
    except asyncio.CancelledError:
        # After SIGTERM/SIGINT arq ends its main task by cancelling it, once the running jobs
        # finished (or job_completion_wait ran out): a clean stop (exit 0), unless this task
        # itself is being cancelled.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.info("worker stopped by a signal")
    finally:
        await worker.close()
        if runner:
            await runner.cleanup()
