"""Usage history per UTC day or hour (``GET /v1/usage/history``, ``GET /admin/v1/usage``,
``session-broker usage export``).

Counters, not a scan of session records (which are kept 7 days): the admission step counts
``sessions`` in the day and hour hashes of its time, the terminal settle adds the session's
``billable_seconds`` to the same windows (the ones it was admitted in), both in
``tenants/budget.lua``. Day hashes are kept 400 days, hour hashes 31 days: a range asks at
most :data:`MAX_DAYS` days or :data:`MAX_HOURS` hours per call.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Literal

import msgspec
import redis.asyncio as aioredis

from broker.core.text import text
from broker.core.errors import InvalidInput
from tenants.scope import TENANTS_INDEX, TenantScope

Granularity = Literal["day", "hour"]
MAX_DAYS = 400
MAX_HOURS = 31 * 24
MAX_END_USER = 128


class Window(msgspec.Struct, kw_only=True):
    start: str
    sessions: int
    billable_seconds: int


class TenantWindow(Window, kw_only=True):
    tenant_id: str


class Range(msgspec.Struct, frozen=True):
    granularity: Granularity
    starts: tuple[datetime, ...]

    def stamps(self) -> list[str]:
        fmt = "%Y%m%d" if self.granularity == "day" else "%Y%m%d%H"
        return [s.strftime(fmt) for s in self.starts]


def _day(raw: str | None, field: str) -> date:
    if raw is None:
        raise InvalidInput(f"{field} is required (YYYY-MM-DD, UTC)", code="invalid_range", field=field)
    try:
        if len(raw) != 10:
            raise ValueError
        return date.fromisoformat(raw)
    except ValueError:
        raise InvalidInput(f"{field} must be a date YYYY-MM-DD (UTC)", code="invalid_range", field=field) from None


def parse_range(raw_from: str | None, raw_to: str | None, granularity: str | None,
                allowed: tuple[str, ...] = ("day", "hour")) -> Range:
    """The windows of ``from``..``to`` (both whole UTC days, inclusive), oldest first; 400
    naming the field when a date is malformed, ``to`` is before ``from`` or the range is
    longer than 400 days (day) / 31 days of hours (hour)."""
    gran = granularity or "day"
    if gran not in allowed:
        raise InvalidInput(f"granularity must be {' or '.join(allowed)}", code="invalid_range", field="granularity")
    first, last = _day(raw_from, "from"), _day(raw_to, "to")
    if last < first:
        raise InvalidInput("to must not be before from", code="invalid_range", field="to")
    days = (last - first).days + 1
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    if gran == "day":
        if days > MAX_DAYS:
            raise InvalidInput(f"a day range covers at most {MAX_DAYS} days", code="invalid_range", field="to")
        return Range("day", tuple(start + timedelta(days=i) for i in range(days)))
    if days * 24 > MAX_HOURS:
        raise InvalidInput(f"an hour range covers at most {MAX_HOURS // 24} days ({MAX_HOURS} hours)",
                           code="invalid_range", field="to")
    return Range("hour", tuple(start + timedelta(hours=i) for i in range(days * 24)))


def check_end_user(end_user: str | None) -> None:
    if end_user is not None and not 1 <= len(end_user) <= MAX_END_USER:
        raise InvalidInput("end_user must be 1 to 128 characters", code="invalid_end_user", field="end_user")


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


async def history(redis: aioredis.Redis, tenant_id: str, rng: Range, end_user: str | None = None) -> list[Window]:
    """One window per step of ``rng``, oldest first; a window with nothing in it is zeros."""
    scope = TenantScope(tenant_id)
    key = scope.usage_day if rng.granularity == "day" else scope.usage_hour
    fields = ("s", "b") if end_user is None else ("s:" + end_user, "b:" + end_user)
    async with redis.pipeline(transaction=False) as pipe:
        for stamp in rng.stamps():
            pipe.hmget(key(stamp), *fields)
        rows = await pipe.execute()
    return [Window(start=_iso(t), sessions=int(s or 0), billable_seconds=int(b or 0))
            for t, (s, b) in zip(rng.starts, rows, strict=True)]


async def tenant_ids(redis: aioredis.Redis) -> list[str]:
    return [text(t) for t in await redis.zrange(TENANTS_INDEX, 0, -1)]


async def all_tenants_history(redis: aioredis.Redis, rng: Range, tenant_id: str | None = None) -> list[TenantWindow]:
    """:func:`history` of one tenant or of every tenant (in creation order), as flat rows."""
    ids = [tenant_id] if tenant_id is not None else await tenant_ids(redis)
    out: list[TenantWindow] = []
    for tid in ids:
        for w in await history(redis, tid, rng):
            out.append(TenantWindow(tenant_id=tid, start=w.start, sessions=w.sessions,
                                    billable_seconds=w.billable_seconds))
    return out
