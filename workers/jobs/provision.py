"""provision_session(tenant_id, session_id): mint the OpenAI client secret, create the
Avaturn session, record ``ready`` and schedule the termination.

Progress is recorded before each upstream call so a re-run (after a crash, a Retry or a
SIGKILL) reuses what exists: a minted secret is reused while valid; ``create_state``
says whether an Avaturn create may have happened (see the README, "Crash safety").
A session stopped meanwhile never stays alive upstream: whoever sees the stop after a
successful create deletes the upstream session.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
from arq import Retry

from broker import tracing
from broker.errors import NotFound
from broker.sessions.jobs import PROVISION
from broker.sessions.models import SessionRecord, now_ms
from broker.sessions.repository import TransitionResult
from tenants.crypto import CredentialError
from tenants.mint_rate import reserve_mint, schedule
from tenants.models import Tenant
from tenants.session_secrets import SEALED_PREFIX, mentions, unseal

from ..context import WorkerContext
from ..upstreams.errors import UpstreamError, UpstreamRejected, UpstreamUnavailable
from .common import REDIS_ERRORS, TERMINATION_GRACE_MS, backoff, fail_session, patiently, timed
from .session_key import inflight_mark
from .terminate import TerminationPending, stop_upstream_and_finish

log = logging.getLogger("workers.provision")

SECRET_REUSE_MARGIN_MS = 30_000
MAX_INLINE_MINT_WAIT = 5.0


async def provision_session(arq_ctx: dict[str, Any], tenant_id: str, session_id: str) -> str:
    ctx: WorkerContext = arq_ctx["wc"]
    deadline_ms = int(ctx.settings.provision_deadline_seconds * 1000)
    try:
        tenant: Tenant | None = await ctx.tenants.get(tenant_id)  # the worker's cache (workers/tenant_cache.py)
    except NotFound:
        tenant = None
    if tenant is None or not tenant.active:
        rec = await ctx.repo.get(tenant_id, session_id)
        started, before, mint_at = False, "", None
    else:
        # Read the record and move it to provisioning in one step (unless it is past its deadline);
        # a session leaving ``queued`` has no secret yet: its mint slot is reserved in that step too.
        started, before, rec, mint_at = await ctx.repo.start_provisioning(
            tenant_id, session_id, now_ms(), deadline_ms, schedule(tenant.quotas.openai_requests_per_minute))
    if rec is None or rec.status in ("ready", "terminated", "failed"):
        return "noop"
    # issue 23: the consumer span of this provisioning, child of the request that admitted it
    with tracing.provisioning(rec.tenant_id, rec.id, rec.traceparent) as step:
        return step.outcome(await _provision(ctx, arq_ctx, rec, tenant, started, before, mint_at, deadline_ms))


async def _provision(ctx: WorkerContext, arq_ctx: dict[str, Any], rec: SessionRecord, tenant: Tenant | None,
                     started: bool, before: str, mint_at: int | None, deadline_ms: int) -> str:
    tenant_id, session_id, job_try = rec.tenant_id, rec.id, arq_ctx.get("job_try", 1)
    if rec.status == "terminating":
        return await _stop(ctx, rec)
    deadline = rec.created_at + deadline_ms
    if not started and now_ms() >= deadline:
        await _fail(ctx, rec, "provision_deadline_exceeded",
                    "The session could not be provisioned in time; create a new one.", reason="reaped")
        return "deadline"
    if tenant is None:
        await _fail(ctx, rec, "tenant_not_found", "The tenant no longer exists.")
        return "no-tenant"
    if not tenant.active:
        await _fail(ctx, rec, "tenant_disabled", "The tenant is disabled.", reason="tenant_disabled")
        return "disabled"
    if not started:  # a status change raced with the step above: act on the current one
        return await _stopped_meanwhile(ctx, tenant_id, session_id)
    if before == "queued":
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
        got = await _secret(ctx, rec, tenant, openai_key, mint_at, avaturn_key=avaturn_key)
        if got is None:
            return await _stopped_meanwhile(ctx, tenant_id, session_id)
        return await _create(ctx, rec, tenant, avaturn_key, *got, arq_ctx=arq_ctx)
    except UpstreamRejected as exc:
        await _fail(ctx, rec, exc.code, exc.message)
        return "rejected"
    except CredentialError:
        await _fail(ctx, rec, "credential_decrypt_failed",
                    "The session's stored credentials cannot be decrypted with BROKER_SECRET_KEY.")
        return "credentials"
    except UpstreamUnavailable as exc:
        delay = backoff(job_try, exc.retry_after)
        if now_ms() + delay * 1000 >= deadline:
            code = "upstream_rate_limited" if exc.status == 429 else exc.code
            await _fail(ctx, rec, code,
                        f"{exc.upstream} stayed unavailable until the provisioning deadline ({exc.message})")
            return "gave-up"
        log.info("provisioning retried in %.1fs: %s", delay, exc.code)
        raise Retry(defer=delay) from None


async def _fail(ctx: WorkerContext, rec: SessionRecord, code: str, message: str, reason: str = "upstream_failed") -> None:
    """``fail_session`` with one log line (arq's per-job lines are off by default)."""
    tracing.set_error_code(code)  # issue 23: on the provisioning span
    if (await fail_session(ctx, rec, code, message, reason=reason)).applied:
        log.warning("provisioning failed: %s", code)


async def _secret(ctx: WorkerContext, rec: SessionRecord, tenant: Tenant, api_key: str,
                  mint_at: int | None = None, *, avaturn_key: str) -> tuple[str, bool] | None:
    """The client secret to use: the one recorded by an earlier attempt while still valid,
    else a new one (rate-limited per tenant across all workers: ``mint_at`` is the slot the
    start step already reserved, if any), and whether the create is already marked in flight
    (a new secret is recorded in the same step as that mark, one round trip less).
    None: the session was stopped."""
    now = now_ms()
    if rec.secret_enc and rec.secret_expires_at * 1000 > now + SECRET_REUSE_MARGIN_MS:
        return ctx.cipher.decrypt(rec.secret_enc), False
    if mint_at is not None:
        wait = max(0, mint_at - now) / 1000.0
    else:
        wait = await reserve_mint(ctx.redis, tenant.id, tenant.quotas.openai_requests_per_minute, now)
    if wait > MAX_INLINE_MINT_WAIT:
        ctx.metrics.mint_deferred.inc()
        raise Retry(defer=wait)
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
                  marked: bool = False, arq_ctx: dict[str, Any] | None = None) -> str:
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
    # This job's own end (arq's result and keys, what arq's finish_job would do one round trip
    # later) is recorded by the same step as ``ready``, so the job returns "ready" below.
    worker = arq_ctx.get("arq_worker") if arq_ctx is not None else None
    finish = worker.inline_finish(arq_ctx, PROVISION, (rec.tenant_id, rec.id), "ready") if worker is not None else None

    async def record_ready() -> TransitionResult:
        return await ctx.repo.transition(
            rec,
            allowed="provisioning",
            status="ready",
            lease=expires_at + TERMINATION_GRACE_MS,
            due_expiry=expires_at,  # where the expiry loop (workers/expiry.py) finds it
            due_provision="del",
            fields={
                "avaturn_session_id": created.session_id,
                "avaturn_token": created.token,
                "ready_at": now,
                "expires_at": expires_at,
                "create_state": "done",
            },
            drop=("secret_enc",),
            publish=True,
            finish=finish,
        )

    try:
        ready = await patiently(record_ready)
    except REDIS_ERRORS:
        # Redis stayed away: end the session nobody can be told about; the job is retried.
        await _delete_orphan(ctx, api_key, created.session_id)
        raise
    if ready.applied and finish is not None:
        worker.finished_inline(finish.job_id)
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
