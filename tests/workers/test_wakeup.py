"""WakeupWorker (workers/wakeup.py): idle workers are woken by enqueues instead of polling,
deferred jobs start on time, and the one-step claim never runs a job twice.

Every worker here has a 5 s fallback poll, so anything faster than that is the wake-up."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from arq import Retry
from arq.constants import in_progress_key_prefix
from arq.connections import ArqRedis
from arq.worker import func

from broker.sessions.jobs import (
    PROVISION,
    QUEUE_NAME,
    TERMINATE,
    WAKE_CAP,
    WAKE_LIST,
    JobQueue,
    job_deserializer,
    job_serializer,
)
from broker.redis_mux import RedisMux
from workers.wakeup import WakeupWorker

FALLBACK_S = 5.0
Job = Callable[..., Awaitable[Any]]


class Runs:
    def __init__(self) -> None:
        self.started: dict[str, list[float]] = {}
        self.event = asyncio.Event()

    def record(self, session_id: str) -> None:
        self.started.setdefault(session_id, []).append(time.time())
        self.event.set()


@contextlib.asynccontextmanager
async def running_worker(redis_url: str, job: Job, *, max_jobs: int = 100, fallback: float = FALLBACK_S,
                         via_mux: bool = False) -> AsyncIterator[WakeupWorker]:
    """``via_mux``: the claim and finish scripts go over a pipelined connection, as in the worker
    process (``workers.main``'s on_startup), instead of arq's pool."""
    pool = ArqRedis.from_url(redis_url)
    pool.job_serializer, pool.job_deserializer, pool.default_queue_name = job_serializer, job_deserializer, QUEUE_NAME
    worker = WakeupWorker(functions=[func(job, name=PROVISION), func(job, name=TERMINATE)], redis_pool=pool, queue_name=QUEUE_NAME,
                          poll_delay=fallback, max_jobs=max_jobs, handle_signals=False, keep_result=5,
                          job_serializer=job_serializer, job_deserializer=job_deserializer)
    mux = RedisMux(aioredis.Redis.from_url(redis_url)) if via_mux else None
    sent: list[Any] = []
    if mux is not None:
        def execute(*args: Any) -> Any:
            sent.append(args[1])  # the script's sha
            return mux.execute(*args)
        worker.script_execute = execute
    worker.mux_sent = sent  # type: ignore[attr-defined]
    task = asyncio.create_task(worker.async_run())
    await asyncio.sleep(0.3)  # the first iteration has run: the worker is blocked on the wake-up list
    try:
        yield worker
    finally:
        deadline = time.monotonic() + 5  # let running jobs finish their bookkeeping first
        while any(not t.done() for t in worker.tasks.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await worker.close()
        if mux is not None:
            await mux.aclose()


@pytest.fixture
async def queue(redis: aioredis.Redis) -> JobQueue:
    return JobQueue(ArqRedis(connection_pool=redis.connection_pool))


async def _until(predicate: Callable[[], bool], timeout: float, worker: WakeupWorker | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError("timed out" + ("" if worker is None else "; " + await _worker_state(worker)))
        await asyncio.sleep(0.005)


async def _worker_state(worker: WakeupWorker) -> str:
    """What a worker that stalled was doing: its main loop's stack, its bookkeeping, the queue."""
    stack, coro = "", worker.main_task.get_coro() if worker.main_task else None
    while coro is not None and getattr(coro, "cr_frame", None) is not None:
        f = coro.cr_frame
        stack += f"\n  {f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno} {f.f_code.co_name}"
        coro = coro.cr_await
    tasks = list(worker.tasks.values())
    state = (f"job_counter={worker.job_counter} sem={worker.sem._value} tasks={len(tasks)} "
             f"done={sum(t.done() for t in tasks)} unreaped_done={len(worker._done)} "
             f"slot_freed={worker._slot_freed.is_set()} wakeups={worker.wakeups} complete={worker.jobs_complete}")
    queued = await worker.pool.zcard(QUEUE_NAME)
    tokens = await worker.pool.llen(WAKE_LIST)
    in_progress = [k async for k in worker.pool.scan_iter(match=in_progress_key_prefix + "*")]
    clients = (await worker.pool.execute_command("CLIENT", "LIST")).decode().count("\n")
    return (f"{state} queued={queued} tokens={tokens} in_progress={len(in_progress)} "
            f"redis_clients={clients}; main loop at:{stack}")


async def test_an_idle_worker_starts_a_new_job_at_once(redis_url: str, queue: JobQueue) -> None:
    """Invariant: an enqueued job starts long before the fallback poll (the token woke the worker)."""
    runs = Runs()

    async def job(ctx: dict[str, Any], tenant_id: str, session_id: str) -> None:
        runs.record(session_id)

    async with running_worker(redis_url, job) as worker:
        latencies = []
        for i in range(20):
            t0 = time.time()
            assert await queue.provision("ten_a", f"ses_{i}")
            await _until(lambda i=i: f"ses_{i}" in runs.started, FALLBACK_S)
            latencies.append(runs.started[f"ses_{i}"][0] - t0)
        assert max(latencies) < 0.5, latencies
        assert worker.wakeups >= 20


async def test_a_deferred_job_starts_at_its_due_time(redis_url: str, queue: JobQueue) -> None:
    """Invariant: a job deferred by 0.4 s starts within 0.4-0.6 s, not at the fallback poll."""
    runs = Runs()

    async def job(ctx: dict[str, Any], tenant_id: str, session_id: str) -> None:
        runs.record(session_id)

    async with running_worker(redis_url, job):
        t0 = time.time()
        assert await queue.provision("ten_a", "ses_later", defer_ms=400)
        await _until(lambda: "ses_later" in runs.started, FALLBACK_S)
        delay = runs.started["ses_later"][0] - t0
        assert 0.39 <= delay < 0.6, delay


async def test_jobs_due_a_millisecond_apart_all_start_on_time(redis_url: str, queue: JobQueue) -> None:
    """Invariant: 300 jobs due 1 ms apart all start, each within 0.3 s of its due time (a
    blocking pop with a sub-millisecond timeout would block for ever: Redis truncates it to 0)."""
    runs = Runs()

    async def job(ctx: dict[str, Any], tenant_id: str, session_id: str) -> None:
        runs.record(session_id)

    async with running_worker(redis_url, job) as worker:
        first = int(time.time() * 1000) + 300
        due = {f"ses_{i}": first + i for i in range(300)}
        await asyncio.gather(*(queue.terminate("ten_a", sid, at_ms=at, tag="expire") for sid, at in due.items()))
        await _until(lambda: len(runs.started) == 300, 5, worker)
    late = [runs.started[sid][0] - at / 1000 for sid, at in due.items()]
    assert max(late) < 0.3 and min(late) > -0.01, (min(late), max(late))


@pytest.mark.parametrize("via_mux", [False, True], ids=["pool", "mux"])
async def test_a_retried_job_runs_again_after_its_delay(redis_url: str, queue: JobQueue, via_mux: bool) -> None:
    """Invariant: Retry(defer=0.3) re-runs the job about 0.3 s later, not at the fallback poll."""
    runs = Runs()

    async def job(ctx: dict[str, Any], tenant_id: str, session_id: str) -> None:
        runs.record(session_id)
        if ctx["job_try"] == 1:
            raise Retry(defer=0.3)

    async with running_worker(redis_url, job, via_mux=via_mux) as worker:
        assert await queue.provision("ten_a", "ses_retry")
        await _until(lambda: len(runs.started.get("ses_retry", [])) == 2, FALLBACK_S)
        # arq's finish of the first try (re-queued with a delay) went over it too
        assert (worker._finish_script is not None and worker._finish_script.sha in worker.mux_sent) == via_mux  # type: ignore[attr-defined]
        first, second = runs.started["ses_retry"]
        assert 0.29 <= second - first < 0.8, second - first


@pytest.mark.parametrize("via_mux", [False, True], ids=["pool", "mux"])
async def test_two_workers_never_run_a_job_twice(redis_url: str, queue: JobQueue, via_mux: bool) -> None:
    """Invariant: with two workers claiming from one queue, each of 300 jobs runs exactly once."""
    runs = Runs()

    async def job(ctx: dict[str, Any], tenant_id: str, session_id: str) -> None:
        runs.record(session_id)
        await asyncio.sleep(0.01)

    async with running_worker(redis_url, job, max_jobs=20, via_mux=via_mux), \
            running_worker(redis_url, job, max_jobs=20, via_mux=via_mux) as second:
        await asyncio.gather(*(queue.provision("ten_a", f"ses_{i}") for i in range(300)))
        await _until(lambda: len(runs.started) == 300, 20)
        await asyncio.sleep(0.3)
    assert sorted(len(v) for v in runs.started.values()) == [1] * 300
    claims = second.mux_sent.count(second._claim_script.sha if second._claim_script else None)  # type: ignore[attr-defined]
    assert (claims > 0) == via_mux  # the claims went over the pipelined connection when it is set


async def test_a_full_worker_leaves_the_wakeup_to_an_idle_one(redis_url: str, queue: JobQueue) -> None:
    """Invariant: while worker A is full (max_jobs=1, busy), a new job is started at once by idle worker B."""
    runs = Runs()
    release = asyncio.Event()

    async def job(ctx: dict[str, Any], tenant_id: str, session_id: str) -> None:
        runs.record(session_id)
        if session_id == "ses_block":
            await release.wait()

    async with running_worker(redis_url, job, max_jobs=1) as a:
        assert await queue.provision("ten_a", "ses_block")
        await _until(lambda: "ses_block" in runs.started, FALLBACK_S)
        async with running_worker(redis_url, job, max_jobs=1) as b:
            t0 = time.time()
            assert await queue.provision("ten_a", "ses_next")
            await _until(lambda: "ses_next" in runs.started, FALLBACK_S)
            assert runs.started["ses_next"][0] - t0 < 0.5
            assert b.wakeups >= 1
            release.set()
        assert a.job_counter <= 1


async def test_an_idle_worker_costs_a_few_commands_a_second(redis_url: str, redis: aioredis.Redis) -> None:
    """Invariant: idle, a worker costs Redis at most 5 commands/s, the claim script's own two
    reads included (per fallback period: claim + blocking pop; arq's health record every 5 s);
    arq's polling at poll_delay=0.05 s costs 20+."""

    async def job(ctx: dict[str, Any], tenant_id: str, session_id: str) -> None:
        pass

    async with running_worker(redis_url, job, fallback=1.0):
        await asyncio.sleep(1.0)
        before = int((await redis.info("stats"))["total_commands_processed"])
        await asyncio.sleep(4.0)
        sent = int((await redis.info("stats"))["total_commands_processed"]) - before - 1
    assert sent / 4.0 <= 5.0, sent


async def test_the_wakeup_list_stays_bounded(redis: aioredis.Redis, queue: JobQueue) -> None:
    """Invariant: with no worker consuming, 500 enqueues leave at most WAKE_CAP tokens."""
    await asyncio.gather(*(queue.provision("ten_a", f"ses_{i}") for i in range(500)))
    assert await redis.llen(WAKE_LIST) == WAKE_CAP
    assert await redis.zcard(QUEUE_NAME) == 500
    assert not await queue.provision("ten_a", "ses_0")  # same job id: not enqueued twice
