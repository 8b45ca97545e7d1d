"""The lean POST /v1/sessions (issue 8) answers exactly like the contract says, and the access
log setting (BROKER_ACCESS_LOG) decides which requests get an access line."""

from __future__ import annotations

import io
import time
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from broker.core.logs import JsonFormatter
from tests.fixtures.stack import Admin, ApiServer, make_settings, tenant_client


@contextmanager
def access_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("broker.access")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_create_answers_with_the_contract_headers_and_body(api: ApiServer, admin: Admin) -> None:
    tenant, key = admin.tenant("hot-a")
    _, other_key = admin.tenant("hot-b")
    with tenant_client(api.url, key) as c, tenant_client(api.url, other_key) as other:
        r = c.post("/v1/sessions", json={"ttl_seconds": 60, "metadata": {"k": "v"}, "end_user": "u1"})
        assert r.status_code == 202, r.text
        body = r.json()
        assert r.headers["content-type"] == "application/json"
        assert int(r.headers["content-length"]) == len(r.content)
        assert r.headers["location"] == f"/v1/sessions/{body['id']}"
        assert r.headers["x-request-id"]
        assert '"minute";q=' in r.headers["ratelimit-policy"] and '"end_user";q=1' in r.headers["ratelimit-policy"]
        assert '"concurrency";r=' in r.headers["ratelimit"]
        assert body["status"] == "queued" and body["metadata"] == {"k": "v"} and body["end_user"] == "u1"
        assert body["avaturn"] is None and body["created_at"].endswith("Z")
        assert c.get(r.headers["location"]).json()["id"] == body["id"]
        assert other.get(r.headers["location"]).status_code == 404  # tenant B cannot see it
        # the same errors as before: wrong media type, bad JSON, unknown field, bad wait, bad key
        assert c.post("/v1/sessions", content=b"{}", headers={"content-type": "text/plain"}).status_code == 415
        bad = c.post("/v1/sessions", content=b"{", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
        unknown = c.post("/v1/sessions", json={"nope": 1}).json()["error"]
        assert unknown["field"] == "nope"
        assert c.post("/v1/sessions?wait=31").json()["error"]["code"] == "invalid_wait"
        deep = b"[" * 65 + b"]" * 65
        too_deep = c.post("/v1/sessions", content=deep, headers={"content-type": "application/json"})
        assert too_deep.status_code == 400 and too_deep.json()["error"]["code"] == "body_too_deep"
        assert c.post("/v1/sessions", content=b"x" * (64 * 1024 + 1),
                      headers={"content-type": "application/json"}).status_code == 413
        assert httpx.post(f"{api.url}/v1/sessions").json()["error"]["code"] == "missing_api_key"
        assert tenant["id"]


def test_idempotent_replay_on_the_hot_path(api: ApiServer, admin: Admin) -> None:
    _, key = admin.tenant("hot-idem")
    _, other_key = admin.tenant("hot-idem-b")
    with tenant_client(api.url, key) as c, tenant_client(api.url, other_key) as other:
        first = c.post("/v1/sessions", json={"ttl_seconds": 60}, headers={"Idempotency-Key": "k1"})
        again = c.post("/v1/sessions", json={"ttl_seconds": 60}, headers={"Idempotency-Key": "k1"})
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"]
        assert "ratelimit" not in again.headers  # a replay consumes (and reports) nothing
        reused = c.post("/v1/sessions", json={"ttl_seconds": 61}, headers={"Idempotency-Key": "k1"})
        assert reused.status_code == 422
        theirs = other.post("/v1/sessions", json={"ttl_seconds": 60}, headers={"Idempotency-Key": "k1"})
        assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]


@pytest.mark.parametrize(("mode", "expected"), [("all", {202, 401}), ("errors", {401}), ("off", set())])
def test_access_log_setting(redis_server: Any, sandbox: Any, mode: str, expected: set[int]) -> None:
    server = ApiServer(make_settings(redis_server.url, sandbox, BROKER_ACCESS_LOG=mode)).start()
    stopped = False
    try:
        admin = Admin(server.url)
        _, key = admin.tenant(f"log-{mode}")
        admin.close()
        with access_lines() as stream, tenant_client(server.url, key) as c:
            assert c.post("/v1/sessions").status_code == 202
            assert httpx.post(f"{server.url}/v1/sessions").status_code == 401
            server.stop()  # every line is written once the server has stopped
            stopped = True
        statuses = {line["status"] for line in _lines(stream) if line["route"] == "/v1/sessions"}
        assert statuses == expected
        assert key not in stream.getvalue()
    finally:
        if not stopped:
            server.stop()


def test_a_changed_default_config_applies_to_the_next_session(settings: Any, api: ApiServer, admin: Admin) -> None:
    """The validated default config is kept per distinct defaults, so a PATCH is never served stale."""
    import redis as sync_redis

    tenant, key = admin.tenant("hot-config", openai={"session": {"instructions": "first"}})
    _, other_key = admin.tenant("hot-config-b", openai={"session": {"instructions": "other"}})
    r = sync_redis.Redis.from_url(settings.redis_url)

    def stored_instructions(tid: str, sid: str) -> str:
        raw = r.hget(f"sb:t:{tid}:s:{sid}", "config")
        return str(json.loads(raw)["instructions"])

    try:
        with tenant_client(api.url, key) as c, tenant_client(api.url, other_key) as other:
            first = c.post("/v1/sessions").json()
            assert stored_instructions(tenant["id"], first["id"]) == "first"
            theirs = other.post("/v1/sessions").json()
            assert theirs["status"] == "queued"
            patched = admin.http.patch(f"/admin/v1/tenants/{tenant['id']}",
                                       json={"openai": {"session": {"instructions": "second"}}})
            assert patched.status_code == 200, patched.text
            deadline = time.monotonic() + 5
            while True:  # the cached tenant is dropped through pub/sub within a moment
                second = c.post("/v1/sessions").json()
                if stored_instructions(tenant["id"], second["id"]) == "second":
                    break
                assert time.monotonic() < deadline, "the new default config was never used"
            overridden = c.post("/v1/sessions", json={"session": {"instructions": "mine"}}).json()
            assert stored_instructions(tenant["id"], overridden["id"]) == "mine"
    finally:
        r.close()
