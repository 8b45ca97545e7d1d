"""Webhook delivery end to end in one process: the fan-out and delivery loops of
workers/webhooks.py on a real Redis, POSTing to real HTTP receivers on loopback that verify
every delivery with the ``standardwebhooks`` package. Retry times are driven by an injected
clock (never real waits of minutes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from broker.sessions.models import now_ms
from broker.webhooks.queue import RETRY_SCHEDULE_S
from tenants.crypto import CredentialCipher, generate_secret_key
from tenants.scope import WEBHOOK_PENDING, TenantScope
from tests.fixtures.wait import wait_until_async
from workers.metrics import WorkerMetrics
from workers.webhooks import WebhookDelivery

from .helpers import create_endpoint, session_event
from .receiver import Receiver

TID = "ten_wh"
DAY_MS = 86400 * 1000


class Clock:
    """The wall clock plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0

    def __call__(self) -> int:
        return now_ms() + self.offset

    def advance(self, ms: int) -> None:
        self.offset += ms


@pytest.fixture
def cipher() -> CredentialCipher:
    return CredentialCipher([generate_secret_key()])


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
async def start(redis: aioredis.Redis, cipher: CredentialCipher) -> AsyncIterator[Callable[..., Awaitable[WebhookDelivery]]]:
    made: list[WebhookDelivery] = []

    async def make(**kw: Any) -> WebhookDelivery:
        kw.setdefault("allow_private", True)
        kw.setdefault("rand", lambda: 0.5)  # no jitter: the schedule exactly
        d = WebhookDelivery(redis, cipher, WorkerMetrics(), sweep_s=0.2, **kw).start()
        made.append(d)
        assert await d.wait_subscribed()
        return d

    try:
        yield make
    finally:
        for d in made:
            await d.stop()


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    await wait_until_async(predicate, timeout, what)


async def attempts(redis: aioredis.Redis, weid: str) -> list[dict[str, str]]:
    rows = await redis.xrange(TenantScope(TID).webhook_attempts(weid))
    return [{k.decode(): v.decode() for k, v in raw.items()} for _, raw in rows]


async def test_per_session_order_holds_when_first_attempts_fail(
        redis: aioredis.Redis, cipher: CredentialCipher, receiver: Receiver, start: Any) -> None:
    clock = Clock()
    failed_once: set[str] = set()

    def rule(rec: Any, nth: int) -> tuple[int, float, dict[str, str]]:
        # the first attempt of every session.ready, and of the created event of sessions 0 and 3, fails
        t, sid = rec.event["type"], rec.event["data"]["session"]["id"]
        if nth == 1 and (t == "session.ready" or (t == "session.created" and sid in ("sess_0", "sess_3"))):
            failed_once.add(rec.webhook_id)
            return 500, 0.0, {}
        return 200, 0.0, {}

    weid, secret = await create_endpoint(redis, cipher, TID, receiver.expect("a", rule=None))
    receiver.expect("a", secret, rule=rule)
    await start(clock=clock)
    expected: dict[str, list[str]] = {}
    for i in range(6):
        sid = f"sess_{i}"
        for etype, status in (("session.created", "queued"), ("session.ready", "ready"),
                              ("session.terminated", "terminated")):
            expected.setdefault(sid, []).append("evt_" + await session_event(redis, TID, sid, etype, status))

    async def all_delivered() -> bool:
        if len(receiver.of("a")) >= 18:
            return True
        clock.advance(6_000)  # past the 5 s retry (+10 %) of whatever failed
        return False

    await until(all_delivered, 20, "18 deliveries")
    assert not receiver.unverified
    assert len(failed_once) == 8
    for sid, ids in expected.items():
        got = [r for r in receiver.received if r.event["data"]["session"]["id"] == sid]
        # every POST of the session, failed ones included, in event order: event k+1 is never
        # sent before event k was delivered (2xx)
        order = [r.webhook_id for r in got]
        assert order == sorted(order, key=ids.index), (sid, order)
        assert [r.webhook_id for r in got if r.status == 200] == ids
        assert [r.event["data"]["sequence"] for r in got if r.status == 200] == [1, 2, 3]
    await until(lambda: _pending_is(redis, 0), what="every delivery recorded")


async def _pending_is(redis: aioredis.Redis, n: int) -> bool:
    return int(await redis.get(WEBHOOK_PENDING) or 0) == n


