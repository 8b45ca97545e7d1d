"""sweep (arq cron, every few seconds, one worker at a time): the provisioning safety net.

Terminations need none: the expiry loop of every worker (``workers/expiry.py``) reads the
due set itself, and takes again any session whose claimer died once its claim runs out.

- Sessions still queued or provisioning a few seconds after admission with no job in the
  queue (a crash between admission and enqueue, a job that timed out or crashed, a Redis
  failover) → enqueue the provisioning again.
- Sessions stuck in queued/provisioning past the provisioning deadline → failed
  (reason ``reaped``); a create that lands later is deleted by the provisioning job.
"""

from __future__ import annotations

import logging
from typing import Any

from broker.sessions.jobs import JobQueue
from broker.sessions.models import now_ms
from tenants.scope import DUE_PROVISION, TenantScope

from ..context import WorkerContext
from .common import fail_session

log = logging.getLogger("workers.sweep")

ORPHAN_AFTER_MS = 5_000  # a queued session with no job after this long is re-enqueued
BATCH = 1_000


async def sweep(arq_ctx: dict[str, Any]) -> dict[str, int]:
    ctx: WorkerContext = arq_ctx["wc"]
    counts = {"requeued": 0, "reaped": 0, "dropped": 0}
    now = now_ms()
    deadline_ms = int(ctx.settings.provision_deadline_seconds * 1000)
    due = await ctx.repo.due(DUE_PROVISION, now + deadline_ms - ORPHAN_AFTER_MS, BATCH)
    if not due:
        return counts
    # One pipelined read for the whole batch (a backlog of queued sessions is the normal case
    # under load, not a fault): each session's status and whether its provisioning job still
    # exists (queued, running, SIGKILLed mid-run, or finished less than keep_result ago).
    async with ctx.redis.pipeline(transaction=False) as pipe:
        for tid, sid, _ in due:
            pipe.hget(TenantScope(tid).session(sid), "status")
            pipe.exists(*JobQueue.provision_job_keys(sid))
        answers = await pipe.execute()
    for i, (tid, sid, score) in enumerate(due):
        status, job_exists = answers[2 * i], answers[2 * i + 1]
        if status not in (b"queued", b"provisioning"):
            await ctx.repo.drop_due(DUE_PROVISION, tid, sid)
            counts["dropped"] += 1
            continue
        if score <= now:
            rec = await ctx.repo.get(tid, sid)
            if rec is None:
                continue
            res = await fail_session(
                ctx, rec, "provision_deadline_exceeded",
                "The session could not be provisioned in time; create a new one.", reason="reaped",
            )
            counts["reaped"] += int(res.applied)
        elif not job_exists and await ctx.queue.provision(tid, sid):
            # The enqueue itself refuses a job id whose job or result key exists (checked again
            # atomically there), so this only re-creates a job that was lost.
            counts["requeued"] += 1
    for action, n in counts.items():
        if n:
            ctx.metrics.sweeper_actions.labels(action).inc(n)
    if any(counts.values()):
        log.info("sweep: %s", counts)
    return counts

