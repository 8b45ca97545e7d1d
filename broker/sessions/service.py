"""The rules of the session lifecycle on the API side: create (validate, admit and schedule),
read, list, stop, and stop-all for a disabled tenant."""

from __future__ import annotations

import base64
import hashlib
import re
from typing import TYPE_CHECKING

import msgspec

from broker.core import tracing
from broker.core.errors import BudgetExhausted, Conflict, InvalidInput, NotFound, QuotaExceeded, Unprocessable
from broker.core.settings import mint_window
from tenants.admission import AdmissionRequest, Admitted, KeyReused, Refused, Replayed, admit
from tenants.budgets import BudgetExhausted as BudgetRefusal
from tenants.models import Tenant
from tenants.session_config import merge_session
from tenants.session_secrets import seal

from .jobs import JobQueue
from .models import CreateSessionRequest, SessionList, SessionRecord, SessionView, new_session_id, now_ms
from .repository import SessionRepository
from .terminal import TERMINATION_GRACE_MS

if TYPE_CHECKING:
    from tenants.crypto import CredentialCipher

MIN_TTL = 10
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_LEN = 64
MAX_METADATA_VALUE_LEN = 512
MAX_CACHED_CONFIGS = 20_000     # distinct tenant default configs kept validated (a few hundred bytes each)
LIST_SCAN_LIMIT = 200           # index entries one listing call examines at most (then a cursor)
LIST_BATCH = 100                # index entries read per round trip with a status filter
STATUS_FILTERS = ("queued", "provisioning", "ready", "terminating", "terminated", "failed")


class AdmissionRefused(QuotaExceeded):
    """A 429 of the admission script, carrying its numbers (``refused``: usage, mint pacing,
    ``retry_after_s``); the HTTP layer renders the RateLimit and Retry-After headers from them
    (:func:`broker.api.ratelimit.refusal_headers`), so the domain knows no header."""

    def __init__(self, message: str, refused: Refused, extra: dict[str, int]) -> None:
        super().__init__(message, code=refused.code, extra=extra)
        self.refused = refused