async def test_retry_schedule_retry_after_and_give_up(
        redis: aioredis.Redis, cipher: CredentialCipher, receiver: Receiver, start: Any) -> None:
    clock = Clock()

    def rule(rec: Any, nth: int) -> tuple[int, float, dict[str, str]]:
        return (503, 0.0, {"Retry-After": "120"}) if nth == 1 else (500, 0.0, {})

    weid, secret = await create_endpoint(redis, cipher, TID, receiver.expect("r"))
    receiver.expect("r", secret, rule=rule)
    d = await start(clock=clock)
    await session_event(redis, TID, "sess_r", "session.created")
    due_key = TenantScope(TID).webhook_due(weid)
    for n in range(1, len(RETRY_SCHEDULE_S) + 1):
        # the attempt-log line is written by the same Lua step that reschedules
        await until(lambda: _logged(redis, weid, n), what=f"attempt {n} recorded")  # noqa: B023
        log = await attempts(redis, weid)
        assert log[-1]["attempt"] == str(n) and log[-1]["status"] in ("500", "503")
        at = int(log[-1]["at"])
        score = int(await redis.zscore(due_key, "sess_r"))
        # the first failure said Retry-After: 120 (later than the 5 s of the schedule)
        wanted = 120_000 if n == 1 else RETRY_SCHEDULE_S[n - 1] * 1000
        assert score - at == wanted, (n, score - at, wanted)
        assert len(receiver.of("r", None)) == n  # not tried again before its time
        clock.offset = score - now_ms() + 1  # the retry time has come
        d.poke()
    # the 10th attempt (after the 9th retry) fails: given up, the queue is empty
    await until(lambda: _logged(redis, weid, 10), what="attempt 10 recorded")
    assert await redis.zcard(due_key) == 0
    assert int(await redis.get(WEBHOOK_PENDING)) == 0
    assert d.metrics.registry.get_sample_value("broker_webhook_deliveries_total", {"outcome": "gave_up"}) == 1
    assert d.metrics.registry.get_sample_value("broker_webhook_deliveries_total", {"outcome": "retry"}) == 9
    # same webhook-id on every attempt; every one verified
    assert len({r.webhook_id for r in receiver.received}) == 1 and not receiver.unverified
    ep = await redis.hgetall(TenantScope(TID).webhook_endpoint(weid))
    assert ep[b"disabled"] == b"0" and ep[b"failing_since"] != b""  # 3.1 days of retries: not 5 days yet


async def _logged(redis: aioredis.Redis, weid: str, n: int) -> bool:
    return await redis.xlen(TenantScope(TID).webhook_attempts(weid)) >= n


async def test_410_disables_at_once_and_records_the_event(
        redis: aioredis.Redis, cipher: CredentialCipher, receiver: Receiver, start: Any) -> None:
    gone, s1 = await create_endpoint(redis, cipher, TID, receiver.expect("gone"))
    watch, s2 = await create_endpoint(redis, cipher, TID, receiver.expect("watch"))
    receiver.expect("gone", s1, rule=lambda rec, n: (410, 0.0, {}))
    receiver.expect("watch", s2)
    d = await start()
    first = "evt_" + await session_event(redis, TID, "sess_g", "session.created")
    await until(lambda: receiver.of("gone", 410), what="the 410")
    # the endpoint is disabled and webhook_endpoint.disabled delivered to the other endpoint
    await until(lambda: any(r.event["type"] == "webhook_endpoint.disabled" for r in receiver.of("watch")),
                what="webhook_endpoint.disabled delivered")
    ep = await redis.hgetall(TenantScope(TID).webhook_endpoint(gone))
    assert ep[b"disabled"] == b"1" and ep[b"disabled_reason"] == b"gone" and ep[b"disabled_at"] != b""
    event = next(r.event for r in receiver.of("watch") if r.event["type"] == "webhook_endpoint.disabled")
    assert event["data"] == {"id": gone, "url": receiver.url("gone"), "disabled_reason": "gone"}
    # later events are not fanned out to it; one POST only, no retry
    await session_event(redis, TID, "sess_g", "session.ready", status="ready")
    await until(lambda: len(receiver.of("watch")) == 3, what="the ready event at the other endpoint")
    assert [r.webhook_id for r in receiver.of("gone", None)] == [first]
    assert d.metrics.registry.get_sample_value("broker_webhook_deliveries_total", {"outcome": "endpoint_gone"}) == 1
    await until(lambda: _pending_is(redis, 0), what="nothing left queued")


