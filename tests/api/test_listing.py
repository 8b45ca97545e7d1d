"""Listing sessions page by page (CONTRACT.md section 14): every session exactly once for any
``limit``, sessions sharing a creation millisecond included; a crafted cursor is a 400 naming
``cursor``, never a 500. Real API (uvicorn on loopback) and real Redis."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis as sync_redis

from tests.fixtures.stack import Admin, tenant_client
from tenants.scope import TenantScope

MANY = {"quotas": {"sessions_per_minute": 1000, "max_concurrent_sessions": 1000, "sessions_per_day": 10000}}


def _walk(c: httpx.Client, limit: int, **params: Any) -> list[str]:
    seen: list[str] = []
    cursor = None
    for _ in range(500):
        q = {"limit": limit, **params, **({"cursor": cursor} if cursor else {})}
        r = c.get("/v1/sessions", params=q)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["data"]) <= limit
        seen += [s["id"] for s in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen
    raise AssertionError("the cursor never ended")


def test_every_session_is_listed_exactly_once_for_any_limit(api, admin: Admin, redis_url: str) -> None:
    """Invariant: 60 sessions created in parallel (many sharing a creation millisecond, and,
    to make sure of it, the index scores then folded into groups of ties of 1 to 11 members)
    are each listed exactly once, newest first, walking next_cursor with limit 1, 3, 7 and 100;
    a status filter walks the same way."""
    tenant, key = admin.tenant("acme", **MANY)
    with tenant_client(api.url, key) as c, ThreadPoolExecutor(12) as pool:
        created = list(pool.map(lambda _: c.post("/v1/sessions", json={}), range(60)))
        assert all(r.status_code == 202 for r in created), [r.text for r in created if r.status_code != 202]
        ids = {r.json()["id"] for r in created}
        assert len(ids) == 60
        r = sync_redis.Redis.from_url(redis_url)
        index = TenantScope(tenant["id"]).sessions_index()
        rows = r.zrange(index, 0, -1, withscores=True)
        # ties: runs of 1, 2, ... 11 members moved onto one score (the first member's)
        i, size = 0, 1
        while i < len(rows):
            group = rows[i : i + size]
            r.zadd(index, {m: group[0][1] for m, _ in group})
            i, size = i + size, size % 11 + 1
        r.close()
        for limit in (1, 3, 7, 100):
            seen = _walk(c, limit)
            assert len(seen) == 60 and set(seen) == ids, f"limit={limit}: {len(seen)} listed, {len(set(seen))} distinct"
            seen_queued = _walk(c, limit, status="queued")
            assert len(seen_queued) == 60 and set(seen_queued) == ids, f"status limit={limit}: {len(seen_queued)}"


def test_sessions_sharing_a_millisecond_are_all_listed_with_limit_1(api, admin: Admin) -> None:
    """Invariant: 60 parallel creates, walked with limit=1, list 60 distinct sessions (without
    any score rewriting: the ties the parallel creates produce themselves)."""
    _, key = admin.tenant("acme", **MANY)
    with tenant_client(api.url, key) as c, ThreadPoolExecutor(12) as pool:
        created = list(pool.map(lambda _: c.post("/v1/sessions", json={}), range(60)))
        ids = {r.json()["id"] for r in created}
        for limit in (1, 3, 7, 100):
            seen = _walk(c, limit)
            assert sorted(seen) == sorted(ids), f"limit={limit}: {len(seen)} listed"



def test_a_status_filtered_page_examines_a_bounded_slice_and_continues_with_a_cursor(
        api, admin: Admin, redis_url: str) -> None:
    """Invariant (issue 17, item 5): ``status=queued&limit=1`` over 300 retained records of
    50 KB, the one queued session the oldest, examines at most LIST_SCAN_LIMIT (200) index
    entries per call and reads no whole record that does not match (a few hundred KB from
    Redis, not the 15 MB of the records): the first page is empty with a ``next_cursor``, the
    walk lists the queued session exactly once; a ``terminated`` walk lists the other 299
    exactly once."""
    tenant, key = admin.tenant("acme", **MANY)
    r = sync_redis.Redis.from_url(redis_url)
    scope = TenantScope(tenant["id"])
    base = 1_780_000_000_000
    ids = [f"ses_bound{i:017d}" for i in range(300)]
    pad = "x" * 50_000
    with r.pipeline(transaction=False) as pipe:
        for i, sid in enumerate(ids):
            pipe.hset(scope.session(sid), mapping={
                "id": sid, "tenant_id": tenant["id"], "status": "queued" if i == 0 else "terminated",
                "created_at": base + i, "ttl_seconds": 60, "config": pad})
            pipe.zadd(scope.sessions_index(), {sid: base + i})
        pipe.execute()
    try:
        with tenant_client(api.url, key) as c:
            sent = int(r.info("stats")["total_net_output_bytes"])
            first = c.get("/v1/sessions", params={"status": "queued", "limit": 1})
            read = int(r.info("stats")["total_net_output_bytes"]) - sent
            assert first.status_code == 200, first.text
            print(f"status=queued&limit=1 over 300 records of 50 KB: {read} bytes read from Redis")
            assert read < 500_000, f"one status-filtered page read {read} bytes from Redis"
            assert first.json()["data"] == [] and first.json()["next_cursor"]  # bound reached, not the end
            assert _walk(c, 1, status="queued") == [ids[0]]
            terminated = _walk(c, 100, status="terminated")
            assert len(terminated) == 299 and set(terminated) == set(ids[1:])
            assert _walk(c, 7) == ids[::-1]  # unfiltered: newest first, each once
    finally:
        r.close()

def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


SID = b"ses_AAAAAAAAAAAAAAAAAAAAAA"
CRAFTED = [
    *(score + b"|" + SID for score in (
        b"1_0", b"5 ", "\u0663".encode(), b"5\n", b" 5", b"+5", b"-5", b"5.0", b"1e3", b"inf", b"-inf", b"nan",
        b"", b"(5", b"[5", b"0x10", b"99999999999999999999999", b"\xff\xfe", "\uff15".encode())),
    b"5|x", b"5|", b"5", b"5|ses_\x00", b"5|ses_a b", b"5|ses_a|b", b"5|ses_a:b", b"5|" + SID + b"\n", b"",
    b"\x00\x01\x02", b"|",
]


@pytest.mark.parametrize("raw", CRAFTED, ids=[repr(c) for c in CRAFTED])
def test_a_crafted_cursor_is_a_400_naming_cursor(api, admin: Admin, raw: bytes) -> None:
    """Invariant: any cursor the API did not return answers 400 with field ``cursor``."""
    _, key = admin.tenant("acme")
    with tenant_client(api.url, key) as c:
        c.post("/v1/sessions", json={})
        for cursor in (_b64(raw), _b64(raw) + "==", "!!" + _b64(raw)):
            r = c.get("/v1/sessions", params={"cursor": cursor})
            assert r.status_code == 400, (cursor, r.status_code, r.text)
            assert r.json()["error"]["field"] == "cursor"


def test_an_admin_key_not_after_beyond_the_calendar_is_a_400(api, admin: Admin) -> None:
    """Invariant: a ``not_after`` that cannot be represented in UTC is a 400 naming the field."""
    tenant, _ = admin.tenant("acme")
    for value in ("9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+14:00"):
        r = admin.http.post(f"/admin/v1/tenants/{tenant['id']}/keys", json={"not_after": value})
        assert r.status_code == 400, (value, r.status_code, r.text)
        assert r.json()["error"]["field"] == "not_after"


def test_random_cursors_are_400s_never_500s(api, admin: Admin) -> None:
    """Invariant: 300 random cursors (random bytes base64url-encoded, random printable text,
    valid-looking cursors with one byte changed) each answer 400 naming ``cursor`` (or 200 for
    the rare one that is well-formed), never a 5xx."""
    import random
    import re

    well_formed = re.compile(rb"[0-9]{1,16}\|ses_[A-Za-z0-9]{1,60}")
    rng = random.Random(17)
    _, key = admin.tenant("acme")
    cursors: list[tuple[str, bool]] = []
    for i in range(300):
        kind = i % 3
        if kind == 0:
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
            cursors.append((_b64(raw), bool(well_formed.fullmatch(raw))))
        elif kind == 1:
            text = "".join(chr(rng.randrange(32, 0x250)) for _ in range(rng.randrange(1, 30)))
            cursors.append((text, False))
        else:
            raw = bytearray(b"%d|" % rng.randrange(10**13) + SID)
            raw[rng.randrange(len(raw))] = rng.randrange(256)
            cursors.append((_b64(bytes(raw)), bool(well_formed.fullmatch(bytes(raw)))))
    with tenant_client(api.url, key) as c:
        for cursor, ok in cursors:
            r = c.get("/v1/sessions", params={"cursor": cursor})
            if ok:
                assert r.status_code == 200, (cursor, r.text)
            else:
                assert r.status_code == 400 and r.json()["error"]["field"] == "cursor", (cursor, r.status_code, r.text)


def test_crafted_admin_tenant_cursors_are_never_500s(api, admin: Admin) -> None:
    """Invariant: the admin tenant listing's cursor, crafted the same ways, is a 400 naming
    ``cursor`` or a page (a well-formed position), never a 5xx."""
    admin.tenant("acme")
    for raw in (b"1_0:x", b"5 :x", "\u0663:x".encode(), b"5\n:x", b"9" * 40 + b":ten_x", b"-5:ten_x", b"nan:x",
                b"inf:x", b"5:", b":x", b"\xff:x", b"5:ten_\x00"):
        for cursor in (_b64(raw), base64.urlsafe_b64encode(raw).decode(), "!!" + _b64(raw)):
            r = admin.http.get("/admin/v1/tenants", params={"cursor": cursor})
            assert r.status_code in (200, 400), (raw, cursor, r.status_code, r.text)
            if r.status_code == 400:
                assert r.json()["error"]["field"] == "cursor"
