"""Session-second budgets (issue 21) on real Redis: the admission step (tenants/budget.lua in
admission.lua) reserves exactly, cuts or refuses, writes nothing on refusal; the terminal
transition (transition.lua through the repository) records billable_seconds and returns the
unused reservation; periods roll over with the injected clock; thresholds are recorded once;
the usage history sums equal the sessions' billable seconds."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.core.errors import InvalidInput
from broker.sessions.models import SessionRecord
from broker.sessions.repository import SessionRepository
from tenants.admission import AdmissionRequest, Admitted, admit
from broker.sessions.outbox import EventLog
from tenants.budgets import BudgetExhausted, read_budgets
from tenants.models import Quotas
from tenants.quotas import build_quotas
from tenants.scope import TenantScope
from tenants.usage_history import history, parse_range

T0 = int(datetime(2026, 11, 23, 12, 0, tzinfo=UTC).timestamp() * 1000)
DEC1 = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp() * 1000)
BIG = 1_000_000


def quotas(**kw: Any) -> Quotas:
    base: dict[str, Any] = {"sessions_per_minute": BIG, "sessions_per_day": BIG, "max_concurrent_sessions": BIG,
                            "max_sessions_per_end_user": BIG, "max_session_seconds": 3600}
    base.update(kw)
    return Quotas(**base)


def req(sid: str, now: int, q: Quotas, ttl: int, end_user: str | None = None, tenant: str = "ten_b") -> AdmissionRequest:
    return AdmissionRequest(
        tenant_id=tenant, session_id=sid, now_ms=now, quotas=q, end_user=end_user,
        session_fields={"id": sid, "tenant_id": tenant, "status": "queued", "created_at": str(now),
                        "ttl_seconds": str(ttl), "end_user": end_user or ""},
        lease_until_ms=now + 600_000, mint_window_ms=3_600_000, ttl_seconds=ttl,
    )


async def dump_all(redis: aioredis.Redis) -> dict[bytes, tuple[bytes | None, bool]]:
    return {key: (await redis.dump(key), (await redis.pttl(key)) > 0) for key in sorted(await redis.keys("*"))}


async def month(redis: aioredis.Redis, tenant: str = "ten_b", period: str = "202611") -> tuple[int, int]:
    used, reserved = await redis.hmget(TenantScope(tenant).budget_month(period), "used", "reserved")
    return int(used or 0), int(reserved or 0)


async def end(redis: aioredis.Redis, tenant: str, sid: str, *, ready_at: int | None, at: int,
              reason: str = "expired") -> SessionRecord:
    """The worker's terminal transition (finish_terminated's writes), through the repository."""
    repo = SessionRepository(redis)
    rec = await repo.get(tenant, sid)
    assert rec is not None
    if ready_at is not None:
        await redis.hset(TenantScope(tenant).session(sid), mapping={"status": "ready", "ready_at": ready_at})
        rec = await repo.get(tenant, sid)
        assert rec is not None
    res = await repo.transition(rec, allowed="*", status="terminated", lease="del", due_expiry="del",
                                due_provision="del", fields={"terminated_at": at, "termination_reason": reason},
                                retain=True)
    assert res.applied
    out = await repo.get(tenant, sid)
    assert out is not None
    return out


async def test_50_parallel_requests_reserve_exactly_the_budget(redis: aioredis.Redis) -> None:
    """Invariant: 50 parallel requests of 60 s against 600 s admit exactly 10 full sessions and
    refuse the other 40 with budget_exhausted; reserved == 600, never more."""
    q = quotas(session_seconds_per_month=600)
    outs = await asyncio.gather(*(admit(redis, req(f"ses_{i}", T0 + i, q, 60)) for i in range(50)))
    admitted = [o for o in outs if isinstance(o, Admitted)]
    refused = [o for o in outs if isinstance(o, BudgetExhausted)]
    assert len(admitted) == 10 and len(refused) == 40
    assert all(o.budget is not None and o.budget.ttl_seconds == 60 and not o.budget.limited for o in admitted)
    assert await month(redis) == (0, 600)
    r = refused[0]
    assert (r.budget, r.limit, r.used, r.reserved) == ("session_seconds_per_month", 600, 0, 600)
    assert r.period_end == "2026-12-01T00:00:00Z"
    assert abs(r.retry_after_s - (DEC1 - T0) // 1000) <= 1


async def test_a_budget_not_a_multiple_admits_nine_full_and_one_cut(redis: aioredis.Redis) -> None:
    """Invariant: with 590 s, 9 full 60 s sessions and one cut to 50 s (ttl_limited_by=budget,
    ttl_seconds written cut), then refusals; the reserved total equals the budget."""
    q = quotas(session_seconds_per_month=590)
    outs = await asyncio.gather(*(admit(redis, req(f"ses_{i}", T0 + i, q, 60)) for i in range(50)))
    grants = sorted(o.budget.ttl_seconds for o in outs if isinstance(o, Admitted) and o.budget)
    assert grants == [50] + [60] * 9
    cut = next(o for o in outs if isinstance(o, Admitted) and o.budget and o.budget.limited)
    stored = await redis.hmget(TenantScope("ten_b").session(cut.session_id), "ttl_seconds", "ttl_limited_by")
    assert stored == [b"50", b"budget"]
    assert sum(isinstance(o, BudgetExhausted) for o in outs) == 40
    assert await month(redis) == (0, 590)


async def test_a_refusal_writes_nothing(redis: aioredis.Redis) -> None:
    q = quotas(session_seconds_per_month=60)
    assert isinstance(await admit(redis, req("ses_a", T0, q, 60)), Admitted)
    before = await dump_all(redis)
    out = await admit(redis, req("ses_x", T0 + 5, q, 60, end_user="u1"))
    assert isinstance(out, BudgetExhausted)
    assert await dump_all(redis) == before


async def test_less_than_10_s_left_refuses_and_10_s_admits_cut(redis: aioredis.Redis) -> None:
    q = quotas(session_seconds_per_month=70)
    assert isinstance(await admit(redis, req("ses_a", T0, q, 60)), Admitted)
    cut = await admit(redis, req("ses_b", T0, q, 60))
    assert isinstance(cut, Admitted) and cut.budget is not None
    assert cut.budget.ttl_seconds == 10 and cut.budget.limited
    q2 = quotas(session_seconds_per_month=79)
    assert isinstance(await admit(redis, req("ses_c", T0, q2, 60)), BudgetExhausted)  # 9 s left


async def test_stop_returns_the_unused_part_at_once(redis: aioredis.Redis) -> None:
    """Invariant: a session ended after 20.3 s of 60 bills 21 s; used 21, reserved back to 0,
    and the next request is admitted at once for the full 60 s (budget 81 s)."""
    q = quotas(session_seconds_per_month=81)
    assert isinstance(await admit(redis, req("ses_a", T0, q, 60)), Admitted)
    assert isinstance(await admit(redis, req("ses_b", T0, q, 60)), Admitted)  # cut to 21
    assert isinstance(await admit(redis, req("ses_c", T0, q, 60)), BudgetExhausted)
    rec = await end(redis, "ten_b", "ses_a", ready_at=T0 + 1000, at=T0 + 21_300, reason="requested")
    assert rec.billable_seconds == 21
    assert await month(redis) == (21, 21)
    nxt = await admit(redis, req("ses_d", T0 + 21_400, q, 60))
    assert isinstance(nxt, Admitted) and nxt.budget is not None and nxt.budget.ttl_seconds == 39


async def test_settle_happens_once_and_a_never_ready_session_costs_nothing(redis: aioredis.Redis) -> None:
    q = quotas(session_seconds_per_month=600)
    assert isinstance(await admit(redis, req("ses_a", T0, q, 60)), Admitted)
    repo = SessionRepository(redis)
    rec = await repo.get("ten_b", "ses_a")
    assert rec is not None
    res = await repo.transition(rec, allowed="queued,provisioning", status="failed", lease="del", due_expiry="del",
                                due_provision="del", fields={"terminated_at": T0 + 5000, "error_code": "x",
                                                             "error_message": "y"}, retain=True)
    assert res.applied
    failed = await repo.get("ten_b", "ses_a")
    assert failed is not None and failed.billable_seconds == 0
    assert await month(redis) == (0, 0)
    again = await repo.transition(failed, allowed="failed", status="terminated", fields={"terminated_at": T0 + 9000})
    assert again.applied  # a (forced) second terminal transition settles nothing more
    assert await month(redis) == (0, 0)


async def test_period_rollover_with_the_injected_clock(redis: aioredis.Redis) -> None:
    """Invariant: the budget is per UTC calendar month of the admission's now: exhausted on
    Nov 30 23:59:59, a full session on Dec 1 00:00:00; each month has its own hash."""
    q = quotas(session_seconds_per_month=60)
    last = DEC1 - 1000
    assert isinstance(await admit(redis, req("ses_a", last, q, 60)), Admitted)
    refused = await admit(redis, req("ses_b", last, q, 60))
    assert isinstance(refused, BudgetExhausted) and refused.retry_after_s == 1
    fresh = await admit(redis, req("ses_c", DEC1, q, 60))
    assert isinstance(fresh, Admitted) and fresh.budget is not None and fresh.budget.ttl_seconds == 60
    assert await month(redis, period="202611") == (0, 60)
    assert await month(redis, period="202612") == (0, 60)
    # the November session ends in December: it settles in November, where it was reserved
    await end(redis, "ten_b", "ses_a", ready_at=last + 500, at=last + 30_000)
    assert await month(redis, period="202611") == (30, 0)
    assert await month(redis, period="202612") == (0, 60)
    ttl = await redis.ttl(TenantScope("ten_b").budget_month("202612"))
    assert 40 * 86400 < ttl <= 72 * 86400


async def test_end_user_budget_is_separate_per_end_user(redis: aioredis.Redis) -> None:
    q = quotas(session_seconds_per_end_user_per_month=100)
    assert isinstance(await admit(redis, req("ses_a", T0, q, 60, end_user="u1")), Admitted)
    cut = await admit(redis, req("ses_b", T0, q, 60, end_user="u1"))
    assert isinstance(cut, Admitted) and cut.budget is not None and cut.budget.ttl_seconds == 40
    refused = await admit(redis, req("ses_c", T0, q, 60, end_user="u1"))
    assert isinstance(refused, BudgetExhausted)
    assert (refused.budget, refused.limit, refused.reserved) == ("session_seconds_per_end_user_per_month", 100, 100)
    other = await admit(redis, req("ses_d", T0, q, 60, end_user="u2"))
    assert isinstance(other, Admitted) and other.budget is not None and other.budget.ttl_seconds == 60
    no_eu = await admit(redis, req("ses_e", T0, q, 60))  # the per-end-user budget needs an end user
    assert isinstance(no_eu, Admitted)
    budgets = await read_budgets(redis, "ten_b", q, T0, end_user="u1")
    eu = budgets["session_seconds_per_end_user_per_month"]
    assert (eu.limit, eu.used, eu.reserved, eu.remaining) == (100, 0, 100, 0)
    assert budgets["session_seconds_per_month"].limit is None
    assert budgets["session_seconds_per_month"].reserved == 220


async def thresholds(redis: aioredis.Redis, tenant: str = "ten_b") -> list[dict[str, Any]]:
    """The tenant's usage.threshold_reached events as GET /v1/events?type=... lists them."""
    page = await EventLog(redis).page(tenant, types=frozenset({"usage.threshold_reached"}), limit=100)
    assert all(e.type == "usage.threshold_reached" for e in page.data)
    return [e.data for e in page.data]


