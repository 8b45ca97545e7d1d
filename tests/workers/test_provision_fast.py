"""The worker's CPU savings keep their guarantees (issue 8): the worker's tenant cache and its
invalidation, Redis sends without a task per command (timeouts and dirty connections still
caught), and the library loggers that are quiet by default. (The one-step claim and start of
a provisioning is tests/workers/test_provisioning.py's.)

Real redis-server (tests/conftest.py), no fakes of our own code."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import time
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.core.compat_redis import use_direct_sends
from broker.core.errors import NotFound
from broker.core.logs import ARQ_WORKER_LOGGER, CHATTY_LOGGERS, configure_logging
from broker.core.settings import Settings, SettingsError
from tenants.crypto import CredentialCipher, generate_secret_key
from tenants.models import OpenAIInput, TenantCreate, TenantPatch
from tenants.scope import tenant_record
from tenants.service import TenantService
from tenants.tenant_cache import TenantCache
from tests.fixtures.redis_compat import command_calls
from tests.fixtures.wait import wait_until_async


@pytest.fixture
async def tenants(redis: aioredis.Redis) -> tuple[TenantService, TenantCache]:
    service = TenantService(redis, CredentialCipher([generate_secret_key()]))
    cache = TenantCache(redis, service).start()
    assert await cache.wait_subscribed()
    yield service, cache
    await cache.stop()


async def _eventually(check: object, timeout: float = 2.0) -> None:
    await wait_until_async(check, timeout, "the cache caught up", interval=0.01)  # type: ignore[arg-type]


async def test_tenant_cache_serves_from_memory_and_drops_a_changed_tenant(
        redis: aioredis.Redis, tenants: tuple[TenantService, TenantCache]) -> None:
    service, cache = tenants
    a = await service.create(TenantCreate(name="a"))
    b = await service.create(TenantCreate(name="b"))
    assert (await cache.get(a.id)).active and (await cache.get(b.id)).active
    await redis.delete(tenant_record(a.id))  # behind the cache's back, no announcement: still cached
    assert (await cache.get(a.id)).id == a.id
    await service.disable(b.id)  # announced on TENANT_CHANGED_CHANNEL: dropped at once
    async def b_disabled() -> bool:
        return not (await cache.get(b.id)).active
    await _eventually(b_disabled)
    with pytest.raises(NotFound):
        await cache.get("ten_ZZZZZZZZZZZZZZZZZZZZZZ")


async def test_tenant_cache_is_bypassed_while_not_subscribed(redis: aioredis.Redis) -> None:
    service = TenantService(redis, CredentialCipher([generate_secret_key()]))
    cache = TenantCache(redis, service)  # listener not started
    a = await service.create(TenantCreate(name="a"))
    assert (await cache.get(a.id)).active
    await redis.delete(tenant_record(a.id))
    with pytest.raises(NotFound):
        await cache.get(a.id)


async def test_tenant_cache_forgets_everything_when_its_listener_reconnects(
        redis: aioredis.Redis, tenants: tuple[TenantService, TenantCache]) -> None:
    service, cache = tenants
    a = await service.create(TenantCreate(name="a"))
    await cache.get(a.id)
    await redis.client_kill_filter(_type="pubsub")  # the listener loses its connection
    await redis.delete(tenant_record(a.id))          # a change it could have missed
    async def resubscribed() -> bool:
        return cache.subscriptions >= 2
    await _eventually(resubscribed, 5.0)
    with pytest.raises(NotFound):
        await cache.get(a.id)


async def test_credentials_are_decrypted_once_per_ciphertext(tenants: tuple[TenantService, TenantCache]) -> None:
    service, cache = tenants
    t = await service.create(TenantCreate(name="a", openai=OpenAIInput(api_key="sk-first-key-0123456789")))
    first = cache.credentials(await cache.get(t.id))
    assert first == ("sk-first-key-0123456789", None)
    assert cache.credentials(await cache.get(t.id)) is first  # the same decrypted pair, no second decryption
    await service.update(t.id, TenantPatch(openai=OpenAIInput(api_key="sk-second-key-0123456789")))

    async def changed() -> bool:
        return cache.credentials(await cache.get(t.id))[0] == "sk-second-key-0123456789"
    await _eventually(changed)
    assert cache.credentials(await service.get((await service.create(TenantCreate(name="b"))).id)) == (None, None)


# ---- Redis sends without a task per command ----------------------------------------------------


def _client(url: str, **kw: object) -> aioredis.Redis:
    return use_direct_sends(aioredis.Redis.from_url(url, socket_timeout=5, **kw))  # type: ignore[arg-type]


async def test_direct_sends_answer_every_command_in_order(redis_url: str) -> None:
    client = _client(redis_url)
    try:
        await client.set("k", "v")
        answers = await asyncio.gather(*(client.incr("n") for _ in range(200)), client.get("k"))
        assert sorted(answers[:-1]) == list(range(1, 201)) and answers[-1] == b"v"
        assert type(await client.connection_pool.get_connection()).__name__.startswith("Direct")
    finally:
        await client.aclose()


async def test_a_connection_returned_with_an_unread_answer_is_not_reused_as_is(redis_url: str,
                                                                              redis: aioredis.Redis) -> None:
    client = _client(redis_url)
    try:
        await client.set("k", "v")
        conn = await client.connection_pool.get_connection()
        pings = command_calls(await redis.info("commandstats"), "ping")
        await conn.send_command("PING")  # its answer is never read
        # ... and is buffered on the connection once Redis ran it: Redis writes a reply before it
        # answers a later command of another client, and loopback delivers it as it is written
        await wait_until_async(lambda: _pings_above(redis, pings), 5, "Redis ran the PING")
        await client.connection_pool.release(conn)
        assert await client.get("k") == b"v"  # not the stale "PONG"
    finally:
        await client.aclose()


async def test_a_connection_closed_by_the_server_is_replaced(redis_url: str, redis: aioredis.Redis) -> None:
    client = _client(redis_url, retry=RedisRetry(NoBackoff(), 3), retry_on_error=[RedisConnectionError])
    try:
        await client.client_setname("direct-test")
        await client.set("k", "v")
        await redis.client_kill_filter(_type="normal", skipme=True)

        async def closed() -> bool:
            return all(c.get("name") != "direct-test" for c in await redis.client_list())

        await wait_until_async(closed, 5, "Redis closed the killed connection")
        assert await client.get("k") == b"v"
    finally:
        await client.aclose()


async def _pings_above(redis: aioredis.Redis, calls: int) -> bool:
    return command_calls(await redis.info("commandstats"), "ping") > calls


@contextlib.contextmanager
def _deaf_server() -> Iterator[int]:
    """Accepts connections and never reads from them."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        yield srv.getsockname()[1]
    finally:
        srv.close()


