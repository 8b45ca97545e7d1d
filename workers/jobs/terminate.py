"""terminate_session(tenant_id, session_id): end a session upstream and record it.

Runs at ``expires_at`` (reason ``expired``), on DELETE (``requested``), on replacement
and tenant disable, and from the sweeper for anything late. Idempotent: a terminal
session is left alone; 404/410 from Avaturn count as already gone. A DELETE that keeps
failing is retried with backoff (and counted), never dropped: the session stays
``terminating`` and in the due set until it is done.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from arq import Retry

from broker.errors import NotFound
from broker.sessions.models import SessionRecord, now_ms
from tenants.crypto import CredentialError

from ..context import WorkerContext
from ..upstreams.errors import UpstreamError
from .common import TERMINATION_GRACE_MS, backoff, finish_terminated, timed

log = logging.getLogger("workers.terminate")

EARLY_TOLERANCE_MS = 50
# A create whose outcome we wait for before declaring a stopped session gone.
INFLIGHT_WAIT_MS = 45_000


class MissingCredentials(Exception):
    code = "upstream_not_configured"


async def _avaturn_key(ctx: WorkerContext, tenant_id: str) -> str:
    try:
        tenant = await ctx.tenants.get(tenant_id)
        key = ctx.tenants.credentials(tenant)[1] or ctx.settings.avaturn_api_key
    except (NotFound, CredentialError):
        key = ctx.settings.avaturn_api_key
    if key is None:
        raise MissingCredentials("no Avaturn key for this tenant or the platform")
    return key


class TerminationPending(Exception):
    """The upstream DELETE failed transiently; retry after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__(f"retry in {delay:.2f}s")
        self.delay = delay


async def terminate_session(arq_ctx: dict[str, Any], tenant_id: str, session_id: str) -> str:
    ctx: WorkerContext = arq_ctx["wc"]
    rec = await ctx.repo.get(tenant_id, session_id)
    if rec is None or rec.status in ("terminated", "failed"):
        return "noop"
    now = now_ms()
    if rec.status == "ready":
        if rec.expires_at and now + EARLY_TOLERANCE_MS < rec.expires_at:
            return "not-due"  # an early duplicate: the expiry job / sweeper will come back
        moved = await ctx.repo.transition(
            rec, allowed="ready", status="terminating", lease=now + TERMINATION_GRACE_MS,
            due_expiry=now, fields={"termination_reason": "expired", "terminating_at": now}, publish=True,
        )
        if moved.applied:  # what the transition wrote (a ready record changes no other field)
            rec = msgspec.structs.replace(rec, status="terminating", termination_reason="expired", terminating_at=now)
        elif moved.status != "ready":
            rec = await ctx.repo.get(tenant_id, session_id)
        if rec is None:
            return "noop"
    if rec.status in ("queued", "provisioning"):
        return "provisioning"  # a stop always passes through 'terminating' first; nothing to do
    if rec.status != "terminating":
        return "noop"
    try:
        return await stop_upstream_and_finish(ctx, rec)
    except TerminationPending as pending:
        raise Retry(defer=pending.delay) from None


async def stop_upstream_and_finish(ctx: WorkerContext, rec: SessionRecord) -> str:
    """For a ``terminating`` session: DELETE upstream if a session exists there, then
    record ``terminated``. Raises TerminationPending when it must be tried again."""
    now = now_ms()
    if not rec.avaturn_session_id:
        if rec.create_state == "inflight" and now - (rec.terminating_at or now) < INFLIGHT_WAIT_MS:
            # The provisioning worker is mid-create: it will see 'terminating' and delete
            # what it created. Come back in case it died.
            raise TerminationPending(2.0)
        await finish_terminated(ctx, rec, "requested")
        return "terminated"
    attempt = rec.delete_attempts + 1
    try:
        avaturn_key = await _avaturn_key(ctx, rec.tenant_id)
        await timed(ctx, "avaturn", "delete", ctx.avaturn.delete_session(avaturn_key, rec.avaturn_session_id))
    except (UpstreamError, MissingCredentials) as exc:
        code = getattr(exc, "code", "no_credentials")
        if _upstream_certainly_over(rec):
            # Avaturn ended it itself (max_duration backstop): record it instead of retrying for ever.
            log.warning("upstream delete failed (%s) after the max_duration backstop; recording terminated", code)
            await finish_terminated(ctx, rec, "expired")
            return "terminated-by-backstop"
        delay = backoff(attempt, getattr(exc, "retry_after", None))
        ctx.metrics.termination_failures.labels(code).inc()
        log.warning("upstream delete failed (%s), attempt %d; retrying in %.1fs", code, attempt, delay)
        retry_at = now_ms() + int(delay * 1000)
        await ctx.repo.transition(
            rec, allowed="terminating", lease=retry_at + TERMINATION_GRACE_MS, due_expiry=retry_at,
            fields={"delete_attempts": attempt},
        )
        raise TerminationPending(delay) from None
    await finish_terminated(ctx, rec, "requested")
    return "terminated"


def _upstream_certainly_over(rec: SessionRecord) -> bool:
    """Avaturn ends a session after ``max_duration`` (we send max(60, ttl)) on its own."""
    if not rec.ready_at:
        return False
    backstop = rec.ready_at + max(60, rec.ttl_seconds) * 1000 + 60_000
    return now_ms() > backstop
