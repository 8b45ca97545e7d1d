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
- :func:`use_direct_sends` (:class:`DirectSendMixin`): the worker's pools (its client and arq's)
  send without a task and a timer per command. redis-py 5.x sends every command of a client with
  ``socket_timeout`` set through ``asyncio.wait_for(self._send_packed_command(...))``, which on
  Python 3.11 wraps the write in a new Task plus a timer (about 15 us of CPU per command) for a
  write that almost never waits; the mixin writes directly and applies ``socket_timeout`` (with
  ``asyncio.timeout``, no task) only when the write has to wait for the buffer to drain, and
  answers the pool's "anything unread?" check from the hiredis parser's state (``_parser``,
  ``_connected``, ``_stream``, ``_reader``, the stream's ``_buffer`` and ``_eof``) instead of a
  zero-timeout read. Errors are handled as redis-py does. Kept on the terminations rows
  (``python -m tests.bench --only terminations``, with and without back to back, three pairs, on
  the shared 2-core machine): expiry lateness p99 with two workers 0.29, 0.11, 0.29 s with it,
  1.22, 1.23, 0.25 s without (target <= 1 s: missed twice of three without it, never with it);
  with one worker 0.40, 0.39, 0.06 s with, 4.6, 0.15, 0.08 s without. The worker rows
  (``--only worker``, two pairs) showed no CPU difference within the noise: measure it again on
  a quiet machine before relying on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from redis._parsers.hiredis import _AsyncHiredisParser
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

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


# -- the worker's pools: sends without a task and a timer per command

C = TypeVar("C")


class DirectSendMixin:
    """Put before a redis-py connection class (see :func:`use_direct_sends`)."""

    async def can_read_destructive(self: Any) -> bool:
        """The pool's "is anything left unread on this connection?" check before every command.
        redis-py answers it with a zero-timeout read (a future, a timer and a cancellation per
        command); when nothing is buffered - in hiredis, in the stream, no EOF, no error - the
        answer is no at once. Otherwise (or with another parser) redis-py's own check runs.
        A peer close the loop has not seen yet surfaces on the command itself as a
        ConnectionError, which the client's retry policy retries on a new connection."""
        try:
            parser = self._parser
            if isinstance(parser, _AsyncHiredisParser) and parser._connected:
                stream = parser._stream
                if (stream is not None and not parser._reader.has_data() and not stream._buffer
                        and not stream._eof and stream.exception() is None):
                    return False
        except AttributeError:  # redis-py's internals moved (an upgrade): its own check below
            pass
        return bool(await super().can_read_destructive())

    async def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
        if not self.is_connected:
            await self.connect()
        elif check_health:
            await self.check_health()
        try:
            if isinstance(command, str):
                command = command.encode()
            if isinstance(command, bytes):
                command = [command]
            writer = self._writer
            writer.writelines(command)
            if self.socket_timeout and writer.transport.get_write_buffer_size():
                async with asyncio.timeout(self.socket_timeout):  # the kernel buffer is full: wait, bounded
                    await writer.drain()
            else:
                await writer.drain()  # returns at once (raises if the connection was lost)
        except asyncio.TimeoutError:
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as e:
            await self.disconnect(nowait=True)
            if len(e.args) == 1:
                err_no, errmsg = "UNKNOWN", e.args[0]
            else:
                err_no, errmsg = e.args[0], e.args[1]
            raise RedisConnectionError(f"Error {err_no} while writing to socket. {errmsg}.") from e
        except BaseException:
            # as redis-py: a send cut off half way cannot be resumed, the connection is dropped
            await self.disconnect(nowait=True)
            raise


_classes: dict[type, type] = {}


def _direct(cls: type[C]) -> type[C]:
    if issubclass(cls, DirectSendMixin):
        return cls
    made = _classes.get(cls)
    if made is None:
        made = _classes[cls] = type(f"Direct{cls.__name__}", (DirectSendMixin, cls), {})
    return made


def use_direct_sends(client: C) -> C:
    """Make the connections ``client``'s pool creates from now on send directly (call it before
    the first command). Works for plain, TLS, unix-socket and Sentinel-managed connections."""
    pool = client.connection_pool  # type: ignore[attr-defined]
    if issubclass(pool.connection_class, AbstractConnection):
        pool.connection_class = _direct(pool.connection_class)
    return client
