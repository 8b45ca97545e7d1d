"""Session-second budgets: a hard ceiling on a tenant's (and an end user's) session time per
UTC calendar month (``session_seconds_per_month``, ``session_seconds_per_end_user_per_month``;
``None`` = no budget).

The rules live in ``budget.lua``, composed into two atomic steps:

* **admission** (``budget_admit`` in ``admission.lua``, after every other check passed):
  ``remaining = limit - used - reserved`` per budget that applies; the session gets
  ``min(ttl, remaining)`` seconds if that is at least :data:`MIN_TTL` (cut: the session hash
  gets ``ttl_limited_by=budget``), else the admission is refused (``budget_exhausted``, 402)
  and nothing is written. Admitted, its TTL is *reserved* (``reserved += ttl``), and the
  admission is counted in the usage windows of now (``sessions``). N parallel requests never
  reserve more than the budget: the check and the reservation are one Redis step.
* **settle** (``budget_settle``, in every script that records ``terminated``/``failed``:
  ``broker/sessions/terminal.py``): ``billable_seconds`` = ``ready_at`` -> end, rounded up
  (0 if never ready) is written to the session once; ``used += billable``,
  ``reserved -= reservation`` (the unused part is free for the next admission at once) and
  the billable seconds are added to the usage windows in which the session was admitted.

Because the TTL was cut to the budget, the session's ``expires_at`` is within it and the
expiry machinery (p99 lateness <= 1 s) enforces the ceiling; nothing polls. ``used`` may pass
the limit by that lateness (a session is billed until it actually ended).

Budget changes (admin PATCH) apply to the next admission; a live session keeps the limits
it was admitted under for its threshold records, and runs to its reserved end even when the
budget was lowered below what is used. A session counts in the month it was admitted in.

Thresholds: when committed seconds (``used + reserved``) reach 50, 80 and 100 % of a
budget, a ``usage.threshold_reached`` event is appended to the tenant's event stream
(``append_tenant_event``, tenants/outbox.lua), once per budget (and end user) per period (a
flag in the budget hash), in the same step as the reservation or settle that crossed it. Its
``data``: ``budget``, ``percent``, ``limit``, ``used``, ``reserved``, ``committed``,
``period`` (``YYYY-MM``), ``period_end`` and ``end_user`` for the per-end-user budget. Both
steps return how many they recorded (``broker_usage_thresholds_total``). A settle crosses one
when the session's billable seconds exceed its reservation (billed until it actually ended).
"""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import resources

import msgspec
import redis.asyncio as aioredis

from broker.core.text import text
from tenants.models import Quotas
from tenants.scope import TenantScope

MIN_TTL = 10
THRESHOLDS = (50, 80, 100)
BUDGETS = ("session_seconds_per_month", "session_seconds_per_end_user_per_month")

_SOURCE = resources.files(__package__).joinpath("budget.lua").read_text()


def lua_functions() -> str:
    """``budget.lua``: the Lua functions ``budget_admit`` and ``budget_settle`` (and helpers),
    to prepend to a script that calls them, AFTER the outbox's (tenants/outbox.py), whose
    ``append_tenant_event`` they call."""
    return _SOURCE


def with_budget(script: str) -> str:
    return _SOURCE + script


# ---- periods and windows (UTC) -----------------------------------------------------------


_periods: dict[int, tuple[str, int, int]] = {}


def period(now_ms: int) -> tuple[str, int, int]:
    """(``yyyymm``, start ms, end ms) of the UTC calendar month containing ``now_ms``."""
    hour = now_ms // 3_600_000
    cached = _periods.get(hour)
    if cached is not None and cached[1] <= now_ms < cached[2]:
        return cached
    t = datetime.fromtimestamp(now_ms / 1000, UTC)
    start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    out = (start.strftime("%Y%m"), int(start.timestamp() * 1000), int(end.timestamp() * 1000))
    if len(_periods) > 8:
        _periods.clear()
    _periods[hour] = out
    return out


_hours: dict[int, str] = {}


def hour_stamp(now_ms: int) -> str:
    """``yyyymmddhh`` of the UTC hour containing ``now_ms`` (formatted once per hour)."""
    hour = now_ms // 3_600_000
    stamp = _hours.get(hour)
    if stamp is None:
        if len(_hours) > 8:
            _hours.clear()
        stamp = _hours[hour] = datetime.fromtimestamp(hour * 3600, UTC).strftime("%Y%m%d%H")
    return stamp


def admission_spec(quotas: Quotas, now_ms: int, ttl_seconds: int, end_user: str | None) -> str:
    """The JSON argument of ``budget_admit`` (admission.lua's ARGV[19])."""
    name, _start, end = period(now_ms)
    hour = hour_stamp(now_ms)
    m = quotas.session_seconds_per_month
    e = quotas.session_seconds_per_end_user_per_month
    return msgspec.json.encode({
        "now": now_ms, "ttl": ttl_seconds, "eu": end_user or "", "p": name, "pe": end,
        "m": -1 if m is None else m, "e": -1 if e is None else e, "d": hour[:8], "h": hour,
    }).decode()


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- outcomes and reads -------------------------------------------------------------------


class BudgetGrant(msgspec.Struct, kw_only=True):
    ttl_seconds: int          # granted (maybe cut)
    limited: bool             # cut by a budget
    thresholds: int           # threshold records written by this admission

    @classmethod
    def parse(cls, raw: bytes | str) -> BudgetGrant:
        ttl, limited, crossed = text(raw).split("|")
        return cls(ttl_seconds=int(ttl), limited=limited == "1", thresholds=int(crossed))


class BudgetExhausted(msgspec.Struct, kw_only=True):
    """Refusal of an admission by a budget (the caller answers 402 ``budget_exhausted``)."""

    budget: str
    limit: int
    used: int
    reserved: int
    period_end: str           # ISO time the period ends (and the budget renews)
    retry_after_s: int


class BudgetUsage(msgspec.Struct, kw_only=True):
    limit: int | None         # None: no budget (used/reserved still counted)
    used: int
    reserved: int
    remaining: int | None
    period_end: str


def _usage(limit: int | None, used: int, reserved: int, period_end: str) -> BudgetUsage:
    remaining = None if limit is None else max(0, limit - used - reserved)
    return BudgetUsage(limit=limit, used=used, reserved=reserved, remaining=remaining, period_end=period_end)


async def read_budgets(
    redis: aioredis.Redis, tenant_id: str, quotas: Quotas, now_ms: int, end_user: str | None = None
) -> dict[str, BudgetUsage]:
    """Each budget of the current period (the end user's only when one is named); reads only."""
    scope = TenantScope(tenant_id)
    name, _start, end = period(now_ms)
    period_end = iso_ms(end)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hmget(scope.budget_month(name), "used", "reserved")
        if end_user is not None:
            pipe.hmget(scope.budget_end_users(name), "u:" + end_user, "r:" + end_user)
        rows = await pipe.execute()
    out = {
        "session_seconds_per_month": _usage(
            quotas.session_seconds_per_month, int(rows[0][0] or 0), int(rows[0][1] or 0), period_end
        )
    }
    if end_user is not None:
        out["session_seconds_per_end_user_per_month"] = _usage(
            quotas.session_seconds_per_end_user_per_month, int(rows[1][0] or 0), int(rows[1][1] or 0), period_end
        )
    return out

