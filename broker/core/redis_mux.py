"""Many concurrent Redis commands over one connection (RESP pipelining), for hot paths.

redis-py's asyncio client gives every command in flight a connection of its own from the pool:
a worker with 300 jobs running has about 300 sockets open, and each command pays for the pool
check-out and check-in, a retry wrapper, a read timeout (a timer) and one socket read per reply:
about 83 us of client CPU per EVALSHA at 300 in flight, against 23 us here
(``python -m tests.bench.redis_mux``, both in the same run). Redis answers the commands of one connection in order, so a
single connection can carry them all: :class:`RedisMux` writes each command at once and a
protocol callback hands the replies, in order, to the waiting callers, however many arrive in
one read.

What stays redis-py's:

- **Connecting**: the connection is made by the client's own pool (``make_connection``), so the
  URL's TLS, auth, database and client name, and Sentinel's master lookup, apply unchanged;
  the socket is then handed to our protocol.
- **Errors**: replies are parsed by hiredis with redis-py's error mapping (``NoScriptError``,
  ``ResponseError``...); a lost connection raises redis-py's ``ConnectionError``.
- **Retries**: a command that fails with ``ConnectionError`` or ``TimeoutError`` is retried
  under the client's own retry policy (``client.get_retry()``), on a new connection.
- **Timeouts**: ``socket_timeout`` of the client's pool bounds each command: a command
  unanswered for that long (checked once a second, not with a timer per command) closes the
  connection and fails every command in flight with ``TimeoutError``, as redis-py does.

Only for commands that answer at once (EVALSHA, HGETALL...): a blocking command (BLPOP) or
pub/sub would hold up every command behind it, so those stay on redis-py's pool.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.asyncio.sentinel import SentinelManagedConnection
from redis.exceptions import InvalidResponse, NoScriptError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .compat_redis import forget_socket, take_over_socket

Execute = Callable[..., Awaitable[Any]]

_WATCH_S = 1.0  # how often an unanswered command's age is checked
_HIGH_WATER = 256 * 1024  # bytes queued in the transport before callers wait for it to drain


class _MuxProtocol(asyncio.Protocol):
    """One Redis connection after its handshake: commands written in order, replies matched in order."""

    def __init__(self, parse_error: Any, timeout: float | None) -> None:
        self._reader = hiredis.Reader(protocolError=InvalidResponse, replyError=parse_error)
        self._pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._timeout = timeout
        self._watch: asyncio.TimerHandle | None = None
        self._paused: list[asyncio.Future[None]] | None = None
        self.transport: asyncio.Transport | None = None
        self.conn: Any = None  # redis-py's connection object that made the handshake
        # Sentinel: a master demoted under us answers READONLY; redis-py then drops the connection
        # and its retry finds the new master. So do we.
        self.readonly_reconnect = False
        self.error: Exception | None = None

    # -- commands
    def send(self, packed: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if self.error is not None:
            fut.set_exception(type(self.error)(*self.error.args))
            return fut
        assert self.transport is not None
        self.transport.write(packed)
        self._pending.append((fut, time.monotonic()))
        if self._watch is None and self._timeout:
            self._watch = loop.call_later(_WATCH_S, self._check_age)
        return fut

    def must_drain(self) -> bool:
        return self._paused is not None

    async def drained(self) -> None:
        if self._paused is not None:
            fut = asyncio.get_running_loop().create_future()
            self._paused.append(fut)
            await fut

    def _check_age(self) -> None:
        self._watch = None
        if not self._pending or self.error is not None:
            return
        assert self._timeout is not None
        if time.monotonic() - self._pending[0][1] > self._timeout:
            self.fail(RedisTimeoutError("Timeout reading from Redis (multiplexed connection)"))
            return
        self._watch = asyncio.get_running_loop().call_later(_WATCH_S, self._check_age)

    def fail(self, error: Exception) -> None:
        """Close the connection and fail every command in flight with ``error``."""
        if self.error is None:
            self.error = error
        if self.transport is not None:
            self.transport.abort()
        if self.conn is not None:  # the socket is closed: redis-py's object must not warn of it
            forget_socket(self.conn)
            self.conn = None
        while self._pending:
            fut, _ = self._pending.popleft()
            if not fut.done():  # one exception object per caller: raising it extends its traceback
                fut.set_exception(type(self.error)(*self.error.args))
                fut.exception()  # a caller that was cancelled meanwhile never reads it: no warning
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._resume()

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover - set_protocol
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        try:
            while True:
                reply = reader.gets()
                if reply is False:
                    return
                fut, _ = pending.popleft()
                if not fut.done():  # else cancelled: its reply is dropped, the order is kept
                    if isinstance(reply, Exception):
                        if self.readonly_reconnect and isinstance(reply, ReadOnlyError):
                            pending.appendleft((fut, 0.0))
                            self.fail(RedisConnectionError("The master is now a replica: reconnecting through Sentinel"))
                            return
                        fut.set_exception(reply)
                    else:
                        fut.set_result(reply)
        except (InvalidResponse, IndexError) as exc:  # garbage, or a reply nobody asked for
            self.fail(RedisConnectionError(f"Protocol error on the multiplexed Redis connection: {exc!r}"))

    def eof_received(self) -> bool:
        return False  # the transport closes itself: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError("Connection to Redis lost" + (f": {exc}" if exc else "")))

    def pause_writing(self) -> None:
        if self._paused is None:
            self._paused = []

    def resume_writing(self) -> None:
        self._resume()

    def _resume(self) -> None:
        waiters, self._paused = self._paused, None
        for fut in waiters or ():
            if not fut.done():
                fut.set_result(None)


class RedisMux:
    """``execute(*args)`` like ``client.execute_command(*args)`` (raw replies, no response
    callbacks), over one pipelined connection made by ``client``'s pool (see the module docstring)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._pool = client.connection_pool
        self._retry = client.get_retry()
        self._proto: _MuxProtocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False

    async def execute(self, *args: Any) -> Any:
        packed = hiredis.pack_command(args)
        proto = self._proto
        if proto is not None and proto.error is None:
            if proto.must_drain():
                await proto.drained()
            try:
                return await proto.send(packed)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                return await self._execute_retrying(packed, exc)
        return await self._execute_retrying(packed, None)

    async def _execute_retrying(self, packed: bytes, first: Exception | None) -> Any:
        """A new connection per attempt, under the client's retry policy (redis-py's own
        ``Retry.call_with_retry``: backoff, attempts, retried errors); ``first``: the error of the
        attempt already made on the current connection, counted as the first failure."""
        retry = self._retry
        failed_first = [first]

        async def attempt() -> Any:
            if failed_first[0] is not None:
                error, failed_first[0] = failed_first[0], None
                raise error
            proto = await self._connected()
            return await proto.send(packed)

        async def give_up_when_closed(error: Exception) -> None:
            if self._closed:
                raise error

        if retry is None:
            return await attempt()
        return await retry.call_with_retry(attempt, give_up_when_closed)

    async def _connected(self) -> _MuxProtocol:
        if self._closed:
            raise RedisConnectionError("The multiplexed Redis client is closed")
        proto = self._proto
        if proto is not None and proto.error is None:
            return proto
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            proto = self._proto
            if proto is not None and proto.error is None:
                return proto
            conn = self._pool.make_connection()
            await conn.connect()  # redis-py's handshake: TLS, AUTH, SELECT, CLIENT SETNAME, Sentinel
            transport, parse_error = take_over_socket(conn)
            proto = _MuxProtocol(parse_error, self._pool.connection_kwargs.get("socket_timeout"))
            proto.transport, proto.conn = transport, conn
            proto.readonly_reconnect = isinstance(conn, SentinelManagedConnection)
            transport.set_write_buffer_limits(high=_HIGH_WATER)
            transport.set_protocol(proto)
            self._proto = proto
            return proto

    async def aclose(self) -> None:
        self._closed = True
        if self._proto is not None:
            self._proto.fail(RedisConnectionError("The multiplexed Redis client is closed"))
            self._proto = None


