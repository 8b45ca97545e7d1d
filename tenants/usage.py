"""A tenant's quota usage, read-only (``GET /v1/usage``, RateLimit header fields).

The counting rules are those of the admission script (``admission.lua``); both read the
same keys of :class:`~tenants.scope.TenantScope`:

* minute: the sliding-window log ``rate`` (zset sid -> admission time): entries with a
  score in ``(now - 60 s, +inf)`` are used; ``reset_s`` is the time until the oldest of
  them leaves the window (0 when none is used).
* day: the counter ``day:{yyyymmdd}`` of the UTC day of ``now``; ``reset_s`` is the time
  until the next UTC midnight.
* concurrency: members of ``live`` (zset sid -> lease deadline) whose lease ends after
  ``now``; ``reset_s`` is 0 (when a session ends is not known in advance).
* end_user (only when asked): members of ``eu:{end_user}`` that still hold a lease in
  ``live``; ``reset_s`` 0.

:func:`usage` never writes: expired entries are simply not counted (only an admission
purges them). It needs Redis >= 6.2 (``ZINTER``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import redis.asyncio as aioredis

from tenants.models import Quotas
from tenants.scope import TenantScope

WINDOW_MS = 60_000
DAY_MS = 86_400_000


class QuotaUsage(msgspec.Struct, kw_only=True):
    limit: int
    used: int
    remaining: int
    reset_s: int  # seconds until one more unit is available again; 0: nothing to wait for / unknown

    @classmethod
    def of(cls, limit: int, used: int, reset_s: int) -> QuotaUsage:
        return cls(limit=limit, used=used, remaining=max(0, limit - used), reset_s=reset_s)


class UsageSnapshot(msgspec.Struct, kw_only=True):
    minute: QuotaUsage          # sessions_per_minute (sliding 60 s window)
    day: QuotaUsage             # sessions_per_day (UTC day)
    concurrency: QuotaUsage     # max_concurrent_sessions
    end_user: QuotaUsage | None = None  # max_sessions_per_end_user, when an end user was named


def utc_day(now_ms: int) -> str:
    """``yyyymmdd`` of the UTC day that contains ``now_ms``."""
    return datetime.fromtimestamp(now_ms / 1000, UTC).strftime("%Y%m%d")


def seconds_to_utc_midnight(now_ms: int) -> int:
    """Whole seconds (rounded up, at least 1) until the next UTC midnight."""
    day_start = datetime.fromtimestamp(now_ms / 1000, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    next_ms = int((day_start + timedelta(days=1)).timestamp() * 1000)
    return max(1, -(-(next_ms - now_ms) // 1000))


def window_reset_s(oldest_ms: float | None, now_ms: int) -> int:
    """Seconds until the oldest entry of the minute window leaves it (0 when there is none)."""
    if oldest_ms is None:
        return 0
    return max(1, -(-(int(oldest_ms) + WINDOW_MS - now_ms) // 1000))


async def usage(
    redis: aioredis.Redis, tenant_id: str, quotas: Quotas, now_ms: int, end_user: str | None = None
) -> UsageSnapshot:
    """One MULTI/EXEC of reads: a consistent snapshot; writes nothing."""
    scope = TenantScope(tenant_id)
    window_open = f"({now_ms - WINDOW_MS}"
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zcount(scope.rate_bucket(), window_open, "+inf")
        pipe.zrangebyscore(scope.rate_bucket(), window_open, "+inf", start=0, num=1, withscores=True)
        pipe.get(scope.day_counter(utc_day(now_ms)))
        pipe.zcount(scope.live(), f"({now_ms}", "+inf")
        if end_user is not None:
            # members of both sets, scored by their lease deadline (weight 0 for the eu score)
            pipe.zinter({scope.live(): 1, scope.end_user(end_user): 0}, withscores=True)
        results = await pipe.execute()
    minute_used = int(results[0])
    oldest = float(results[1][0][1]) if results[1] else None
    day_used = int(results[2] or 0)
    live_used = int(results[3])
    snap = UsageSnapshot(
        minute=QuotaUsage.of(quotas.sessions_per_minute, minute_used, window_reset_s(oldest, now_ms)),
        day=QuotaUsage.of(quotas.sessions_per_day, day_used, seconds_to_utc_midnight(now_ms)),
        concurrency=QuotaUsage.of(quotas.max_concurrent_sessions, live_used, 0),
    )
    if end_user is not None:
        eu_used = sum(1 for _sid, lease in results[4] if float(lease) > now_ms)
        snap.end_user = QuotaUsage.of(quotas.max_sessions_per_end_user, eu_used, 0)
    return snap
