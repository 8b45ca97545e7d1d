"""Atomic admission against a real redis-server: each quota refuses at exactly its limit
with the right code / limit / current / retry_after, a refusal writes nothing, idempotent
replays consume nothing, replace_oldest replaces exactly the oldest, and tenants are
isolated."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import redis.asyncio as aioredis

from tenants.admission import AdmissionRequest, Admitted, KeyReused, Refused, Replayed, admit
from tenants.models import Quotas
from tenants.scope import DUE_EXPIRY, DUE_PROVISION, PROVISION_TENANTS, PROVISION_WAKE, TenantScope, due_member
from tenants.usage import usage

T0 = int(datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC).timestamp() * 1000)
LEASE_MS = 600_000
BIG = 1_000_000


def quotas(**kw: Any) -> Quotas:
    base: dict[str, Any] = {
        "sessions_per_minute": BIG,
        "sessions_per_day": BIG,
        "max_concurrent_sessions": BIG,
        "max_sessions_per_end_user": BIG,
    }
    base.update(kw)
    return Quotas(**base)


def req(
    sid: str,
    now: int,
    q: Quotas,
    *,
    tenant: str = "ten_a",
    end_user: str | None = None,
    idem: str | None = None,
    body: str = "body-1",
    lease_ms: int = LEASE_MS,
) -> AdmissionRequest:
    return AdmissionRequest(
        tenant_id=tenant,
        session_id=sid,
        now_ms=now,
        quotas=q,
        end_user=end_user,
        idempotency_digest=idem,
        body_digest=body if idem else None,
        session_fields={"id": sid, "status": "queued", "created_at": str(now)},
        lease_until_ms=now + lease_ms,
        mint_window_ms=30_000,
    )


async def dump_all(redis: aioredis.Redis) -> dict[bytes, tuple[bytes | None, bool]]:
    """Every key's serialized value (DUMP) and whether it has a TTL."""
    out = {}
    for key in sorted(await redis.keys("*")):
        out[key] = (await redis.dump(key), (await redis.pttl(key)) > 0)
    return out


async def test_admitted_session_writes_every_record(redis: aioredis.Redis) -> None:
    """Invariant: an admission writes the hash as given plus its mint slot, the index, the
    lease, the rate log, the day counter (with TTL), the mint schedule, the provisioning
    schedule (session at its slot, tenant in the ring, a wake-up token: the slot is now), the
    end-user set and the idempotency record (with TTL); no job and no due:provision entry."""
    q = quotas()
    r = req("ses_1", T0, q, end_user="u1", idem="d" * 64)
    out = await admit(redis, r)
    assert isinstance(out, Admitted)
    assert out.session_id == "ses_1" and out.replaced == []
    s = TenantScope("ten_a")
    assert await redis.hgetall(s.session("ses_1")) == {
        b"id": b"ses_1",
        b"status": b"queued",
        b"created_at": str(T0).encode(),
        b"mint_at": str(T0).encode(),
        # written by the budget step (tenants/budget.lua): the TTL reserved and where it is counted
        b"ttl_seconds": b"3600",
        b"budget_base": b"sb:t:ten_a:",
        b"budget_period": b"202611",
        b"budget_reserved": b"3600",
        b"budget_limits": b"-1,-1",
        b"usage_day": b"20261123",
        b"usage_hour": b"2026112312",
        # the outbox (tenants/outbox.lua): the session's event counter, its session.created the first
        b"event_seq": b"1",
    }
    events = await redis.xrange(s.events())
    assert len(events) == 1 and events[0][1][b"type"] == b"session.created"
    assert events[0][1][b"session_id"] == b"ses_1" and events[0][1][b"sequence"] == b"1"
    assert events[0][1][b"status"] == b"queued"
    assert out.mint_at == T0
    assert await redis.zscore(s.sessions_index(), "ses_1") == T0
    assert await redis.zscore(s.live(), "ses_1") == T0 + LEASE_MS
    assert await redis.zscore(s.rate_bucket(), "ses_1") == T0
    assert await redis.zscore(s.end_user("u1"), "ses_1") == T0
    assert await redis.get(s.day_counter("20261123")) == b"1"
    assert 0 < await redis.ttl(s.day_counter("20261123")) <= 48 * 3600
    assert await redis.zscore(s.provision_schedule(), "ses_1") == T0
    assert await redis.zscore(PROVISION_TENANTS, "ten_a") == T0
    assert await redis.lrange(PROVISION_WAKE, 0, -1) == [b"1"]
    assert await redis.hgetall(s.mint_bucket()) == {b"tat": str(T0 + 200).encode(), b"last": str(T0).encode()}
    assert not await redis.exists(DUE_PROVISION)
    assert [k for k in await redis.keys("*") if k.startswith(b"arq:")] == []
    assert await redis.hgetall(s.idempotency("d" * 64)) == {b"body": b"body-1", b"sid": b"ses_1"}
    assert 0 < await redis.ttl(s.idempotency("d" * 64)) <= 24 * 3600
    assert out.usage.minute.used == 1 and out.usage.minute.remaining == BIG - 1 and out.usage.minute.reset_s == 60
    assert out.usage.day.used == 1 and out.usage.day.reset_s == 12 * 3600
    assert out.usage.concurrency.used == 1
    assert out.usage.end_user is not None and out.usage.end_user.used == 1


