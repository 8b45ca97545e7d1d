"""The provisioning loop: one per worker process, it provisions the sessions whose mint slot
(or retry time) has come, from the provisioning schedule (``broker/sessions/schedule.py``).

1. It **claims** the due sessions, as many as it has free slots (``BROKER_WORKER_MAX_JOBS`` in
   flight at most), with one Lua call per batch (``provision_claim.lua``): round robin over the
   tenants with due work, so one tenant's backlog never delays another tenant's session; each
   claimed entry moves to ``now + lease`` and the loop's :class:`~workers.jobs.claim.ClaimKeeper`
   renews it every second while the session is being provisioned, so a SIGKILLed worker's
   sessions are claimed by another worker when its lease runs out (3 s after its last renewal).
2. It runs each claimed session (``jobs/provision.py``: mint at the slot, create, ``ready``)
   in a task of its own; a transient upstream failure reschedules the same session at the
   retry time, a Redis error leaves it to its lease.
3. It sleeps until the earliest score of the ring (the next slot, retry or lease end), at most
   ``MAX_SLEEP_S``, and wakes at once on a token of the wake-up list (admission pushes one when
   a slot is due within a second): a listener task blocks on ``BLPOP`` (redis-py's
   ``blpop``) while the loop has free slots, and the sleep itself is an asyncio timer, so a
   session is started on its slot time, not at Redis's blocked-client timeout resolution. A
   full loop gives a token it took back to the list, for an idle worker.

Idle cost per worker: one claim call per ``MAX_SLEEP_S`` (an EVALSHA and the two reads of
the ring inside it) and one ``BLPOP`` per ``WAKE_BLOCK_S``: 5 commands a second. Redis going away pauses the loop (counted in
``broker_redis_errors_total{source="provision"}``), which goes on by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from broker.core.logs import log_context
from broker.sessions.models import now_ms
from broker.sessions.schedule import Claimed, ProvisionSchedule, entry_of
from tenants.scope import PROVISION_WAKE

from .context import WorkerContext
from .jobs.claim import HELD_LEASE_MS, RENEW_S, ClaimKeeper
from .jobs.common import REDIS_DOWN_PAUSE_S, REDIS_ERRORS
from .jobs.provision import Rescheduled, provision_claimed

log = logging.getLogger("workers.provisioning")

# Longest sleep without a token: a slot further than 1 s away (admission pushes no token for
# it) is learnt this long after its admission at the latest, before it is due.
MAX_SLEEP_S = 0.75
WAKE_BLOCK_S = 1.0         # the listener's BLPOP timeout (it blocks again at once)
# A full loop, once a slot is free, waits this much longer before claiming: the slots freed
# meanwhile are filled by the same claim call.
FULL_GATHER_S = 0.005
MIN_TICK_S = 0.005         # between two claims that took nothing while the ring says work is due
# One attempt (mint + create + records) runs at most this long; then it is cut off and the
# session is taken again after its lease (an attempt normally ends within two upstream timeouts).
ATTEMPT_TIMEOUT_S = 30.0
ERROR_PAUSE_S = 1.0


class ProvisioningLoop:
    def __init__(self, ctx: WorkerContext, *, max_in_flight: int | None = None, lease_ms: int = HELD_LEASE_MS,
                 renew_s: float = RENEW_S, max_sleep: float = MAX_SLEEP_S) -> None:
        self.ctx = ctx
        self.schedule = ProvisionSchedule(ctx.redis, ctx.mux.execute if ctx.mux is not None else None)
        self.keeper = ClaimKeeper(ctx.redis, ctx.metrics, lease_ms=lease_ms, every_s=renew_s,
                                  locate=entry_of, source="provision")
        self.max_in_flight = max_in_flight or ctx.settings.worker_max_jobs
        self.lease_ms = lease_ms
        self.deadline_ms = int(ctx.settings.provision_deadline_seconds * 1000)
        self.max_sleep = max_sleep
        self.claimed = 0           # sessions claimed (tests, bench)
        self.wakeups = 0           # tokens taken from the wake-up list
        self.claim_calls = 0
        self.last_run = 0.0        # time.monotonic() of the last completed iteration
        self._in_flight: set[asyncio.Task[None]] = set()
        self._running: dict[str, asyncio.Task[None]] = {}  # session id -> its attempt in flight
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._draining = False
        self._redis_lost = False
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._last_warning = 0.0

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def start(self) -> ProvisioningLoop:
        self._task = asyncio.create_task(self.run(), name="provisioning-loop")
        self._listener = asyncio.create_task(self._listen(), name="provisioning-wakeups")
        return self

    def poke(self) -> None:
        """Claim again now (a session of this worker was rescheduled, a test)."""
        self._wake.set()

    def drain(self) -> None:
        """Stop claiming (SIGTERM): what is in flight goes on; see :meth:`wait_idle`."""
        self._draining = True
        self._wake.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the sessions in flight to end; True if they all did."""
        if not self._in_flight:
            return True
        _, pending = await asyncio.wait(set(self._in_flight), timeout=timeout)
        return not pending

    async def stop(self, patience: float = 0.0) -> None:
        """Stop claiming; give the sessions in flight ``patience`` seconds, then cut them off
        (taken again by a worker after their lease, no longer renewed)."""
        self._draining = True
        for task in (self._task, self._listener):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._task, self._listener) if t is not None), return_exceptions=True)
        self._task = self._listener = None
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=patience) if patience > 0 else (
                set(), set(self._in_flight))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.keeper.stop()

    # ---- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                delay = await self.step()
                self.last_run = time.monotonic()
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                self.ctx.metrics.redis_errors.labels("provision").inc()
                self._warn("redis unreachable (%s); the provisioning loop keeps retrying", type(exc).__name__)
                self._redis_lost = True
                delay = REDIS_DOWN_PAUSE_S
            except Exception:
                log.exception("provisioning loop iteration failed; going on")
                delay = ERROR_PAUSE_S
            await self._sleep(delay)

    async def step(self) -> float:
        """One iteration: claim what is due and start it; returns how long to sleep at most."""
        if self._draining:
            self._wake.clear()
            return 3600.0
        free = self.max_in_flight - len(self._in_flight)
        if free <= 0:
            await asyncio.wait(set(self._in_flight), return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(FULL_GATHER_S)
            return 0.0
        if self._redis_lost:
            # Redis is back: renew this worker's claims before claiming (an outage longer than
            # the lease let them lapse), so its own sessions in flight are not taken again
            await self.keeper.renew_now()
            self._redis_lost = False
        now = now_ms()
        self._wake.clear()  # a token from now on means: claim again
        next_due, claims = await self.schedule.claim(now, now + self.lease_ms, free, deadline_ms=self.deadline_ms)
        self.claim_calls += 1
        for claimed in claims:
            self._spawn(claimed)
        if next_due is None:
            return self.max_sleep
        if next_due <= now:
            # more is due than this call took (or the ring was corrected): again at once; a full
            # loop waits for a free slot in the next step
            return 0.0 if claims else MIN_TICK_S
        return min(self.max_sleep, max(0.0, (next_due - now_ms()) / 1000))

    async def _sleep(self, delay: float) -> None:
        if delay <= 0 or self._wake.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()

    def _spawn(self, claimed: Claimed) -> None:
        sid = claimed.record.id
        if sid in self._running:
            # Its lease lapsed while this worker still works on it (Redis away, a stalled loop):
            # the claim only renewed it; the attempt in flight goes on, no second one.
            return
        self.claimed += 1
        task = asyncio.create_task(self._provision(claimed))
        self._running[sid] = task
        task.add_done_callback(lambda _t, sid=sid: self._running.pop(sid, None))
        self._in_flight.add(task)
        if len(self._in_flight) >= self.max_in_flight:
            self._room.clear()
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if len(self._in_flight) < self.max_in_flight:
            self._room.set()

    async def _provision(self, claimed: Claimed) -> None:
        rec = claimed.record
        metrics = self.ctx.metrics
        with log_context(tenant_id=rec.tenant_id, session_id=rec.id), self.keeper.hold(rec.tenant_id, rec.id):
            started = metrics.job_started("provision")
            error: BaseException | None = None
            try:
                async with asyncio.timeout(ATTEMPT_TIMEOUT_S):
                    await provision_claimed(self.ctx, claimed)
            except Rescheduled as exc:
                error = exc
                self._wake.set()  # its retry time may come before this loop's next wake-up
            except REDIS_ERRORS as exc:
                # Not recorded: the claim's lease runs out and a worker takes the session again.
                error = exc
                metrics.redis_errors.labels("provision").inc()
                self._warn("redis unreachable (%s) while provisioning; the session is taken again after its lease",
                           type(exc).__name__)
            except TimeoutError as exc:
                error = exc
                log.warning("provisioning attempt cut off after %.0f s; the session is taken again after its lease",
                            ATTEMPT_TIMEOUT_S)
            except asyncio.CancelledError as exc:
                error = exc
                raise
            except Exception as exc:
                error = exc
                log.exception("provisioning attempt failed; the session is taken again after its lease")
            finally:
                metrics.job_finished("provision", started, error)

    # ---- wake-ups -----------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Block on the wake-up list while this loop has room; a token wakes the loop."""
        redis = self.ctx.redis
        while True:
            await self._room.wait()
            if self._draining:
                return
            try:
                got = await redis.blpop([PROVISION_WAKE], timeout=WAKE_BLOCK_S)
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                self.ctx.metrics.redis_errors.labels("provision").inc()
                self._warn("redis unreachable (%s); the provisioning loop keeps retrying", type(exc).__name__)
                await asyncio.sleep(REDIS_DOWN_PAUSE_S)
                continue
            except Exception:
                log.exception("waiting for wake-ups failed; going on")
                await asyncio.sleep(ERROR_PAUSE_S)
                continue
            if got is None:
                continue
            self.wakeups += 1
            if self._draining or len(self._in_flight) >= self.max_in_flight:
                # full (or stopping): the token is for a worker with room
                with contextlib.suppress(*REDIS_ERRORS):
                    await self.schedule.wake()
                continue
            self._wake.set()

    def _warn(self, message: str, *args: object) -> None:
        if time.monotonic() - self._last_warning > 5:
            self._last_warning = time.monotonic()
            log.warning(message, *args)

