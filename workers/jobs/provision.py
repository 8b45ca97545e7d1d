"""Provisioning one claimed session: mint the OpenAI client secret at the session's mint slot,
create the Avaturn session, record ``ready`` and schedule the termination.

The provisioning loop (``workers/provisioning.py``) claims the session from the provisioning
schedule (``broker/sessions/schedule.py``: the claim moved it to ``provisioning`` and leased
it to this worker) and runs :func:`provision_claimed`. Progress is recorded before each
upstream call so a re-run (after a crash, a retry or a SIGKILL: another worker claims it once
the lease runs out) reuses what exists: a minted secret is reused while valid;
``create_state`` says whether an Avaturn create may have happened (see "Crash safety"). A
transient upstream failure reschedules the same session at the retry time: the mint slot was
reserved once, at admission, and is never taken again. A session stopped meanwhile never
stays alive upstream: whoever sees the stop after a successful create deletes the upstream
session.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec

from broker.core import tracing
from broker.core.errors import NotFound
from broker.sessions.models import SessionRecord, now_ms
from broker.sessions.repository import TransitionResult
from broker.sessions.schedule import Claimed
from broker.sessions.terminal import TERMINATION_GRACE_MS
from tenants.crypto import CredentialError
from tenants.models import Tenant
from tenants.session_secrets import SEALED_PREFIX, mentions, unseal

from ..context import WorkerContext
from ..upstreams.errors import UpstreamError, UpstreamRejected, UpstreamUnavailable
from .common import REDIS_ERRORS, backoff, deadline_message, fail_session, patiently, timed
from .session_key import inflight_mark
from .terminate import TerminationPending, stop_upstream_and_finish

log = logging.getLogger("workers.provision")

SECRET_REUSE_MARGIN_MS = 30_000
# A session claimed before its mint slot (only with clocks apart between the API that reserved
# it and this worker) waits for it here when it is this close, else it is rescheduled at it.
MAX_INLINE_MINT_WAIT = 5.0


class Rescheduled(Exception):
    """The attempt ended with the session rescheduled at ``at_ms`` (a retry, or its mint slot)."""

    def __init__(self, at_ms: int, reason: str) -> None:
        super().__init__(f"rescheduled at {at_ms} ({reason})")
        self.at_ms = at_ms
        self.reason = reason


class _NotYet(Exception):
    def __init__(self, at_ms: int) -> None:
        self.at_ms = at_ms


async def provision_claimed(ctx: WorkerContext, claimed: Claimed) -> str:
    """Run one attempt at a session this worker claimed; returns what happened ("ready",
    "deadline", "rejected", ...). Raises :class:`Rescheduled` when the session was put back in
    the schedule for a later attempt, and Redis errors as they come (the claim's lease then
    runs out and a worker takes the session again)."""
    rec = claimed.record
    # the consumer span of this provisioning, child of the request that admitted it
    with tracing.provisioning(rec.tenant_id, rec.id, rec.traceparent) as step:
        return step.outcome(await _provision(ctx, claimed))


async def _provision(ctx: WorkerContext, claimed: Claimed) -> str:
    rec = claimed.record
    deadline_ms = int(ctx.settings.provision_deadline_seconds * 1000)
    deadline = rec.created_at + deadline_ms
    if now_ms() >= deadline:
        await _fail(ctx, rec, "provision_deadline_exceeded", deadline_message(rec), reason="reaped")
        return "deadline"
    try:
        tenant: Tenant | None = await ctx.tenants.get(rec.tenant_id)  # the worker's cache (tenants/tenant_cache.py)
    except NotFound:
        tenant = None
    if tenant is None:
        await _fail(ctx, rec, "tenant_not_found", "The tenant no longer exists.")
        return "no-tenant"
    if not tenant.active:
        await _fail(ctx, rec, "tenant_disabled", "The tenant is disabled.", reason="tenant_disabled")
        return "disabled"
    if claimed.before == "queued":
        ctx.metrics.queue_wait.observe(max(0.0, (now_ms() - rec.created_at) / 1000))

    try:
        openai_key, avaturn_key = _credentials(ctx, tenant)
    except CredentialError:
        await _fail(ctx, rec, "credential_decrypt_failed",
                    "The tenant's stored upstream credentials cannot be decrypted with BROKER_SECRET_KEY.")
        return "credentials"
    if openai_key is None or avaturn_key is None:
        which = "OpenAI" if openai_key is None else "Avaturn"
        await _fail(ctx, rec, "upstream_not_configured",
                    f"No {which} API key is configured for this tenant or the platform.")
        return "not-configured"

    try:
        got = await _secret(ctx, rec, openai_key, avaturn_key=avaturn_key)
        if got is None:
            return await _stopped_meanwhile(ctx, rec.tenant_id, rec.id)
        return await _create(ctx, rec, tenant, avaturn_key, *got)
    except UpstreamRejected as exc:
        await _fail(ctx, rec, exc.code, exc.message)
        return "rejected"
    except CredentialError:
        await _fail(ctx, rec, "credential_decrypt_failed",
                    "The session's stored credentials cannot be decrypted with BROKER_SECRET_KEY.")
        return "credentials"
    except _NotYet as early:
        ctx.metrics.mint_deferred.inc()
        return await _reschedule(ctx, rec, early.at_ms, "mint slot")
    except UpstreamUnavailable as exc:
        delay = backoff(rec.attempts, exc.retry_after)
        if now_ms() + delay * 1000 >= deadline:
            code = "upstream_rate_limited" if exc.status == 429 else exc.code
            await _fail(ctx, rec, code,
                        f"{exc.upstream} stayed unavailable until the provisioning deadline ({exc.message})")
            return "gave-up"
        log.info("provisioning retried in %.1fs: %s", delay, exc.code)
        return await _reschedule(ctx, rec, now_ms() + int(delay * 1000), exc.code)


async def _reschedule(ctx: WorkerContext, rec: SessionRecord, at_ms: int, reason: str) -> str:
    """Put the same session back in its tenant's schedule at ``at_ms`` (no new mint slot) and
    raise :class:`Rescheduled`; if it was stopped (or failed by the sweeper) meanwhile, there is
    nothing to retry: the stop is finished instead."""
    res = await ctx.repo.transition(rec, allowed="provisioning", due_provision=at_ms)
    if not res.applied:
        return await _stopped_meanwhile(ctx, rec.tenant_id, rec.id)
    raise Rescheduled(at_ms, reason)


async def _fail(ctx: WorkerContext, rec: SessionRecord, code: str, message: str, reason: str = "upstream_failed") -> None:
    """``fail_session`` with one log line."""
    tracing.set_error_code(code)  # on the provisioning span
    if (await fail_session(ctx, rec, code, message, reason=reason)).applied:
        log.warning("provisioning failed: %s", code)


async def _secret(ctx: WorkerContext, rec: SessionRecord, api_key: str, *,
                  avaturn_key: str) -> tuple[str, bool] | None:
    """The client secret to use: the one recorded by an earlier attempt while still valid,
    else a new one, minted at the session's mint slot (``mint_at``, reserved at admission:
    never a second one), and whether the create is already marked in flight (a new secret is
    recorded in the same step as that mark, one round trip less). None: the session was stopped."""
    now = now_ms()
    if rec.secret_enc and rec.secret_expires_at * 1000 > now + SECRET_REUSE_MARGIN_MS:
        return ctx.cipher.decrypt(rec.secret_enc), False
    wait = max(0, rec.mint_at - now) / 1000.0
    if wait > MAX_INLINE_MINT_WAIT:
        raise _NotYet(rec.mint_at)
    if wait > 0:
        await asyncio.sleep(wait)
    config = msgspec.json.decode(rec.config)
    # MCP credentials are opened here, right before the mint, and never leave this frame.
    secrets = unseal(config, ctx.cipher) if SEALED_PREFIX in rec.config else []
    try:
        minted = await timed(ctx, "openai", "mint", ctx.minter.mint(api_key, config, expires_seconds=_secret_ttl(rec)))
    except UpstreamRejected as exc:
        if secrets and mentions(exc.message, secrets):
            raise _without_secrets(exc) from None
        raise
    saved = await ctx.repo.transition(
        rec,
        allowed="provisioning",
        fields={"secret_enc": ctx.cipher.encrypt(minted.value), "secret_expires_at": minted.expires_at,
                **inflight_mark(ctx, avaturn_key)},  # the create follows at once (with the key it uses)
    )
    return (minted.value, True) if saved.applied else None


async def _create(ctx: WorkerContext, rec: SessionRecord, tenant: Tenant, api_key: str, secret: str,
                  marked: bool = False) -> str:
    if rec.create_state in ("inflight", "unknown"):
        # An earlier attempt may have created an Avaturn session we never heard back from.
        # Avaturn has no idempotency key and no list endpoint: we create again; the possible
        # orphan has no token holder and ends by itself (user_absent_timeout, max_duration).
        ctx.metrics.possible_orphans.inc()
    if not marked and not (  # the mark and the key of the create (session_key.py), before it can happen
        await ctx.repo.transition(rec, allowed="provisioning", fields=inflight_mark(ctx, api_key))
    ).applied:
        return await _stopped_meanwhile(ctx, rec.tenant_id, rec.id)
    max_duration = max(60, rec.ttl_seconds)
    try:
        created = await timed(ctx, "avaturn", "create", ctx.avaturn.create_session(
            api_key,
            secret,
            avatar_id=tenant.avaturn.avatar_id,
            background=tenant.avaturn.background,
            user_absent_timeout=tenant.avaturn.user_absent_timeout,
            max_duration=max_duration,
        ))
    except UpstreamUnavailable as exc:
        # A 500 may come from an origin that failed after creating the session: unknown too.
        state = "unknown" if exc.maybe_applied or exc.status == 500 else ""
        await ctx.repo.transition(rec, allowed="provisioning", fields={"create_state": state})
        raise
    except UpstreamRejected:
        await ctx.repo.transition(rec, allowed="provisioning", fields={"create_state": ""})
        raise
    now = now_ms()
    expires_at = now + rec.ttl_seconds * 1000
    async def record_ready() -> TransitionResult:
        return await ctx.repo.transition(
            rec,
            allowed="provisioning",
            status="ready",
            lease=expires_at + TERMINATION_GRACE_MS,
            due_expiry=expires_at,  # where the expiry loop (workers/expiry.py) finds it
            due_provision="del",  # out of the provisioning schedule
            fields={
                "avaturn_session_id": created.session_id,
                "avaturn_token": created.token,
                "ready_at": now,
                "expires_at": expires_at,
                "create_state": "done",
            },
            drop=("secret_enc",),
            publish=True,
        )

    try:
        ready = await patiently(record_ready)
    except REDIS_ERRORS:
        # Redis stayed away: end the session nobody can be told about; the job is retried.
        await _delete_orphan(ctx, api_key, created.session_id)
        raise
    if ready.applied or await _recorded_ready(ctx, rec, created.session_id):
        ctx.metrics.provision_outcome("ready", "")
        ctx.metrics.time_to_ready.observe(max(0.0, (now - rec.created_at) / 1000))
        return "ready"
    # Stopped (or reaped) while the create was in flight: the upstream session must not live on.
    await ctx.repo.transition(
        rec,
        allowed="terminating",
        fields={"avaturn_session_id": created.session_id, "create_state": "done"},
    )
    fresh = await ctx.repo.get(rec.tenant_id, rec.id)
    if fresh is not None and fresh.status == "terminating":
        return await _stop(ctx, fresh)
    await _delete_orphan(ctx, api_key, created.session_id)
    return "stopped"


async def _recorded_ready(ctx: WorkerContext, rec: SessionRecord, upstream_id: str) -> bool:
    """The ready transition applied although its answer was lost (a write retried by the
    Redis client or by ``patiently``): the session is ours, not an orphan to delete."""
    fresh = await ctx.repo.get(rec.tenant_id, rec.id)
    return fresh is not None and fresh.status == "ready" and fresh.avaturn_session_id == upstream_id


async def _stop(ctx: WorkerContext, rec: SessionRecord) -> str:
    """Finish a stopped session; an upstream DELETE that fails now is retried with backoff by
    the termination job (and the sweeper), not by failing this job."""
    try:
        return await stop_upstream_and_finish(ctx, rec)
    except TerminationPending:
        return "stop-pending"


async def _stopped_meanwhile(ctx: WorkerContext, tenant_id: str, session_id: str) -> str:
    fresh = await ctx.repo.get(tenant_id, session_id)
    if fresh is not None and fresh.status == "terminating":
        return await _stop(ctx, fresh)
    return "stopped"


async def _delete_orphan(ctx: WorkerContext, api_key: str, upstream_id: str) -> None:
    try:
        await timed(ctx, "avaturn", "delete", ctx.avaturn.delete_session(api_key, upstream_id))
    except UpstreamError as exc:
        log.warning("could not delete orphan upstream session: %s", exc.code)
        ctx.metrics.possible_orphans.inc()


def _without_secrets(exc: UpstreamRejected) -> UpstreamRejected:
    """The same refusal with a fixed message, for an OpenAI text (already sanitized) that still
    echoes an MCP credential: the message is stored on the session and shown to the tenant."""
    where = f" (parameter '{exc.param}')" if exc.param else ""
    return UpstreamRejected(upstream=exc.upstream, operation=exc.operation, status=exc.status, code=exc.code,
                            message=f"OpenAI rejected the session configuration{where}.", param=exc.param)


def _credentials(ctx: WorkerContext, tenant: Tenant) -> tuple[str | None, str | None]:
    openai_key, avaturn_key = ctx.tenants.credentials(tenant)  # decrypted once per worker (cached)
    return openai_key or ctx.settings.openai_api_key, avaturn_key or ctx.settings.avaturn_api_key


def _secret_ttl(rec: SessionRecord) -> int:
    return max(10, min(7200, rec.ttl_seconds))
