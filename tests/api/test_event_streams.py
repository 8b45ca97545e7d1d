"""The live event streams (contract section 11, issue 20) on a real stack (API on loopback,
arq worker, Redis, sandbox) read with an SSE client (httpx streaming). Invariants: a stream
delivers each of the tenant's events once, in order, as `event:`/`id:`/`data:` blocks, resumes
after Last-Event-ID, never shows another tenant's events; one pub/sub subscription per API
process however many streams are open; at most 10 streams per tenant and process (429 beyond)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import redis

from tenants.scope import TenantScope
from tests.fixtures.stack import Admin, tenant_client, wait_status
from tests.fixtures.wait import wait_until


class Sse:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.iter_lines()

    def next_block(self) -> dict[str, Any] | None:
        """The next event block ({event, id, data}); comments skipped; None at the end."""
        block: dict[str, Any] = {}
        for line in self.lines:
            if line == "":
                if block:
                    return block
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            block[name] = json.loads(value) if name == "data" else value
        return block or None

    def take(self, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            b = self.next_block()
            assert b is not None, f"stream ended after {out}"
            out.append(b)
        return out

    def wait_open(self) -> None:
        for line in self.lines:
            if line == ": stream open":
                return


@contextmanager
def sse(c: httpx.Client, path: str, last_event_id: str | None = None) -> Iterator[Sse]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with c.stream("GET", path, headers=headers, timeout=httpx.Timeout(10, read=10)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        yield Sse(r)


def test_session_stream_replays_then_follows_and_ends(api, worker, admin: Admin) -> None:
    _, key = admin.tenant("a")
    with tenant_client(api.url, key) as c:
        sid = c.post("/v1/sessions?wait=10", json={"ttl_seconds": 60}).json()["id"]
        with sse(c, f"/v1/sessions/{sid}/events") as s:
            created, ready = s.take(2)
            assert [created["event"], ready["event"]] == ["session.created", "session.ready"]
            assert created["id"] == created["data"]["id"] and created["data"]["data"]["sequence"] == 1
            assert ready["data"]["data"]["session"]["status"] == "ready"
            assert c.delete(f"/v1/sessions/{sid}").status_code in (200, 202)
            (ended,) = s.take(1)
            assert ended["event"] == "session.terminated" and ended["data"]["data"]["sequence"] == 3
            assert s.next_block() is None  # the session's stream ends after its terminal event
        # resume after the first event: the rest, once
        with sse(c, f"/v1/sessions/{sid}/events", last_event_id=created["id"]) as s:
            assert [b["id"] for b in s.take(2)] == [ready["id"], ended["id"]]
            assert s.next_block() is None


def test_tenant_stream_follows_new_events_of_its_tenant_only(api, worker, admin: Admin, settings) -> None:
    _, key_a = admin.tenant("a")
    _, key_b = admin.tenant("b")
    with tenant_client(api.url, key_a) as a, tenant_client(api.url, key_b) as b:
        old = a.post("/v1/sessions?wait=10").json()["id"]  # before the stream: not replayed
        with sse(b, "/v1/events/stream") as sb, sse(a, "/v1/events/stream") as sa:
            sa.wait_open()
            sb.wait_open()
            sid_a = a.post("/v1/sessions?wait=10").json()["id"]
            sid_b = b.post("/v1/sessions?wait=10").json()["id"]
            got_a = sa.take(2)
            assert [(x["event"], x["data"]["data"]["session"]["id"]) for x in got_a] == [
                ("session.created", sid_a), ("session.ready", sid_a)]
            got_b = sb.take(2)
            assert {x["data"]["data"]["session"]["id"] for x in got_b} == {sid_b}
            assert old not in {sid_a, sid_b}
        # resume the tenant stream after A's created: A's ready comes next
        with sse(a, "/v1/events/stream", last_event_id=got_a[0]["id"]) as sa:
            assert sa.take(1)[0]["id"] == got_a[1]["id"]


def _outbox_receivers(redis_url: str) -> int:
    """How many subscriptions a tenant's outbox wake-up reaches (PUBLISH's answer)."""
    r = redis.Redis.from_url(redis_url)
    try:
        return int(r.publish(TenantScope("ten_probe").events(), "0-0"))
    finally:
        r.close()


def test_streams_share_one_subscription_and_are_bounded_per_tenant(api, worker, admin: Admin, settings) -> None:
    _, key = admin.tenant("a")
    _, key_b = admin.tenant("b")
    with tenant_client(api.url, key) as c, tenant_client(api.url, key_b) as b:
        with contextlib.ExitStack() as stack:
            held = [stack.enter_context(sse(c, "/v1/events/stream")) for _ in range(10)]  # kept: a dropped
            for s in held:                                                               # reader closes its stream
                s.wait_open()
            assert _outbox_receivers(settings.redis_url) == 1  # the API process's one, not one per stream
            with c.stream("GET", "/v1/events/stream", timeout=httpx.Timeout(10, read=10)) as r:
                assert r.status_code == 429, r.status_code
                r.read()
                assert r.json()["error"]["code"] == "too_many_streams" and r.headers["retry-after"]
            with sse(b, "/v1/events/stream") as other:  # another tenant is not counted against it
                other.wait_open()
        # the streams closed by the client are given back
        def given_back() -> bool:
            with c.stream("GET", "/v1/events/stream", timeout=httpx.Timeout(10, read=10)) as again:
                return again.status_code == 200

        wait_until(given_back, 10, "the streams closed by the client given back")


def test_stream_bad_input_and_other_tenants_session(api, worker, admin: Admin) -> None:
    _, key_a = admin.tenant("a")
    _, key_b = admin.tenant("b")
    with tenant_client(api.url, key_a) as a, tenant_client(api.url, key_b) as b:
        sid = a.post("/v1/sessions?wait=10").json()["id"]
        r = a.get("/v1/events/stream", headers={"Last-Event-ID": "nope"})
        assert r.status_code == 400 and r.json()["error"]["field"] == "Last-Event-ID"
        r = b.get(f"/v1/sessions/{sid}/events")
        assert r.status_code == 404
        assert a.get("/v1/events/stream", headers={"Authorization": "Bearer nope"}).status_code == 401
        wait_status(a, sid, {"ready"})
