"""The worker process tunes Python's cyclic GC once started (workers.main.GC_THRESHOLDS): what
is alive after start-up is frozen, and the older collections, which walk every job in flight,
run less often. A worker built inside another program (the tests) leaves its collector alone."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import pytest

from broker.core.settings import Settings
from workers import main as worker_main
from workers.main import Health
from workers.metrics import WorkerMetrics


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


async def _start_and_stop(settings: Settings, **kwargs: Any) -> None:
    worker = worker_main.build_worker(settings, WorkerMetrics(), Health(), handle_signals=False, **kwargs)
    ctx = worker.ctx  # what arq passes
    await worker.on_startup(ctx)
    try:
        await asyncio.sleep(0)
    finally:
        await worker.on_shutdown(ctx)


async def test_the_worker_process_freezes_its_startup_heap_and_sets_the_thresholds(
    settings: Settings, restore_gc: None
) -> None:
    gc.unfreeze()
    await _start_and_stop(settings, gc_thresholds=worker_main.GC_THRESHOLDS)
    assert gc.get_threshold() == worker_main.GC_THRESHOLDS
    assert gc.get_freeze_count() > 10_000  # modules, the SDK, the clients


async def test_a_worker_inside_another_program_leaves_its_collector_alone(settings: Settings, restore_gc: None) -> None:
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    await _start_and_stop(settings)
    assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() == 0


def test_run_worker_builds_the_worker_with_the_thresholds(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    """The process entry point (``broker worker``) is the one that asks for them (against the
    suite's Redis: the entry point waits for a reachable Redis before it builds the worker)."""
    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_build(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(worker_main, "build_worker", fake_build)
    with pytest.raises(Stop):
        asyncio.run(worker_main.run_worker(Settings(redis_url=redis_url), None))
    assert seen["gc_thresholds"] == worker_main.GC_THRESHOLDS
