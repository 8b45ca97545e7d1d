"""The provisioning schedule: which session a worker provisions next, owned by the session domain.

Admission reserves each session's OpenAI mint slot (``mint_at``) and puts the session in its
tenant's schedule at that slot (``TenantScope.provision_schedule()``: sid -> ms) and the tenant
in the ring of tenants with scheduled work (:data:`~tenants.scope.PROVISION_TENANTS`, tid -> a
score no later than the tenant's earliest entry), and pushes a wake-up token
(:data:`~tenants.scope.PROVISION_WAKE`) when the slot is due within a second. From then on the
score is the time the scheduler takes the session next:

- a worker's provisioning loop (``workers/provisioning.py``) **claims** the due sessions with
  :meth:`ProvisionSchedule.claim`, one Lua step per batch (``provision_claim.lua``): round robin
  over the tenants with due work, each claimed entry moved to ``now + lease`` and renewed by the
  claimer every second while it works (``workers.jobs.claim.ClaimKeeper``), so a worker that
  died loses its sessions to another worker when the lease runs out;
- a transient upstream failure **reschedules** the same entry at the retry time
  (``SessionRepository.transition(due_provision=...)``), never a new mint slot;
- a session admitted by ``replace_oldest`` that waits for the upstream end of the sessions it
  replaced (``waits_for``) is **deferred** by the claim, still ``queued``, every
  :data:`WAIT_RECHECK_MS`, until none of them is live (or its deadline passed);
- ``ready``, ``failed`` and ``terminated`` remove it in the same step as the status
  (``due_provision="del"``); a claim that meets a session in another status drops its entry.

The scripts that change it share ``lib.lua`` (``schedule``/``unschedule``/``set_status``).
"""

from __future__ import annotations

import redis.asyncio as aioredis

from broker.core.text import text
from broker.core.redis_mux import Execute, evalsha
from tenants.scope import PROVISION_TENANTS, PROVISION_WAKE, STATS_LIVE, TenantScope

from .lua import script
from .models import SessionRecord

_CLAIM = script("provision_claim.lua")
WAKE_CAP = 64                 # wake-up tokens kept at most (enough to wake every idle worker)
MAX_TENANTS_PER_CLAIM = 1000  # tenants with due work looked at by one claim call
# A session that waits for the upstream end of the sessions it replaced (``waits_for``) is
# looked at again this often (ms) by the claims, until they have ended or its deadline passed.
WAIT_RECHECK_MS = 250

# The tenant schedule key and the session key around their ids, for the claim script (which
# builds the keys of the tenants it finds in the ring).
_MARK_T, _MARK_S = "\x00t\x00", "\x00s\x00"
_SCHED_PARTS = TenantScope(_MARK_T).provision_schedule().split(_MARK_T)
_SESSION_PREFIX, _rest = TenantScope(_MARK_T).session(_MARK_S).split(_MARK_T)
_SESSION_PARTS = [_SESSION_PREFIX, *_rest.split(_MARK_S)]


class Claimed:
    """A session this worker claimed: its record after the claim (``provisioning``, attempts
    counted) and its status before it (``queued`` for a first attempt)."""

    __slots__ = ("tenant_id", "before", "record")

    def __init__(self, tenant_id: str, before: str, record: SessionRecord) -> None:
        self.tenant_id = tenant_id
        self.before = before
        self.record = record

    def __repr__(self) -> str:
        return f"Claimed({self.record.id!r}, before={self.before!r})"



class ProvisionSchedule:
    def __init__(self, redis: aioredis.Redis, execute: Execute | None = None) -> None:
        self.redis = redis
        self.execute: Execute = execute or redis.execute_command
        self._claim = redis.register_script(_CLAIM)

    async def claim(self, now: int, lease_until: int, room: int,
                    max_tenants: int = MAX_TENANTS_PER_CLAIM, *, deadline_ms: int | None = None,
                    recheck_ms: int = WAIT_RECHECK_MS) -> tuple[int | None, list[Claimed]]:
        """Claim up to ``room`` sessions due at ``now``, round robin over their tenants, leased
        until ``lease_until``; returns the earliest score left in the ring (None: nothing is
        scheduled; a score <= now: more is due than ``room``) and the claimed sessions. One
        round trip.

        A session that waits for replaced sessions still live (``waits_for``, replace_oldest)
        is not claimed but looked at again ``recheck_ms`` later, unless it is ``deadline_ms``
        past its creation (then it is claimed, and the worker fails it)."""
        raw = await evalsha(self.execute, self._claim, [PROVISION_TENANTS, STATS_LIVE],
                            [now, lease_until, room, max_tenants, *_SCHED_PARTS, *_SESSION_PARTS,
                             "" if deadline_ms is None else deadline_ms, recheck_ms])
        claims = []
        for i in range(1, len(raw), 3):
            flat = raw[i + 2]
            record = SessionRecord.from_hash(dict(zip(flat[::2], flat[1::2], strict=True)))
            claims.append(Claimed(text(raw[i]), text(raw[i + 1]), record))
        head = raw[0]
        return (int(float(head)) if head not in (b"", "") else None), claims

    async def wake(self) -> None:
        """Wake one idle provisioning loop (a token on :data:`PROVISION_WAKE`)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.lpush(PROVISION_WAKE, "1")
            pipe.ltrim(PROVISION_WAKE, 0, WAKE_CAP - 1)
            await pipe.execute()

    async def entries(self, tenant_id: str) -> list[tuple[str, int]]:
        """The tenant's schedule, earliest first (tests, the sweeper)."""
        rows = await self.redis.zrange(TenantScope(tenant_id).provision_schedule(), 0, -1, withscores=True)
        return [(text(m), int(s)) for m, s in rows]


def schedule_key(tenant_id: str) -> str:
    return TenantScope(tenant_id).provision_schedule()


def entry_of(tenant_id: str, session_id: str) -> tuple[str, str]:
    """(key, member) of a session's entry in the schedule (what a claim keeper renews)."""
    return TenantScope(tenant_id).provision_schedule(), session_id