async def test_rate_limit_refuses_at_exactly_limit_and_writes_nothing(redis: aioredis.Redis) -> None:
    """Invariant: at most L admissions in any rolling 60 s; the (L+1)th is refused with
    rate_limited, limit L, current L, retry_after = until the oldest leaves the window; the
    refusal leaves every key byte-identical."""
    q = quotas(sessions_per_minute=3)
    for i in range(3):
        out = await admit(redis, req(f"ses_{i}", T0 + i * 1000, q))
        assert isinstance(out, Admitted) and out.usage.minute.used == i + 1
    before = await dump_all(redis)
    out = await admit(redis, req("ses_x", T0 + 3000, q))
    assert isinstance(out, Refused)
    assert (out.code, out.limit, out.current, out.retry_after_s) == ("rate_limited", 3, 3, 57)
    assert out.usage.minute.remaining == 0 and out.usage.minute.reset_s == 57
    assert await dump_all(redis) == before
    # 1 ms before the oldest leaves the window: still refused, retry in 1 s
    out = await admit(redis, req("ses_x", T0 + 59_999, q))
    assert isinstance(out, Refused) and out.retry_after_s == 1
    assert await dump_all(redis) == before
    # the oldest (T0) leaves the window (T0, T0+60000] exactly at T0 + 60 s
    out = await admit(redis, req("ses_3", T0 + 60_000, q))
    assert isinstance(out, Admitted)
    assert out.usage.minute.used == 3 and out.usage.minute.reset_s == 1  # ses_1 leaves at T0+61 s
    assert await redis.zscore(TenantScope("ten_a").rate_bucket(), "ses_0") is None  # purged


async def test_daily_quota_per_utc_day(redis: aioredis.Redis) -> None:
    """Invariant: sessions_per_day counts per UTC day; the refusal retries at UTC midnight;
    the next UTC day starts a fresh counter."""
    q = quotas(sessions_per_day=2)
    late = int(datetime(2026, 11, 23, 23, 58, 0, tzinfo=UTC).timestamp() * 1000)
    assert isinstance(await admit(redis, req("ses_1", late, q)), Admitted)
    assert isinstance(await admit(redis, req("ses_2", late + 1000, q)), Admitted)
    before = await dump_all(redis)
    out = await admit(redis, req("ses_3", late + 59_500, q))  # 23:58:59.5
    assert isinstance(out, Refused)
    assert (out.code, out.limit, out.current, out.retry_after_s) == ("daily_quota_exhausted", 2, 2, 61)
    assert await dump_all(redis) == before
    midnight = int(datetime(2026, 11, 24, tzinfo=UTC).timestamp() * 1000)
    out = await admit(redis, req("ses_3", midnight, q))
    assert isinstance(out, Admitted) and out.usage.day.used == 1 and out.usage.day.reset_s == 86400
    s = TenantScope("ten_a")
    assert await redis.get(s.day_counter("20261123")) == b"2"
    assert await redis.get(s.day_counter("20261124")) == b"1"