class SessionService:
    def __init__(self, repo: SessionRepository, queue: JobQueue, *, provision_deadline_s: float,
                 mint_window_s: float | None = None, cipher: CredentialCipher | None = None) -> None:
        """``mint_window_s``: a session is admitted only if its mint slot is at most this far
        ahead (``Settings.mint_window_seconds()``; default: the deadline minus the default
        margin, ``broker.core.settings.mint_window``)."""
        self.repo = repo
        self.queue = queue
        self.provision_deadline_ms = int(provision_deadline_s * 1000)
        window_s = mint_window(provision_deadline_s) if mint_window_s is None else mint_window_s
        self.mint_window_ms = int(window_s * 1000)
        self._cipher = cipher  # seals the MCP credentials of a request's own session override
        self._default_configs: dict[bytes, str] = {}

    # ---- create ---------------------------------------------------------------------------

    def _config_json(self, tenant: Tenant, req: CreateSessionRequest) -> str:
        """The merged, validated session config as stored (JSON), its MCP credentials sealed
        (:mod:`tenants.session_secrets`: the defaults' already are, so only an override's own
        credentials cost cipher work, and a config without any costs none). Without overrides it
        is the tenant's validated defaults, the same for every request: kept per distinct defaults
        (keyed by their encoding, so an updated tenant gets a fresh entry), bounded."""
        if req.session is not None:
            return msgspec.json.encode(
                seal(merge_session(tenant.openai.session, req.session, tenant.openai.allowed_overrides), self._cipher)
            ).decode()
        key = msgspec.json.encode(tenant.openai.session)
        cached = self._default_configs.get(key)
        if cached is None:  # seal(): nothing to do unless a record predates sealing
            cached = msgspec.json.encode(seal(merge_session(tenant.openai.session, None, ()), self._cipher)).decode()
            if len(self._default_configs) >= MAX_CACHED_CONFIGS:
                self._default_configs.clear()
            self._default_configs[key] = cached
        return cached

    def _checked_ttl(self, tenant: Tenant, req: CreateSessionRequest) -> int:
        """The TTL to use; also checks end_user and metadata (400 naming the field)."""
        max_ttl = tenant.quotas.max_session_seconds
        ttl = max_ttl if req.ttl_seconds is None else req.ttl_seconds
        if not MIN_TTL <= ttl <= max_ttl:
            raise InvalidInput(
                f"ttl_seconds must be between {MIN_TTL} and {max_ttl} (this tenant's max_session_seconds)",
                code="invalid_ttl",
                field="ttl_seconds",
            )
        if req.end_user is not None and not 1 <= len(req.end_user) <= 128:
            raise InvalidInput("end_user must be 1 to 128 characters", code="invalid_end_user", field="end_user")
        if req.metadata is not None:
            if len(req.metadata) > MAX_METADATA_KEYS:
                raise InvalidInput(
                    f"metadata may have at most {MAX_METADATA_KEYS} keys", code="invalid_metadata", field="metadata"
                )
            for key, value in req.metadata.items():
                if not 1 <= len(key) <= MAX_METADATA_KEY_LEN or len(value) > MAX_METADATA_VALUE_LEN:
                    raise InvalidInput(
                        f"metadata keys must be 1..{MAX_METADATA_KEY_LEN} characters and values at most "
                        f"{MAX_METADATA_VALUE_LEN}",
                        code="invalid_metadata",
                        field=f"metadata.{key[:64]}" if key else "metadata",
                    )
        return ttl

    async def create(
        self,
        tenant: Tenant,
        req: CreateSessionRequest,
        *,
        body: bytes,
        idempotency_key: str | None,
    ) -> tuple[SessionRecord, Admitted | Replayed]:
        config = self._config_json(tenant, req)
        ttl = self._checked_ttl(tenant, req)
        now = now_ms()
        sid = new_session_id()
        fields = {
            "id": sid,
            "tenant_id": tenant.id,
            "status": "queued",
            "created_at": str(now),
            "ttl_seconds": str(ttl),
            "config": config,
            "metadata": msgspec.json.encode(req.metadata or {}).decode(),
            "end_user": req.end_user or "",
        }
        tracing.stamp(fields)  # + "traceparent" (the request's span) when tracing is on
        outcome = await tracing.admission(tenant.id, sid, admit(  # the admission span
            self.repo.redis,
            AdmissionRequest(
                tenant_id=tenant.id,
                session_id=sid,
                now_ms=now,
                quotas=tenant.quotas,
                end_user=req.end_user,
                idempotency_digest=_digest(idempotency_key.encode()) if idempotency_key else None,
                body_digest=_digest(_canonical(req)) if idempotency_key else None,
                session_fields=fields,
                lease_until_ms=now + self.provision_deadline_ms + TERMINATION_GRACE_MS,
                # its mint slot, reserved here, is scheduled by the same script: no job to enqueue
                mint_window_ms=self.mint_window_ms,
                ttl_seconds=ttl,
            ),
            self.repo.execute,
        ))
        if isinstance(outcome, Refused):
            extra: dict[str, int] = {"limit": outcome.limit, "current": outcome.current,
                                     "retry_after": outcome.retry_after_s}
            if outcome.code == "provisioning_backlog":
                extra["backlog"] = outcome.current
            raise AdmissionRefused(_refusal_message(outcome), outcome, extra)
        if isinstance(outcome, BudgetRefusal):
            raise BudgetExhausted(
                f"{outcome.budget} of {outcome.limit} s is used up for this period (used {outcome.used} s, "
                f"reserved by live sessions {outcome.reserved} s); it renews at {outcome.period_end}",
                headers={"Retry-After": str(outcome.retry_after_s)},
                extra={"budget": outcome.budget, "limit": outcome.limit, "used": outcome.used,
                       "reserved": outcome.reserved, "period_end": outcome.period_end},
            )
        if isinstance(outcome, KeyReused):
            raise Unprocessable(
                "this Idempotency-Key was already used with a different request body",
                code="idempotency_key_reused",
            )
        if isinstance(outcome, Replayed):
            rec = await self.repo.get(tenant.id, outcome.session_id)
            if rec is None:  # admitted by a request that has not finished writing: impossible with one script
                raise Conflict("a request with this Idempotency-Key is still being admitted; retry shortly")
            return rec, outcome
        fields["mint_at"] = str(outcome.mint_at)  # the script stores it with the record
        for replaced in outcome.replaced:
            await self.queue.terminate(tenant.id, replaced, tag="replaced")
        # The record as the script wrote it (no read back: a worker may already be on it).
        if outcome.budget is not None:
            fields["ttl_seconds"] = str(outcome.budget.ttl_seconds)
            if outcome.budget.limited:
                fields["ttl_limited_by"] = "budget"
        return msgspec.convert(fields, SessionRecord, strict=False), outcome

    # ---- read -----------------------------------------------------------------------------

    async def get(self, tenant_id: str, session_id: str) -> SessionRecord:
        rec = await self.repo.get(tenant_id, session_id) if _plausible_id(session_id) else None
        if rec is None:
            raise NotFound("no session with this id", code="session_not_found")
        return rec

    async def list(self, tenant_id: str, *, status: str | None, limit: int, cursor: str | None) -> SessionList:
        """One page of the tenant's sessions, newest first, after ``cursor``.

        Every session is listed exactly once across the pages (the cursor is the index position
        of the last entry examined). One call examines at most :data:`LIST_SCAN_LIMIT` index
        entries: with a status filter the statuses are read first (one field per entry) and only
        the matching records in full; when the bound is reached before ``limit`` matches, the page
        is shorter than ``limit`` (even empty) and ``next_cursor`` continues from there.
        ``next_cursor`` is null only when nothing is left after the page."""
        if status is not None and status not in STATUS_FILTERS:
            raise InvalidInput(f"status must be one of {', '.join(STATUS_FILTERS)}", code="invalid_status", field="status")
        if not 1 <= limit <= 100:
            raise InvalidInput("limit must be between 1 and 100", code="invalid_limit", field="limit")
        position = _decode_cursor(cursor) if cursor is not None else None
        out: list[SessionView] = []
        examined = 0
        exhausted = False
        while len(out) < limit and examined < LIST_SCAN_LIMIT:
            room = LIST_SCAN_LIMIT - examined
            want = min(room, limit - len(out) if status is None else LIST_BATCH)
            batch = await self.repo.page_after(tenant_id, position, want)
            ids = [sid for sid, _ in batch]
            states: list[str | None] = []
            if status is None:
                records = await self.repo.get_many(tenant_id, ids)
                states = [rec.status if rec is not None else None for rec in records]
            else:
                states = await self.repo.statuses(tenant_id, ids)
                matching = [sid for sid, st in zip(ids, states, strict=True) if st == status]
                full = dict(zip(matching, await self.repo.get_many(tenant_id, matching), strict=True))
                records = [full.get(sid) if st == status else None for sid, st in zip(ids, states, strict=True)]
            gone = []
            stopped = False
            for (sid, score), rec, st in zip(batch, records, states, strict=True):
                if len(out) == limit:
                    stopped = True  # a match after the last one listed: the next page starts at it
                    break
                examined += 1
                position = (score, sid)
                if st is None:
                    gone.append(sid)
                elif rec is not None and (status is None or rec.status == status):  # (it may have moved since)
                    out.append(SessionView.of(rec))
            await self.repo.forget(tenant_id, gone)
            if not stopped and len(batch) < want:  # the index has nothing after this batch
                exhausted = True
                break
        more = not exhausted and position is not None and bool(await self.repo.page_after(tenant_id, position, 1))
        next_cursor = _encode_cursor(*position) if more and position is not None else None
        return SessionList(data=out, next_cursor=next_cursor)

    # ---- stop -----------------------------------------------------------------------------

    async def stop(self, tenant_id: str, session_id: str, reason: str = "requested") -> SessionRecord:
        """Never limited by quota. Idempotent: a terminal session is returned as it is.

        The answer is the record read before the stop job is enqueued: once it is, an idle
        worker can end the session within a millisecond (0 ms upstream), and a read after that
        turned this call's answer into "already terminated" (200) for a session it had just
        moved to ``terminating`` (202, CONTRACT.md). The expiry loop takes a stop only
        ``STOP_GRACE_MS`` after it, so before the read only a provisioning attempt already running
        can end it (when its own step sees the stop): that session is then reported as it is."""
        rec = await self.get(tenant_id, session_id)
        if rec.status in ("terminated", "failed"):
            return rec
        now = now_ms()
        if rec.status != "terminating":
            await self.repo.transition(
                rec,
                allowed="queued,provisioning,ready",
                status="terminating",
                lease=now + TERMINATION_GRACE_MS,
                due_expiry=now,
                fields={"termination_reason": reason, "terminating_at": now},
                publish=True,
            )
        current = await self.get(tenant_id, session_id)
        if current.live:
            await self.queue.terminate(tenant_id, session_id, tag="stop")
        return current

    async def stop_all(self, tenant_id: str, reason: str) -> int:
        count = 0
        for sid in await self.repo.live_ids(tenant_id):
            try:
                await self.stop(tenant_id, sid, reason)
                count += 1
            except NotFound:
                continue
        return count


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(req: CreateSessionRequest) -> bytes:
    return msgspec.json.encode(msgspec.to_builtins(req), order="sorted")


