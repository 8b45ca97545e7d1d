"""sweep (arq cron, every few seconds, one worker at a time): the safety net.

- Sessions past ``expires_at`` (or whose retry time has come) that are not terminated:
  a lost expiry job, a Redis failover, a crashed worker → enqueue a termination.
- Sessions still queued or provisioning a few seconds after admission with no job in the
  queue (a crash between admission and enqueue, a job that timed out or crashed, a Redis
  failover) → enqueue the provisioning again.
- Sessions stuck in queued/provisioning past the provisioning deadline → failed
  (reason ``reaped``); a create that lands later is deleted by the provisioning job.
"""

from __future__ import annotations

import logging
from typing import Any

from broker.sessions.models import now_ms
from tenants.scope import DUE_EXPIRY, DUE_PROVISION

from ..context import WorkerContext
from .common import fail_session

log = logging.getLogger("workers.sweep")

LATE_MS = 1_000          # the expiry job normally wins; the sweeper acts on what is late
ORPHAN_AFTER_MS = 5_000  # a queued session with no job after this long is re-enqueued
BATCH = 1_000


async def sweep(arq_ctx: dict[str, Any]) -> dict[str, int]:
    ctx: WorkerContext = arq_ctx["wc"]
    counts = {"terminations": 0, "requeued": 0, "reaped": 0, "dropped": 0}
    now = now_ms()
    for tid, sid, score in await ctx.repo.due(DUE_EXPIRY, now - LATE_MS, BATCH):
        rec = await ctx.repo.get(tid, sid)
        if rec is None or not rec.live:
            await ctx.repo.drop_due(DUE_EXPIRY, tid, sid)
            counts["dropped"] += 1
            continue
        if await ctx.queue.terminate(tid, sid, tag=f"sweep{score}"):
            counts["terminations"] += 1
    deadline_ms = int(ctx.settings.provision_deadline_seconds * 1000)
    for tid, sid, score in await ctx.repo.due(DUE_PROVISION, now + deadline_ms - ORPHAN_AFTER_MS, BATCH):
        rec = await ctx.repo.get(tid, sid)
        if rec is None or rec.status not in ("queued", "provisioning"):
            await ctx.repo.drop_due(DUE_PROVISION, tid, sid)
            counts["dropped"] += 1
            continue
        if score <= now:
            res = await fail_session(
                ctx, rec, "provision_deadline_exceeded",
                "The session could not be provisioned in time; create a new one.", reason="reaped",
            )
            counts["reaped"] += int(res.applied)
        elif await ctx.queue.provision(tid, sid):
            # arq refuses a job id that is still queued, running (or SIGKILLed: its job key
            # stays until it is re-run) or finished less than keep_result ago, so this only
            # re-creates a job that was lost.
            counts["requeued"] += 1
    for action, n in counts.items():
        if n:
            ctx.metrics.sweeper_actions.labels(action).inc(n)
    if any(counts.values()):
        log.info("sweep: %s", counts)
    return counts