async def test_concurrency_limit_and_expired_leases(redis: aioredis.Redis) -> None:
    """Invariant: at most L unexpired leases; the (L+1)th is refused with concurrency_limit
    (retry_after 1) writing nothing, even when expired leases are present; an expired lease
    stops counting and the next admission purges it."""
    q = quotas(max_concurrent_sessions=2)
    assert isinstance(await admit(redis, req("ses_1", T0, q, lease_ms=10_000)), Admitted)
    assert isinstance(await admit(redis, req("ses_2", T0 + 1, q)), Admitted)
    before = await dump_all(redis)
    out = await admit(redis, req("ses_3", T0 + 9_999, q))
    assert isinstance(out, Refused)
    assert (out.code, out.limit, out.current, out.retry_after_s) == ("concurrency_limit", 2, 2, 1)
    assert out.usage.concurrency.remaining == 0
    assert await dump_all(redis) == before
    # at T0+10 s the lease of ses_1 has ended (live while deadline > now)
    snap = await usage(redis, "ten_a", q, T0 + 10_000)
    assert snap.concurrency.used == 1
    assert await dump_all(redis) == before  # usage() writes nothing
    out = await admit(redis, req("ses_3", T0 + 10_000, q))
    assert isinstance(out, Admitted) and out.usage.concurrency.used == 2
    live = TenantScope("ten_a").live()
    assert [m.decode() for m in await redis.zrange(live, 0, -1)] == ["ses_2", "ses_3"]


async def test_refusal_with_stale_entries_writes_nothing(redis: aioredis.Redis) -> None:
    """Invariant: a refusal does not even purge expired leases, stale end-user members or
    rate entries outside the window (DUMP of every key identical)."""
    q = quotas(max_concurrent_sessions=1, max_sessions_per_end_user=1)
    assert isinstance(await admit(redis, req("ses_1", T0, q, end_user="u1", lease_ms=5_000)), Admitted)
    assert isinstance(await admit(redis, req("ses_2", T0 + 6_000, q, end_user="u2")), Admitted)
    before = await dump_all(redis)
    out = await admit(redis, req("ses_3", T0 + 65_000, q, end_user="u1"))
    assert isinstance(out, Refused) and out.code == "concurrency_limit"
    assert out.usage.end_user is not None and out.usage.end_user.used == 0  # ses_1's lease ended
    assert out.usage.minute.used == 1  # only ses_2 is inside the window
    assert await dump_all(redis) == before


async def test_end_user_reject(redis: aioredis.Redis) -> None:
    """Invariant: with policy reject, the end user's (cap+1)th live session is refused with
    end_user_limit writing nothing; other end users and anonymous requests are unaffected;
    an end user whose session lease ended may start a new one."""
    q = quotas(max_sessions_per_end_user=1)
    assert isinstance(await admit(redis, req("ses_1", T0, q, end_user="u1", lease_ms=20_000)), Admitted)
    before = await dump_all(redis)
    out = await admit(redis, req("ses_2", T0 + 1, q, end_user="u1"))
    assert isinstance(out, Refused)
    assert (out.code, out.limit, out.current, out.retry_after_s) == ("end_user_limit", 1, 1, 1)
    assert await dump_all(redis) == before
    assert isinstance(await admit(redis, req("ses_2", T0 + 2, q, end_user="u2")), Admitted)
    assert isinstance(await admit(redis, req("ses_3", T0 + 3, q)), Admitted)
    out = await admit(redis, req("ses_4", T0 + 20_000, q, end_user="u1"))
    assert isinstance(out, Admitted) and out.replaced == []
    eu = TenantScope("ten_a").end_user("u1")
    assert await redis.zrange(eu, 0, -1) == [b"ses_4"]  # the stale member was purged


