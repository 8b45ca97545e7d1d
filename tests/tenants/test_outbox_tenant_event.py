"""``append_tenant_event`` (tenants/outbox.lua): a tenant event that is not a session's goes into
the same outbox stream, with its ``data`` object and the optional endpoint restriction, and is
rendered by the event log like any other event."""

from __future__ import annotations

import json

import pytest

from broker.sessions.outbox import EventLog
from tenants.outbox import lua_functions


@pytest.mark.asyncio
async def test_a_tenant_event_is_appended_published_and_rendered(redis) -> None:
    script = redis.register_script(
        lua_functions() + "\nreturn append_tenant_event(ARGV[1], ARGV[2], ARGV[3], ARGV[4])"
    )
    pubsub = redis.pubsub()
    await pubsub.subscribe("sb:t:t_x:events")
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    data = {"budget": "session_seconds_per_month", "percent": 80}
    eid = (await script(args=["sb:t:t_x:", "usage.threshold_reached", json.dumps(data), ""])).decode()
    ping = (await script(args=["sb:t:t_x:", "test.ping", "{}", "we_1"])).decode()
    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
    assert msg is not None and msg["data"].decode() == eid
    await pubsub.aclose()

    rows = await redis.xrange("sb:t:t_x:events")
    assert [r[0].decode() for r in rows] == [eid, ping]
    assert b"endpoint_id" not in rows[0][1] and rows[1][1][b"endpoint_id"] == b"we_1"
    page = await EventLog(redis).page("t_x")
    assert [(e.id, e.type, e.data) for e in page.data] == [
        ("evt_" + eid, "usage.threshold_reached", data), ("evt_" + ping, "test.ping", {})]