async def test_thresholds_are_recorded_once_per_period(redis: aioredis.Redis) -> None:
    """Invariant: 50/80/100 % of committed seconds each give one event per period, written by
    the reservation that crossed it (the admission returns how many); a new period records
    them again."""
    q = quotas(session_seconds_per_month=100)
    crossed = []
    for i, ttl in enumerate((40, 10, 20, 30)):  # 40, 50 (50 %), 70, 100 (80 %, 100 %)
        got = await admit(redis, req(f"ses_{i}", T0, q, ttl))
        assert isinstance(got, Admitted) and got.budget is not None
        crossed.append(got.budget.thresholds)
    assert crossed == [0, 1, 0, 2]
    await end(redis, "ten_b", "ses_0", ready_at=T0, at=T0 + 1000)  # frees 39: back below 80 %
    assert isinstance(await admit(redis, req("ses_9", T0, q, 39)), Admitted)  # 100 % again: no event
    events = await thresholds(redis)
    assert [e["percent"] for e in events] == [50, 80, 100]
    assert events[0] == {"budget": "session_seconds_per_month", "percent": 50, "limit": 100, "used": 0,
                         "reserved": 50, "committed": 50, "period": "2026-11", "period_end": "2026-12-01T00:00:00Z"}
    assert (events[2]["used"], events[2]["reserved"], events[2]["committed"]) == (0, 100, 100)
    assert isinstance(await admit(redis, req("ses_dec", DEC1, q, 60)), Admitted)
    december = (await thresholds(redis))[3:]
    assert [(e["percent"], e["period"], e["period_end"]) for e in december] == [(50, "2026-12", "2027-01-01T00:00:00Z")]
    assert not await redis.exists("sb:t:ten_b:outbox:usage")  # the former list is gone


