"""An arq worker that sleeps on a wake-up list instead of polling, and claims jobs in one step.

arq's worker only polls: every ``poll_delay`` it reads the due jobs (ZRANGEBYSCORE), then
claims each one with WATCH/EXISTS/ZSCORE/MULTI/PSETEX/EXEC (four round trips per job, also
for every job that is already running, on every poll). Its maintainers declined blocking
pops and pub/sub, so this subclass adds both halves:

- **Wake-up.** Every enqueue (``broker.sessions.jobs.JobQueue`` and the admission script)
  LPUSHes a token to :data:`~broker.sessions.jobs.WAKE_LIST` (trimmed to ``WAKE_CAP``) in
  the same atomic step as the job. Between iterations a worker with room for more jobs
  blocks on BLPOP of that list, for at most the time until the next deferred job of the
  queue (a termination at ``expires_at``, a retry, the sweeper's cron run) and at most
  ``poll_delay`` - so polling stays as the fallback (idle: about two commands a second).
  A worker that is full waits for one of its jobs to end instead (a token it took could
  have woken another worker). A job re-queued with a delay pushes a token too, so idle
  workers re-read the next due time.
- **Claiming.** One Lua script (:data:`CLAIM`) reads the due jobs, skips those in progress,
  takes the in-progress key of up to ``room`` of them (``SET NX PX``, what arq's
  transaction does) and returns them with the next due time: one round trip per iteration
  whatever the number of jobs. It also makes, for each job it claims, the reads arq's
  ``run_job`` starts with, so a job starts without a round trip of its own
  (:mod:`workers.arq_run`); ``finish_job`` is one script (:data:`FINISH`) instead of
  arq's MULTI/EXEC, with the same effects.

Burst mode (tests) keeps arq's plain polling and ``run_job``. Only ``_poll_iteration`` (the
body of arq 0.28's ``main`` loop), the start of ``run_job`` and ``finish_job`` are replaced;
the rest is arq's Worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from typing import Any

from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from arq.jobs import serialize_result
from arq.utils import timestamp_ms, to_ms
from arq.worker import Worker

from broker.redis_mux import Execute, evalsha
from broker.sessions.jobs import WAKE_CAP, WAKE_LIST, JobFinish

from .arq_run import PrefetchedRunMixin

# KEYS[1] queue zset. ARGV: 1 now ms, 2 in-progress ms, 3 room, 4 scan limit, 5 in-progress prefix,
# 6 job key prefix (or "": no reads), 7 retry key prefix.
# Reply: {next due score or "", id1, score1, job1, try1, id2, ...} (claimed jobs; job "" = gone).
# For each claimed job it also makes the reads arq's run_job starts with (GET the job, INCR and
# EXPIRE its retry counter: arq's MULTI/EXEC), so the job starts without a round trip of its own.
CLAIM = """
local now = tonumber(ARGV[1])
local room = tonumber(ARGV[3])
local out = {''}
if room > 0 then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[4]))
  for i = 1, #due, 2 do
    if room <= 0 then break end
    local id = due[i]
    if redis.call('SET', ARGV[5] .. id, '1', 'NX', 'PX', ARGV[2]) then
      out[#out + 1] = id
      out[#out + 1] = due[i + 1]
      if ARGV[6] ~= '' then
        out[#out + 1] = redis.call('GET', ARGV[6] .. id) or ''
        out[#out + 1] = redis.call('INCR', ARGV[7] .. id)
        redis.call('EXPIRE', ARGV[7] .. id, 88400)
      else  -- abortable jobs: arq's run_job makes these reads itself
        out[#out + 1] = ''
        out[#out + 1] = 0
      end
      room = room - 1
    end
  end
end
local nxt = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if nxt[2] then out[1] = nxt[2] end
return out
"""

# arq's finish_job (MULTI/EXEC of up to six commands) as one script, plus the wake-up token
# of a job re-queued for later. KEYS: 1 in-progress, 2 retry, 3 job, 4 result, 5 queue,
# 6 arq's abort zset, 7 wake-up list. ARGV: 1 job id, 2 finish "1"/"", 3 result data or "",
# 4 result TTL ms or "" (forever), 5 score increment or "", 6 keep in-progress ms or "" (delete),
# 7 wake-up cap.
FINISH = """
if ARGV[6] == '' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[6]) end
if ARGV[2] == '1' then
  if ARGV[3] ~= '' then
    if ARGV[4] == '' then redis.call('SET', KEYS[4], ARGV[3])
    else redis.call('SET', KEYS[4], ARGV[3], 'PX', ARGV[4]) end
  end
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('ZREM', KEYS[6], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
elseif ARGV[5] ~= '' then
  redis.call('ZINCRBY', KEYS[5], ARGV[5], ARGV[1])
  redis.call('LPUSH', KEYS[7], '1')
  redis.call('LTRIM', KEYS[7], 0, tonumber(ARGV[7]) - 1)
end
return 1
"""

# A full worker, once a slot is free, waits this much longer before claiming: the slots freed
# meanwhile are filled by the same claim call (at 300 jobs/s, ~1.5 per call instead of 1).
FULL_GATHER_S = 0.005

# Shortest blocking pop: shorter waits (a deferred job due within 10 ms) sleep on the loop.
MIN_BLOCK_S = 0.01


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class WakeupWorker(PrefetchedRunMixin, Worker):
    """arq's Worker with a blocking wake-up and one-step claiming (see the module docstring).

    ``poll_delay`` is the fallback: the longest an idle worker waits without a token."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fallback_s = max(self.poll_delay_s, 0.01)
        if not self.burst:
            self.poll_delay_s = 0.0  # arq's own sleep between iterations: we wait in _idle_wait
        self.wakeups = 0           # iterations started by a token (for tests and metrics)
        self._claim_script: Any = None
        self._finish_script: Any = None
        self._done: list[tuple[str, asyncio.Task[Any]]] = []  # job tasks ended since the last iteration
        self._next_scan = 0.0
        self._slot_freed = asyncio.Event()
        self._finished_inline: set[str] = set()  # jobs whose finish a job's own script already made
        self.ctx["arq_worker"] = self  # for inline_finish (the jobs' ctx is a copy of self.ctx)
        # How the claim and finish scripts are sent: the jobs' pipelined connection once the
        # worker's context has one (set in on_startup, cleared in on_shutdown), else the pool.
        self.script_execute: Execute | None = None

    async def _poll_iteration(self) -> None:
        if self.burst:
            await super()._poll_iteration()
            return
        self._reap_done_tasks()
        await self.heart_beat()  # may enqueue the cron job: before reading the next due time
        next_due: int | None = None
        if self.allow_pick_jobs:
            next_due = await self._claim_and_start()
        if self.allow_abort_jobs:
            await self._cancel_aborted_jobs()
        await self._idle_wait(next_due)

    async def _claim_and_start(self) -> int | None:
        if self._claim_script is None:
            self._claim_script = self.pool.register_script(CLAIM)
        room = self.max_jobs - self.job_counter
        reply = await evalsha(
            self.script_execute or self.pool.execute_command, self._claim_script, [self.queue_name],
            [timestamp_ms(), int(self.in_progress_timeout_s * 1000), room, self.queue_read_limit,
             in_progress_key_prefix, "" if self.allow_abort_jobs else job_key_prefix, retry_key_prefix],
        )
        for i in range(1, len(reply), 4):
            job_id, score = _text(reply[i]), int(float(reply[i + 1]))
            job, job_try = reply[i + 2] or None, int(reply[i + 3])
            await self.sem.acquire()  # never blocks: at most ``room`` jobs were claimed
            self.job_counter += 1
            if self.allow_abort_jobs:  # arq's run_job also reads the abort set: it makes its own reads
                task = self.loop.create_task(self.run_job(job_id, score))
            else:
                task = self.loop.create_task(self.run_claimed_job(job_id, score, job, job_try))
            task.add_done_callback(functools.partial(self._job_done, job_id))
            self.tasks[job_id] = task
        return int(float(reply[0])) if reply[0] not in (b"", "") else None

    def _job_done(self, job_id: str, task: asyncio.Task[Any]) -> None:
        self._release_sem_dec_counter_on_complete()
        self._done.append((job_id, task))
        self._slot_freed.set()

    def _reap_done_tasks(self) -> None:
        """arq's clean-up of finished job tasks (an error in run_job itself surfaces here), for the
        tasks that ended since the last iteration rather than a scan of all of them (up to
        ``max_jobs`` per iteration); a full scan still runs once per fallback period, for any task
        put in ``self.tasks`` by arq's own code."""
        done, self._done = self._done, []
        now = time.monotonic()
        if now >= self._next_scan:
            self._next_scan = now + self.fallback_s
            done += [(job_id, task) for job_id, task in self.tasks.items() if task.done()]
        for job_id, task in done:
            if self.tasks.get(job_id) is task:
                del self.tasks[job_id]
                task.result()

    async def _idle_wait(self, next_due: int | None) -> None:
        if self.job_counter >= self.max_jobs:
            # Full: wait for a job of ours to end (a token taken now could have woken another
            # worker), without a callback on every running task; then FULL_GATHER_S more, so one
            # claim call starts the jobs of every slot freed meanwhile instead of one call each.
            self._slot_freed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.fallback_s):
                    await self._slot_freed.wait()
            if self.job_counter < self.max_jobs:
                await asyncio.sleep(FULL_GATHER_S)
            return
        if not self.allow_pick_jobs:
            await asyncio.sleep(self.fallback_s)
            return
        wait = self.fallback_s
        if next_due is not None:
            wait = min(wait, (next_due - timestamp_ms()) / 1000)
        if wait < MIN_BLOCK_S:
            # Redis truncates a BLPOP timeout to whole ms: "0.001" can become 0, i.e. forever.
            await asyncio.sleep(max(0.0, wait))
            return
        # Never deaf to tokens: a deferred job is started when the pop times out, which Redis
        # (checking blocked clients' timeouts at its hz, 10/s by default) may do up to ~100 ms late.
        if await self.pool.blpop([WAKE_LIST], timeout=round(wait, 3)) is not None:
            self.wakeups += 1

    def inline_finish(self, ctx: dict[str, Any], function_name: str, args: tuple[Any, ...],
                      result: Any) -> JobFinish | None:
        """The running job ``ctx`` finished successfully with ``result``, for a script of the job
        itself to record (``broker.sessions.repository.SessionRepository.transition(finish=...)``):
        the same result record and keys as arq's ``run_job`` + ``finish_job``. Call
        :meth:`finished_inline` once that script applied; until then nothing changes (arq's own
        finish runs as usual if it did not apply, or if its answer was lost). None (arq finishes
        the job itself) for a cron job, a result kept for ever or not at all."""
        job_id = ctx.get("job_id")
        function = self.functions.get(function_name)
        if job_id is None or function is None or hasattr(function, "next_run"):
            return None
        forever = self.keep_result_forever if function.keep_result_forever is None else function.keep_result_forever
        ttl_s = self.keep_result_s if function.keep_result_s is None else function.keep_result_s
        if forever or not ttl_s or ttl_s <= 0:
            return None
        now = timestamp_ms()
        data = serialize_result(
            function_name, args, {}, ctx["job_try"], round(ctx["enqueue_time"].timestamp() * 1000), True, result,
            ctx.get("start_ms", now), now, f"{job_id}:{function_name}", self.queue_name,
            job_id=job_id, serializer=self.job_serializer,
        )
        return JobFinish(job_id=job_id, result=data or b"", result_ttl_ms=max(1, to_ms(ttl_s) or 1),
                         queue=self.queue_name)

    def finished_inline(self, job_id: str) -> None:
        """The job's own script recorded its finish (:meth:`inline_finish`): arq's is skipped."""
        self._finished_inline.add(job_id)

    async def finish_job(  # noqa: PLR0913 - arq's signature
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        """arq's ``finish_job`` in one script call; a job re-queued for later also pushes a wake-up
        token, so blocked workers re-read the next due time. A job whose own script already
        recorded its successful finish (:meth:`inline_finish`) has nothing left to do here: its
        keys are gone and its result is kept, whatever happened after that script."""
        if self._finished_inline:
            if job_id in self._finished_inline:
                self._finished_inline.discard(job_id)
                return
        if self._finish_script is None:
            self._finish_script = self.pool.register_script(FINISH)
        ttl = "" if keep_result_forever or result_timeout_s is None else to_ms(result_timeout_s)
        await evalsha(
            self.script_execute or self.pool.execute_command, self._finish_script,
            [in_progress_key_prefix + job_id, retry_key_prefix + job_id, job_key_prefix + job_id,
             result_key_prefix + job_id, self.queue_name, abort_jobs_ss, WAKE_LIST],
            [job_id, "1" if finish else "", result_data or "", ttl, incr_score or "",
             "" if keep_in_progress is None else to_ms(keep_in_progress), WAKE_CAP],
        )