async def test_a_write_that_cannot_drain_times_out(redis_url: str) -> None:
    with _deaf_server() as port:
        client = use_direct_sends(aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5,
                                                 lib_name=None, lib_version=None))
        try:
            started = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                await asyncio.wait_for(client.set("big", b"x" * (64 << 20)), 10)  # far over the socket buffers
            assert time.monotonic() - started < 5
        finally:
            await client.aclose()


# ---- quiet library loggers --------------------------------------------------------------------


@pytest.fixture
def log_lines(restore_logging: None) -> Iterator[io.StringIO]:
    yield io.StringIO()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root, arq = logging.getLogger(), logging.getLogger(ARQ_WORKER_LOGGER)
    names = (*CHATTY_LOGGERS, ARQ_WORKER_LOGGER, "uvicorn.access")
    saved = root.handlers[:], root.level, {n: logging.getLogger(n).level for n in names}, arq.filters[:]
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)
        arq.filters[:] = saved[3]


def _arq_lines(buffer: io.StringIO) -> list[str]:
    logging.getLogger().handlers[0].setStream(buffer)  # type: ignore[attr-defined]
    arq = logging.getLogger(ARQ_WORKER_LOGGER)
    arq.info("%6.2fs → %s(%s)%s", 0.01, "term:ses_x:stop:terminate_session", "'ten_x', 'ses_x'", "")
    arq.info("%6.2fs ← %s ● %s", 0.8, "term:ses_x:stop:terminate_session", "'ready'")
    arq.info("received %s, setting allow_pick_jobs to `False`", "SIGTERM")
    arq.warning("%6.2fs ! %s max retries %d exceeded", 1.0, "term:ses_y:stop:terminate_session", 1000)
    return [json.loads(line)["event"] for line in buffer.getvalue().splitlines()]


def test_per_job_and_per_request_library_lines_are_off_by_default(log_lines: io.StringIO) -> None:
    configure_logging("json", "INFO")
    for name in ("httpx", "httpx2", "openai"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        assert logging.getLogger(name).isEnabledFor(logging.WARNING), name
    assert logging.getLogger("workers.provision").isEnabledFor(logging.INFO)
    events = _arq_lines(log_lines)  # arq: lifecycle lines and warnings stay, per-job lines go
    assert events == ["received SIGTERM, setting allow_pick_jobs to `False`",
                      "  1.00s ! term:ses_y:stop:terminate_session max retries 1000 exceeded"]


def test_library_lines_come_back_with_their_setting(log_lines: io.StringIO) -> None:
    configure_logging("json", "INFO")
    configure_logging("json", "INFO", "INFO")  # BROKER_LIBRARY_LOG_LEVEL=INFO (configured twice: no stale filter)
    assert all(logging.getLogger(n).isEnabledFor(logging.INFO) for n in ("httpx", "httpx2", "openai"))
    assert len(_arq_lines(log_lines)) == 4


def test_library_log_level_setting() -> None:
    assert Settings.from_env({}).library_log_level == "WARNING"
    assert Settings.from_env({"BROKER_LIBRARY_LOG_LEVEL": "INFO"}).library_log_level == "INFO"
    with pytest.raises(SettingsError, match="BROKER_LIBRARY_LOG_LEVEL"):
        Settings.from_env({"BROKER_LIBRARY_LOG_LEVEL": "chatty"})
