"""Tracking the sessions a fault test admits, and checking the invariants of issue 4 against
the broker's Redis state and the sandbox audit.

Each session is created with a unique ``instructions`` marker. The sandbox audit records the
session config of every minted secret and the secret fingerprint of every Avaturn session, so
each upstream session maps back to the broker session it was created for, recorded or not.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis as sync_redis

from broker.sessions.models import SessionRecord
from tests.fixtures.stack import tenant_client
from tests.fixtures.wait import wait_until
from tenants.scope import TenantScope

SETTLED = frozenset({"ready", "terminated", "failed"})
FINAL = frozenset({"terminated", "failed"})
MAX_DURATION_FLOOR = 60  # Avaturn's minimum max_duration; the broker sends max(60, ttl)


@dataclass
class Tracked:
    sid: str
    label: str
    ttl: int
    admitted_at: float  # time.time() of the 2xx answer


@dataclass
class Upstream:
    """The upstream sessions of the tracked broker sessions, grouped by broker session."""

    by_sid: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    unmapped: list[dict[str, Any]] = field(default_factory=list)
    secrets_by_sid: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Ledger:
    """The sessions of one tenant that a test created, read back from the API and Redis."""

    def __init__(self, api_url: str, key: str, tenant_id: str, redis_url: str) -> None:
        self.client: httpx.Client = tenant_client(api_url, key)
        self.tenant_id = tenant_id
        self.redis = sync_redis.Redis.from_url(redis_url)
        self.sessions: dict[str, Tracked] = {}

    def close(self) -> None:
        self.client.close()
        self.redis.close()

    def create(self, ttl: int = 10, wait: int = 0, **body: Any) -> str:
        label = f"fault-{uuid.uuid4().hex[:12]}"
        params = {"wait": str(wait)} if wait else None
        r = self.client.post("/v1/sessions", params=params, json={"ttl_seconds": ttl, **body,
                                                                   "session": {"instructions": label}})
        assert r.status_code in (201, 202), r.text
        sid = r.json()["id"]
        self.sessions[sid] = Tracked(sid, label, ttl, time.time())
        return sid

    def view(self, sid: str) -> dict[str, Any]:
        r = self.client.get(f"/v1/sessions/{sid}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def record(self, sid: str) -> SessionRecord:
        raw = self.redis.hgetall(TenantScope(self.tenant_id).session(sid))
        assert raw, f"session {sid} vanished from Redis"
        return SessionRecord.from_hash(raw)  # type: ignore[arg-type]

    def statuses(self) -> dict[str, str]:
        return {sid: self.record(sid).status for sid in self.sessions}

    def wait_for(self, sids: list[str] | None, statuses: frozenset[str] | set[str], timeout: float) -> float:
        """Wait until every session in ``sids`` (default all) has one of ``statuses``; returns the seconds waited."""
        start = time.monotonic()
        targets = list(self.sessions) if sids is None else sids
        last: dict[str, str] = {}

        def reached() -> bool:
            last.update({sid: self.record(sid).status for sid in targets})
            return all(s in statuses for s in last.values())

        wait_until(reached, timeout, f"every session {sorted(statuses)}", interval=0.1,
                   state=lambda: f"still {({sid: st for sid, st in last.items() if st not in statuses})}")
        return time.monotonic() - start

    def live_slots(self) -> int:
        return int(self.redis.zcard(TenantScope(self.tenant_id).live()))

    def usage_active(self) -> int:
        r = self.client.get("/v1/usage")
        assert r.status_code == 200, r.text
        return int(r.json()["active_sessions"])

    def upstream(self, audit: dict[str, Any]) -> Upstream:
        label_to_sid = {t.label: sid for sid, t in self.sessions.items()}
        secret_to_sid: dict[str, str] = {}
        out = Upstream()
        for secret in audit["secrets"]:
            sid = label_to_sid.get((secret.get("session") or {}).get("instructions", ""))
            if sid is not None:
                secret_to_sid[secret["secret_fingerprint"]] = sid
                out.secrets_by_sid[sid] += 1
        for up in audit["sessions"]:
            sid = secret_to_sid.get(up["secret_fingerprint"])
            if sid is None:
                out.unmapped.append(up)
            else:
                out.by_sid[sid].append(up)
        return out


@dataclass
class Report:
    """What the invariant check measured (tests print it; the README quotes it)."""

    statuses: dict[str, int]
    duplicates: int
    max_lateness_s: float
    orphans: list[dict[str, Any]]

    def __str__(self) -> str:
        return (f"statuses {self.statuses}, duplicate upstream sessions {self.duplicates}, "
                f"max DELETE lateness {self.max_lateness_s}s")


def check_invariants(
    ledger: Ledger,
    audit: dict[str, Any],
    *,
    lateness_bound_s: float,
    max_duplicates: int = 0,
    final: bool = True,
) -> Report:
    """Assert the invariants of issue 4 over every session of ``ledger``:

    1. none stuck: every session is ``terminated`` or ``failed`` (``final``) or also ``ready``;
    2. every upstream session the broker recorded is ended upstream once the broker session is
       terminated, no later than its due time (``expires_at``, or when it was stopped if that was
       earlier) + ``lateness_bound_s``; a failed session leaves no live upstream session it recorded;
    3. at most one upstream session per broker session, except ``max_duplicates`` second ones
       (the create-outcome-unknown window); every upstream session the broker did not record
       (an orphan: nobody holds its token) is bounded by Avaturn itself: ``max_duration ==
       max(60, ttl)`` (see :func:`assert_orphans_end_by_backstop`);
    4. every concurrency slot released: the tenant's ``live`` zset holds exactly the sessions
       still ready, and ``GET /v1/usage`` agrees.
    """
    allowed = FINAL if final else SETTLED
    records = {sid: ledger.record(sid) for sid in ledger.sessions}
    counts: dict[str, int] = defaultdict(int)
    for sid, rec in records.items():
        counts[rec.status] += 1
        assert rec.status in allowed, f"{sid} is stuck in {rec.status} (create_state={rec.create_state!r})"
    up = ledger.upstream(audit)
    assert not up.unmapped, f"upstream sessions no broker session asked for: {up.unmapped}"
    duplicates = 0
    orphans: list[dict[str, Any]] = []
    max_lateness = float("-inf")
    for sid, rec in records.items():
        ups = up.by_sid.get(sid, [])
        ttl = ledger.sessions[sid].ttl
        recorded = [u for u in ups if u["session_id"] == rec.avaturn_session_id]
        extra = [u for u in ups if u["session_id"] != rec.avaturn_session_id]
        if rec.avaturn_session_id:
            assert len(recorded) == 1, f"{sid} recorded upstream {rec.avaturn_session_id} that was never created"
        duplicates += max(0, len(ups) - 1)
        orphans += extra
        for u in ups:
            assert u["max_duration"] == max(MAX_DURATION_FLOOR, ttl), f"{sid}: max_duration {u['max_duration']}"
        if rec.status == "terminated" and recorded:
            u = recorded[0]
            assert not u["live"], f"{sid} is terminated but its upstream session is still live"
            due = min(t for t in (rec.expires_at, rec.terminating_at) if t) / 1000  # expiry or the stop
            lateness = (u["ended_at"] or 0) - due
            max_lateness = max(max_lateness, lateness)
            assert lateness <= lateness_bound_s, f"{sid}: upstream ended {lateness:.1f}s after it was due"
        if rec.status == "failed":
            assert not any(u["live"] for u in recorded), f"{sid} failed but left its upstream session live"
    assert duplicates <= max_duplicates, f"{duplicates} upstream sessions created twice (allowed {max_duplicates})"
    still_held = sum(1 for rec in records.values() if rec.status == "ready")
    assert ledger.live_slots() == still_held, f"live zset holds {ledger.live_slots()} slots, {still_held} expected"
    assert ledger.usage_active() == still_held
    return Report(statuses=dict(counts), duplicates=duplicates, max_lateness_s=round(max(max_lateness, 0.0), 2),
                  orphans=orphans)


def assert_orphans_end_by_backstop(sandbox: Any, report: Report) -> None:
    """The extra upstream sessions (nobody holds their token) end by ``max_duration``: move the
    sandbox clock past the longest one and check that no upstream session is left live."""
    if not report.orphans:
        return
    longest = max(u["max_duration"] for u in report.orphans)
    sandbox.advance_clock(longest + 1)
    live = [u for u in sandbox.audit()["sessions"] if u["live"]]
    assert not live, f"upstream sessions outlived their max_duration backstop: {live}"