async def evalsha(execute: Execute, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
    """``script(keys=..., args=...)`` sent with ``execute`` (a client's ``execute_command`` or
    :meth:`RedisMux.execute`), without redis-py's layers around EVALSHA (argument copies, a
    deprecation-check wrapper, an import per call).

    A server that does not know the script (a fresh worker's first jobs, a restarted or flushed
    Redis) gets it loaded once per process, however many callers met the NOSCRIPT together: each
    used to load it through redis-py's own call, so the hundreds of admissions or jobs in flight
    after a Redis restart each sent a SCRIPT LOAD, and each took a pool connection to do so."""
    try:
        return await execute("EVALSHA", script.sha, len(keys), *keys, *args)
    except NoScriptError:
        await _load_once(script)
    try:
        return await execute("EVALSHA", script.sha, len(keys), *keys, *args)
    except NoScriptError:  # flushed again in between: redis-py's call loads it and runs it
        return await script(keys=keys, args=args)


_loads: dict[tuple[str, int], asyncio.Future[Any]] = {}  # (sha, client) -> the load in flight


async def _load_once(script: AsyncScript) -> None:
    """Load ``script`` into its client's server; callers that arrive while a load is in flight
    wait for that one (a failed load fails them all, like their own would have)."""
    key = (script.sha, id(script.registered_client))
    load = _loads.get(key)
    if load is None or load.get_loop() is not asyncio.get_running_loop():
        load = _loads[key] = asyncio.ensure_future(script.registered_client.script_load(script.script))
        load.add_done_callback(lambda done: _loads.pop(key, None) if _loads.get(key) is done else None)
    await asyncio.shield(load)
