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
  whatever the number of jobs. ``run_job`` and ``finish_job`` are arq's own.

Burst mode (tests) keeps arq's plain polling. Only ``_poll_iteration`` (the body of arq
0.28's ``main`` loop) and ``finish_job`` are overridden; the rest is arq's Worker.
"""

from __future__ import annotations

import asyncio
from typing import Any

from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker

from broker.sessions.jobs import WAKE_CAP, WAKE_LIST

# KEYS[1] queue zset. ARGV: 1 now ms, 2 in-progress ms, 3 room, 4 scan limit, 5 in-progress prefix.
# Reply: {next due score or "", id1, score1, id2, score2, ...} (claimed jobs).
CLAIM = """
local now = tonumber(ARGV[1])
local room = tonumber(ARGV[3])
local out = {''}
if room > 0 then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[4]))
  for i = 1, #due, 2 do
    if room <= 0 then break end
    if redis.call('SET', ARGV[5] .. due[i], '1', 'NX', 'PX', ARGV[2]) then
      out[#out + 1] = due[i]
      out[#out + 1] = due[i + 1]
      room = room - 1
    end
  end
end
local nxt = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if nxt[2] then out[1] = nxt[2] end
return out
"""

# Shortest blocking pop: shorter waits (a deferred job due within 10 ms) sleep on the loop.
MIN_BLOCK_S = 0.01


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class WakeupWorker(Worker):
    """arq's Worker with a blocking wake-up and one-step claiming (see the module docstring).

    ``poll_delay`` is the fallback: the longest an idle worker waits without a token."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fallback_s = max(self.poll_delay_s, 0.01)
        if not self.burst:
            self.poll_delay_s = 0.0  # arq's own sleep between iterations: we wait in _idle_wait
        self.wakeups = 0           # iterations started by a token (for tests and metrics)
        self._claim_script: Any = None

    async def _poll_iteration(self) -> None:
        if self.burst:
            await super()._poll_iteration()
            return
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                task.result()  # an error in run_job itself surfaces here, as in arq
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
        reply = await self._claim_script(
            keys=[self.queue_name],
            args=[timestamp_ms(), int(self.in_progress_timeout_s * 1000), room, self.queue_read_limit,
                  in_progress_key_prefix],
        )
        for i in range(1, len(reply), 2):
            job_id, score = _text(reply[i]), int(float(reply[i + 1]))
            await self.sem.acquire()  # never blocks: at most ``room`` jobs were claimed
            self.job_counter += 1
            task = self.loop.create_task(self.run_job(job_id, score))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task
        return int(float(reply[0])) if reply[0] not in (b"", "") else None

    async def _idle_wait(self, next_due: int | None) -> None:
        if self.job_counter >= self.max_jobs:
            running = [t for t in self.tasks.values() if not t.done()]
            if running:
                await asyncio.wait(running, timeout=self.fallback_s, return_when=asyncio.FIRST_COMPLETED)
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
        await super().finish_job(job_id, finish, result_data, result_timeout_s, keep_result_forever, incr_score,
                                 keep_in_progress)
        if incr_score:  # re-queued for later: let blocked workers re-read the next due time
            await push_wakeup(self.pool)


async def push_wakeup(redis: Any) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.lpush(WAKE_LIST, 1)
        pipe.ltrim(WAKE_LIST, 0, WAKE_CAP - 1)
        await pipe.execute()
