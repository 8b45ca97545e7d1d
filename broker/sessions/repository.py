"""All Redis access of the session domain.

Every state change goes through one Lua script (``transition.lua``) that checks the
current status and updates the record, the concurrency lease, the end-user set and the
due sets in one atomic step, then publishes the new status for ``wait``ers. Terminal
transitions release the lease, drop what a retained record no longer needs (``terminal.py``),
and set a retention TTL on the record.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from broker.core.redis_mux import Execute, RedisMux, evalsha
from broker.core.text import text
from tenants.scope import DUE_EXPIRING, DUE_EXPIRY, PROVISION_TENANTS, STATS_LIVE, TenantScope, due_member

from .lua import script
from .models import SessionRecord


RETENTION_SECONDS = 7 * 24 * 3600
_SCRIPT = script("transition.lua")

Score = int | str  # "" keep, "del" remove, or an int score


class TransitionResult:
    """``thresholds``: the ``usage.threshold_reached`` events the budget settle of a terminal
    transition recorded (tenants/budget.lua), for ``broker_usage_thresholds_total``."""

    __slots__ = ("applied", "status", "missing", "thresholds")

    def __init__(self, raw: list[Any]) -> None:
        code = int(raw[0])
        self.applied = code == 1
        self.missing = code == -1
        status = raw[1]
        self.status = text(status)
        self.thresholds = int(raw[2]) if len(raw) > 2 else 0

    def __repr__(self) -> str:
        return f"TransitionResult(applied={self.applied}, status={self.status!r}, thresholds={self.thresholds})"



class SessionRepository:
    """``mux``: send the scripts (:meth:`transition`, and the admission and the provisioning
    claims through :attr:`execute`) over one pipelined connection instead of the client's pool
    (the worker makes two or three per session, the API one per admission)."""

    def __init__(self, redis: aioredis.Redis, mux: RedisMux | None = None) -> None:
        self.redis = redis
        self.execute: Execute = redis.execute_command if mux is None else mux.execute
        self._transition = redis.register_script(_SCRIPT)

    async def get(self, tenant_id: str, session_id: str) -> SessionRecord | None:
        raw = await self.redis.hgetall(TenantScope(tenant_id).session(session_id))
        if not raw:
            return None
        return SessionRecord.from_hash(raw)

    async def get_many(self, tenant_id: str, session_ids: list[str]) -> list[SessionRecord | None]:
        scope = TenantScope(tenant_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in session_ids:
                pipe.hgetall(scope.session(sid))
            raws = await pipe.execute()
        return [SessionRecord.from_hash(r) if r else None for r in raws]

    async def statuses(self, tenant_id: str, session_ids: list[str]) -> list[str | None]:
        """The status of each session (None: no record), one field read per session: what a
        status-filtered listing examines before reading the matching records in full."""
        if not session_ids:
            return []
        scope = TenantScope(tenant_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in session_ids:
                pipe.hget(scope.session(sid), "status")
            raws = await pipe.execute()
        return [None if r is None else text(r) for r in raws]

    async def page_after(self, tenant_id: str, cursor: tuple[int, str] | None, count: int) -> list[tuple[str, int]]:
        """Up to ``count`` entries of the sessions index, newest first, strictly after ``cursor``
        (``(score, session id)`` of the last entry already listed; None: from the newest).

        The index orders ties on score (sessions created in the same millisecond) by member,
        descending, so "after (s, id)" is: the members of score ``s`` below ``id``, then every
        member of a lower score. Both parts are read in one round trip, and the answer does not
        depend on ``id`` still being in the index (a listing forgets entries whose record is
        gone). The ties of one millisecond are few (one tenant's admissions in that ms)."""
        key = TenantScope(tenant_id).sessions_index()
        if cursor is None:
            rows = await self.redis.zrevrangebyscore(key, "+inf", "-inf", start=0, num=count, withscores=True)
            return [(text(m), int(s)) for m, s in rows]
        score, after = cursor
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrevrangebyscore(key, score, score)
            pipe.zrevrangebyscore(key, f"({score}", "-inf", start=0, num=count, withscores=True)
            ties, lower = await pipe.execute()
        out = [(sid, score) for sid in map(text, ties) if sid < after][:count]
        out += [(text(m), int(s)) for m, s in lower[: count - len(out)]]
        return out

    async def forget(self, tenant_id: str, session_ids: list[str]) -> None:
        if session_ids:
            await self.redis.zrem(TenantScope(tenant_id).sessions_index(), *session_ids)

    async def trim_indexes(
        self, tenant_ids: list[str], created_before: int, budget: int, floor: int | None = None
    ) -> tuple[int, int, int, int | None]:
        """Remove from the sessions indexes of ``tenant_ids`` (taken in this order) the entries
        of sessions created before ``created_before`` (ms) whose record no longer exists,
        examining at most ``budget`` entries in all; ``floor`` is the score where the previous
        call stopped in the first tenant, which resumes there.

        Only :meth:`forget` (a tenant listing its sessions) trims otherwise. The index score is
        ``created_at``, but a record leaves Redis when its retention TTL runs out, counted from
        when the session *ended*, and a session that never ended has no TTL at all: no score
        says a record is gone, so every candidate's record is checked, and an entry whose record
        exists is never removed. An entry seen without its record is dead for good (a session id
        is written once, at admission), so the check and the removal need not be one atomic
        step, and concurrent calls only repeat each other's work (``removed`` is what ZREM
        removed, so it is never counted twice). Four round trips for the whole list, none per
        tenant or session.

        Returns ``(examined, removed, done, resume)``: the first ``done`` tenants are finished;
        when ``done < len(tenant_ids)`` the budget ran out in ``tenant_ids[done]``, to be resumed
        from the score ``resume`` (None: from its oldest entry)."""
        scopes = [TenantScope(tid) for tid in tenant_ids]
        lows = ["-inf"] * len(scopes)
        if floor is not None and lows:
            lows[0] = str(floor)
        below = f"({created_before}"
        async with self.redis.pipeline(transaction=False) as pipe:
            for scope, low in zip(scopes, lows, strict=True):
                pipe.zcount(scope.sessions_index(), low, below)
            counts = [int(n) for n in await pipe.execute()]
        plan: list[tuple[int, int]] = []  # (position in tenant_ids, entries to examine there)
        left, done = budget, len(scopes)
        for i, candidates in enumerate(counts):
            take = min(candidates, left)
            if take:
                plan.append((i, take))
                left -= take
            if take < candidates:
                done = i
                break
        batches: list[list[tuple[str, int]]] = []
        if plan:
            async with self.redis.pipeline(transaction=False) as pipe:
                for i, take in plan:
                    pipe.zrangebyscore(scopes[i].sessions_index(), lows[i], below, start=0, num=take, withscores=True)
                batches = [[(text(m), int(s)) for m, s in rows]
                           for rows in await pipe.execute()]
        examined = sum(len(rows) for rows in batches)
        dead: dict[int, list[str]] = {}
        if examined:
            async with self.redis.pipeline(transaction=False) as pipe:
                for (i, _), rows in zip(plan, batches, strict=True):
                    for sid, _ in rows:
                        pipe.exists(scopes[i].session(sid))
                exists = iter(await pipe.execute())
            for (i, _), rows in zip(plan, batches, strict=True):
                gone = [sid for sid, _ in rows if not next(exists)]
                if gone:
                    dead[i] = gone
        removed_by: dict[int, int] = {}
        if dead:
            async with self.redis.pipeline(transaction=False) as pipe:
                for i, gone in dead.items():
                    pipe.zrem(scopes[i].sessions_index(), *gone)
                removed_by = dict(zip(dead, (int(n) for n in await pipe.execute()), strict=True))
        resume: int | None = None
        if done < len(scopes):
            cut = dict(zip((i for i, _ in plan), batches, strict=True)).get(done)
            resume = cut[-1][1] if cut else (None if lows[done] == "-inf" else int(lows[done]))
            if cut and not removed_by.get(done) and lows[done] != "-inf" and resume == int(lows[done]):
                # every entry examined is alive and has the score it resumed from: resuming
                # there again would examine the same ones for ever, so the tenant is left for
                # the next pass (an entry behind a whole budget of such records, sessions that
                # never ended all created in the same millisecond, waits until they have ended)
                done, resume = done + 1, None
        return examined, sum(removed_by.values()), done, resume

    async def live_ids(self, tenant_id: str) -> list[str]:
        ids = await self.redis.zrange(TenantScope(tenant_id).live(), 0, -1)
        return [i.decode() for i in ids]

    async def transition(
        self,
        rec: SessionRecord,
        *,
        allowed: str,
        status: str = "",
        lease: Score = "",
        due_expiry: Score = "",
        due_provision: Score = "",
        fields: dict[str, str | int] | None = None,
        drop: tuple[str, ...] = (),
        publish: bool = False,
        retain: bool = False,
    ) -> TransitionResult:
        """``due_provision``: the session's entry in its tenant's provisioning schedule
        (``broker/sessions/schedule.py``): a score (re)schedules it then, ``"del"`` ends it."""
        scope = TenantScope(rec.tenant_id)
        keys = [
            scope.session(rec.id),
            scope.live(),
            scope.end_user(rec.end_user) if rec.end_user else scope.end_user("-"),
            DUE_EXPIRY,
            scope.provision_schedule(),
            STATS_LIVE,
            PROVISION_TENANTS,
            DUE_EXPIRING,
        ]
        pairs: list[str | int] = []
        for k, v in (fields or {}).items():
            pairs += [k, v]
        args: list[str | int | bytes] = [
            allowed,
            status,
            lease,
            due_expiry,
            due_provision,
            due_member(rec.tenant_id, rec.id),
            rec.id,
            scope.events_channel(rec.id) if publish else "",
            RETENTION_SECONDS if retain else "",
            len(fields or {}),
            rec.tenant_id,
            *pairs,
            *drop,
        ]
        raw = await evalsha(self.execute, self._transition, keys, args)
        return TransitionResult(raw)

    async def due(self, key: str, until_ms: int, limit: int) -> list[tuple[str, str, int]]:
        rows = await self.redis.zrangebyscore(key, "-inf", until_ms, start=0, num=limit, withscores=True)
        out = []
        for member, score in rows:
            tid, _, sid = text(member).partition(":")
            out.append((tid, sid, int(score)))
        return out

    async def drop_due(self, key: str, tenant_id: str, session_id: str) -> None:
        await self.redis.zrem(key, due_member(tenant_id, session_id))
