"""The worker's shutdown (``on_shutdown`` in workers.main) waits for its background tasks to
end before it closes their Redis clients: a task cut off inside a pipeline first leaves it and
gives the connection back (a pipeline left holding one is a leaked connection, and redis-py
warns about it whenever the garbage collector finds it)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from broker.core.settings import Settings
from workers import gauges
from workers.main import Health, build_worker
from workers.metrics import WorkerMetrics


async def test_no_background_task_outlives_the_shutdown(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant: when on_shutdown returns, the gauge refresher and the heartbeat have ended,
    including the clean-up a cancelled refresher runs inside its pipeline (made slow here)."""
    inside = asyncio.Event()
    cleaned = []

    async def slow_snapshot(redis: Any) -> Any:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.ping()
            await pipe.execute()
            inside.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                await asyncio.sleep(0.3)  # a slow way out (the pipeline's own reset awaits too)
                cleaned.append(True)
                raise

    monkeypatch.setattr(gauges, "read_snapshot", slow_snapshot)
    worker = build_worker(settings, WorkerMetrics(), Health(), handle_signals=False)
    ctx = worker.ctx
    await worker.on_startup(ctx)
    await asyncio.wait_for(inside.wait(), 10)
    await worker.on_shutdown(ctx)
    assert ctx["shared_gauges"].done() and ctx["heartbeat"].done()
    assert cleaned == [True]
