"""Before the arq worker starts: wait for Redis.

A worker started while Redis is unreachable (a deploy where Redis comes up later, a typo in
BROKER_REDIS_URL) waits for it rather than crashing: one WARNING line every
:data:`REPORT_EVERY_S` naming the URL (password masked) and what to do, a check every second,
``/healthz`` on the metrics port answering 503 meanwhile. SIGINT/SIGTERM end the wait and the
process (exit 0). Once Redis answers, the worker starts; a Redis lost later is ridden out by
the worker itself (``workers/main.py``).

Kept apart from ``workers/main.py`` (which only calls :func:`wait_for_redis`), and uses arq
not at all: it runs before the arq Worker exists, so that the Worker's own signal handlers
are installed only after this wait has removed its own.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from broker.core.redis_check import ping, unreachable_line, where
from broker.core.redis_client import create_redis
from broker.core.settings import Settings

log = logging.getLogger("workers.startup")

REPORT_EVERY_S = 10.0
CHECK_EVERY_S = 1.0


async def wait_for_redis(settings: Settings, *, report_every_s: float = REPORT_EVERY_S,
                         check_every_s: float = CHECK_EVERY_S) -> bool:
    """True once Redis answers a PING; False when SIGINT or SIGTERM came first."""
    client = create_redis(settings, max_connections=2, retries=0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        waited_since: float | None = None
        last_report = float("-inf")
        while True:
            error = await ping(client)
            if error is None:
                if waited_since is not None:
                    log.info("redis at %s is reachable after %.0f s; the worker starts",
                             where(settings), time.monotonic() - waited_since)
                return True
            now = time.monotonic()
            waited_since = now if waited_since is None else waited_since
            if now - last_report >= report_every_s:
                last_report = now
                log.warning(unreachable_line(settings, error, hint=(
                    f"the worker waits for it (checked every {check_every_s:g} s; Ctrl-C or SIGTERM stops it); "
                    "check BROKER_REDIS_URL")))
            try:
                await asyncio.wait_for(stop.wait(), check_every_s)
            except TimeoutError:
                continue
            log.info("stopped by a signal while waiting for Redis")
            return False
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await client.aclose()
