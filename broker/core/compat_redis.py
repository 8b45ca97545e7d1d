"""Every private name of redis-py the broker uses, and only here (tests/test_private_names.py
fails on one anywhere else). Written for redis-py 5.x (``redis[hiredis]>=5,<6`` in pyproject.toml);
tests/test_compat_redis.py fails on a version outside :data:`WRITTEN_FOR`: re-read each piece
against the new version, measure it again, then widen the range.

What each piece buys, and what it was measured against:

- :func:`take_over_socket`, :func:`forget_socket`: the pipelined connection of
  :class:`broker.core.redis_mux.RedisMux`. redis-py has no public way to hand over the socket of
  a connection its pool has opened (TLS, AUTH, SELECT, Sentinel's master lookup done), so the
  mux reads it from the connection's stream objects (``_writer``, ``_reader``, and the
  ``StreamReader``'s ``_buffer``, which must be empty) and takes the parser's error mapping
  (``_parser.parse_error``). Still pays: 11.5 and 11.7 us of client CPU per EVALSHA through the
  mux against 38.9 and 37.4 us through the worker's pool at 300 in flight, 0.30x (``python -m
  tests.bench.redis_mux``, both in one run, run twice on the shared 2-core machine).
  redis-py's ``Retry`` is used through its public ``call_with_retry``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError

WRITTEN_FOR = ((5, 0), (6, 0))  # redis-py versions [5.0, 6.0)


def written_for(version: str) -> bool:
    """Whether redis-py ``version`` ("5.3.1") is one this module was written and measured for."""
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    return WRITTEN_FOR[0] <= major_minor < WRITTEN_FOR[1]


# -- RedisMux: taking over the socket of a connection redis-py has opened


def take_over_socket(conn: AbstractConnection) -> tuple[asyncio.Transport, Callable[[str], Exception]]:
    """The transport of ``conn`` after redis-py's ``await conn.connect()``, and its parser's
    error mapping (``-NOSCRIPT`` -> ``NoScriptError``...), for the mux to set its own protocol
    on. Raises redis-py's ``ConnectionError`` (and closes the socket) when bytes are already
    waiting in redis-py's stream: the mux must start at a reply boundary."""
    writer = conn._writer
    reader = conn._reader
    assert writer is not None
    if reader is not None and (reader._buffer or reader.at_eof()):  # asyncio.StreamReader's buffer
        writer.transport.abort()
        raise RedisConnectionError("Unexpected data after the Redis handshake")
    return writer.transport, conn._parser.parse_error  # type: ignore[return-value]


def forget_socket(conn: AbstractConnection) -> None:
    """The mux closed the socket it took over: redis-py's connection object drops its stream
    objects, so that it neither warns of an unclosed transport nor closes it again."""
    conn._writer = conn._reader = None
