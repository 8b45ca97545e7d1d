"""The garbage collector's tuning, once a process (API or worker) has started."""

from __future__ import annotations

import gc


def tune_gc(thresholds: tuple[int, int, int] | None = None) -> None:
    """Once the process has started: move everything alive (modules, the app, its routes and
    OpenAPI document, the metric families, the SDK clients) to the permanent generation, so the
    collections no longer walk it; optionally set the collector's ``thresholds`` (the worker's:
    ``workers.main.GC_THRESHOLDS``). (The API keeps the defaults. Measured under admission load:
    a few hundred young collections and 2-4 full ones per 30,000 requests, since what a request
    allocates dies by reference counting. The worker's drain of 3,000 sessions spent 1.2 s in
    full collections without the freeze, 0.5 s with it.)"""
    gc.collect()
    gc.freeze()
    if thresholds is not None:
        gc.set_threshold(*thresholds)
