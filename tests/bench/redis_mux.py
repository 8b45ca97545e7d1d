"""Client CPU per Redis command, redis-py's pool against :class:`broker.core.redis_mux.RedisMux`.

``python -m tests.bench.redis_mux [--n 20000] [--concurrency 300]`` starts its own
redis-server and runs N EVALSHA calls (a script shaped like a session transition: one HSET,
one HGETALL of a 200-byte value), C at a time, on uvloop, through each client in turn (twice,
alternating), and prints the process CPU per call of each and their ratio (the same run)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from broker.embedded_redis import EmbeddedRedis
from broker.core.redis_mux import RedisMux
from broker.serve import run_async
from broker.core.compat_redis import use_direct_sends

SCRIPT = "redis.call('HSET', KEYS[1], 'a', ARGV[1]); return redis.call('HGETALL', KEYS[1])"


async def _cpu_per_call(call: Callable[[int], Awaitable[Any]], n: int, concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await call(i)

    await asyncio.gather(*(one(i) for i in range(min(n, 2000))))  # warm: connections, scripts
    cpu0 = time.process_time()
    await asyncio.gather(*(one(i) for i in range(n)))
    return (time.process_time() - cpu0) / n * 1e6


async def run(n: int, concurrency: int) -> dict[str, float]:
    with EmbeddedRedis() as server:
        # The worker's client: redis-py pool with direct sends (broker/core/compat_redis.py).
        client = use_direct_sends(aioredis.Redis.from_url(server.url, socket_timeout=5,
                                                          max_connections=concurrency + 32))
        mux = RedisMux(client)
        try:
            sha = await client.script_load(SCRIPT)
            value = "x" * 200

            async def pool_call(i: int) -> Any:
                return await client.execute_command("EVALSHA", sha, 1, f"k{i % 500}", value)

            async def mux_call(i: int) -> Any:
                return await mux.execute("EVALSHA", sha, 1, f"k{i % 500}", value)

            pool_us, mux_us = [], []
            for _ in range(2):
                pool_us.append(await _cpu_per_call(pool_call, n, concurrency))
                mux_us.append(await _cpu_per_call(mux_call, n, concurrency))
        finally:
            await mux.aclose()
            await client.aclose()
    pool_cpu, mux_cpu = min(pool_us), min(mux_us)
    return {"redis_py_pool_us_per_call": round(pool_cpu, 1), "mux_us_per_call": round(mux_cpu, 1),
            "ratio": round(mux_cpu / pool_cpu, 3), "n": n, "concurrency": concurrency}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench.redis_mux")
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=300)
    args = p.parse_args()
    print(json.dumps(run_async(run(args.n, args.concurrency))))


if __name__ == "__main__":
    main()
