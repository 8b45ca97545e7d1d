"""Pieces shared by the jobs: backoff, the terminal transitions, upstream credentials."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from broker.sessions.models import SessionRecord, now_ms
from broker.sessions.repository import TransitionResult

from ..context import WorkerContext
from ..upstreams.errors import UpstreamError

BACKOFF_BASE = 0.5
BACKOFF_CAP = 8.0
TERMINATION_GRACE_MS = 120_000


def backoff(attempt: int, retry_after: float | None = None) -> float:
    """Capped exponential backoff with full jitter; an upstream Retry-After wins if longer."""
    delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(0, attempt - 1)))
    delay = max(delay, 0.05)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


async def finish_terminated(ctx: WorkerContext, rec: SessionRecord, reason: str) -> TransitionResult:
    now = now_ms()
    res = await ctx.repo.transition(
        rec,
        allowed="*",
        status="terminated",
        lease="del",
        due_expiry="del",
        due_provision="del",
        fields={"terminated_at": now, "termination_reason": rec.termination_reason or reason},
        drop=("avaturn_token", "secret_enc"),
        publish=True,
        retain=True,
    )
    if res.applied:
        ctx.metrics.terminations.labels(rec.termination_reason or reason).inc()
        if rec.expires_at and (rec.termination_reason or reason) == "expired":
            ctx.metrics.termination_lateness.observe(max(0.0, (now - rec.expires_at) / 1000))
    return res


async def fail_session(ctx: WorkerContext, rec: SessionRecord, code: str, message: str, reason: str = "upstream_failed") -> TransitionResult:
    res = await ctx.repo.transition(
        rec,
        allowed="queued,provisioning",
        status="failed",
        lease="del",
        due_expiry="del",
        due_provision="del",
        fields={
            "terminated_at": now_ms(),
            "error_code": code,
            "error_message": message,
            "termination_reason": reason,
        },
        drop=("secret_enc",),
        publish=True,
        retain=True,
    )
    if res.applied:
        ctx.metrics.provisions.labels("failed", code).inc()
    return res


async def timed(ctx: WorkerContext, upstream: str, op: str, coro: Any) -> Any:
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        result = await coro
    except UpstreamError as exc:
        ctx.metrics.upstream_calls.labels(upstream, op, exc.code).inc()
        ctx.metrics.upstream_latency.labels(upstream, op).observe(loop.time() - start)
        raise
    ctx.metrics.upstream_calls.labels(upstream, op, "ok").inc()
    ctx.metrics.upstream_latency.labels(upstream, op).observe(loop.time() - start)
    return result
