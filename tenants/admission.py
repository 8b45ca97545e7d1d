"""Exact, atomic admission of a new session: every quota of one request is checked and
taken in ONE Redis Lua step (``admission.lua``), so N parallel requests against a limit L
admit exactly min(N, L), across any number of API processes, and a refusal consumes (and
writes) nothing.

The step, in order:

1. **Idempotency** (``idem:{sha256(key)}``, 24 h): a recorded key with the same body digest
   answers :class:`Replayed` (nothing consumed), with another body :class:`KeyReused`.
   Refusals are not recorded, so a retry after ``Retry-After`` is evaluated afresh.
2. **Checks**, computed before anything is written, first failure wins:

   * ``sessions_per_minute`` - sliding-window log: at most L admissions in any rolling
     60 s (the burst is the whole per-minute allowance); ``retry_after`` is the time until
     the oldest admission leaves the window.
   * ``sessions_per_day`` - counter of the UTC day; ``retry_after`` = until UTC midnight.
   * ``max_sessions_per_end_user`` (only with an end user): the end user's sessions that
     still hold a lease. At the cap, ``end_user_policy="reject"`` refuses
     (``end_user_limit``); ``"replace_oldest"`` replaces the oldest ``count - cap + 1``.
   * ``max_concurrent_sessions`` - unexpired leases in ``live`` minus the sessions this
     request replaces and the live ones they were waiting for (see 3.: the new session takes
     their slot); ``retry_after`` = 1 s (when
     a session ends is not known in advance). Same 1 s for ``end_user_limit``.
   * ``openai_requests_per_minute`` - the mint slot this session would be granted by the
     tenant's GCRA schedule (``tenants/mint_rate.lua``, burst then one per emission interval,
     FIFO), computed without writing. A slot later than ``now + mint_window_ms`` cannot be
     ready before the provisioning deadline: ``provisioning_backlog``, ``limit`` =
     ``openai_requests_per_minute``, ``current`` = the backlog (sessions of the tenant whose
     slot is after now), ``retry_after`` = whole seconds until the slot would fit
     (``ceil((slot - (now + window)) / 1000)``); the schedule only moves with time, so a
     request after that fits unless others took the slots meanwhile.

3. **Admission**: purge expired leases and rate entries, write the session hash as given
   plus ``mint_at`` (the slot, ms), index it, take a lease until ``lease_until_ms``, log the
   admission in the minute window, count it for the day (48 h TTL), take the mint slot
   (the slot is THE slot of this session: nothing reserves another one for it), put the
   session in the tenant's provisioning schedule (``TenantScope.provision_schedule()``, sid
   -> slot), the tenant in ``PROVISION_TENANTS`` (``ZADD LT``: at its earliest slot) and,
   when the slot is due within 1 s, a token in ``PROVISION_WAKE`` (capped at
   ``PROVISION_WAKE_CAP``) so an idle scheduler starts it at once, and record the
   idempotency key. No job and no ``due:provision`` entry is written: the scheduler works
   from the schedule, and the provisioning deadline is ``created_at`` + the deadline. Each replaced
   session still ``queued|provisioning|ready`` becomes ``terminating``
   (``termination_reason=replaced``, ``terminating_at`` = now in ms); a replaced session
   that is (now) ``terminating`` is put in ``due:expiry`` at now, so the sweeper ends it
   even if the caller crashes; every replaced session leaves the end user's set. The caller
   enqueues their termination (the ids are in :attr:`Admitted.replaced`).

   Replacement never lets live upstream sessions exceed ``max_concurrent_sessions``
   (CONTRACT.md section 14): a replaced session whose upstream session may be live (its
   record has an ``avaturn_session_id`` or ``create_state`` ``inflight|unknown|done``, the
   sessions the termination must DELETE or wait for) **keeps its lease** in ``live`` until
   its termination records it ended (DELETE answered, or Avaturn's ``max_duration``
   backstop), and the new session records it in ``waits_for`` (comma-separated ids): the
   provisioning claim (``broker/sessions/provision_claim.lua``) leaves the new session
   ``queued`` while any of them is live. A replaced session that never reached upstream
   leaves ``live`` at once (it cannot create any more: every create is preceded by an
   atomic mark that needs status ``provisioning``) and the new session inherits what it was
   waiting for. The concurrency check of the replacing request does not count the replaced
   sessions nor what they were waiting for (the new session takes their slot); every other
   request counts all of them until they end, and so does ``GET /v1/usage``.

A lease is live while its deadline is strictly after ``now_ms``. ``now_ms`` is the caller's
clock: run API processes with synchronised clocks (NTP); Redis TTLs (day counter, rate log,
idempotency record) are in Redis's own clock.
"""

