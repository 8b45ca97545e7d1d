"""broker/core/compat_redis.py, the one module that touches redis-py's private names: the version
guard (fails on a redis-py it was not written and measured for) and the private names it reads,
checked on a real connection of the installed redis-py."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from broker.core import compat_redis


def test_written_for_the_installed_redis_py() -> None:
    assert compat_redis.written_for(redis.__version__), (
        f"redis-py {redis.__version__} is outside compat_redis.WRITTEN_FOR {compat_redis.WRITTEN_FOR}: "
        "re-read each piece of broker/core/compat_redis.py against it, measure again, then widen the range")


def test_the_guard_refuses_other_versions() -> None:
    assert compat_redis.written_for("5.0.0") and compat_redis.written_for("5.3.1")
    for other in ("4.6.0", "6.0.0", "6.2.0", "7.0.1"):
        assert not compat_redis.written_for(other), other


async def test_the_private_names_on_a_real_connection(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    conn = client.connection_pool.make_connection()
    await conn.connect()
    transport, parse_error = compat_redis.take_over_socket(conn)
    assert isinstance(transport, asyncio.Transport) and not transport.is_closing()
    assert isinstance(parse_error("NOSCRIPT No matching script"), NoScriptError)
    assert type(parse_error("ERR wrong")) is ResponseError
    transport.abort()
    compat_redis.forget_socket(conn)
    await conn.disconnect()  # redis-py's own close of a connection whose socket it no longer has
    await client.aclose()


async def test_the_direct_sends_names_on_a_real_connection(redis_url: str) -> None:
    """The names DirectSendMixin.can_read_destructive reads (else it falls back to redis-py's own
    check: correct, but the measured gain is gone), and the answers it gives."""
    from redis._parsers.hiredis import _AsyncHiredisParser

    client = compat_redis.use_direct_sends(aioredis.Redis.from_url(redis_url, socket_timeout=5))
    conn = client.connection_pool.make_connection()
    try:
        await conn.connect()
        assert isinstance(conn, compat_redis.DirectSendMixin)
        parser = conn._parser
        assert isinstance(parser, _AsyncHiredisParser) and parser._connected
        stream = parser._stream
        assert not parser._reader.has_data() and not stream._buffer and not stream._eof
        assert await conn.can_read_destructive() is False
        await conn.send_command("PING")
        assert await conn.read_response() == b"PONG"
    finally:
        await conn.disconnect()
        await client.aclose()