async def test_five_days_failing_disables_with_the_event(
        redis: aioredis.Redis, cipher: CredentialCipher, receiver: Receiver, start: Any) -> None:
    clock = Clock()
    bad, s1 = await create_endpoint(redis, cipher, TID, receiver.expect("bad"))
    watch, s2 = await create_endpoint(redis, cipher, TID, receiver.expect("watch"), events="webhook_endpoint.disabled")
    receiver.expect("bad", s1, rule=lambda rec, n: (500, 0.0, {}))
    receiver.expect("watch", s2)
    d = await start(clock=clock)
    await session_event(redis, TID, "sess_1", "session.created")
    await until(lambda: _logged(redis, bad, 1), what="first failure")
    ep_key = TenantScope(TID).webhook_endpoint(bad)
    first_failure = int(await redis.hget(ep_key, "failing_since"))
    # 4 days later a failure does not disable it (the first retry, due long ago)
    clock.advance(4 * DAY_MS)
    d.poke()
    await until(lambda: _logged(redis, bad, 2), what="second failure")
    assert await redis.hget(ep_key, "disabled") == b"0"
    assert int(await redis.hget(ep_key, "failing_since")) == first_failure
    # 5 days after the first failure, the next failure (a new session's event) disables it
    clock.advance(DAY_MS + 1000)
    await session_event(redis, TID, "sess_2", "session.created")
    await until(lambda: redis.hget(ep_key, "disabled_reason"), what="disabled")
    assert await redis.hget(ep_key, "disabled_reason") == b"failing"
    await until(lambda: receiver.of("watch"), what="webhook_endpoint.disabled delivered")
    assert receiver.of("watch")[0].event["data"]["disabled_reason"] == "failing"
    assert d.metrics.registry.get_sample_value("broker_webhook_deliveries_total",
                                               {"outcome": "endpoint_failing"}) == 1
    # sess_1's delivery still queued is dropped, with its line in the attempt log
    await until(lambda: _pending_is(redis, 0), what="the disabled endpoint's queues dropped")
    log = await attempts(redis, bad)
    assert [e["error"] for e in log][-1] == "endpoint_disabled"
    assert not receiver.unverified


async def test_a_success_clears_failing_since(
        redis: aioredis.Redis, cipher: CredentialCipher, receiver: Receiver, start: Any) -> None:
    clock = Clock()
    weid, s1 = await create_endpoint(redis, cipher, TID, receiver.expect("flaky"))
    receiver.expect("flaky", s1, rule=lambda rec, n: (500 if n == 1 else 200, 0.0, {}))
    await start(clock=clock)
    await session_event(redis, TID, "sess_1", "session.created")
    ep_key = TenantScope(TID).webhook_endpoint(weid)
    await until(lambda: redis.hget(ep_key, "failing_since"), what="failing")
    clock.advance(6000)
    await until(lambda: receiver.of("flaky"), what="delivered on the retry")
    await until(lambda: _pending_is(redis, 0))
    assert await redis.hget(ep_key, "failing_since") == b""


async def test_a_slow_endpoint_does_not_delay_another(
        redis: aioredis.Redis, cipher: CredentialCipher, receiver: Receiver, start: Any) -> None:
    slow, s1 = await create_endpoint(redis, cipher, TID, receiver.expect("slow"))
    fast, s2 = await create_endpoint(redis, cipher, TID, receiver.expect("fast"))
    receiver.expect("slow", s1, rule=lambda rec, n: (200, 4.0, {}))
    receiver.expect("fast", s2)
    d = await start(max_in_flight=16, per_endpoint=4)
    t0 = time.monotonic()
    for i in range(40):
        await session_event(redis, TID, f"sess_{i}", "session.created")
    await until(lambda: len(receiver.of("fast")) == 40, timeout=10, what="the fast endpoint's 40")
    fast_done = time.monotonic() - t0
    # the slow receiver answers after 4 s: meanwhile the fast one got everything (bound generous:
    # the slow endpoint holds at most per_endpoint = 4 of the 16 slots)
    assert fast_done < 3.5, fast_done
    assert len(receiver.of("slow")) <= 4
    assert receiver.max_in_flight["slow"] <= 4
    assert d.in_flight >= 1
    assert not receiver.unverified


