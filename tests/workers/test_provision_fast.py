"""The worker's CPU savings keep their guarantees (issue 8): the one-step start of a
provisioning, the worker's tenant cache and its invalidation, Redis sends without a task per
command (timeouts and dirty connections still caught), arq's job bookkeeping in one script each
(claim with the job's reads, finish), and the library loggers that are quiet by default.

Real redis-server (tests/conftest.py), no fakes of our own code."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from arq import Retry
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from arq.jobs import deserialize_result
from arq.worker import Worker
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.errors import NotFound
from broker.logs import ARQ_WORKER_LOGGER, CHATTY_LOGGERS, configure_logging
from broker.sessions.jobs import PROVISION, QUEUE_NAME, WAKE_LIST, JobFinish, JobQueue, job_deserializer
from broker.sessions.repository import SessionRepository
from broker.settings import Settings, SettingsError
from tenants.crypto import CredentialCipher, generate_secret_key
from tenants.mint_rate import reserve_mint, schedule
from tenants.models import OpenAIInput, TenantCreate, TenantPatch
from tenants.scope import STATS_LIVE, TenantScope, tenant_record
from tenants.service import TenantService
from workers import arq_run
from workers.redis_io import use_direct_sends
from workers.tenant_cache import TenantCache

from .test_wakeup import Runs, _until, queue, running_worker  # noqa: F401 - fixture

TID, SID = "ten_AAAAAAAAAAAAAAAAAAAAAA", "ses_BBBBBBBBBBBBBBBBBBBBBB"


async def _session(redis: aioredis.Redis, status: str = "queued", created_at: int | None = None) -> str:
    key = TenantScope(TID).session(SID)
    await redis.hset(key, mapping={"id": SID, "tenant_id": TID, "status": status, "ttl_seconds": 60,
                                   "created_at": created_at if created_at is not None else int(time.time() * 1000)})
    await redis.hincrby(STATS_LIVE, status, 1)
    return key


def _stats(raw: dict[bytes, bytes]) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in raw.items()}


# ---- one step: read the session and start provisioning -------------------------------------


async def test_start_provisioning_reads_and_starts_in_one_step(redis: aioredis.Redis) -> None:
    repo = SessionRepository(redis)
    key = await _session(redis)
    now = int(time.time() * 1000)
    started, before, rec, mint_at = await repo.start_provisioning(TID, SID, now, 60_000)
    assert (started, before, mint_at) == (True, "queued", None)
    assert rec is not None and rec.status == "provisioning" and rec.attempts == 1 and rec.id == SID
    assert _stats(await redis.hgetall(STATS_LIVE)) == {"queued": 0, "provisioning": 1}
    again = await repo.start_provisioning(TID, SID, now, 60_000)  # a re-run
    assert (again.started, again.before) == (True, "provisioning") and again.record is not None
    assert again.record.attempts == 2
    assert _stats(await redis.hgetall(STATS_LIVE)) == {"queued": 0, "provisioning": 1}
    assert await redis.hget(key, "status") == b"provisioning"


async def test_the_mint_slot_is_reserved_in_the_same_step_when_leaving_queued(redis: aioredis.Redis) -> None:
    """Same schedule as reserve_mint (tenants/mint_rate.lua): at 1 mint a minute, the slot the
    start took makes the next reservation wait a minute; a re-run reserves nothing."""
    repo = SessionRepository(redis)
    await _session(redis)
    now = int(time.time() * 1000)
    first = await repo.start_provisioning(TID, SID, now, 60_000, schedule(1))
    assert first.started and first.mint_at == now
    rerun = await repo.start_provisioning(TID, SID, now, 60_000, schedule(1))
    assert rerun.started and rerun.mint_at is None
    assert await reserve_mint(redis, TID, 1, now) == 60.0


@pytest.mark.parametrize("status", ["ready", "terminating", "terminated", "failed"])
async def test_start_provisioning_leaves_other_statuses_alone(redis: aioredis.Redis, status: str) -> None:
    repo = SessionRepository(redis)
    key = await _session(redis, status)
    got = await repo.start_provisioning(TID, SID, int(time.time() * 1000), 60_000, schedule(60))
    assert (got.started, got.before, got.mint_at) == (False, status, None)
    assert got.record is not None and got.record.status == status
    assert await redis.hget(key, "attempts") is None
    assert not await redis.exists(TenantScope(TID).mint_bucket())
    assert _stats(await redis.hgetall(STATS_LIVE)) == {status: 1}


async def test_start_provisioning_does_not_start_past_the_deadline(redis: aioredis.Redis) -> None:
    repo = SessionRepository(redis)
    now = int(time.time() * 1000)
    await _session(redis, created_at=now - 61_000)
    got = await repo.start_provisioning(TID, SID, now, 60_000, schedule(60))
    assert (got.started, got.before, got.mint_at) == (False, "queued", None)
    assert got.record is not None and got.record.status == "queued"
    assert _stats(await redis.hgetall(STATS_LIVE)) == {"queued": 1}
    assert tuple(await repo.start_provisioning(TID, "ses_CCCCCCCCCCCCCCCCCCCCCC", now, 60_000)) == (False, "", None, None)


# ---- the worker's tenant cache ---------------------------------------------------------------


@pytest.fixture
async def tenants(redis: aioredis.Redis) -> tuple[TenantService, TenantCache]:
    service = TenantService(redis, CredentialCipher([generate_secret_key()]))
    cache = TenantCache(redis, service).start()
    assert await cache.wait_subscribed()
    yield service, cache
    await cache.stop()


async def _eventually(check: object, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


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


async def test_a_connection_returned_with_an_unread_answer_is_not_reused_as_is(redis_url: str) -> None:
    client = _client(redis_url)
    try:
        await client.set("k", "v")
        conn = await client.connection_pool.get_connection()
        await conn.send_command("PING")  # its answer is never read
        await asyncio.sleep(0.1)         # ... and is now buffered on the connection
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
        await asyncio.sleep(0.05)
        assert await client.get("k") == b"v"
    finally:
        await client.aclose()


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


# ---- arq bookkeeping: claim with the job's reads, finish in one script ------------------------


def test_run_claimed_job_is_arqs_run_job_after_its_first_round_trip() -> None:
    """An arq upgrade that changes run_job fails here instead of drifting silently."""
    ours = inspect.getsource(arq_run.PrefetchedRunMixin.run_claimed_job).split("\n")
    theirs = inspect.getsource(Worker.run_job).split("\n")
    first = next(i for i, line in enumerate(theirs) if "abort_job = False" in line)
    assert theirs[0].strip().startswith("async def run_job(self, job_id: str, score: int)")
    assert "self.pool.pipeline(transaction=True)" in theirs[2] and "incr(retry_key_prefix" in theirs[4]
    assert ours[3:] == theirs[first + 1:]


async def test_a_finished_job_is_cleaned_up_as_arq_does(redis_url: str, redis: aioredis.Redis,
                                                        queue: JobQueue) -> None:  # noqa: F811
    runs = Runs()

    async def job(ctx: dict[str, object], tid: str, sid: str) -> str:
        runs.record(sid)
        assert ctx["job_try"] == 1
        return "done"

    async with running_worker(redis_url, job, fallback=5.0):
        await queue.provision(TID, SID)
        jid = f"prov:{SID}"
        await _until(lambda: SID in runs.started, 3)
        async def finished() -> bool:
            return bool(await redis.exists(result_key_prefix + jid))
        await _eventually(finished)
        assert 0 < await redis.pttl(result_key_prefix + jid) <= 5_000  # keep_result=5
        assert not await redis.exists(job_key_prefix + jid, retry_key_prefix + jid, in_progress_key_prefix + jid)
        assert await redis.zscore(QUEUE_NAME, jid) is None
        assert not await queue.provision(TID, SID)  # the result key keeps the enqueue idempotent


async def test_a_retried_job_is_requeued_later_with_its_try_count(redis_url: str, redis: aioredis.Redis,
                                                                  queue: JobQueue) -> None:  # noqa: F811
    tries: list[int] = []

    async def job(ctx: dict[str, object], tid: str, sid: str) -> str:
        tries.append(int(ctx["job_try"]))  # type: ignore[call-overload]
        if len(tries) == 1:
            raise Retry(defer=0.3)
        return "done"

    async with running_worker(redis_url, job, fallback=5.0):
        await queue.provision(TID, SID)
        await _until(lambda: len(tries) == 2, 3)  # the wake-up token of the re-queue starts it on time
        assert tries == [1, 2]
        jid = f"prov:{SID}"
        async def finished() -> bool:
            return bool(await redis.exists(result_key_prefix + jid))
        await _eventually(finished)
        assert not await redis.exists(job_key_prefix + jid, retry_key_prefix + jid)
    assert await redis.llen(WAKE_LIST) <= 64


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
    arq.info("%6.2fs → %s(%s)%s", 0.01, "prov:ses_x:provision_session", "'ten_x', 'ses_x'", "")
    arq.info("%6.2fs ← %s ● %s", 0.8, "prov:ses_x:provision_session", "'ready'")
    arq.info("received %s, setting allow_pick_jobs to `False`", "SIGTERM")
    arq.warning("%6.2fs ! %s max retries %d exceeded", 1.0, "prov:ses_y:provision_session", 1000)
    return [json.loads(line)["event"] for line in buffer.getvalue().splitlines()]


def test_per_job_and_per_request_library_lines_are_off_by_default(log_lines: io.StringIO) -> None:
    configure_logging("json", "INFO")
    for name in ("httpx", "httpx2", "openai"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        assert logging.getLogger(name).isEnabledFor(logging.WARNING), name
    assert logging.getLogger("workers.provision").isEnabledFor(logging.INFO)
    events = _arq_lines(log_lines)  # arq: lifecycle lines and warnings stay, per-job lines go
    assert events == ["received SIGTERM, setting allow_pick_jobs to `False`",
                      "  1.00s ! prov:ses_y:provision_session max retries 1000 exceeded"]


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


# ---- the provisioning job's end recorded by its own `ready` step (no finish_job round trip) -----


async def test_a_job_finished_by_its_ready_step_leaves_what_arqs_finish_leaves(
        redis_url: str, redis: aioredis.Redis, queue: JobQueue) -> None:  # noqa: F811
    """Same keys and result as arq's finish_job (test above), written by the transition that
    records ``ready``; arq's own finish (the FINISH script) is then not called at all."""
    repo = SessionRepository(redis)
    await _session(redis, "provisioning")
    applied: list[bool] = []

    async def job(ctx: dict[str, Any], tid: str, sid: str) -> str:
        worker = ctx["arq_worker"]
        rec = await repo.get(tid, sid)
        assert rec is not None
        finish = worker.inline_finish(ctx, PROVISION, (tid, sid), "ready")
        res = await repo.transition(rec, allowed="provisioning", status="ready", fields={"ready_at": 1},
                                    finish=finish)
        applied.append(res.applied)
        worker.finished_inline(finish.job_id)
        return "ready"

    jid = f"prov:{SID}"
    async with running_worker(redis_url, job, fallback=5.0) as worker:
        await queue.provision(TID, SID)
        await _until(lambda: bool(applied), 3)

        async def finished() -> bool:
            return all(t.done() for t in worker.tasks.values())
        await _eventually(finished)
        assert applied == [True]
        assert worker._finish_script is None and not worker._finished_inline  # arq's finish was skipped
        assert 0 < await redis.pttl(result_key_prefix + jid) <= 5_000  # keep_result=5
        info = deserialize_result(await redis.get(result_key_prefix + jid), deserializer=job_deserializer)
        assert (info.success, info.result, info.function, list(info.args), info.job_try) == (
            True, "ready", PROVISION, [TID, SID], 1)
        assert not await redis.exists(job_key_prefix + jid, retry_key_prefix + jid, in_progress_key_prefix + jid)
        assert await redis.zscore(QUEUE_NAME, jid) is None
        assert await redis.hget(TenantScope(TID).session(SID), "status") == b"ready"
        assert not await queue.provision(TID, SID)  # the result key keeps the enqueue idempotent


async def test_a_transition_that_does_not_apply_finishes_nothing(redis: aioredis.Redis) -> None:
    repo = SessionRepository(redis)
    await _session(redis, "terminating")
    jid = f"prov:{SID}"
    await redis.set(job_key_prefix + jid, b"job")
    await redis.set(in_progress_key_prefix + jid, b"1")
    await redis.zadd(QUEUE_NAME, {jid: 1})
    rec = await repo.get(TID, SID)
    assert rec is not None
    res = await repo.transition(rec, allowed="provisioning", status="ready",
                                finish=JobFinish(job_id=jid, result=b"r", result_ttl_ms=5_000))
    assert not res.applied and res.status == "terminating"
    assert await redis.exists(job_key_prefix + jid, in_progress_key_prefix + jid) == 2
    assert not await redis.exists(result_key_prefix + jid)
    assert await redis.zscore(QUEUE_NAME, jid) == 1
