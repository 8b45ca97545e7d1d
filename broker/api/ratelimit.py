"""``RateLimit-Policy`` / ``RateLimit`` header fields (draft-ietf-httpapi-ratelimit-headers,
-10/-11: Structured Field Lists of String items with parameters) and ``Retry-After``.

``RateLimit-Policy`` names each quota policy with its quota ``q`` and window ``w`` (seconds)::

    RateLimit-Policy: "minute";q=60;w=60, "day";q=1000;w=86400,
                      "concurrency";q=10;qu="concurrent-requests"

``RateLimit`` gives, per policy, the available quota ``r`` and, where more becomes
available at a known time, ``t`` (seconds)::

    RateLimit: "minute";r=59;t=60, "day";r=999;t=50000, "concurrency";r=9

The per-end-user cap is listed as the policy ``"end_user"`` when the request named one.
``t`` is left out when nothing is waiting to be freed (an empty minute window) and for the
concurrency policies (a slot frees when a session ends, which is not known in advance).

The mint pacing (``openai_requests_per_minute``, checked at admission: a session is admitted
only if its mint slot comes before its provisioning deadline) is the policy ``"mint"``, on
admissions and refusals: ``q`` mints per ``w=60`` s; ``r`` = sessions that would still be
admitted now under that rule, ``t`` (only when ``r`` is 0) = seconds until one more would
(the ``Retry-After`` of a ``provisioning_backlog`` refusal)::

    RateLimit-Policy: ..., "mint";q=300;w=60
    RateLimit: ..., "mint";r=0;t=3
"""

from __future__ import annotations

from tenants.admission import Refused
from tenants.usage import QuotaUsage, UsageSnapshot

_CONCURRENT = 'qu="concurrent-requests"'


def _state(name: str, quota: QuotaUsage) -> str:
    remaining = quota.remaining
    item = f'"{name}";r={remaining if remaining > 0 else 0}'
    return item + f";t={int(quota.reset_s)}" if quota.reset_s > 0 else item


def _limit(quota: QuotaUsage) -> int:
    return quota.limit if quota.limit > 0 else 0


def ratelimit_headers(usage: UsageSnapshot, mint: QuotaUsage | None = None) -> dict[str, str]:
    """Both fields, built directly (on every admission: no per-policy lists and joins);
    ``mint``: the admission's mint pacing (``Admitted.mint`` / ``Refused.mint``)."""
    minute, day, concurrency, end_user = usage.minute, usage.day, usage.concurrency, usage.end_user
    policy = (f'"minute";q={_limit(minute)};w=60, "day";q={_limit(day)};w=86400, '
              f'"concurrency";q={_limit(concurrency)};{_CONCURRENT}')
    state = f'{_state("minute", minute)}, {_state("day", day)}, {_state("concurrency", concurrency)}'
    if end_user is not None:
        policy += f', "end_user";q={_limit(end_user)};{_CONCURRENT}'
        state += ", " + _state("end_user", end_user)
    if mint is not None:
        policy += f', "mint";q={_limit(mint)};w=60'
        state += ", " + _state("mint", mint)
    return {"RateLimit-Policy": policy, "RateLimit": state}


def ratelimit_header_items(
    usage: UsageSnapshot, mint: QuotaUsage | None = None
) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    """The same two fields as ASGI header items (lower-case names, latin-1 values)."""
    h = ratelimit_headers(usage, mint)
    return (b"ratelimit-policy", h["RateLimit-Policy"].encode()), (b"ratelimit", h["RateLimit"].encode())


def refusal_headers(refused: Refused) -> dict[str, str]:
    """Headers of a 429: the RateLimit fields and ``Retry-After`` (delay-seconds, >= 1)."""
    headers = ratelimit_headers(refused.usage, refused.mint)
    headers["Retry-After"] = str(max(1, int(refused.retry_after_s)))
    return headers
