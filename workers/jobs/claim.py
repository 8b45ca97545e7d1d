"""Claiming terminations: the one way a worker takes a ``terminating`` (or expired ``ready``)
session to end it, whether from the expiry loop (``workers/expiry.py``) or a stop job; and
recording a batch of them ``terminated`` in one step (:class:`FinishBatch`, the loop's).

A session is owned through its score in ``sb:due:expiry``: claiming it (``broker/sessions/termination_claim.lua``, one
atomic step for a whole batch) moves the score to ``now + lease`` (:data:`HELD_LEASE_MS`), and
the claimer's :class:`ClaimKeeper` moves it on every :data:`RENEW_S` while the DELETE is in
flight, so another worker only takes it once the lease has run out, that is when its claimer
died or stalled: a SIGKILLed worker's sessions are taken again within seconds, a live
worker's slow DELETE (up to the upstream timeout) is never doubled. Whoever ends it removes
it from the set (``finish_terminated``); a failed DELETE sets the score to the retry time.
Two claimers racing on a session is harmless anyway (a second DELETE answers 404 = gone, the
terminal transition applies once), the lease only keeps it rare.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import redis.asyncio as aioredis

from broker.core.text import text
from broker.sessions.models import SessionRecord, now_ms
from broker.sessions.lua import script
from broker.sessions.repository import RETENTION_SECONDS
from tenants.scope import (DUE_EXPIRING, DUE_EXPIRY, PROVISION_TENANTS, STATS_LIVE, TenantScope, due_member,
                           split_due_member)

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..metrics import WorkerMetrics

log = logging.getLogger("workers.expiry")

_SCRIPT = script("termination_claim.lua")
_FINISH = script("termination_finish.lua")
FINISH_WAIT_S = 0.005      # finishes gathered this long go to Redis in one script call
# A claim's lease, and how often a live claimer renews it: a claimer that died is replaced
# HELD_LEASE_MS after its last renewal at most; a live one may miss one renewal (a stalled
# event loop, a Redis blip) before another worker takes its session (harmless: see above).
HELD_LEASE_MS = 3_000
RENEW_S = 1.0

# What a claimer needs of the record (all of ``stop_upstream_and_finish``'s inputs).
FIELDS = ("id", "tenant_id", "status", "created_at", "ttl_seconds", "end_user", "ready_at", "expires_at",
          "terminating_at", "termination_reason", "avaturn_session_id", "create_state", "delete_attempts",
          "avaturn_key_enc", "traceparent")  # traceparent: the termination span links to the creation's trace


class Claim:
    """The outcome for one session: ``claimed`` (with ``record``), ``not_due``, ``gone`` or
    ``provisioning``."""

    __slots__ = ("tenant_id", "session_id", "outcome", "record")

    def __init__(self, tenant_id: str, session_id: str, outcome: str, record: SessionRecord | None) -> None:
        self.tenant_id = tenant_id
        self.session_id = session_id
        self.outcome = outcome
        self.record = record

    def __repr__(self) -> str:
        return f"Claim({self.session_id!r}, {self.outcome!r})"


class TerminationClaims:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._claim = redis.register_script(_SCRIPT)

    async def due(self, now: int, limit: int) -> tuple[list[tuple[str, str]], int | None]:
        """Up to ``limit`` sessions due at ``now`` (oldest first), and the score of the first
        one due later (None: nothing scheduled). One round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(DUE_EXPIRY, "-inf", now, start=0, num=limit)
            pipe.zrangebyscore(DUE_EXPIRY, f"({now}", "+inf", start=0, num=1, withscores=True)
            members, after = await pipe.execute()
        return [split_due_member(m) for m in members], int(after[0][1]) if after else None

    async def claim(self, sessions: list[tuple[str, str]], *, now: int, due_until: int, claim_until: int,
                    lease: int, stop_due_until: int | None = None) -> list[Claim]:
        """Claim each of ``sessions`` (tenant id, session id) that is due by ``due_until``, a
        stop's first attempt by ``stop_due_until`` (see ``termination_claim.lua``); one round trip for
        the whole list."""
        if not sessions:
            return []
        keys: list[str] = [DUE_EXPIRY, STATS_LIVE]
        per_session: list[str] = []
        for tid, sid in sessions:
            scope = TenantScope(tid)
            keys += [scope.session(sid), scope.live()]
            per_session += [due_member(tid, sid), sid, scope.events_channel(sid)]
        stop_until = due_until if stop_due_until is None else stop_due_until
        args: list[Any] = [now, due_until, claim_until, lease, stop_until, len(FIELDS), *FIELDS, *per_session]
        rows = await self._claim(keys=keys, args=args)
        out = []
        for (tid, sid), row in zip(sessions, rows, strict=True):
            outcome = text(row[0])
            record = None
            if outcome == "claimed":
                values = {k: v.decode() for k, v in zip(FIELDS, row[1:], strict=True) if v is not None}
                record = msgspec.convert(values, SessionRecord, strict=False)
            out.append(Claim(tid, sid, outcome, record))
        return out


def expiry_entry(tenant_id: str, session_id: str) -> tuple[str, str]:
    """(key, member) of a session's entry in the termination schedule."""
    return DUE_EXPIRY, due_member(tenant_id, session_id)