async def test_replace_oldest(redis: aioredis.Redis) -> None:
    """Invariant: with replace_oldest at the cap, exactly the oldest count-cap+1 sessions of
    that end user are replaced: marked terminating/replaced, queued in due:expiry at now,
    removed from live and the end-user set; their slots are free in the same step; other
    sessions are untouched."""
    q = quotas(max_sessions_per_end_user=3, end_user_policy="replace_oldest", max_concurrent_sessions=4)
    s = TenantScope("ten_a")
    for i in range(3):
        assert isinstance(await admit(redis, req(f"ses_{i}", T0 + i, q, end_user="u1")), Admitted)
    assert isinstance(await admit(redis, req("ses_other", T0 + 3, q, end_user="u2")), Admitted)
    await redis.hset(s.session("ses_1"), "status", "ready")
    # lower the cap to 1: three live sessions -> the 3 oldest go for the new one
    q1 = quotas(max_sessions_per_end_user=1, end_user_policy="replace_oldest", max_concurrent_sessions=4)
    out = await admit(redis, req("ses_new", T0 + 100, q1, end_user="u1"))
    assert isinstance(out, Admitted)
    assert out.replaced == ["ses_0", "ses_1", "ses_2"]
    assert out.usage.concurrency.used == 2 and out.usage.end_user is not None and out.usage.end_user.used == 1
    for sid in out.replaced:
        h = await redis.hgetall(s.session(sid))
        assert h[b"status"] == b"terminating"
        assert h[b"termination_reason"] == b"replaced"
        assert h[b"terminating_at"] == str(T0 + 100).encode()
        assert await redis.zscore(DUE_EXPIRY, due_member("ten_a", sid)) == T0 + 100
        assert await redis.zscore(s.live(), sid) is None
    assert await redis.zrange(s.end_user("u1"), 0, -1) == [b"ses_new"]
    assert await redis.hget(s.session("ses_other"), "status") == b"queued"
    assert await redis.zscore(s.live(), "ses_other") is not None

    # cap 2: only the single oldest of (ses_new, ses_b) is replaced when a third comes
    q2 = quotas(max_sessions_per_end_user=2, end_user_policy="replace_oldest", max_concurrent_sessions=3)
    assert isinstance(await admit(redis, req("ses_b", T0 + 200, q2, end_user="u1")), Admitted)
    # concurrency is at its cap (ses_other, ses_new, ses_b) but the replacement frees a slot
    out = await admit(redis, req("ses_c", T0 + 300, q2, end_user="u1"))
    assert isinstance(out, Admitted) and out.replaced == ["ses_new"]
    assert await redis.zrange(s.end_user("u1"), 0, -1) == [b"ses_b", b"ses_c"]
    assert await redis.zcard(s.live()) == 3


async def test_replace_oldest_still_bounded_by_concurrency(redis: aioredis.Redis) -> None:
    """Invariant: when even the replacement leaves no slot, the request is refused with
    concurrency_limit and nobody is replaced (nothing written)."""
    q = quotas(max_sessions_per_end_user=1, end_user_policy="replace_oldest", max_concurrent_sessions=2)
    assert isinstance(await admit(redis, req("ses_1", T0, q, end_user="u1")), Admitted)
    assert isinstance(await admit(redis, req("ses_2", T0 + 1, q, end_user="u2")), Admitted)
    assert isinstance(await admit(redis, req("ses_3", T0 + 2, q, end_user="u1")), Admitted)  # replaces ses_1
    q1 = quotas(max_sessions_per_end_user=1, end_user_policy="replace_oldest", max_concurrent_sessions=1)
    before = await dump_all(redis)
    out = await admit(redis, req("ses_4", T0 + 3, q1, end_user="u1"))
    assert isinstance(out, Refused)
    assert (out.code, out.limit, out.current) == ("concurrency_limit", 1, 2)
    assert await dump_all(redis) == before


async def test_replaced_session_already_terminating_keeps_its_reason(redis: aioredis.Redis) -> None:
    """Invariant: a replaced session that is already terminating keeps its reason but is
    (re)queued for the sweeper; one without a record is only dropped from the sets."""
    q = quotas(max_sessions_per_end_user=2, end_user_policy="replace_oldest")
    s = TenantScope("ten_a")
    assert isinstance(await admit(redis, req("ses_1", T0, q, end_user="u1")), Admitted)
    assert isinstance(await admit(redis, req("ses_2", T0 + 1, q, end_user="u1")), Admitted)
    await redis.hset(s.session("ses_1"), mapping={"status": "terminating", "termination_reason": "requested"})
    await redis.delete(s.session("ses_2"))
    q1 = quotas(max_sessions_per_end_user=1, end_user_policy="replace_oldest")
    out = await admit(redis, req("ses_3", T0 + 5, q1, end_user="u1"))
    assert isinstance(out, Admitted) and out.replaced == ["ses_1", "ses_2"]
    assert await redis.hget(s.session("ses_1"), "termination_reason") == b"requested"
    assert await redis.zscore(DUE_EXPIRY, due_member("ten_a", "ses_1")) == T0 + 5
    assert await redis.zscore(DUE_EXPIRY, due_member("ten_a", "ses_2")) is None
    assert not await redis.exists(s.session("ses_2"))
    assert await redis.zrange(s.live(), 0, -1) == [b"ses_3"]


