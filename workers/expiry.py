"""The expiry loop: one per worker process, it ends every session whose time has come.

``sb:due:expiry`` holds every live session that has a termination ahead of it: a ``ready``
one at its ``expires_at``, a ``terminating`` one at its retry time (or at once). The loop

1. reads the due sessions and claims up to as many as it has free DELETE slots, in one
   atomic step for the whole batch (``broker/sessions/termination_claim.lua``: a ``ready`` one moves to
   ``terminating``, each claimed one's score moves to ``now + lease`` so no other worker takes
   it while this one works on it, the lease renewed every second by the loop's
   :class:`~workers.jobs.claim.ClaimKeeper` until the session is ended; two round trips per batch);
2. runs their upstream DELETEs concurrently (at most ``max_in_flight``), each then recorded
   ``terminated`` (or its retry time set, ``jobs/terminate.py``), each with the Avaturn key that
   created the session (``jobs/session_key.py``: one decrypt, ~20 us, no Redis read), the
   ``terminated`` records of every 5 ms written by one script call (``broker/sessions/termination_finish.lua``);
3. sleeps until the next due score, at most ``MAX_SLEEP_S``, at least ``MIN_TICK_S`` between
   batches while work is due (so a burst is taken in batches, not one by one), and waits for
   a free slot instead of reading when all are busy.

A worker SIGKILLed mid-batch loses nothing: its claims run out 3 s after their last renewal
and another worker's loop takes them again (a second DELETE answers 404 = gone; the terminal
transition applies once). Redis going away pauses the loop, which goes
on by itself; an unexpected error is logged and the loop goes on.

Idle cost: one pipelined pair of ``ZRANGEBYSCORE`` per ``MAX_SLEEP_S`` per worker (4
commands/s), none of them inside a script.

Next to it, :class:`ExpiringLoop` records ``session.expiring`` (contract section 11: 60 s
before ``expires_at``, or at ready for a shorter session). The step that makes a session ready
(``transition.lua``) puts it in ``sb:due:expiring`` at its ``expires_at``; the loop takes the
entries due within the lead time and records each one's event in one atomic step per batch
(``broker/sessions/expiring.lua``): only while the session is still ``ready``, once (the entry is removed
and a flag set in the session hash in that step: two workers racing record it once). Leaving
``ready`` removes the entry. A session ready with less than the lead left is due at once. The
loop sleeps until the next entry is due, at most ``MAX_SLEEP_S``: an event is late by at most
that (a session that becomes ready while it sleeps) plus one script call. Idle cost: one
script call per ``MAX_SLEEP_S`` per worker.
"""

from __future__ import annotations

import asyncio
import logging
import time

from broker.core.logs import log_context
from broker.sessions.lua import script
from broker.sessions.models import SessionRecord, now_ms
from broker.sessions.terminal import TERMINATION_GRACE_MS
from tenants.scope import DUE_EXPIRING, TENANT_KEYS

from .context import WorkerContext
from .jobs.claim import HELD_LEASE_MS, RENEW_S, ClaimKeeper, FinishBatch, TerminationClaims
from .jobs.common import REDIS_DOWN_PAUSE_S, REDIS_ERRORS
from .jobs.terminate import end_claimed

log = logging.getLogger("workers.expiry")

CLAIM_BATCH = 500          # sessions claimed per Lua call at most
MAX_IN_FLIGHT = 200        # concurrent upstream DELETEs per worker
# Longest sleep: a session that becomes due meanwhile is seen this late at most. New ready
# sessions are due >= 10 s (the minimum TTL) after they appear, stops are run at once by their
# job, so this only delays the fallbacks (retries scheduled by another worker, lapsed claims).
MAX_SLEEP_S = 0.5
MIN_TICK_S = 0.02          # between two batches while sessions are due
# A stop (DELETE, replacement, tenant disable) has its own job, run at once: the loop makes
# the first attempt at one only when it is this late (the job was lost or its worker died),
# so the two do not race for it; retries (delete_attempts > 0) are the loop's, on time.
STOP_GRACE_MS = 1_000
ERROR_PAUSE_S = 1.0
EXPIRING_BATCH = 500       # session.expiring events recorded per script call at most
_EXPIRING = script("expiring.lua")