class ClaimKeeper:
    """Keeps the claims this worker is working on alive: while any is held, every
    :data:`RENEW_S` one ``ZADD XX`` per schedule key (pipelined, one round trip) moves all of
    their scores to ``now + HELD_LEASE_MS`` (``XX``: a session ended meanwhile is not put back).
    Released before the record's last step has answered, a renewal can still land after it: a
    retry time then moves to ``now + lease``, an earlier attempt, never a lost one.

    ``locate`` maps a session to its entry (schedule key, member): the termination schedule
    (the default) or the provisioning schedule (``broker.sessions.schedule.entry_of``), one
    keeper per schedule; ``source`` labels its Redis errors."""

    def __init__(self, redis: aioredis.Redis, metrics: WorkerMetrics, *, lease_ms: int = HELD_LEASE_MS,
                 every_s: float = RENEW_S, locate: Callable[[str, str], tuple[str, str]] = expiry_entry,
                 source: str = "expiry") -> None:
        self.redis = redis
        self.metrics = metrics
        self.lease_ms = lease_ms
        self.every_s = every_s
        self.locate = locate
        self.source = source
        self._held: collections.Counter[tuple[str, str]] = collections.Counter()
        self._task: asyncio.Task[None] | None = None
        self.renewals = 0  # renewal round trips made (tests)

    @property
    def held(self) -> int:
        return len(self._held)

    @contextlib.contextmanager
    def hold(self, tenant_id: str, session_id: str) -> Iterator[None]:
        entry = self.locate(tenant_id, session_id)
        self._held[entry] += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._renew(), name="claim-keeper")
        try:
            yield
        finally:
            self._held[entry] -= 1
            if self._held[entry] <= 0:
                del self._held[entry]

    def holds(self, tenant_id: str, session_id: str) -> bool:
        return self.locate(tenant_id, session_id) in self._held

    async def _renew(self) -> None:
        while self._held:
            await asyncio.sleep(self.every_s)
            if not self._held:
                return
            try:
                await self.renew_now()
            except (RedisConnectionError, RedisTimeoutError):
                self.metrics.redis_errors.labels(self.source).inc()  # the next tick tries again
            except Exception:  # never let a renewal failure end the loop: the leases would lapse
                log.exception("renewing claims failed; trying again")

    async def renew_now(self) -> None:
        """Renew every held claim now (one round trip); Redis errors are the caller's."""
        if not self._held:
            return
        until = now_ms() + self.lease_ms
        by_key: dict[str, dict[str, int]] = {}
        for key, member in list(self._held):
            by_key.setdefault(key, {})[member] = until
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, members in by_key.items():
                pipe.zadd(key, members, xx=True)
            await pipe.execute()
        self.renewals += 1

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class FinishBatch:
    """``finish_terminated`` for many sessions at once: each caller awaits :meth:`finish`;
    the records gathered over ``FINISH_WAIT_S`` are written by one ``termination_finish.lua`` call (same
    writes and metrics as ``finish_terminated``, each applied once). A Redis error reaches
    every caller of the batch."""

    def __init__(self, redis: aioredis.Redis, metrics: WorkerMetrics) -> None:
        self.metrics = metrics
        self._finish = redis.register_script(_FINISH)
        self._waiting: list[tuple[SessionRecord, str, asyncio.Future[bool]]] = []
        self._flush: asyncio.Task[None] | None = None

    async def finish(self, rec: SessionRecord, reason: str) -> bool:
        """Record ``rec`` terminated (``reason`` unless it has one); True if this applied it."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((rec, reason, done))
        if self._flush is None:
            self._flush = asyncio.create_task(self._flush_soon())
        return await done

    async def _flush_soon(self) -> None:
        try:
            await asyncio.sleep(FINISH_WAIT_S)
        finally:
            batch, self._waiting, self._flush = self._waiting, [], None
        try:
            applied = await self._write(batch)
        except Exception as exc:  # Redis away: each caller sees it (its claim lapses, it is retaken)
            for *_, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for (_, _, done), ok in zip(batch, applied, strict=True):
            if not done.done():
                done.set_result(ok)

    async def _write(self, batch: list[tuple[SessionRecord, str, asyncio.Future[bool]]]) -> list[bool]:
        now = now_ms()
        keys: list[str] = [DUE_EXPIRY, PROVISION_TENANTS, STATS_LIVE, DUE_EXPIRING]
        args: list[Any] = [now, RETENTION_SECONDS]
        for rec, reason, _ in batch:
            scope = TenantScope(rec.tenant_id)
            keys += [scope.session(rec.id), scope.live(), scope.end_user(rec.end_user or "-"), scope.provision_schedule()]
            args += [rec.id, due_member(rec.tenant_id, rec.id), scope.events_channel(rec.id), reason, rec.tenant_id]
        recorded = await self._finish(keys=keys, args=args)
        out = []
        for (rec, _, _), value in zip(batch, recorded, strict=True):
            if value:  # [reason, thresholds recorded by the settle] (termination_finish.lua)
                self.metrics.count_termination(rec, text(value[0]), now, int(value[1]))
            out.append(bool(value))
        return out
