"""The API's Redis connections pack commands with hiredis (broker/api/redis_packing.py):
byte-for-byte what redis-py's own packer writes, and the same errors."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from broker.api.redis_packing import _HiredisPacking, use_hiredis_packing

ARGS = [
    ("EVALSHA", "abc", 2, "k1", "k2", "é", b"\x00\xff", 0, -5, 12345678901234),
    ("SET", "k", "v" * 10_000),
    ("SCRIPT LOAD", "return 1"),
    (b"CONFIG GET", b"maxmemory"),
]


@pytest.mark.parametrize("args", ARGS)
def test_same_bytes_as_redis_py(args: tuple[object, ...]) -> None:
    fast = type("Fast", (_HiredisPacking, Connection), {})()
    assert b"".join(fast.pack_command(*args)) == b"".join(Connection().pack_command(*args))


def test_same_errors_and_memoryview_fallback() -> None:
    fast = type("Fast", (_HiredisPacking, Connection), {})()
    for bad in (None, True):
        with pytest.raises(DataError):
            fast.pack_command("SET", "k", bad)
    view = memoryview(b"value")
    assert b"".join(fast.pack_command("SET", "k", view)) == b"".join(Connection().pack_command("SET", "k", view))


async def test_a_patched_client_talks_to_redis(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert use_hiredis_packing(client)
        assert issubclass(client.connection_pool.connection_class, _HiredisPacking)
        use_hiredis_packing(client)  # idempotent: no subclass of the subclass
        assert client.connection_pool.connection_class.__mro__.count(_HiredisPacking) == 1
        await client.set("packing:k", "é" * 3000)
        assert (await client.get("packing:k")).decode() == "é" * 3000
        assert await client.eval("return ARGV[1] .. #KEYS", 1, "k", "x") == b"x1"
    finally:
        await client.delete("packing:k")
        await client.aclose()