class ExpiryLoop:
    def __init__(self, ctx: WorkerContext, *, batch: int = CLAIM_BATCH, max_in_flight: int = MAX_IN_FLIGHT,
                 max_sleep: float = MAX_SLEEP_S, lease_ms: int = HELD_LEASE_MS, renew_s: float = RENEW_S) -> None:
        self.ctx = ctx
        self.claims = TerminationClaims(ctx.redis)
        self.finishes = FinishBatch(ctx.redis, ctx.metrics)
        # renews the claims of the DELETEs in flight (and of the stop jobs: workers/main.py)
        self.keeper = ClaimKeeper(ctx.redis, ctx.metrics, lease_ms=lease_ms, every_s=renew_s)
        self.batch = batch
        self.max_in_flight = max_in_flight
        self.max_sleep = max_sleep
        self.lease_ms = lease_ms
        self.last_run = 0.0        # time.monotonic() of the last completed iteration
        self._in_flight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._last_warning = 0.0
        self._draining = False

    def start(self) -> ExpiryLoop:
        self._task = asyncio.create_task(self.run(), name="expiry-loop")
        return self

    def drain(self) -> None:
        """Claim nothing more (SIGTERM); the DELETEs in flight go on (see :meth:`stop`)."""
        self._draining = True

    async def stop(self, patience: float | None = None) -> None:
        """Stop claiming; give the DELETEs in flight ``patience`` seconds (default: the upstream
        timeout + 1 s) to finish. What is cut off is taken again by a worker after the lease
        (no longer renewed)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._in_flight:
            wait = self.ctx.settings.upstream_timeout_seconds + 1 if patience is None else patience
            _, pending = await asyncio.wait(set(self._in_flight), timeout=wait)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.keeper.stop()

    async def run(self) -> None:
        while True:
            try:
                delay = await self.step()
                self.last_run = time.monotonic()
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                self.ctx.metrics.redis_errors.labels("expiry").inc()
                self._warn("redis unreachable (%s); the expiry loop keeps retrying", type(exc).__name__)
                delay = REDIS_DOWN_PAUSE_S
            except Exception:
                log.exception("expiry loop iteration failed; going on")
                delay = ERROR_PAUSE_S
            if delay > 0:
                await asyncio.sleep(delay)

    async def step(self) -> float:
        """One iteration: claim what is due and start its DELETEs; returns how long to sleep."""
        if self._draining:
            return self.max_sleep
        free = self.max_in_flight - len(self._in_flight)
        if free <= 0:
            await asyncio.wait(set(self._in_flight), return_when=asyncio.FIRST_COMPLETED)
            return 0.0
        limit = min(self.batch, free)
        now = now_ms()
        due, next_at = await self.claims.due(now, limit)
        if due:
            claims = await self.claims.claim(due, now=now, due_until=now, claim_until=now + self.lease_ms,
                                             lease=now + TERMINATION_GRACE_MS, stop_due_until=now - STOP_GRACE_MS)
            for claim in claims:
                if claim.record is not None:
                    self._spawn(claim.record)
            if len(due) == limit:
                return MIN_TICK_S  # more may be due: the next batch after a breath
        if next_at is None:
            return self.max_sleep
        until_next = (next_at - now_ms()) / 1000
        return min(self.max_sleep, max(MIN_TICK_S if due else 0.001, until_next))

    def _spawn(self, rec: SessionRecord) -> None:
        task = asyncio.create_task(self._end(rec))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _end(self, rec: SessionRecord) -> None:
        with log_context(tenant_id=rec.tenant_id, session_id=rec.id):
            try:
                await end_claimed(self.ctx, rec, self.finishes.finish, self.keeper)
            except REDIS_ERRORS as exc:
                # Not recorded: the claim runs out and a worker takes the session again.
                self.ctx.metrics.redis_errors.labels("expiry").inc()
                self._warn("redis unreachable (%s) while ending a session; it is taken again after its claim",
                           type(exc).__name__)
            except Exception:
                log.exception("ending a session failed; it is taken again after its claim")

    def _warn(self, message: str, *args: object) -> None:
        if time.monotonic() - self._last_warning > 5:
            self._last_warning = time.monotonic()
            log.warning(message, *args)


class ExpiringLoop:
    """Records ``session.expiring`` ``lead_s`` (default: the setting
    ``BROKER_SESSION_EXPIRING_LEAD_SECONDS``, 60 s) before each ready session's ``expires_at``
    (see the module's docstring). One per worker process; any number may run."""

    def __init__(self, ctx: WorkerContext, *, lead_s: float | None = None, batch: int = EXPIRING_BATCH,
                 max_sleep: float = MAX_SLEEP_S) -> None:
        self.ctx = ctx
        lead = ctx.settings.session_expiring_lead_seconds if lead_s is None else lead_s
        self.lead_ms = int(lead * 1000)
        self.batch = batch
        self.max_sleep = max_sleep
        self.recorded = 0          # events this loop recorded
        self._script = ctx.redis.register_script(_EXPIRING)
        self._task: asyncio.Task[None] | None = None
        self._last_warning = 0.0

    def start(self) -> ExpiringLoop:
        self._task = asyncio.create_task(self.run(), name="expiring-loop")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def run(self) -> None:
        while True:
            try:
                delay = await self.step()
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                self.ctx.metrics.redis_errors.labels("expiry").inc()
                if time.monotonic() - self._last_warning > 5:
                    self._last_warning = time.monotonic()
                    log.warning("redis unreachable (%s); the expiring loop keeps retrying", type(exc).__name__)
                delay = REDIS_DOWN_PAUSE_S
            except Exception:
                log.exception("expiring loop iteration failed; going on")
                delay = ERROR_PAUSE_S
            if delay > 0:
                await asyncio.sleep(delay)

    async def step(self) -> float:
        """Record the events now due (one script call); returns how long to sleep."""
        now = now_ms()
        recorded, taken, next_score = await self._script(
            keys=[DUE_EXPIRING], args=[now + self.lead_ms, self.batch, TENANT_KEYS, now])
        self.recorded += int(recorded)
        if int(taken) >= self.batch:
            return MIN_TICK_S  # more may be due
        if next_score is None:
            return self.max_sleep
        until_next = (float(next_score) - self.lead_ms - now_ms()) / 1000
        return min(self.max_sleep, max(0.001, until_next))