def _plausible_id(session_id: str) -> bool:
    return session_id.startswith("ses_") and 5 <= len(session_id) <= 64 and session_id.isascii() and ":" not in session_id


def _encode_cursor(score: int, sid: str) -> str:
    return base64.urlsafe_b64encode(f"{score}|{sid}".encode()).decode().rstrip("=")


_CURSOR_TEXT = re.compile(r"[A-Za-z0-9_-]{1,200}")
_CURSOR = re.compile(r"([0-9]{1,16})\|(ses_[A-Za-z0-9]{1,60})")


def _decode_cursor(cursor: str) -> tuple[int, str]:
    """``(score, session id)`` of the last entry of the previous page. Only what
    :func:`_encode_cursor` writes is accepted (ASCII digits, a session id): anything else is a
    400 naming ``cursor``, never a malformed score handed to Redis."""
    if _CURSOR_TEXT.fullmatch(cursor):
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        except (ValueError, UnicodeDecodeError):
            raw = ""
        m = _CURSOR.fullmatch(raw)
        if m:
            return int(m.group(1)), m.group(2)
    raise InvalidInput("cursor is not a cursor this API returned", code="invalid_cursor", field="cursor")


def _refusal_message(r: Refused) -> str:
    if r.code == "provisioning_backlog":
        return (f"openai_requests_per_minute of {r.limit} leaves no mint slot for a new session before its "
                f"provisioning deadline ({r.current} sessions already waiting); retry after {r.retry_after_s} s")
    what = {
        "rate_limited": "sessions_per_minute",
        "concurrency_limit": "max_concurrent_sessions",
        "daily_quota_exhausted": "sessions_per_day",
        "end_user_limit": "max_sessions_per_end_user",
    }.get(r.code, r.code)
    return f"{what} limit of {r.limit} reached (current usage {r.current}); retry after {r.retry_after_s} s"
