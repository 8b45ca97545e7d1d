"""Running one worker process: the provisioning, expiry and webhook delivery loops, arq (stop
jobs, the sweeper's cron, its health record) through its documented API, plus the
metrics/health HTTP endpoint on ``--metrics-port``."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from aiohttp import web
from arq import Retry, Worker, cron, func
from prometheus_client.exposition import choose_encoder

from broker.core.logs import bind_log_context, log_context
from broker.core.redis_client import create_worker_pool
from broker.core.compat_redis import use_direct_sends
from broker.core.gc_tuning import tune_gc
from broker.sessions.jobs import QUEUE_NAME, TERMINATE, job_deserializer, job_serializer
from broker.core.settings import Settings

from .context import WorkerContext
from .expiry import ExpiringLoop, ExpiryLoop
from .jobs.common import REDIS_DOWN_PAUSE_S, REDIS_ERRORS
from .jobs.sweep import sweep
from .jobs.terminate import terminate_session
from .metrics import WorkerMetrics
from .provisioning import ProvisioningLoop
from .webhooks import WebhookDelivery
from .webhooks import from_context as webhook_delivery
from .startup import wait_for_redis

log = logging.getLogger("workers")

JOB_TIMEOUT = 30          # seconds: a stop job (one DELETE) never runs longer
# SIGTERM: running work ends by itself within this (a provisioning attempt is cut off after
# ATTEMPT_TIMEOUT_S = 30 s, a stop job after JOB_TIMEOUT), so none is cancelled mid-create.
JOB_COMPLETION_WAIT_S = JOB_TIMEOUT + 5
# arq's poll of its queue (stop jobs, the sweeper's cron): a stop's DELETE starts within this
# (arq's default, 0.5 s, would save 2 Redis commands a second per idle worker). A lost or late stop
# job is taken by the expiry loop STOP_GRACE_MS after the stop anyway.
POLL_DELAY_S = 0.25
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
# Redis unreachable (restart, failover): arq's run is started again after REDIS_DOWN_PAUSE_S; a
# stop job that hit it is retried after REDIS_RETRY_DEFER_S.
REDIS_RETRY_DEFER_S = 1.0


class Health:
    def __init__(self) -> None:
        self.last_ok = 0.0

    def healthy(self) -> bool:
        return time.monotonic() - self.last_ok < HEALTH_STALE_S


class BrokerWorker:
    """One worker process's work: the provisioning loop (``workers/provisioning.py``), the
    expiry loop (``workers/expiry.py``) and the webhook delivery (``workers/webhooks.py``),
    which are ours, and an arq ``Worker``, used through its documented API for what it does as
    shipped: the stop jobs (``terminate_session``, enqueued with ``ArqRedis.enqueue_job``), the
    sweeper's cron and its health record.

    Redis going away never ends the process: our loops pause and resume by themselves, and
    when arq's ``async_run()`` gives up on Redis (its commands retry for ~20 s first) it is
    simply run again. SIGTERM/SIGINT: no new work is claimed (arq's
    ``handle_sig_wait_for_completion`` for its jobs, the loops' drain for ours), work in
    flight ends by itself within ``JOB_COMPLETION_WAIT_S``, then :meth:`async_run` returns."""

    def __init__(self, settings: Settings, metrics: WorkerMetrics, health: Health, *, burst: bool = False,
                 handle_signals: bool = True, gc_thresholds: tuple[int, int, int] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.health = health
        self.handle_signals = handle_signals
        self.gc_thresholds = gc_thresholds
        self.shutdown_grace_s = JOB_COMPLETION_WAIT_S + JOB_TIMEOUT  # what a SIGTERMed worker may need at most
        # URL or Sentinel, TLS, generous retries (survives a Redis restart): broker/core/redis_client.py
        self.pool = use_direct_sends(create_worker_pool(settings, job_serializer=job_serializer,
                                                        job_deserializer=job_deserializer,
                                                        default_queue_name=QUEUE_NAME))  # broker/core/compat_redis.py
        self.ctx: dict[str, Any] = {"broker_worker": self}  # arq's ctx, passed to the jobs
        self.provisioning: ProvisioningLoop | None = None
        self.expiry: ExpiryLoop | None = None
        self.expiring: ExpiringLoop | None = None
        self.webhooks: WebhookDelivery | None = None
        self._started = False
        self._signalled = False
        self._last_warning = 0.0

        async def on_job_start(ctx: dict[str, Any]) -> None:
            bind_log_context(job_id=ctx.get("job_id"))  # arq's own job lines too (run_job is one task per job)

        self.arq = Worker(
            functions=[func(_instrumented(terminate_session, metrics, "terminate"), name=TERMINATE,  # type: ignore[arg-type]
                            max_tries=1000, timeout=JOB_TIMEOUT)],
            cron_jobs=[cron(_instrumented(sweep, metrics, "sweep"), name="sweep",  # type: ignore[arg-type]
                            second=set(range(0, 60, SWEEP_EVERY_S)), run_at_startup=True, timeout=20, unique=True,
                            max_tries=3)],  # a sweep cut off by a killed worker is simply run again
            queue_name=QUEUE_NAME,
            redis_pool=self.pool,
            ctx=self.ctx,
            on_job_start=on_job_start,
            max_jobs=settings.worker_max_jobs,
            job_timeout=JOB_TIMEOUT,
            keep_result=10,
            poll_delay=POLL_DELAY_S,
            max_tries=1000,
            health_check_interval=5,
            job_serializer=job_serializer,
            job_deserializer=job_deserializer,
            job_completion_wait=JOB_COMPLETION_WAIT_S,
            burst=burst,
            handle_signals=False,  # ours (below) also drains the loops, then calls arq's handler
            retry_jobs=True,
        )

    # ---- start-up and shutdown --------------------------------------------------------------

    async def on_startup(self, ctx: dict[str, Any] | None = None) -> None:
        """Build the worker's context (clients, caches) and start its background tasks."""
        if self._started:
            return
        self._started = True
        ctx = self.ctx if ctx is None else ctx
        ctx["wc"] = wc = WorkerContext.build(self.settings, self.metrics)
        ctx["heartbeat"] = asyncio.create_task(_heartbeat(wc, self.health))
        ctx["shared_gauges"] = self.metrics.shared.start(wc.redis)  # workers/gauges.py snapshot refresher
        self.expiry = ctx["expiry"] = ExpiryLoop(wc).start()  # ends due sessions (workers/expiry.py)
        ctx["claims"] = self.expiry.claims            # the stop jobs claim through the same script
        ctx["keeper"] = self.expiry.keeper            # and their claims are renewed with the loop's
        self.expiring = ctx["expiring"] = ExpiringLoop(wc).start()  # session.expiring events (workers/expiry.py)
        self.provisioning = ctx["provisioning"] = ProvisioningLoop(wc).start()  # workers/provisioning.py
        self.webhooks = ctx["webhooks"] = webhook_delivery(wc).start()  # fan-out and delivery: workers/webhooks.py
        if self.gc_thresholds is not None:
            tune_gc(self.gc_thresholds)  # everything alive now (modules, SDK, clients) out of the collector's way

    async def on_shutdown(self, ctx: dict[str, Any] | None = None) -> None:
        ctx = self.ctx if ctx is None else ctx
        if ctx.get("provisioning"):
            await ctx["provisioning"].stop()  # what is cut off is taken again after its lease
        if ctx.get("webhooks"):
            await ctx["webhooks"].stop()  # likewise: a POST cut off is delivered again after its lease
        if ctx.get("expiry"):
            await ctx["expiry"].stop()  # before the clients close: its DELETEs in flight finish
        if ctx.get("expiring"):
            await ctx["expiring"].stop()
        # cancelled and waited for: one cut off inside a pipeline must leave it (and give its
        # connection back) before the clients close, or the pipeline is left holding it
        background = [task for task in (ctx.get("heartbeat"), ctx.get("shared_gauges")) if task]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        wc: WorkerContext | None = ctx.get("wc")
        if wc:
            await wc.close()
        self._started = False

    async def async_run(self) -> None:
        """Run until cancelled, or until a signal's shutdown is complete (or, ``burst``, until
        arq's queue is empty)."""
        await self.on_startup(self.ctx)
        if self.handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.on_signal, sig)
        while True:
            try:
                await self.arq.async_run()
                return
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if (task is not None and task.cancelling()) or not self._signalled:
                    raise
                # arq ended its main task after the signal: our own work in flight ends now
                if self.provisioning is not None:
                    await self.provisioning.wait_idle(JOB_COMPLETION_WAIT_S)
                if self.webhooks is not None:
                    await self.webhooks.wait_idle(JOB_COMPLETION_WAIT_S)  # a POST ends within 15 s
                log.info("worker stopped by a signal")
                return
            except REDIS_ERRORS as exc:
                self._redis_lost(exc)
                await asyncio.sleep(REDIS_DOWN_PAUSE_S)

    def on_signal(self, signum: int) -> None:
        """SIGTERM/SIGINT: stop taking work; what runs ends by itself."""
        if self._signalled:
            return
        self._signalled = True
        log.info("received %s: taking no new work; running work ends by itself", signal.Signals(signum).name)
        if self.provisioning is not None:
            self.provisioning.drain()
        if self.webhooks is not None:
            self.webhooks.drain()
        if self.expiry is not None:
            self.expiry.drain()
        self.arq.handle_sig_wait_for_completion(signum)

    async def close(self) -> None:
        """Stop everything and close every client (also after a cancelled run or a Redis outage)."""
        if self.provisioning is not None:
            await self.provisioning.stop()
        if self.webhooks is not None:
            await self.webhooks.stop()
        try:
            await self.arq.close()  # cancels its job tasks and main task, deletes its health key
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # a job task cancelled just now: arq's close stopped there; the pool is closed below
        except REDIS_ERRORS as exc:
            self._redis_lost(exc)
        await self.on_shutdown(self.ctx)
        await self.pool.aclose(close_connection_pool=True)

    def _redis_lost(self, exc: BaseException) -> None:
        self.metrics.redis_errors.labels("poll").inc()
        if time.monotonic() - self._last_warning > 5:
            self._last_warning = time.monotonic()
            log.warning("redis unreachable (%s); the worker keeps retrying", type(exc).__name__)


def build_worker(
    settings: Settings, metrics: WorkerMetrics, health: Health, *, burst: bool = False, handle_signals: bool = True,
    gc_thresholds: tuple[int, int, int] | None = None,
) -> BrokerWorker:
    """The worker of the broker; ``gc_thresholds``: tune the process's collector once started
    (``broker.core.gc_tuning.tune_gc``), as the worker process does with :data:`GC_THRESHOLDS` (a worker
    run inside another program, such as the tests, leaves that program's collector alone)."""
    return BrokerWorker(settings, metrics, health, burst=burst, handle_signals=handle_signals,
                        gc_thresholds=gc_thresholds)


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
    if not await wait_for_redis(settings):  # before arq starts; a signal meanwhile ends the process
        if runner:
            await runner.cleanup()
        return
    worker = build_worker(settings, metrics, health, gc_thresholds=GC_THRESHOLDS)
    try:
        await worker.async_run()  # returns after a signal's clean shutdown (exit 0)
    finally:
        await worker.close()
        if runner:
            await runner.cleanup()
