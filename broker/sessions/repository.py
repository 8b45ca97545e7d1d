"""All Redis access of the session domain.

Every state change goes through one Lua script (``transition.lua``) that checks the
current status and updates the record, the concurrency lease, the end-user set and the
due sets in one atomic step, then publishes the new status for ``wait``ers. Terminal
transitions release the lease, drop what a retained record no longer needs (``terminal.py``),
and set a retention TTL on the record.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, NamedTuple

import redis.asyncio as aioredis

from broker.redis_mux import Execute, RedisMux, evalsha
from tenants.mint_rate import lua_function
from tenants.scope import DUE_EXPIRY, DUE_PROVISION, STATS_LIVE, TenantScope, due_member

from .jobs import JobFinish, JobSpec
from .models import SessionRecord
from .terminal import with_terminal_drop


RETENTION_SECONDS = 7 * 24 * 3600
_SCRIPT = with_terminal_drop(resources.files(__package__).joinpath("transition.lua").read_text())

Score = int | str  # "" keep, "del" remove, or an int score
_NO_JOB_KEYS = ("", "", "", "")
_NO_JOB_ARGS = ("", 0, 0, "", 1)

# The provisioning job's first step: read the session and, if it is queued or provisioning and
# not past its provisioning deadline, move it to provisioning (attempts + 1, the live-status
# counters as transition.lua keeps them) - one round trip instead of a read and a transition.
# A session leaving ``queued`` has never minted a client secret, so its OpenAI mint slot
# (tenants/mint_rate.lua, the same function) is reserved in the same step when asked for.
# KEYS: 1 session hash, 2 stats hash, 3 the tenant's mint schedule (or "").
# ARGV: 1 now (ms), 2 provisioning deadline (ms after created_at), 3-4 the mint schedule's
#       interval and tolerance (ms), or "" for no reservation.
# Reply: {1 started | 0 not started (other status, or past the deadline) | -1 missing,
#         status before the step, the hash after it (HGETALL), the mint slot granted (ms) or -1}.
_START_PROVISIONING = lua_function("reserve_mint") + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {-1, '', {}, -1} end
local started = 0
local grant = -1
if (st == 'queued' or st == 'provisioning')
    and (tonumber(redis.call('HGET', KEYS[1], 'created_at')) or 0) + tonumber(ARGV[2]) > tonumber(ARGV[1]) then
  if st == 'queued' then
    redis.call('HSET', KEYS[1], 'status', 'provisioning')
    redis.call('HINCRBY', KEYS[2], 'queued', -1)
    redis.call('HINCRBY', KEYS[2], 'provisioning', 1)
    if ARGV[3] ~= '' then grant = reserve_mint({KEYS[3]}, {ARGV[1], ARGV[3], ARGV[4]}) end
  end
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  started = 1
end
return {started, st, redis.call('HGETALL', KEYS[1]), grant}
"""


class Started(NamedTuple):
    started: bool                 # the session is now provisioning, for this attempt
    before: str                   # its status before the step ("" if it does not exist)
    record: SessionRecord | None  # the record after the step
    mint_at: int | None           # the OpenAI mint slot reserved in the same step (unix ms)


class TransitionResult:
    __slots__ = ("applied", "status", "missing")

    def __init__(self, raw: list[Any]) -> None:
        code = int(raw[0])
        self.applied = code == 1
        self.missing = code == -1
        status = raw[1]
        self.status = status.decode() if isinstance(status, bytes) else str(status)

    def __repr__(self) -> str:
        return f"TransitionResult(applied={self.applied}, status={self.status!r})"