async def test_rotation_signs_with_both_secrets_for_24_hours(
        redis: aioredis.Redis, cipher: CredentialCipher, receiver: Receiver, start: Any) -> None:
    from broker.webhooks.signing import new_secret

    clock = Clock()
    old, new = new_secret(), new_secret()
    until_ms = clock() + DAY_MS
    weid, _ = await create_endpoint(redis, cipher, TID, receiver.expect("rot"), secret=new,
                                    prev_secret_enc=cipher.encrypt(old), prev_secret_until=str(until_ms))
    receiver.expect("rot", new)
    await start(clock=clock)
    await session_event(redis, TID, "sess_1", "session.created")
    await until(lambda: receiver.of("rot"), what="delivery during the rotation")
    first = receiver.of("rot")[0]
    assert len(first.headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(first.body, first.headers)
    clock.offset += DAY_MS + 1000  # the 24 h are over
    await session_event(redis, TID, "sess_2", "session.created")
    await until(lambda: len(receiver.of("rot")) == 2, what="delivery after the rotation")
    second = receiver.of("rot")[1]
    assert len(second.headers["webhook-signature"].split(" ")) == 1
    Webhook(new).verify(second.body, second.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(second.body, second.headers)
    assert not receiver.unverified


async def test_a_name_resolving_to_loopback_is_refused_before_connecting(
        redis: aioredis.Redis, cipher: CredentialCipher, start: Any) -> None:
    connections = 0

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(count, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        weid, _ = await create_endpoint(redis, cipher, TID, f"https://localhost:{port}/hook")
        await start(allow_private=False)
        await session_event(redis, TID, "sess_1", "session.created")
        await until(lambda: _logged(redis, weid, 1), what="the refused attempt")
        log = await attempts(redis, weid)
        assert log[0]["error"] == "address_not_public" and log[0]["status"] == ""
        assert connections == 0
    finally:
        server.close()
        await server.wait_closed()


async def test_the_body_is_the_event_as_the_api_renders_it(
        redis: aioredis.Redis, cipher: CredentialCipher, receiver: Receiver, start: Any) -> None:
    from broker.sessions.outbox import EventLog

    weid, s1 = await create_endpoint(redis, cipher, TID, receiver.expect("b"))
    receiver.expect("b", s1)
    await start()
    await session_event(redis, TID, "sess_1", "session.created")
    await until(lambda: receiver.of("b"), what="delivery")
    page = await EventLog(redis).page(TID)
    import msgspec
    assert receiver.of("b")[0].body == msgspec.json.encode(page.data[0])
    assert receiver.of("b")[0].webhook_id == page.data[0].id


async def test_an_unexpected_sender_error_is_a_counted_attempt_not_a_retry_every_lease(
        redis: aioredis.Redis, cipher: CredentialCipher, start: Any) -> None:
    """Invariant: whatever goes wrong in a POST, the attempt is recorded and the retry schedule
    applies. An exception escaping the sender (a library error nobody foresaw, like the
    Retry-After ValueError) used to leave the attempt unrecorded: the delivery was claimed again
    after every 3 s lease, forever, never counted, never given up."""
    from workers.webhook_sender import WebhookSender

    class Broken(WebhookSender):
        calls = 0

        async def post(self, url: str, secrets: Any, msg_id: str, body: bytes) -> Any:
            Broken.calls += 1
            raise ValueError("a receiver's answer no one foresaw")

    sender = Broken(allow_private=True)
    try:
        weid, _ = await create_endpoint(redis, cipher, TID, "http://127.0.0.1:9/hook")
        await start(sender=sender, lease_ms=300, renew_s=0.1)
        await session_event(redis, TID, "sess_1", "session.created")
        await until(lambda: _logged(redis, weid, 1), what="the attempt recorded")
        log = await attempts(redis, weid)
        assert log[0]["error"] == "internal_error" and log[0]["attempt"] == "1"
        due = await redis.zscore(TenantScope(TID).webhook_due(weid), "sess_1")
        assert due is not None and due >= now_ms() + 3000  # the 5 s retry, not the 0.3 s lease
        assert Broken.calls == 1
    finally:
        await sender.aclose()