async def test_idempotent_replay_consumes_nothing(redis: aioredis.Redis) -> None:
    """Invariant: the same key and body returns the first session id and leaves every key
    byte-identical (even when quota is exhausted); another body is KeyReused, also writing
    nothing."""
    q = quotas(sessions_per_minute=1)
    key = "k" * 64
    first = await admit(redis, req("ses_1", T0, q, idem=key, body="b1"))
    assert isinstance(first, Admitted)
    before = await dump_all(redis)
    again = await admit(redis, req("ses_2", T0 + 10, q, idem=key, body="b1"))
    assert again == Replayed(session_id="ses_1")
    assert await dump_all(redis) == before
    other = await admit(redis, req("ses_3", T0 + 20, q, idem=key, body="b2"))
    assert other == KeyReused()
    assert await dump_all(redis) == before


async def test_refusal_is_not_recorded_for_the_key(redis: aioredis.Redis) -> None:
    """Invariant: a refused request does not record its Idempotency-Key: the same key after
    Retry-After is evaluated afresh and admitted."""
    q = quotas(sessions_per_minute=1)
    assert isinstance(await admit(redis, req("ses_1", T0, q)), Admitted)
    refused = await admit(redis, req("ses_2", T0 + 1000, q, idem="a" * 64))
    assert isinstance(refused, Refused)
    assert not await redis.exists(TenantScope("ten_a").idempotency("a" * 64))
    later = T0 + 1000 + refused.retry_after_s * 1000
    out = await admit(redis, req("ses_2", later, q, idem="a" * 64))
    assert isinstance(out, Admitted) and out.session_id == "ses_2"


async def test_check_order_rate_before_day(redis: aioredis.Redis) -> None:
    """Invariant: when several quotas are exhausted, the first in the documented order
    (minute, day, end user, concurrency) is reported."""
    q = quotas(sessions_per_minute=1, sessions_per_day=1, max_concurrent_sessions=1, max_sessions_per_end_user=1)
    assert isinstance(await admit(redis, req("ses_1", T0, q, end_user="u")), Admitted)
    out = await admit(redis, req("ses_2", T0 + 1, q, end_user="u"))
    assert isinstance(out, Refused) and out.code == "rate_limited"
    out = await admit(redis, req("ses_2", T0 + 61_000, q, end_user="u"))
    assert isinstance(out, Refused) and out.code == "daily_quota_exhausted"
    q2 = quotas(max_concurrent_sessions=1, max_sessions_per_end_user=1)
    out = await admit(redis, req("ses_2", T0 + 61_000, q2, end_user="u"))
    assert isinstance(out, Refused) and out.code == "end_user_limit"


async def test_tenants_are_isolated(redis: aioredis.Redis) -> None:
    """Invariant: tenant A exhausting every quota changes no key of tenant B, and B's usage
    and admissions are unaffected (same end-user id and idempotency digest included)."""
    q = quotas(sessions_per_minute=2, sessions_per_day=2, max_concurrent_sessions=2, max_sessions_per_end_user=1)
    assert isinstance(await admit(redis, req("ses_b0", T0, q, tenant="ten_b", end_user="u1", idem="i" * 64)), Admitted)
    b_keys = sorted(await redis.keys("sb:t:ten_b:*"))
    b_before = {k: await redis.dump(k) for k in b_keys}
    b_usage = await usage(redis, "ten_b", q, T0 + 500, end_user="u1")
    assert isinstance(await admit(redis, req("ses_a0", T0 + 1, q, end_user="u1", idem="i" * 64)), Admitted)
    assert isinstance(await admit(redis, req("ses_a1", T0 + 2, q, end_user="u2")), Admitted)
    assert isinstance(await admit(redis, req("ses_a2", T0 + 3, q, end_user="u3")), Refused)
    assert {k: await redis.dump(k) for k in sorted(await redis.keys("sb:t:ten_b:*"))} == b_before
    assert await usage(redis, "ten_b", q, T0 + 500, end_user="u1") == b_usage
    out = await admit(redis, req("ses_b1", T0 + 4, q, tenant="ten_b", end_user="u2"))
    assert isinstance(out, Admitted) and out.usage.minute.used == 2