class SessionRepository:
    """``mux``: send the scripts (:meth:`start_provisioning`, :meth:`transition`, and the
    admission through :attr:`execute`) over one pipelined connection instead of the client's
    pool (the worker makes three per session, the API one per admission)."""

    def __init__(self, redis: aioredis.Redis, mux: RedisMux | None = None) -> None:
        self.redis = redis
        self.execute: Execute = redis.execute_command if mux is None else mux.execute
        self._transition = redis.register_script(_SCRIPT)
        self._start = redis.register_script(_START_PROVISIONING)

    async def get(self, tenant_id: str, session_id: str) -> SessionRecord | None:
        raw = await self.redis.hgetall(TenantScope(tenant_id).session(session_id))
        if not raw:
            return None
        return SessionRecord.from_hash(raw)

    async def start_provisioning(self, tenant_id: str, session_id: str, now: int, deadline_ms: int,
                                 mint_schedule: tuple[int, int] | None = None) -> Started:
        """See ``_START_PROVISIONING``; ``mint_schedule`` is ``tenants.mint_rate.schedule(...)``
        of the tenant to reserve its mint slot if the session leaves ``queued``."""
        scope = TenantScope(tenant_id)
        interval, tau = mint_schedule if mint_schedule is not None else ("", "")
        raw = await evalsha(self.execute, self._start, [scope.session(session_id), STATS_LIVE, scope.mint_bucket()],
                             [now, deadline_ms, interval, tau])
        if int(raw[0]) == -1:
            return Started(False, "", None, None)
        flat = raw[2]
        rec = SessionRecord.from_hash(dict(zip(flat[::2], flat[1::2], strict=True)))
        before = raw[1].decode() if isinstance(raw[1], bytes) else str(raw[1])
        grant = int(raw[3])
        return Started(int(raw[0]) == 1, before, rec, grant if grant >= 0 else None)

    async def get_many(self, tenant_id: str, session_ids: list[str]) -> list[SessionRecord | None]:
        scope = TenantScope(tenant_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in session_ids:
                pipe.hgetall(scope.session(sid))
            raws = await pipe.execute()
        return [SessionRecord.from_hash(r) if r else None for r in raws]

    async def page_ids(self, tenant_id: str, max_score: str, batch: int) -> list[tuple[str, int]]:
        rows = await self.redis.zrevrangebyscore(
            TenantScope(tenant_id).sessions_index(), max_score, "-inf", start=0, num=batch, withscores=True
        )
        return [(m.decode() if isinstance(m, bytes) else m, int(s)) for m, s in rows]

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
                batches = [[(m.decode() if isinstance(m, bytes) else m, int(s)) for m, s in rows]
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
        job: JobSpec | None = None,
        finish: JobFinish | None = None,
    ) -> TransitionResult:
        """``job`` is enqueued in the same step, only if the transition applies; ``finish`` (the
        running arq job, see :class:`JobFinish`) is recorded as finished in it, likewise."""
        scope = TenantScope(rec.tenant_id)
        keys = [
            scope.session(rec.id),
            scope.live(),
            scope.end_user(rec.end_user) if rec.end_user else scope.end_user("-"),
            DUE_EXPIRY,
            DUE_PROVISION,
            STATS_LIVE,
            *(job.keys() if job is not None else _NO_JOB_KEYS),
            *(finish.keys() if finish is not None else ()),
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
            *(job.args() if job is not None else _NO_JOB_ARGS),
            *(finish.args() if finish is not None else ()),
            *pairs,
            *drop,
        ]
        raw = await evalsha(self.execute, self._transition, keys, args)
        return TransitionResult(raw)

    async def due(self, key: str, until_ms: int, limit: int) -> list[tuple[str, str, int]]:
        rows = await self.redis.zrangebyscore(key, "-inf", until_ms, start=0, num=limit, withscores=True)
        out = []
        for member, score in rows:
            text = member.decode() if isinstance(member, bytes) else member
            tid, _, sid = text.partition(":")
            out.append((tid, sid, int(score)))
        return out

    async def drop_due(self, key: str, tenant_id: str, session_id: str) -> None:
        await self.redis.zrem(key, due_member(tenant_id, session_id))
