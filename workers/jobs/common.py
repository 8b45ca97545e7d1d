"""Pieces shared by the jobs: backoff, the terminal transitions, upstream credentials."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from broker.sessions.models import SessionRecord, now_ms
from broker.sessions.repository import TransitionResult

from ..context import WorkerContext

BACKOFF_BASE = 0.5
BACKOFF_CAP = 8.0
# Redis unreachable (restart, failover). WatchError too: redis-py raises it, not ConnectionError, when
# the connection drops while a key is WATCHed, and arq's job start WATCHes (a real conflict arq
# handles itself); without it a Redis restart at that moment ended the worker process.
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, WatchError)
REDIS_DOWN_PAUSE_S = 0.5  # the loops' pause (and arq's restart) while Redis is unreachable
RECORD_PATIENCE_S = 10.0

T = TypeVar("T")


def backoff(attempt: int, retry_after: float | None = None) -> float:
    """Capped exponential backoff with full jitter; an upstream Retry-After wins if longer."""
    delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(0, attempt - 1)))
    delay = max(delay, 0.05)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


async def patiently(write: Callable[[], Awaitable[T]], patience: float = RECORD_PATIENCE_S) -> T:
    """Run a Redis write that records an upstream side effect, retrying it through a short
    Redis outage (restart, failover): if it were given up, a re-run would repeat the side
    effect (a second Avaturn session). Raises the Redis error after ``patience`` seconds."""
    give_up = time.monotonic() + patience
    delay = 0.1
    while True:
        try:
            return await write()
        except REDIS_ERRORS:
            if time.monotonic() + delay > give_up:
                raise
            await asyncio.sleep(delay)
            delay = min(2 * delay, 1.0)


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
        publish=True,
        retain=True,
    )
    if res.applied:
        ctx.metrics.count_termination(rec, rec.termination_reason or reason, now, res.thresholds)
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
        publish=True,
        retain=True,
    )
    if res.applied:
        ctx.metrics.provisions.labels("failed", code).inc()
        if res.thresholds:  # rare: a failed session bills 0 s (its settle only frees), unless the budget changed meanwhile
            ctx.metrics.usage_thresholds.inc(res.thresholds)
    return res


def deadline_message(rec: SessionRecord) -> str:
    """The error message of a session failed at its provisioning deadline (by its attempt or
    the sweeper): a replace_oldest session still waiting for the replaced one says so."""
    if rec.waits_for:
        return ("The session it replaced was not ended upstream in time (replace_oldest waits for that); "
                "create a new one.")
    return "The session could not be provisioned in time; create a new one."


async def timed(ctx: WorkerContext, upstream: str, op: str, coro: Any) -> Any:
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        result = await coro
    except BaseException as exc:  # count, latency, outcome (rejected/unavailable/error) and code
        ctx.metrics.observe_upstream(upstream, op, loop.time() - start, exc)
        raise
    ctx.metrics.observe_upstream(upstream, op, loop.time() - start)
    return result
