"""Webhook delivery in the worker (contract section 11): the fan-out of the tenants' outbox
entries to their endpoints' queues, and the delivery loop that claims the due queue heads and
POSTs them. One :class:`WebhookDelivery` per worker process, started and stopped with the
provisioning loop (``workers/main.py``). The queues and their Lua: ``broker/webhooks/queue.py``.

1. **Fan-out** (one task): for each tenant with endpoints (``WEBHOOK_TENANTS``), one Lua step
   reads the outbox entries after the tenant's cursor and queues each for the endpoints that
   want it, then moves the cursor (``fanout.lua``: atomic, nothing fanned out twice or lost). It
   runs for a tenant when the outbox PUBLISHes an event id on the tenant's stream name (one
   ``PSUBSCRIBE OUTBOX_PATTERN`` per worker process, on its own connection), for a tenant new in
   ``WEBHOOK_TENANTS`` (re-read every :data:`SWEEP_S`), and for every tenant after the
   subscription was (re)made and every :data:`FULL_SWEEP_S` (a safety net: a healthy
   subscription loses no message, and a sweep of every tenant every second by every worker
   would cost one Lua call per tenant per worker per second). The admission path gains no
   Redis command: the PUBLISH is the outbox's own.
2. **Delivery** (one loop): claims due queue heads (``claim.lua``: round robin over endpoints,
   at most ``per_endpoint`` in flight per endpoint and ``per_tenant`` per tenant in this
   worker, so a slow receiver holds at most that many of the worker's ``max_in_flight`` slots
   and a tenant's 10 slow receivers at most ``per_tenant``; each claim leased for 3 s and
   renewed every second by a :class:`~workers.jobs.claim.ClaimKeeper` while its POST is in
   flight), POSTs each in a task of its own (``workers/webhook_sender.py``) and records the
   attempt (``complete.lua``: popped when delivered, given up or the endpoint disabled, else
   scheduled again on the contract's retry schedule with +-10 % jitter, never before
   ``Retry-After``). It sleeps until the earliest due head (at most :data:`MAX_SLEEP_S`), and
   is woken by the fan-out, by its own completions and by ``sb:wh:wake`` (a resend).

A SIGKILLed worker's claims are taken again by another worker when their leases run out: the
delivery is made again with the same ``webhook-id`` (at-least-once). Redis going away pauses
both loops (``broker_redis_errors_total{source="webhooks"}``), which go on by themselves.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import secrets as _secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import redis.asyncio as aioredis

from broker.core.logs import log_context
from broker.core.redis_mux import Execute
from broker.sessions.models import now_ms
from broker.sessions.outbox import render
from broker.webhooks.queue import RETRY_SCHEDULE_S, Delivery, DeliveryQueue, due_entry
from tenants.crypto import CredentialCipher
from tenants.scope import OUTBOX_PATTERN, WEBHOOK_WAKE, TenantScope

from .jobs.claim import HELD_LEASE_MS, RENEW_S, ClaimKeeper
from .jobs.common import REDIS_ERRORS
from .metrics import WorkerMetrics
from .webhook_sender import Attempt, WebhookSender

log = logging.getLogger("workers.webhooks")

MAX_IN_FLIGHT = 256         # POSTs in flight per worker (async I/O: cheap; the sender's pool is 256)
PER_ENDPOINT = 32           # ... of which to one endpoint at most (8 measured too few: below)
PER_TENANT = 96             # ... and to one tenant's endpoints together (10 x 32 would be every slot)
SWEEP_S = 1.0               # the tenants with endpoints re-read this often (a new one is fanned out at once)
FULL_SWEEP_S = 10.0         # every such tenant's outbox looked at this often (and after a lost subscription)
MAX_SLEEP_S = 1.0           # longest sleep of the delivery loop without a wake-up
MIN_TICK_S = 0.005
FANOUT_CONCURRENCY = 32     # tenants fanned out at once
JITTER = 0.1                # retry delays are drawn in [1 - JITTER, 1 + JITTER] of the schedule's
REDIS_DOWN_PAUSE_S = 0.5
ERROR_PAUSE_S = 1.0
SECRET_CACHE = 1024         # decrypted secrets kept (by their ciphertext)
# One attempt, Redis steps included, is cut off after this; the claim then lapses and the
# delivery is taken again (the POST itself is bounded by the sender's 15 s).
ATTEMPT_TIMEOUT_S = 30.0


def retry_delay_s(attempt: int, rand: Callable[[], float] = random.random) -> float | None:
    """Seconds before the attempt after failed attempt ``attempt`` (1-based), None after the last."""
    if attempt > len(RETRY_SCHEDULE_S):
        return None
    return RETRY_SCHEDULE_S[attempt - 1] * (1 - JITTER + 2 * JITTER * rand())


class WebhookDelivery:
    def __init__(self, redis: aioredis.Redis, cipher: CredentialCipher, metrics: WorkerMetrics, *,
                 allow_private: bool, execute: Execute | None = None, sender: WebhookSender | None = None,
                 max_in_flight: int = MAX_IN_FLIGHT, per_endpoint: int = PER_ENDPOINT,
                 per_tenant: int = PER_TENANT,
                 lease_ms: int = HELD_LEASE_MS, renew_s: float = RENEW_S, sweep_s: float = SWEEP_S,
                 full_sweep_s: float = FULL_SWEEP_S,
                 max_sleep: float = MAX_SLEEP_S, clock: Callable[[], int] = now_ms,
                 rand: Callable[[], float] = random.random) -> None:
        self.redis = redis
        self.cipher = cipher
        self.metrics = metrics
        self.queue = DeliveryQueue(redis, execute)
        self.sender = sender or WebhookSender(allow_private=allow_private)
        self._own_sender = sender is None
        self.keeper = ClaimKeeper(redis, metrics, lease_ms=lease_ms, every_s=renew_s, locate=due_entry,
                                  source="webhooks")
        self.max_in_flight = max_in_flight
        self.per_endpoint = per_endpoint
        self.per_tenant = per_tenant
        self.lease_ms = lease_ms
        self.sweep_s = sweep_s
        self.full_sweep_s = full_sweep_s
        self.max_sleep = max_sleep
        self.clock = clock
        self.rand = rand
        self.attempts = 0               # POSTs made (tests, bench)
        self.fanned_out = 0             # deliveries queued by this worker's fan-out
        self._in_flight: set[asyncio.Task[None]] = set()
        self._running: dict[tuple[str, str, str], Delivery] = {}
        self._wake = asyncio.Event()
        self._fan_wake = asyncio.Event()
        self._fan_pending: set[str] = set()
        self._tenants: set[str] = set()  # tenants with endpoints, as of the last sweep
        self._subscribed = asyncio.Event()
        self._missed = True  # wake-ups may have been missed (not subscribed yet, or lost): sweep all
        self._draining = False
        self._closed = False
        self._redis_lost = False
        self._tasks: list[asyncio.Task[None]] = []
        self._secrets: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._last_warning = 0.0

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def start(self) -> WebhookDelivery:
        self._tasks = [asyncio.create_task(self._run(), name="webhook-delivery"),
                       asyncio.create_task(self._dispatch(), name="webhook-fanout"),
                       asyncio.create_task(self._listen(), name="webhook-wakeups")]
        return self

    async def wait_subscribed(self, timeout: float = 5.0) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._subscribed.wait()
        return self._subscribed.is_set()

    def poke(self) -> None:
        self._wake.set()
        self._fan_wake.set()

    def drain(self) -> None:
        """Stop claiming (SIGTERM): the POSTs in flight go on; see :meth:`wait_idle`."""
        self._draining = True
        self._wake.set()

    async def wait_idle(self, timeout: float) -> bool:
        if not self._in_flight:
            return True
        _, pending = await asyncio.wait(set(self._in_flight), timeout=timeout)
        return not pending

    async def stop(self, patience: float = 0.0) -> None:
        """Stop; POSTs still in flight after ``patience`` s are cut off (their claims lapse and
        another worker delivers them)."""
        self._draining = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._in_flight:
            if patience > 0:
                _, pending = await asyncio.wait(set(self._in_flight), timeout=patience)
            else:
                pending = set(self._in_flight)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.keeper.stop()
        if self._own_sender and not self._closed:
            self._closed = True
            await self.sender.aclose()

    # ---- delivery ---------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                delay = await self.step()
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                self._redis_error(exc)
                self._redis_lost = True
                delay = REDIS_DOWN_PAUSE_S
            except Exception:
                log.exception("webhook delivery loop iteration failed; going on")
                delay = ERROR_PAUSE_S
            await self._sleep(self._wake, delay)

    async def step(self) -> float:
        """Claim what is due and start it; returns how long to sleep at most."""
        if self._draining:
            self._wake.clear()
            return 3600.0
        free = self.max_in_flight - len(self._in_flight)
        if free <= 0:
            await asyncio.wait(set(self._in_flight), return_when=asyncio.FIRST_COMPLETED)
            return 0.0
        if self._redis_lost:
            await self.keeper.renew_now()  # an outage longer than the lease let this worker's claims lapse
            self._redis_lost = False
        now = self.clock()
        self._wake.clear()
        busy = collections.Counter(d.member for d in self._running.values())
        nxt, claimed = await self.queue.claim(now, now + self.lease_ms, free, self.per_endpoint, dict(busy),
                                              _secrets.token_hex(8), tenant_cap=self.per_tenant)
        for d in claimed:
            self._spawn(d)
        if nxt is None:
            return self.max_sleep
        if nxt <= now:
            return 0.0 if claimed else MIN_TICK_S
        return min(self.max_sleep, max(0.0, (nxt - self.clock()) / 1000))

    def _spawn(self, d: Delivery) -> None:
        key = (d.tenant_id, d.endpoint_id, d.session)
        running = self._running.get(key)
        if running is not None and running.entry_id == d.entry_id:
            # its lease lapsed while this worker still delivers it (a stalled loop, a Redis
            # blip): this claim only renewed it; the POST in flight completes with its token
            running.token = d.token
            return
        # (a running one with another entry has completed: its task is only ending)
        self._running[key] = d
        task = asyncio.create_task(self._deliver(d))
        self._in_flight.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._in_flight.discard(t)
            if self._running.get(key) is d:
                del self._running[key]
            self._wake.set()  # the session's next event may be due now; the endpoint has room again

        task.add_done_callback(done)

    async def _deliver(self, d: Delivery) -> None:
        with log_context(tenant_id=d.tenant_id), self.keeper.hold(d.tenant_id, f"{d.endpoint_id}:{d.session}"):
            try:
                async with asyncio.timeout(ATTEMPT_TIMEOUT_S):
                    attempt = await self._post(d)
                    await self._record(d, attempt)
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                self._redis_error(exc)  # not recorded: the lease runs out and it is delivered again
            except TimeoutError:
                log.warning("webhook attempt cut off after %.0f s; delivered again after its lease", ATTEMPT_TIMEOUT_S)
            except Exception:
                log.exception("webhook attempt failed; delivered again after its lease")

    async def _post(self, d: Delivery) -> Attempt:
        try:
            event = render(d.tenant_id, d.entry_id, d.fields)
            body = msgspec.json.encode(event)
            secrets = [self._secret(d.secret_enc)]
            if d.prev_secret_enc and d.prev_secret_until > self.clock():
                secrets.append(self._secret(d.prev_secret_enc))
        except Exception:
            log.exception("webhook %s: the event or the endpoint's secret is unreadable", d.endpoint_id)
            return Attempt(None, "internal_error", 0, "")
        self.attempts += 1
        try:
            return await self.sender.post(d.url, secrets, event.id, body)
        except Exception:
            # the sender answers every receiver and network outcome; anything else is a bug, but
            # an unrecorded attempt would be claimed again after every lease, uncounted, forever
            log.exception("webhook %s: the POST failed unexpectedly; recorded as a failed attempt", d.endpoint_id)
            return Attempt(None, "internal_error", 0, "")

    def _secret(self, token: str) -> str:
        secret = self._secrets.get(token)
        if secret is None:
            secret = self.cipher.decrypt(token)
            self._secrets[token] = secret
            if len(self._secrets) > SECRET_CACHE:
                self._secrets.popitem(last=False)
        else:
            self._secrets.move_to_end(token)
        return secret

    async def _record(self, d: Delivery, attempt: Attempt) -> str:
        now = self.clock()
        if attempt.ok:
            result, retry_at, give_up = "ok", 0, False
        else:
            result = "gone" if attempt.status == 410 else "fail"
            delay = retry_delay_s(d.attempt, self.rand)
            give_up = delay is None
            delay = max(delay or 0.0, attempt.retry_after_s or 0.0)
            retry_at = now + int(delay * 1000)
        outcome = await self.queue.complete(d, result, now=now, retry_at=retry_at, give_up=give_up,
                                            status=attempt.status, error=attempt.error,
                                            latency_ms=attempt.latency_ms, response=attempt.response)
        if outcome != "stale":
            self.metrics.webhook_delivery(outcome)
            if outcome == "delivered":
                self.metrics.webhook_lateness.observe(max(0.0, (now - d.created_ms) / 1000))
        return outcome

    # ---- fan-out ----------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        next_sweep = next_full = 0.0
        while True:
            await self._sleep(self._fan_wake, max(0.0, next_sweep - time.monotonic()))
            self._fan_wake.clear()
            tenants, self._fan_pending = self._fan_pending, set()
            try:
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + self.sweep_s
                    known = set(await self.queue.tenants())
                    tenants |= known - self._tenants  # new: their wake-ups were ignored until now
                    self._tenants = known
                    if now >= next_full or self._missed:
                        # every tenant: after the subscription was down (wake-ups lost), and as
                        # a safety net every FULL_SWEEP_S
                        self._missed = False
                        next_full = now + self.full_sweep_s
                        tenants |= known
                await self.fan_out(tenants)
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                self._redis_error(exc)
                self._fan_pending |= tenants
                self._missed = True
                await asyncio.sleep(REDIS_DOWN_PAUSE_S)
            except Exception:
                log.exception("webhook fan-out failed; going on")
                self._fan_pending |= tenants
                await asyncio.sleep(ERROR_PAUSE_S)

    async def fan_out(self, tenants: Iterable[str]) -> int:
        """Fan out every new entry of ``tenants``; the deliveries queued."""
        pending = list(tenants)
        queued = 0
        for i in range(0, len(pending), FANOUT_CONCURRENCY):
            for n in await asyncio.gather(*(self._fan_out_one(t) for t in pending[i:i + FANOUT_CONCURRENCY])):
                queued += n
        return queued

    async def _fan_out_one(self, tenant_id: str) -> int:
        from broker.webhooks.queue import FANOUT_BATCH

        queued = 0
        while True:
            read, n = await self.queue.fanout(tenant_id, self.clock(), FANOUT_BATCH)
            if n:
                queued += n
                self.fanned_out += n
                self._wake.set()
            if read < FANOUT_BATCH:
                return queued

    async def _listen(self) -> None:
        """One pub/sub connection: the outbox's PUBLISHes (a tenant's new event) and ``sb:wh:wake``."""
        warned = False
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(OUTBOX_PATTERN)
                await pubsub.subscribe(WEBHOOK_WAKE)
                self._subscribed.set()
                warned = False
                self._missed = True  # what was appended while we were away: the next sweep looks at all
                self.poke()
                while True:
                    # a bounded read (not listen(): that one fails after the client's socket_timeout when idle)
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is None:
                        continue
                    channel = msg.get("channel")
                    channel = channel.decode() if isinstance(channel, bytes) else str(channel)
                    if channel == WEBHOOK_WAKE:
                        self._wake.set()
                        continue
                    tid = TenantScope.tenant_of_events_channel(channel)
                    if tid is not None and tid in self._tenants:  # others: the sweep finds new tenants
                        self._fan_pending.add(tid)
                        self._fan_wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._subscribed.clear()
                self.metrics.redis_errors.labels("webhooks").inc()
                log.log(logging.DEBUG if warned else logging.WARNING,
                        "webhook wake-ups lost Redis (%s); the sweep goes on, reconnecting", type(exc).__name__)
                warned = True
                await asyncio.sleep(REDIS_DOWN_PAUSE_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    # ---- helpers ----------------------------------------------------------------------------

    @staticmethod
    async def _sleep(event: asyncio.Event, delay: float) -> None:
        if delay <= 0 or event.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await event.wait()

    def _redis_error(self, exc: BaseException) -> None:
        self.metrics.redis_errors.labels("webhooks").inc()
        if time.monotonic() - self._last_warning > 5:
            self._last_warning = time.monotonic()
            log.warning("redis unreachable (%s); webhook delivery keeps retrying", type(exc).__name__)


def from_context(ctx: Any) -> WebhookDelivery:
    """The worker's delivery, on its clients (``WorkerContext``)."""
    return WebhookDelivery(ctx.redis, ctx.cipher, ctx.metrics, allow_private=ctx.settings.webhook_allow_private,
                           execute=ctx.mux.execute if ctx.mux is not None else None)
