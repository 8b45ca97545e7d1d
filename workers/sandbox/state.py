"""In-memory state of the sandbox upstreams: minted secrets, Avaturn sessions, deletes, counters.

Everything lives on the server's one event loop, so no locks. Histories are bounded
(``cap`` entries each, oldest dropped first). Secrets are never stored: only their sha256
(``fingerprint``), which is also how tests match a secret they saw to the audit.
The clock is ``time.time()`` plus an offset that ``POST /_sandbox/clock`` can advance, so
tests can let ``max_duration`` or a secret's lifetime elapse without waiting.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, deque
from typing import Any

import msgspec

from workers.sandbox.faults import OPERATIONS, FaultPlan
from workers.sandbox.webhooks import Receivers

DEFAULT_CAP = 200_000


def fingerprint(value: str) -> str:
    """sha256 hex of a secret or key: what the audit records instead of the value."""
    return hashlib.sha256(value.encode()).hexdigest()


class SecretRecord(msgspec.Struct, kw_only=True):
    secret_fingerprint: str
    key_fingerprint: str
    session: dict[str, Any]
    expires_after_seconds: int
    created_at: float
    expires_at: int


class SessionRecord(msgspec.Struct, kw_only=True):
    session_id: str
    created_at: float
    max_duration: int
    avatar_id: str
    background: str
    user_absent_timeout: int
    secret_fingerprint: str
    key_fingerprint: str
    deleted_at: float | None = None
    ended_at: float | None = None
    ended_by: str | None = None
    live: bool = True


class DeleteRecord(msgspec.Struct, kw_only=True):
    session_id: str
    at: float
    status: int
    key_fingerprint: str | None


class SandboxState:
    def __init__(self, cap: int = DEFAULT_CAP) -> None:
        self.cap = cap
        self.reset()

    def reset(self) -> None:
        self.clock_offset = 0.0
        self.faults = FaultPlan()
        self.secrets: dict[str, SecretRecord] = {}
        self.minted: deque[SecretRecord] = deque(maxlen=self.cap)
        self.sessions: dict[str, SessionRecord] = {}
        self.deletes: deque[DeleteRecord] = deque(maxlen=self.cap)
        self.counters: dict[str, Counter[str]] = {op: Counter() for op in OPERATIONS}
        self.receivers = Receivers(self.cap)

    def now(self) -> float:
        return time.time() + self.clock_offset

    def count(self, op: str, what: str) -> None:
        self.counters[op][what] += 1

    # -- OpenAI -------------------------------------------------------------------------

    def add_secret(self, value: str, key: str, session: dict[str, Any], seconds: int) -> SecretRecord:
        now = self.now()
        record = SecretRecord(
            secret_fingerprint=fingerprint(value),
            key_fingerprint=fingerprint(key),
            session=session,
            expires_after_seconds=seconds,
            created_at=now,
            expires_at=int(now) + seconds,
        )
        self.secrets[record.secret_fingerprint] = record
        if len(self.secrets) > self.cap:
            del self.secrets[next(iter(self.secrets))]
        self.minted.append(record)
        return record

    def usable_secret(self, value: str) -> SecretRecord | None:
        """The record of a secret this sandbox minted and that has not expired yet."""
        record = self.secrets.get(fingerprint(value))
        if record is None or self.now() >= record.expires_at:
            return None
        return record

    # -- Avaturn ------------------------------------------------------------------------

    def add_session(self, record: SessionRecord) -> None:
        self.sessions[record.session_id] = record
        if len(self.sessions) > self.cap:
            del self.sessions[next(iter(self.sessions))]

    def refresh(self, record: SessionRecord, now: float) -> None:
        """End ``record`` by itself once its ``max_duration`` has elapsed."""
        if record.live and now >= record.created_at + record.max_duration:
            record.live = False
            record.ended_by = "max_duration"
            record.ended_at = record.created_at + record.max_duration

    def delete_session(self, session_id: str, key: str) -> int:
        """End a live session now; 200, or 404 when unknown, not this key's, or already ended."""
        now = self.now()
        key_fp = fingerprint(key)
        record = self.sessions.get(session_id)
        status = 404
        if record is not None and record.key_fingerprint == key_fp:
            self.refresh(record, now)
            if record.live:
                record.live = False
                record.deleted_at = now
                record.ended_at = now
                record.ended_by = "delete"
                status = 200
        self.deletes.append(DeleteRecord(session_id=session_id, at=now, status=status, key_fingerprint=key_fp))
        return status

    # -- audit --------------------------------------------------------------------------

    def live_count(self) -> int:
        now = self.now()
        live = 0
        for record in self.sessions.values():
            self.refresh(record, now)
            live += record.live
        return live

    def summary(self) -> dict[str, Any]:
        return {
            "now": self.now(),
            "clock_offset": self.clock_offset,
            "live_sessions": self.live_count(),
            "counters": {op: dict(c) for op, c in self.counters.items()},
        }

    def audit(self) -> dict[str, Any]:
        out = self.summary()  # refreshes every session first
        out["secrets"] = list(self.minted)
        out["sessions"] = list(self.sessions.values())
        out["deletes"] = list(self.deletes)
        out["config"] = self.faults.describe()
        return out
