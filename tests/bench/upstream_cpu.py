"""The CPU of the two upstream calls alone (mint + create), for the worker's CPU budget.

``python -m tests.bench.upstream_cpu --openai URL --avaturn URL --n N --concurrency C`` runs N
mint+create pairs with the worker's own clients (``OpenAIMinter``, ``AvaturnClient``, built
once) on uvloop, C at a time, and prints ``{"cpu_s": ..., "wall_s": ..., "n": ...}``: only
the process CPU spent while the calls ran."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from broker.serve import run_async
from workers.upstreams.avaturn import AvaturnClient
from workers.upstreams.openai import OpenAIMinter

from .baselines import PLATFORM_AVATURN_KEY, PLATFORM_OPENAI_KEY, SESSION


async def run(openai_url: str, avaturn_url: str, n: int, concurrency: int) -> dict[str, float]:
    minter = OpenAIMinter(openai_url, timeout=10)
    avaturn = AvaturnClient(avaturn_url, timeout=10)
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            secret = await minter.mint(PLATFORM_OPENAI_KEY, SESSION, expires_seconds=600)
            await avaturn.create_session(PLATFORM_AVATURN_KEY, secret.value, avatar_id="jane_20240829",
                                         background="default", user_absent_timeout=60, max_duration=600)

    try:
        await asyncio.gather(*(one() for _ in range(min(n, 50))))  # warm the pools
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return {"cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0, "n": n}
    finally:
        await minter.aclose()
        await avaturn.aclose()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench.upstream_cpu")
    p.add_argument("--openai", required=True)
    p.add_argument("--avaturn", required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=500)
    args = p.parse_args()
    print(json.dumps(run_async(run(args.openai, args.avaturn, args.n, args.concurrency))))


if __name__ == "__main__":
    main()