from __future__ import annotations

import weakref
from importlib import resources
from typing import Literal

import msgspec
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from broker.core.text import text
from broker.core.redis_mux import Execute, evalsha

from tenants.mint_rate import lua_library, schedule
from tenants.budgets import BudgetExhausted, BudgetGrant, admission_spec, iso_ms, with_budget
from tenants.models import Quotas
from tenants.outbox import lua_functions as outbox_lua
from tenants.scope import (
    DUE_EXPIRY,
    PROVISION_TENANTS,
    PROVISION_WAKE,
    PROVISION_WAKE_CAP,
    STATS_LIVE,
    TenantScope,
    due_member,
)
from tenants.usage import QuotaUsage, UsageSnapshot, utc_day

RefusalCode = Literal[
    "rate_limited", "concurrency_limit", "daily_quota_exhausted", "end_user_limit", "provisioning_backlog"
]

# prepended: the outbox (append_event, append_tenant_event) first, as budget.lua's thresholds call
# it; then budget.lua's functions (budget_admit) and the GCRA (mint_rate.lua)
_SOURCE = outbox_lua() + with_budget(lua_library() + resources.files(__package__).joinpath("admission.lua").read_text())
_scripts: weakref.WeakKeyDictionary[aioredis.Redis, AsyncScript] = weakref.WeakKeyDictionary()


class AdmissionRequest(msgspec.Struct, kw_only=True):
    """All that one admission needs."""

    tenant_id: str
    session_id: str
    now_ms: int
    quotas: Quotas
    end_user: str | None = None
    idempotency_digest: str | None = None  # sha256 hex of the Idempotency-Key
    body_digest: str | None = None         # sha256 hex of the canonical request body
    session_fields: dict[str, str] = msgspec.field(default_factory=dict)  # initial session hash
    lease_until_ms: int                    # concurrency lease deadline of the new session
    mint_window_ms: int                    # admitted only if its mint slot is at most now + this
    # requested TTL, reserved against the budgets (tenants/budgets.py) and written as the session's
    # ttl_seconds, maybe cut (None: session_fields' ttl_seconds, else max_session_seconds)
    ttl_seconds: int | None = None


class Admitted(msgspec.Struct, kw_only=True):
    session_id: str
    replaced: list[str]
    usage: UsageSnapshot  # after this admission
    mint_at: int          # the session's mint slot (unix ms), as stored in its hash and schedule
    mint: QuotaUsage      # the mint pacing after this admission (see :func:`_mint`)
    budget: BudgetGrant | None = None  # the TTL granted by the budgets (maybe cut)


class Replayed(msgspec.Struct, kw_only=True):
    """Idempotent replay: the session admitted earlier with this key; nothing consumed."""

    session_id: str


class KeyReused(msgspec.Struct, kw_only=True):
    """The Idempotency-Key was recorded with another body (the caller answers 422)."""


class Refused(msgspec.Struct, kw_only=True):
    code: RefusalCode
    limit: int
    current: int
    retry_after_s: int
    usage: UsageSnapshot  # at the time of the refusal (nothing was taken)
    mint: QuotaUsage      # the mint pacing at the time of the refusal


Outcome = Admitted | Replayed | KeyReused | Refused | BudgetExhausted


def _script(redis: aioredis.Redis) -> AsyncScript:
    script = _scripts.get(redis)
    if script is None:
        script = _scripts[redis] = redis.register_script(_SOURCE)
    return script



_DAY_MS = 86_400_000
_days: dict[int, str] = {}


