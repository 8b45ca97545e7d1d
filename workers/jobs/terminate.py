"""Ending sessions upstream and recording it.

Most terminations are run by the expiry loop (``workers/expiry.py``), which claims every due
session of ``sb:due:expiry`` in batches. ``terminate_session(tenant_id, session_id)`` is the
arq job for the rare immediate ones: a stop (DELETE), a replacement, a tenant disable. Both
take the session through the same claim (``claim.py``) and end it with
:func:`stop_upstream_and_finish`, so a stop job and the loop racing on one session do one
DELETE (at worst two, the second answered 404 = gone) and one terminal transition.

Idempotent: a terminal session is left alone; 404/410 from Avaturn count as already gone, the
DELETE being sent with the key that created the session (``session_key.py``), never another.
A DELETE that keeps failing is retried with backoff (and counted), never dropped: the session
stays ``terminating`` and in the due set at its retry time, where the expiry loop takes it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from broker.core import tracing
from broker.sessions.models import SessionRecord, now_ms
from broker.sessions.terminal import TERMINATION_GRACE_MS

from ..context import WorkerContext
from ..upstreams.errors import UpstreamError
from .claim import HELD_LEASE_MS, ClaimKeeper, TerminationClaims
from .common import backoff, finish_terminated, timed
from .session_key import MissingCredentials, SessionKeyUndecryptable, delete_key

log = logging.getLogger("workers.terminate")

EARLY_TOLERANCE_MS = 50
# A create whose outcome we wait for before declaring a stopped session gone.
INFLIGHT_WAIT_MS = 45_000
INFLIGHT_RECHECK_MS = 2_000


class TerminationPending(Exception):
    """The upstream DELETE failed transiently; retry after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__(f"retry in {delay:.2f}s")
        self.delay = delay


async def terminate_session(arq_ctx: dict[str, Any], tenant_id: str, session_id: str) -> str:
    """An immediate termination (stop, replacement, tenant disable; ``expire`` jobs from before
    the expiry loop): claim the session if it is due, end it. A session claimed by another
    worker, or waiting for its retry time, is left to that claim / the expiry loop."""
    ctx: WorkerContext = arq_ctx["wc"]
    claims: TerminationClaims = arq_ctx.get("claims") or TerminationClaims(ctx.redis)
    keeper: ClaimKeeper | None = arq_ctx.get("keeper")
    now = now_ms()
    # Without a keeper (a bare job context) nobody renews the claim: it must outlast one DELETE.
    lease = HELD_LEASE_MS if keeper is not None else int(ctx.settings.upstream_timeout_seconds * 1000) + HELD_LEASE_MS
    [claim] = await claims.claim([(tenant_id, session_id)], now=now, due_until=now + EARLY_TOLERANCE_MS,
                                 claim_until=now + lease, lease=now + TERMINATION_GRACE_MS)
    if claim.record is None:
        return {"gone": "noop", "not_due": "not-due"}.get(claim.outcome, claim.outcome)
    return await end_claimed(ctx, claim.record, keeper=keeper)


Finish = Callable[[SessionRecord, str], Awaitable[object]]


async def end_claimed(ctx: WorkerContext, rec: SessionRecord, finish: Finish | None = None,
                      keeper: ClaimKeeper | None = None) -> str:
    """End a claimed ``terminating`` session, its claim renewed by ``keeper`` meanwhile; a
    failure leaves it scheduled for its retry."""
    held = keeper.hold(rec.tenant_id, rec.id) if keeper is not None else contextlib.nullcontext()
    try:
        with held:
            return await stop_upstream_and_finish(ctx, rec, finish)
    except TerminationPending:
        return "retry-scheduled"


async def stop_upstream_and_finish(ctx: WorkerContext, rec: SessionRecord, finish: Finish | None = None) -> str:
    # issue 23: the termination's own trace, linked to the session's creation
    with tracing.termination(rec.tenant_id, rec.id, rec.traceparent) as step:
        return step.outcome(await _stop_upstream_and_finish(ctx, rec, finish))


async def _stop_upstream_and_finish(ctx: WorkerContext, rec: SessionRecord, finish: Finish | None = None) -> str:
    """For a ``terminating`` session: DELETE upstream if a session exists there, then
    record ``terminated`` (``finish``: ``finish_terminated`` or the expiry loop's batch of
    it). When it must be tried again, records the retry time (its score in the due set,
    where the expiry loop takes it) and raises TerminationPending."""
    record: Finish = finish if finish is not None else functools.partial(finish_terminated, ctx)
    now = now_ms()
    if not rec.avaturn_session_id:
        if rec.create_state == "inflight" and now - (rec.terminating_at or now) < INFLIGHT_WAIT_MS:
            # The provisioning worker is mid-create: it will see 'terminating' and delete
            # what it created. Come back in case it died.
            await ctx.repo.transition(rec, allowed="terminating", due_expiry=now + INFLIGHT_RECHECK_MS)
            raise TerminationPending(INFLIGHT_RECHECK_MS / 1000)
        await record(rec, "requested")
        return "terminated"
    attempt = rec.delete_attempts + 1
    try:
        # The key that created the session (session_key.py): a 404 from it, and only from it, is "gone".
        avaturn_key = await delete_key(ctx, rec)
        await timed(ctx, "avaturn", "delete", ctx.avaturn.delete_session(avaturn_key, rec.avaturn_session_id))
    except (UpstreamError, MissingCredentials, SessionKeyUndecryptable) as exc:
        code = getattr(exc, "code", "no_credentials")
        if _upstream_certainly_over(rec):
            # Avaturn ended it itself (max_duration backstop): record it instead of retrying for ever.
            log.warning("upstream delete failed (%s) after the max_duration backstop; recording terminated", code)
            await record(rec, "expired")
            return "terminated-by-backstop"
        delay = backoff(attempt, getattr(exc, "retry_after", None))
        ctx.metrics.termination_failures.labels(code).inc()
        if isinstance(exc, SessionKeyUndecryptable):
            # Never another key (the tenant's current one, the platform's): its 404 would end nothing.
            log.warning("upstream delete not sent (%s: BROKER_SECRET_KEY lacks the key that encrypted the session's "
                        "Avaturn key), attempt %d; the session stays terminating, retrying in %.1fs", code, attempt, delay)
        else:
            log.warning("upstream delete failed (%s), attempt %d; retrying in %.1fs", code, attempt, delay)
        retry_at = now_ms() + int(delay * 1000)
        await ctx.repo.transition(
            rec, allowed="terminating", lease=retry_at + TERMINATION_GRACE_MS, due_expiry=retry_at,
            fields={"delete_attempts": attempt},
        )
        raise TerminationPending(delay) from None
    await record(rec, "requested")
    return "terminated"


def _upstream_certainly_over(rec: SessionRecord) -> bool:
    """Avaturn ends a session after ``max_duration`` (we send max(60, ttl)) on its own."""
    if not rec.ready_at:
        return False
    backstop = rec.ready_at + max(60, rec.ttl_seconds) * 1000 + 60_000
    return now_ms() > backstop