async def test_usage_matches_admission_snapshot(redis: aioredis.Redis) -> None:
    """Invariant: usage() read right after an admission equals the snapshot the admission
    returned (same counting rules), with and without an end user."""
    q = quotas(sessions_per_minute=5, sessions_per_day=7, max_concurrent_sessions=3, max_sessions_per_end_user=2)
    out = None
    for i in range(3):
        out = await admit(redis, req(f"ses_{i}", T0 + i * 7000, q, end_user="u1" if i else "u2"))
        assert isinstance(out, Admitted)
    assert out is not None and isinstance(out, Admitted)
    now = T0 + 2 * 7000
    assert await usage(redis, "ten_a", q, now, end_user="u1") == out.usage
    snap = await usage(redis, "ten_a", q, now)
    assert snap.end_user is None
    assert msgspec.to_builtins(snap.minute) == {"limit": 5, "used": 3, "remaining": 2, "reset_s": 46}
    assert (snap.day.used, snap.concurrency.used, snap.concurrency.remaining) == (3, 3, 0)
    empty = await usage(redis, "ten_zero", q, now, end_user="nobody")
    assert (empty.minute.used, empty.minute.reset_s, empty.day.used, empty.concurrency.used) == (0, 0, 0, 0)
    assert empty.end_user is not None and empty.end_user.used == 0


async def test_lease_must_be_in_the_future(redis: aioredis.Redis) -> None:
    """Invariant: a request whose lease would already be over is rejected before Redis."""
    q = quotas()
    bad = req("ses_1", T0, q)
    bad.lease_until_ms = T0
    try:
        await admit(redis, bad)
    except ValueError:
        pass
    else:
        raise AssertionError("admit accepted a lease that ends at now")
    assert await redis.dbsize() == 0


async def test_replace_oldest_keeps_the_slot_of_a_session_that_may_be_live_upstream(redis: aioredis.Redis) -> None:
    """Invariant (issue 17, item 4): a replaced session whose upstream session may be live
    (an avaturn_session_id, or a create in flight) keeps its lease until its termination ends
    it; the new session takes its slot but records that it waits for it; every other
    admission counts both (max_concurrent never exceeded upstream); replacing the waiting
    session (never upstream) frees its slot at once and the next one inherits the wait."""
    q = quotas(max_sessions_per_end_user=1, end_user_policy="replace_oldest", max_concurrent_sessions=2)
    s = TenantScope("ten_a")
    assert isinstance(await admit(redis, req("ses_1", T0, q, end_user="u1")), Admitted)
    assert isinstance(await admit(redis, req("ses_o1", T0 + 1, q, end_user="o1")), Admitted)
    await redis.hset(s.session("ses_1"), mapping={"status": "ready", "avaturn_session_id": "av_1",
                                                    "create_state": "done"})
    out = await admit(redis, req("ses_2", T0 + 2, q, end_user="u1"))
    assert isinstance(out, Admitted) and out.replaced == ["ses_1"]
    assert await redis.hget(s.session("ses_1"), "status") == b"terminating"
    assert await redis.zscore(s.live(), "ses_1") is not None  # still holds its slot
    assert await redis.hget(s.session("ses_2"), "waits_for") == b"ses_1"
    assert out.usage.concurrency.used == 3  # both counted, honestly
    assert (await usage(redis, "ten_a", q, T0 + 3)).concurrency.used == 3
    # another end user: ses_1 + ses_2 + ses_o1 = 3, over the cap of 2 (ses_2 took ses_1's slot): refused
    refused = await admit(redis, req("ses_o2", T0 + 3, q, end_user="o2"))
    assert isinstance(refused, Refused) and refused.code == "concurrency_limit"
    # the same end user again: ses_2 (waiting, never upstream) is replaced and frees its slot at
    # once; ses_3 takes the slot and inherits the wait for ses_1 (neither counts against it:
    # 3 leases - ses_2 - ses_1 < 2)
    out = await admit(redis, req("ses_3", T0 + 4, q, end_user="u1"))
    assert isinstance(out, Admitted) and out.replaced == ["ses_2"]
    assert await redis.zscore(s.live(), "ses_2") is None
    assert await redis.hget(s.session("ses_3"), "waits_for") == b"ses_1"
    assert sorted(await redis.zrange(s.live(), 0, -1)) == [b"ses_1", b"ses_3", b"ses_o1"]
    # a create in flight counts as upstream too; a replaced session already ended is not waited for
    await redis.hset(s.session("ses_3"), mapping={"status": "provisioning", "create_state": "inflight"})
    await redis.hset(s.session("ses_1"), "status", "terminated")
    await redis.zrem(s.live(), "ses_1")
    out = await admit(redis, req("ses_4", T0 + 5, q, end_user="u1"))
    assert isinstance(out, Admitted) and out.replaced == ["ses_3"]
    assert await redis.zscore(s.live(), "ses_3") is not None
    assert await redis.hget(s.session("ses_4"), "waits_for") == b"ses_3"
