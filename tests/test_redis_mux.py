"""broker/core/redis_mux.py: many commands in flight over one pipelined connection, against a real
redis-server. Every reply reaches the caller that sent its command, whatever else happens to
the connection (errors, cancelled callers, a Redis restart, a Redis that stops answering)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.embedded_redis import EmbeddedRedis
from broker.core.redis_mux import RedisMux
from tests.fixtures.redis_compat import command_calls
from tests.fixtures.wait import wait_until_async


@pytest.fixture
async def mux(redis: aioredis.Redis) -> AsyncIterator[RedisMux]:
    m = RedisMux(redis)
    try:
        yield m
    finally:
        await m.aclose()


async def _clients(client: aioredis.Redis) -> int:
    return len(await client.client_list())


async def test_thousands_of_concurrent_commands_share_one_connection_and_get_their_own_replies(
    redis: aioredis.Redis, mux: RedisMux
) -> None:
    """Invariant: 3,000 concurrent commands each get their own reply, over one connection."""
    await redis.mset({f"k{i}": f"v{i}" for i in range(3000)})
    before = await _clients(redis)
    replies = await asyncio.gather(*(mux.execute("GET", f"k{i}") for i in range(3000)))
    assert replies == [f"v{i}".encode() for i in range(3000)]
    assert await _clients(redis) == before + 1
    script = "return {KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1}"
    sha = await redis.script_load(script)
    out = await asyncio.gather(*(mux.execute("EVALSHA", sha, 1, f"key{i}", b"\x00bin", i) for i in range(500)))
    assert out == [[f"key{i}".encode(), b"\x00bin", i + 1] for i in range(500)]


async def test_error_replies_raise_redis_py_exceptions_and_keep_the_order(redis: aioredis.Redis, mux: RedisMux) -> None:
    """Invariant: an error reply fails only its own command, with redis-py's exception class."""
    await redis.set("s", "text")
    calls = [mux.execute("GET", "s"), mux.execute("INCR", "s"), mux.execute("EVALSHA", "0" * 40, 0),
             mux.execute("GET", "s")]
    got = await asyncio.gather(*calls, return_exceptions=True)
    assert got[0] == b"text" and got[3] == b"text"
    assert isinstance(got[1], ResponseError) and "not an integer" in str(got[1])
    assert isinstance(got[2], NoScriptError)


async def test_a_cancelled_caller_does_not_shift_the_replies(redis: aioredis.Redis, mux: RedisMux) -> None:
    """Invariant: callers cancelled while their command is in flight leave every other caller
    with its own reply (the dropped replies are consumed in order)."""
    await redis.mset({f"k{i}": str(i) for i in range(200)})
    tasks = [asyncio.ensure_future(mux.execute("GET", f"k{i}")) for i in range(200)]
    await asyncio.sleep(0)  # every command is written
    for t in tasks[::3]:
        t.cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    for i, r in enumerate(done):
        if i % 3:
            assert r == str(i).encode()
    assert await mux.execute("GET", "k7") == b"7"


async def test_a_redis_restart_fails_or_retries_the_commands_in_flight_then_reconnects() -> None:
    """Invariant: across a Redis restart no command gets another command's reply: each one in
    flight either succeeds with its own reply (retried on the new connection) or raises
    ConnectionError; commands after the restart succeed on a new connection."""
    with EmbeddedRedis() as server:
        client = aioredis.Redis.from_url(server.url, socket_timeout=5,
                                         retry=Retry(ConstantBackoff(0.2), 20),
                                         retry_on_error=[RedisConnectionError, RedisTimeoutError])
        mux = RedisMux(client)
        try:
            await client.mset({f"k{i}": str(i) for i in range(50)})  # restart() is a SIGTERM: Redis fsyncs its AOF

            async def steady(i: int) -> bytes | Exception:
                try:
                    return await mux.execute("GET", f"k{i % 50}")
                except RedisConnectionError as exc:
                    return exc

            out: list[bytes | Exception] = []

            async def load() -> list[bytes | Exception]:
                for n in range(60):
                    out.extend(await asyncio.gather(*(steady(n * 20 + j) for j in range(20))))
                    await asyncio.sleep(0.05)  # a steady load spread over the restart, not a burst before it
                return out

            running = asyncio.ensure_future(load())
            await wait_until_async(lambda: len(out) >= 100, 10, "the load running before the restart")
            await asyncio.to_thread(server.restart)
            results = await running
            for i, r in enumerate(results):
                assert isinstance(r, RedisConnectionError) or r == str(i % 50).encode(), (i, r)
            assert await mux.execute("GET", "k3") == b"3"
        finally:
            await mux.aclose()
            await client.aclose()


async def test_a_redis_that_stops_answering_times_out_the_commands_then_recovers() -> None:
    """Invariant: commands sent to a Redis that stops answering (SIGSTOP) fail with TimeoutError
    within about socket_timeout + 1 s, and once it answers again a new connection serves commands."""
    with EmbeddedRedis() as server:
        client = aioredis.Redis.from_url(server.url, socket_timeout=1, retry=Retry(ConstantBackoff(0), 0),
                                         retry_on_error=[RedisConnectionError, RedisTimeoutError])
        mux = RedisMux(client)
        try:
            await client.set("k", "v")
            assert await mux.execute("GET", "k") == b"v"
            assert server.proc is not None
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                got = await asyncio.gather(*(mux.execute("GET", "k") for _ in range(10)), return_exceptions=True)
                waited = time.monotonic() - t0
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            assert all(isinstance(g, RedisTimeoutError) for g in got), got
            assert 1.0 <= waited < 2.5, waited
            assert await mux.execute("GET", "k") == b"v"
        finally:
            await mux.aclose()
            await client.aclose()


async def test_a_closed_mux_refuses_commands(redis: aioredis.Redis) -> None:
    """Invariant: after aclose() nothing is sent; callers get ConnectionError, not a hang."""
    mux = RedisMux(redis)
    assert await mux.execute("PING") == b"PONG"
    await mux.aclose()
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(mux.execute("PING"), 2)


async def test_a_script_unknown_to_redis_is_loaded_once_for_all_the_callers_that_met_it(
    redis: aioredis.Redis, mux: RedisMux
) -> None:
    """Invariant: 300 concurrent calls of a script Redis does not know (fresh process, restarted or
    flushed Redis) all get their own result, with one SCRIPT LOAD between them and no extra
    pool connection; a flush later is handled again the same way."""
    from broker.core.redis_mux import evalsha

    script = redis.register_script("return {KEYS[1], tonumber(ARGV[1]) * 2}")
    await mux.execute("PING")  # the mux's own connection is made on first use

    async def burst() -> tuple[list[Any], int, int]:
        await redis.script_flush()
        loads = command_calls(await redis.info("commandstats"), "script", "load")
        clients = await _clients(redis)
        out = await asyncio.gather(*(evalsha(mux.execute, script, [f"k{i}"], [i]) for i in range(300)))
        # counted after the flush (Redis 6.2 counts SCRIPT FLUSH and LOAD together); the INFO
        # calls and CLIENT LIST are not SCRIPT commands
        loaded = command_calls(await redis.info("commandstats"), "script", "load") - loads
        return out, loaded, await _clients(redis) - clients

    for _ in range(2):
        out, loads, new_clients = await burst()
        assert out == [[f"k{i}".encode(), 2 * i] for i in range(300)]
        assert loads == 1
        assert new_clients == 0
