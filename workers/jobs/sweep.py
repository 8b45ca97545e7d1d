"""sweep (arq cron, every few seconds, one worker at a time): the provisioning safety net,
and the trim of the tenants' sessions indexes.

Terminations need none: the expiry loop of every worker (``workers/expiry.py``) reads the
due set itself, and takes again any session whose claimer died once its claim runs out.
Provisioning needs little: the provisioning loops claim from the schedule, take over a dead
worker's sessions after their lease, and fail a session they claim past its deadline. The
sweeper covers what no loop sees while it is not due, reading the schedule
(``broker/sessions/schedule.py``) of the tenants in the ring:

- Sessions still queued or provisioning past the provisioning deadline (their upstream
  down until then, the workers all down or stalled, a claimer whose attempt hangs) → failed
  ``provision_deadline_exceeded`` (reason ``reaped``); a create that lands later is deleted by
  the attempt that made it.
- A tenant whose ring entry is later than a due entry of its schedule (the ring is only a
  hint, corrected by every claim that looks at the tenant) → its ring entry lowered
  (``requeued``), so the loops see the session at once.
- Index entries of sessions whose record has expired (``TenantScope.sessions_index()``, written at
  admission; a tenant listing its sessions drops the dead ones it meets, but a tenant that
  never lists would keep them for ever) → removed (``trimmed``), a bounded slice per run, see
  :func:`trim_session_indexes`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from broker.core.text import text
from broker.sessions.models import now_ms
from broker.sessions.repository import RETENTION_SECONDS
from tenants.scope import PROVISION_TENANTS, SWEEP_INDEX_CURSOR, TENANTS_INDEX, TenantScope

from ..context import WorkerContext
from .claim import HELD_LEASE_MS
from .common import deadline_message, fail_session

log = logging.getLogger("workers.sweep")

BATCH = 1_000             # schedule entries looked at per sweep at most
SWEEP_TENANTS = 1_000     # tenants of the ring looked at per sweep at most
# The trim's bound per run: this many tenants visited (a ZCOUNT each, pipelined) and this many
# index entries examined (an EXISTS of their record each, pipelined), in at most 8 round trips
# (cursor read and write, the slice of tenants, twice when a pass ends, and the four pipelines
# of SessionRepository.trim_indexes). At one sweep every 2 s: up to 1,000 entries removed a
# second, a pass over 10,000 tenants in 100 s.
INDEX_TENANTS_PER_SWEEP = 200
INDEX_ENTRIES_PER_SWEEP = 2_000
# A run that did not use up its entry budget (little left to remove) makes this worker wait
# this long before its next one; one that did runs again at the next sweep (every 2 s), so a
# backlog is worked off at up to 1,000 entries a second while an idle deployment does not pay
# ~100 commands/s of ZCOUNTs for nothing (make bench's idle row with 10,000 tenants: 122.7).
INDEX_TRIM_EVERY_S = 30.0


async def sweep(arq_ctx: dict[str, Any]) -> dict[str, int]:
    ctx: WorkerContext = arq_ctx["wc"]
    counts = {"requeued": 0, "reaped": 0, "dropped": 0, "trimmed": 0}
    now = now_ms()
    try:
        await _provisioning(ctx, now, counts)
        if time.monotonic() >= ctx.index_trim_due:
            ctx.index_trim_due = time.monotonic() + INDEX_TRIM_EVERY_S  # also after a failed run
            counts["trimmed"], busy = await trim_session_indexes(ctx, now)
            if busy:
                ctx.index_trim_due = 0.0
    finally:  # what was done is counted even when a later step fails (Redis away)
        for action, n in counts.items():
            if n:
                ctx.metrics.sweeper_actions.labels(action).inc(n)
        if any(counts.values()):
            log.info("sweep: %s", counts)
    return counts


async def _provisioning(ctx: WorkerContext, now: int, counts: dict[str, int]) -> None:
    """Fail what is queued or provisioning past its deadline; lower a ring entry that is later
    than a due session of its tenant. Looks at the entries due by now + the claim lease (the
    due ones and those being worked on), at most :data:`BATCH`; three round trips."""
    deadline_ms = int(ctx.settings.provision_deadline_seconds * 1000)
    ring = [(text(t), int(s)) for t, s in await ctx.redis.zrange(PROVISION_TENANTS, 0, SWEEP_TENANTS - 1,
                                                                   withscores=True)]
    if not ring:
        return
    async with ctx.redis.pipeline(transaction=False) as pipe:
        for tid, _ in ring:
            pipe.zrangebyscore(TenantScope(tid).provision_schedule(), "-inf", now + HELD_LEASE_MS,
                               start=0, num=BATCH, withscores=True)
        per_tenant = await pipe.execute()
    entries: list[tuple[str, int, str, int]] = []  # tid, its ring score, sid, entry score
    for (tid, ring_score), rows in zip(ring, per_tenant, strict=True):
        for sid, score in rows:
            if len(entries) < BATCH:
                entries.append((tid, ring_score, text(sid), int(score)))
    if not entries:
        return
    async with ctx.redis.pipeline(transaction=False) as pipe:
        for tid, _, sid, _ in entries:
            pipe.hmget(TenantScope(tid).session(sid), "status", "created_at")
        states = await pipe.execute()
    lowered: set[str] = set()
    for (tid, ring_score, sid, score), (status, created_at) in zip(entries, states, strict=True):
        if status not in (b"queued", b"provisioning"):
            continue  # ended meanwhile, or no longer the scheduler's: a claim drops its entry
        if int(created_at or 0) + deadline_ms <= now:
            rec = await ctx.repo.get(tid, sid)  # all of it: the terminal step releases its end-user entry too
            if rec is None:
                continue
            res = await fail_session(ctx, rec, "provision_deadline_exceeded", deadline_message(rec), reason="reaped")
            counts["reaped"] += int(res.applied)
        elif score <= now and ring_score > score and tid not in lowered:
            await ctx.redis.zadd(PROVISION_TENANTS, {tid: score}, lt=True)
            lowered.add(tid)
            counts["requeued"] += 1



async def trim_session_indexes(ctx: WorkerContext, now: int) -> tuple[int, bool]:
    """One slice of the pass over every tenant's sessions index: remove the entries of
    sessions created more than the retention ago whose record has expired; return how many,
    and whether the entry budget was used up (more may be waiting).

    A record expires ``RETENTION_SECONDS`` after its session *ended*, so no entry younger than
    that can be dead by expiry, and an older one is removed only once its record is seen gone
    (:meth:`SessionRepository.trim_indexes`): a session still alive, or ended less than the
    retention ago, keeps its entry. Each run takes the tenants from where the last one stopped
    (``SWEEP_INDEX_CURSOR``: a rank in ``sb:tenants``, ordered by creation, new tenants at the
    end) and does at most :data:`INDEX_TENANTS_PER_SWEEP` tenants and
    :data:`INDEX_ENTRIES_PER_SWEEP` entries; a tenant cut by the entry budget is resumed at the
    score where it stopped, so a tenant with a large backlog takes several runs and the others
    wait, none blocks the pass. Every step is safe to repeat: runs that overlap (several
    workers, a retried run) examine the same entries again and remove each once; a lost cursor
    write only repeats a slice, a tenant removed meanwhile only shifts the ranks (a tenant may
    be skipped until the next pass)."""
    rank, cut_tenant, floor = _read_cursor(await ctx.redis.get(SWEEP_INDEX_CURSOR))
    tenant_ids = await _tenants_from(ctx, rank)
    if not tenant_ids and rank:  # past the last tenant: the next pass starts
        rank, floor = 0, None
        tenant_ids = await _tenants_from(ctx, 0)
    if not tenant_ids:
        return 0, False
    if tenant_ids[0] != cut_tenant:
        floor = None  # the score belongs to a tenant that is no longer at this rank
    examined, removed, done, resume = await ctx.repo.trim_indexes(
        tenant_ids, now - RETENTION_SECONDS * 1000, INDEX_ENTRIES_PER_SWEEP, floor
    )
    if done < len(tenant_ids):
        cursor = f"{rank + done}:{tenant_ids[done]}:{'' if resume is None else resume}"
    elif len(tenant_ids) < INDEX_TENANTS_PER_SWEEP:
        cursor = "0::"  # this was the last slice of the pass
    else:
        cursor = f"{rank + done}::"
    await ctx.redis.set(SWEEP_INDEX_CURSOR, cursor)
    return removed, examined >= INDEX_ENTRIES_PER_SWEEP


async def _tenants_from(ctx: WorkerContext, rank: int) -> list[str]:
    ids = await ctx.redis.zrange(TENANTS_INDEX, rank, rank + INDEX_TENANTS_PER_SWEEP - 1)
    return [text(i) for i in ids]


def _read_cursor(raw: bytes | str | None) -> tuple[int, str, int | None]:
    """``"{rank}:{tenant id}:{score}"`` → (rank, tenant, score); anything else starts a pass."""
    try:
        rank, tenant_id, score = text(raw or "").split(":")
        return max(0, int(rank)), tenant_id, int(score) if score else None
    except ValueError:
        return 0, "", None

