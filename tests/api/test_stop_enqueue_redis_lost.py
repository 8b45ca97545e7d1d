"""A stop whose Redis connection drops while arq's ``enqueue_job`` WATCHes the job key.

redis-py reports that as a ``WatchError`` (not a ``ConnectionError``), which reached the API as a
500 during the webhook fault test's Redis restart. Invariant: a lost Redis connection is always
answered as Redis unreachable (``ConnectionError``: the API's 503 with ``Retry-After``), never as
an unexpected error. The connection is really cut, by a loopback proxy in front of the real Redis
that closes both sides when the command after the WATCH arrives."""

from __future__ import annotations

import asyncio
from urllib.parse import urlparse

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.sessions.jobs import JobQueue, new_arq_redis


async def _cutting_proxy(target_port: int, cut_on: bytes) -> tuple[asyncio.Server, int]:
    """Forwards to Redis; closes the client's connection when a request contains ``cut_on``."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", target_port)

        async def down() -> None:
            while data := await up_r.read(65536):
                writer.write(data)
                await writer.drain()

        task = asyncio.create_task(down())
        try:
            while data := await reader.read(65536):
                if cut_on in data.upper():
                    break
                up_w.write(data)
                await up_w.drain()
        finally:
            task.cancel()
            writer.close()
            up_w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.asyncio
async def test_a_connection_lost_while_the_job_key_is_watched_is_redis_unreachable(redis_url: str) -> None:
    server, port = await _cutting_proxy(urlparse(redis_url).port or 6379, b"EXISTS")
    client = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        queue = JobQueue(new_arq_redis(client.connection_pool))
        with pytest.raises(RedisConnectionError):
            await queue.terminate("ten_x", "ses_x", tag="stop")
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