def _utc_day(now_ms: int) -> tuple[str, int]:
    """(``yyyymmdd`` of the UTC day of ``now_ms``, whole seconds to the next UTC midnight): the
    same as ``tenants.usage.utc_day`` / ``seconds_to_utc_midnight`` (UTC days are 86,400 s in
    Unix time), with integer arithmetic and the day's name formatted once per day."""
    day = now_ms // _DAY_MS
    name = _days.get(day)
    if name is None:
        if len(_days) > 4:
            _days.clear()
        name = _days[day] = utc_day(now_ms)
    return name, max(1, -(-((day + 1) * _DAY_MS - now_ms) // 1000))


def _snapshot(
    quotas: Quotas, day_reset_s: int, minute: tuple[int, int], day_used: int, live_used: int, eu_used: int
) -> UsageSnapshot:
    return UsageSnapshot(
        minute=QuotaUsage.of(quotas.sessions_per_minute, minute[0], minute[1]),
        day=QuotaUsage.of(quotas.sessions_per_day, day_used, day_reset_s),
        concurrency=QuotaUsage.of(quotas.max_concurrent_sessions, live_used, 0),
        end_user=QuotaUsage.of(quotas.max_sessions_per_end_user, eu_used, 0) if eu_used >= 0 else None,
    )


def _mint(limit: int, backlog: int, remaining: int, next_slot_ms: int, latest_ms: int) -> QuotaUsage:
    """The mint pacing as a :class:`QuotaUsage`: ``limit`` = ``openai_requests_per_minute``,
    ``used`` = the backlog (sessions whose slot is after now), ``remaining`` = sessions that
    would still be admitted now, ``reset_s`` = whole seconds until one more would (0 while
    ``remaining`` > 0)."""
    reset = max(1, -(-(next_slot_ms - latest_ms) // 1000)) if remaining <= 0 else 0
    return QuotaUsage(limit=limit, used=backlog, remaining=max(0, remaining), reset_s=reset)


async def admit(redis: aioredis.Redis, req: AdmissionRequest, execute: Execute | None = None) -> Outcome:
    """Check and take every quota of one new session in one atomic step (one EVALSHA), sent
    with ``execute`` if given (the API's :class:`broker.core.redis_mux.RedisMux`)."""
    if req.lease_until_ms <= req.now_ms:
        raise ValueError("lease_until_ms must be after now_ms")
    if req.mint_window_ms < 0:
        raise ValueError("mint_window_ms must not be negative")
    scope = TenantScope(req.tenant_id)
    q = req.quotas
    interval, tau = schedule(q.openai_requests_per_minute)
    day, day_reset_s = _utc_day(req.now_ms)
    keys = [
        scope.idempotency(req.idempotency_digest) if req.idempotency_digest else "",
        scope.rate_bucket(),
        scope.day_counter(day),
        scope.live(),
        scope.sessions_index(),
        scope.session(req.session_id),
        DUE_EXPIRY,
        scope.end_user(req.end_user) if req.end_user is not None else "",
        STATS_LIVE,
        scope.mint_bucket(),
        scope.provision_schedule(),
        PROVISION_TENANTS,
        PROVISION_WAKE,
        scope.base(),
    ]
    fields = req.session_fields
    ttl = req.ttl_seconds if req.ttl_seconds is not None else int(fields.get("ttl_seconds", q.max_session_seconds))
    args: list[str | int] = [
        req.now_ms,
        req.session_id,
        q.sessions_per_minute,
        q.sessions_per_day,
        q.max_concurrent_sessions,
        q.max_sessions_per_end_user,
        q.end_user_policy,
        req.body_digest or "",
        req.lease_until_ms,
        q.openai_requests_per_minute,
        interval,
        tau,
        req.mint_window_ms,
        day_reset_s,
        scope.session(""),
        due_member(req.tenant_id, ""),
        req.tenant_id,
        PROVISION_WAKE_CAP,
        admission_spec(q, req.now_ms, ttl, req.end_user),
    ]
    for field, value in fields.items():
        if field != "ttl_seconds":  # written by budget_admit (maybe cut)
            args += [field, value]
    if execute is None:
        raw = await _script(redis)(keys=keys, args=args)
    else:
        raw = await evalsha(execute, _script(redis), keys, args)
    kind = text(raw[0])
    if kind == "replayed":
        return Replayed(session_id=text(raw[1]))
    if kind == "key_reused":
        return KeyReused()
    latest = req.now_ms + req.mint_window_ms
    if kind == "refused":
        code, limit, current, retry, m_used, m_reset, d_used, live, eu, backlog, remaining, next_slot = raw[1:]
        return Refused(
            code=text(code),  # type: ignore[arg-type]
            limit=int(limit),
            current=int(current),
            retry_after_s=int(retry),
            usage=_snapshot(q, day_reset_s, (int(m_used), int(m_reset)), int(d_used), int(live), int(eu)),
            mint=_mint(q.openai_requests_per_minute, int(backlog), int(remaining), int(next_slot), latest),
        )
    if kind == "budget_exhausted":
        budget, limit, used, reserved, end, retry = raw[1:]
        return BudgetExhausted(budget=text(budget), limit=int(limit), used=int(used), reserved=int(reserved),
                               period_end=iso_ms(int(end)), retry_after_s=int(retry))
    m_used, m_reset, d_used, live, eu, slot, backlog, remaining, next_slot = (int(v) for v in raw[1:10])
    return Admitted(
        session_id=req.session_id,
        replaced=[text(sid) for sid in raw[11:]],
        budget=BudgetGrant.parse(raw[10]),
        usage=_snapshot(q, day_reset_s, (m_used, m_reset), d_used, live, eu),
        mint_at=slot,
        mint=_mint(q.openai_requests_per_minute, backlog, remaining, next_slot, latest),
    )
