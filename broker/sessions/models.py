"""The session domain shared by the API and the workers: states, the stored record, the
wire view and the create request."""

from __future__ import annotations

import secrets
import string
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

Status = Literal["queued", "provisioning", "ready", "terminating", "terminated", "failed"]
LIVE_STATUSES: frozenset[str] = frozenset({"queued", "provisioning", "ready", "terminating"})
TERMINAL_STATUSES: frozenset[str] = frozenset({"terminated", "failed"})
TerminationReason = Literal["expired", "requested", "replaced", "tenant_disabled", "upstream_failed", "reaped"]

_ALPHABET = string.ascii_letters + string.digits


def new_session_id() -> str:
    """``ses_`` + 22 characters drawn uniformly from [A-Za-z0-9], from one urandom read
    (bytes >= 248 are rejected so ``b % 62`` is unbiased); 22 per-character calls cost 45 us."""
    while True:
        chars = [_ALPHABET[b % 62] for b in secrets.token_bytes(32) if b < 248]
        if len(chars) >= 22:
            return "ses_" + "".join(chars[:22])


def now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


_iso_second: tuple[int, str] = (-1, "")


def iso(ms: int | None) -> str | None:
    """``2026-01-02T03:04:05.678Z`` (UTC, milliseconds); the seconds part is formatted once per
    second (every answer of the API carries ``created_at``)."""
    global _iso_second
    if not ms:
        return None
    second, milli = divmod(ms, 1000)
    cached = _iso_second
    if cached[0] != second:
        cached = _iso_second = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S."))
    return f"{cached[1]}{milli:03d}Z"


class SessionRecord(msgspec.Struct, kw_only=True):
    """What a session hash in Redis holds (all values are strings there)."""

    id: str
    tenant_id: str
    status: str
    created_at: int
    ttl_seconds: int
    config: str = "{}"                   # merged OpenAI session config (JSON); MCP credentials sealed
                                         # (tenants.session_secrets), opened only by the worker
    metadata: str = "{}"
    end_user: str = ""
    ready_at: int = 0
    expires_at: int = 0
    terminating_at: int = 0
    terminated_at: int = 0
    termination_reason: str = ""
    error_code: str = ""
    error_message: str = ""
    avaturn_session_id: str = ""
    avaturn_token: str = ""
    secret_enc: str = ""                 # minted client secret, encrypted; dropped when terminal
    secret_expires_at: int = 0
    create_state: str = ""               # "" | inflight | done | unknown
    avaturn_key_enc: str = ""            # the Avaturn key of the create, encrypted (workers/jobs/session_key.py)
    attempts: int = 0                    # provisioning claims (broker/sessions/schedule.py)
    mint_at: int = 0                     # the OpenAI mint slot reserved at admission (ms); 0: none
    delete_attempts: int = 0
    waits_for: str = ""                  # replace_oldest: ids (comma-separated) of the replaced sessions
                                         # whose upstream end the create waits for (tenants/admission.py)
    traceparent: str = ""                # W3C context of the request that admitted it (tracing on)
    billable_seconds: int = -1           # recorded by the terminal transition (tenants/budget.lua); -1: not yet
    ttl_limited_by: str = ""             # "budget" when admission cut the TTL to the budget left

    def billable_at(self, at_ms: int) -> int:
        """Whole seconds ready_at -> end (rounded up; 0 if never ready): the recorded value once
        terminal, else up to ``at_ms``."""
        if self.billable_seconds >= 0:
            return self.billable_seconds
        if not self.ready_at:
            return 0
        return max(0, -(-(at_ms - self.ready_at) // 1000))

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATUSES

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> SessionRecord:
        return msgspec.convert(
            {k.decode(): v.decode() for k, v in raw.items()}, cls, strict=False
        )


class AvaturnView(msgspec.Struct):
    session_id: str
    token: str | None


class ErrorView(msgspec.Struct):
    code: str
    message: str


class SessionView(msgspec.Struct, kw_only=True):
    id: str
    status: str
    created_at: str | None
    ready_at: str | None
    expires_at: str | None
    terminated_at: str | None
    avaturn: AvaturnView | None
    end_user: str | None
    termination_reason: str | None
    error: ErrorView | None
    metadata: dict[str, str]
    billable_seconds: int = 0
    ttl_limited_by: str | None = None

    @classmethod
    def of(cls, rec: SessionRecord, at_ms: int | None = None) -> SessionView:
        """The wire view of ``rec``; ``at_ms``: when (a live session's billable seconds run
        up to it: an event renders the session as of the event), default now."""
        avaturn = None
        if rec.avaturn_session_id and rec.status in ("ready", "terminating", "terminated"):
            token = rec.avaturn_token if rec.status != "terminated" and rec.avaturn_token else None
            avaturn = AvaturnView(session_id=rec.avaturn_session_id, token=token)
        return cls(
            id=rec.id,
            status=rec.status,
            created_at=iso(rec.created_at),
            ready_at=iso(rec.ready_at),
            expires_at=iso(rec.expires_at),
            terminated_at=iso(rec.terminated_at),
            avaturn=avaturn,
            end_user=rec.end_user or None,
            termination_reason=rec.termination_reason or None,
            error=ErrorView(rec.error_code, rec.error_message) if rec.error_code else None,
            metadata=msgspec.json.decode(rec.metadata) if rec.metadata else {},
            billable_seconds=rec.billable_at(at_ms or now_ms()) if rec.ready_at else max(0, rec.billable_seconds),
            ttl_limited_by=rec.ttl_limited_by or None,
        )


class SessionList(msgspec.Struct):
    data: list[SessionView]
    next_cursor: str | None


class CreateSessionRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    session: dict[str, Any] | None = None
    ttl_seconds: int | None = None
    end_user: str | None = None
    metadata: dict[str, str] | None = None
