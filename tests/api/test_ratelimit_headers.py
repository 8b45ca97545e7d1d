"""RateLimit-Policy / RateLimit / Retry-After header fields: valid Structured Field Lists
(parsed with http_sfv) carrying the draft-ietf-httpapi-ratelimit-headers parameters
(q, w, qu on policies; r, t on service limits) with the snapshot's values."""

from __future__ import annotations

from typing import Any

import http_sfv
import redis.asyncio as aioredis

from broker.api.ratelimit import ratelimit_headers, refusal_headers
from tenants.admission import AdmissionRequest, Admitted, Refused, admit
from tenants.models import Quotas
from tenants.usage import QuotaUsage, UsageSnapshot


def parse(value: str) -> dict[str, dict[str, Any]]:
    """Structured-field List -> {policy name: parameters}; fails on invalid syntax."""
    sf = http_sfv.List()
    sf.parse(value.encode())
    out: dict[str, dict[str, Any]] = {}
    for item in sf:
        assert isinstance(item, http_sfv.Item) and isinstance(item.value, str)
        assert item.value not in out
        out[item.value] = dict(item.params)
    return out


def snapshot(with_end_user: bool = False) -> UsageSnapshot:
    return UsageSnapshot(
        minute=QuotaUsage.of(60, 1, 60),
        day=QuotaUsage.of(1000, 1, 50_000),
        concurrency=QuotaUsage.of(10, 1, 0),
        end_user=QuotaUsage.of(2, 1, 0) if with_end_user else None,
    )


def test_headers_are_structured_field_lists() -> None:
    """Invariant: both fields parse as sf-lists of string items with the expected params."""
    h = ratelimit_headers(snapshot())
    assert set(h) == {"RateLimit-Policy", "RateLimit"}
    assert parse(h["RateLimit-Policy"]) == {
        "minute": {"q": 60, "w": 60},
        "day": {"q": 1000, "w": 86400},
        "concurrency": {"q": 10, "qu": "concurrent-requests"},
    }
    assert parse(h["RateLimit"]) == {
        "minute": {"r": 59, "t": 60},
        "day": {"r": 999, "t": 50_000},
        "concurrency": {"r": 9},
    }


def test_end_user_policy_and_no_reset_when_nothing_used() -> None:
    """Invariant: the end-user cap is listed when present; `t` is omitted when nothing is
    waiting to be freed; remaining is never negative (a lowered limit)."""
    snap = snapshot(with_end_user=True)
    snap.minute = QuotaUsage.of(60, 0, 0)
    snap.concurrency = QuotaUsage.of(3, 5, 0)
    h = ratelimit_headers(snap)
    assert parse(h["RateLimit-Policy"])["end_user"] == {"q": 2, "qu": "concurrent-requests"}
    limits = parse(h["RateLimit"])
    assert limits["end_user"] == {"r": 1}
    assert limits["minute"] == {"r": 60}
    assert limits["concurrency"] == {"r": 0}


async def test_refusal_headers_from_a_real_refusal(redis: aioredis.Redis) -> None:
    """Invariant: a 429's Retry-After equals the refusal's retry_after and the exhausted
    policy shows r=0 with t equal to Retry-After (the draft: Retry-After not earlier
    than the end of the effective window)."""
    q = Quotas(sessions_per_minute=2, sessions_per_day=10, max_concurrent_sessions=5)
    now = 1_795_000_000_000

    def req(sid: str, at: int) -> AdmissionRequest:
        return AdmissionRequest(
            tenant_id="ten_h", session_id=sid, now_ms=at, quotas=q, session_fields={"status": "queued"},
            lease_until_ms=at + 60_000, mint_window_ms=40_000,
        )

    first = await admit(redis, req("ses_1", now))
    assert isinstance(first, Admitted)
    assert parse(ratelimit_headers(first.usage)["RateLimit"])["minute"] == {"r": 1, "t": 60}
    assert isinstance(await admit(redis, req("ses_2", now + 10_000)), Admitted)
    refused = await admit(redis, req("ses_3", now + 15_500))
    assert isinstance(refused, Refused)
    h = refusal_headers(refused)
    assert h["Retry-After"] == "45" == str(refused.retry_after_s)
    limits = parse(h["RateLimit"])
    assert limits["minute"] == {"r": 0, "t": 45}
    assert limits["day"]["r"] == 8
    assert limits["concurrency"] == {"r": 3}
    assert parse(h["RateLimit-Policy"])["minute"] == {"q": 2, "w": 60}


def test_mint_policy_item() -> None:
    """Invariant: the mint pacing is one more sf-list item "mint" with q (mints per minute) and
    w=60; its state has r (sessions that still fit now) and t only when r is 0."""
    h = ratelimit_headers(snapshot(), QuotaUsage(limit=300, used=12, remaining=0, reset_s=2))
    assert parse(h["RateLimit-Policy"])["mint"] == {"q": 300, "w": 60}
    assert parse(h["RateLimit"])["mint"] == {"r": 0, "t": 2}
    h = ratelimit_headers(snapshot(with_end_user=True), QuotaUsage(limit=300, used=0, remaining=209, reset_s=0))
    assert list(parse(h["RateLimit"])) == ["minute", "day", "concurrency", "end_user", "mint"]
    assert parse(h["RateLimit"])["mint"] == {"r": 209}


async def test_backlog_refusal_headers_from_a_real_refusal(redis: aioredis.Redis) -> None:
    """Invariant: a provisioning_backlog refusal's Retry-After is the mint item's t (r=0),
    whole seconds until the next slot is within the window; the other policies are intact."""
    q = Quotas(openai_requests_per_minute=60, max_concurrent_sessions=100)  # T = 1 s, burst 10
    now = 1_795_000_000_000

    def req(sid: str, at: int) -> AdmissionRequest:
        return AdmissionRequest(
            tenant_id="ten_m", session_id=sid, now_ms=at, quotas=q, session_fields={"status": "queued"},
            lease_until_ms=at + 60_000, mint_window_ms=2_500,
        )

    for i in range(12):  # 10 at now, then now + 1 s and now + 2 s
        out = await admit(redis, req(f"ses_{i}", now))
        assert isinstance(out, Admitted)
    assert parse(ratelimit_headers(out.usage, out.mint)["RateLimit"])["mint"] == {"r": 0, "t": 1}
    refused = await admit(redis, req("ses_x", now))
    assert isinstance(refused, Refused) and refused.code == "provisioning_backlog"
    h = refusal_headers(refused)
    assert h["Retry-After"] == "1" == str(refused.retry_after_s)  # slot now + 3 s, window ends at now + 2.5 s
    limits = parse(h["RateLimit"])
    assert limits["mint"] == {"r": 0, "t": 1}
    assert limits["minute"] == {"r": 60 - 12, "t": 60}
    assert parse(h["RateLimit-Policy"])["mint"] == {"q": 60, "w": 60}