async def test_end_user_thresholds_name_the_end_user(redis: aioredis.Redis) -> None:
    q = quotas(session_seconds_per_end_user_per_month=100)
    assert isinstance(await admit(redis, req("ses_a", T0, q, 80, end_user="u1")), Admitted)
    events = await thresholds(redis)
    assert [(e["budget"], e["percent"], e["end_user"]) for e in events] == [
        ("session_seconds_per_end_user_per_month", 50, "u1"), ("session_seconds_per_end_user_per_month", 80, "u1")]


async def test_a_settle_that_bills_past_the_reservation_crosses_and_says_so(redis: aioredis.Redis) -> None:
    """Invariant: a session billed beyond its reservation (it ended late: expiry lateness,
    rounding up, a DELETE retried upstream) can cross a threshold in the settle; that step
    records the event and the transition returns how many it recorded."""
    q = quotas(session_seconds_per_month=1000)
    got = await admit(redis, req("ses_a", T0, q, 499))
    assert isinstance(got, Admitted) and got.budget is not None and got.budget.thresholds == 0  # 49.9 %
    repo = SessionRepository(redis)
    rec = await repo.get("ten_b", "ses_a")
    assert rec is not None
    await repo.transition(rec, allowed="queued", status="ready", fields={"ready_at": T0, "expires_at": T0 + 499_000})
    res = await repo.transition(rec, allowed="*", status="terminated", lease="del", due_expiry="del",
                                fields={"terminated_at": T0 + 499_200, "termination_reason": "expired"})
    assert res.applied and res.thresholds == 1  # billed 500 s (rounded up) of 1000: 50 %
    assert [(e["percent"], e["used"], e["reserved"]) for e in await thresholds(redis)] == [(50, 500, 0)]
    again = await repo.transition(rec, allowed="terminated", status="terminated")
    assert again.applied and again.thresholds == 0


