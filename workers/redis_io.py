"""Redis commands without a task per command.

redis-py (5.x) sends every command of a client with ``socket_timeout`` set through
``asyncio.wait_for(self._send_packed_command(...))``, which on Python 3.11 wraps the write in
a new Task plus a timer: about 15 us of CPU per command, for a write that almost never waits
(it only waits when the kernel's send buffer is full and the transport pauses). Our worker
makes thousands of commands a second, so :func:`use_direct_sends` gives the client's
connections a ``send_packed_command`` that writes directly and applies ``socket_timeout``
(with ``asyncio.timeout``, no task) only when the write really has to wait for the buffer to
drain. Errors are handled exactly as redis-py does: a write that times out or fails
disconnects and raises redis' ``TimeoutError`` / ``ConnectionError``.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from redis._parsers.hiredis import _AsyncHiredisParser
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

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