async def test_usage_history_sums_equal_the_sessions_billable_seconds(redis: aioredis.Redis) -> None:
    q = quotas()
    bills = 0
    for i in range(6):
        now = T0 + i * 1_800_000  # every 30 min: 3 hours
        assert isinstance(await admit(redis, req(f"ses_{i}", now, q, 600, end_user="u1" if i % 2 else None)), Admitted)
        rec = await end(redis, "ten_b", f"ses_{i}", ready_at=now + 700, at=now + 700 + 1000 * (10 + i) + 1)
        bills += rec.billable_seconds
    hours = await history(redis, "ten_b", parse_range("2026-11-23", "2026-11-23", "hour"))
    assert len(hours) == 24 and hours[0].start == "2026-11-23T00:00:00Z"
    assert [(w.sessions, w.billable_seconds) for w in hours[12:15]] == [(2, 11 + 12), (2, 13 + 14), (2, 15 + 16)]
    assert sum(w.billable_seconds for w in hours) == bills == 11 + 12 + 13 + 14 + 15 + 16
    days = await history(redis, "ten_b", parse_range("2026-11-22", "2026-11-24", "day"))
    assert [(w.sessions, w.billable_seconds) for w in days] == [(0, 0), (6, bills), (0, 0)]
    eu = await history(redis, "ten_b", parse_range("2026-11-23", "2026-11-23", "day"), end_user="u1")
    assert (eu[0].sessions, eu[0].billable_seconds) == (3, 12 + 14 + 16)
    assert 399 * 86400 < await redis.ttl(TenantScope("ten_b").usage_day("20261123")) <= 401 * 86400
    assert 30 * 86400 < await redis.ttl(TenantScope("ten_b").usage_hour("2026112312")) <= 32 * 86400


@pytest.mark.parametrize(("args", "field"), [
    (("2026-11-01", "2027-12-06", "day"), "to"),  # 401 days (400 max)
    (("2026-11-01", "2026-12-02", "hour"), "to"),
    (("2026-11-02", "2026-11-01", "day"), "to"),
    (("2026-13-01", "2026-11-01", "day"), "from"),
    ((None, "2026-11-01", "day"), "from"),
    (("2026-11-01", "2026-11-01", "minute"), "granularity"),
])
def test_bad_ranges_name_the_field(args: tuple[Any, ...], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_range(*args)
    assert err.value.field == field


def test_budget_quotas_are_validated() -> None:
    assert build_quotas({"session_seconds_per_month": 60}).session_seconds_per_month == 60
    assert build_quotas({"session_seconds_per_month": None}, Quotas(session_seconds_per_month=600)) \
        .session_seconds_per_month is None
    assert Quotas().session_seconds_per_month is None and Quotas().session_seconds_per_end_user_per_month is None
    for bad in (59, 1_000_000_001, "600", 60.0, True):
        with pytest.raises(InvalidInput) as err:
            build_quotas({"session_seconds_per_end_user_per_month": bad})
        assert err.value.field == "quotas.session_seconds_per_end_user_per_month"
