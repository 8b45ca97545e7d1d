"""Input limits of every endpoint: body size, nesting, field lengths, metadata, tools and their
schemas, ``wait``, pagination, ``Idempotency-Key``, path ids and admin bodies. Every violation
is a 4xx in the contract's shape naming the field at fault, and nothing is created by it."""

from __future__ import annotations

import json
from typing import Any

import httpx

from broker.api.body import MAX_DEPTH
from tests.fixtures.stack import ADMIN_TOKEN, Admin, ApiServer, tenant_client

from .support import assert_error

JSON = {"content-type": "application/json"}


def _deep(levels: int) -> bytes:
    return b'{"session": {"prompt": {"id": "p", "variables": {"v": ' + b'{"a":' * levels + b"1" + b"}" * levels + b"}}}}"


def _tool(i: int, **extra: Any) -> dict[str, Any]:
    return {"type": "function", "name": f"tool_{i}", "description": "d", "parameters": {"type": "object"}, **extra}


def _session_body(session: dict[str, Any]) -> dict[str, Any]:
    return {"json": {"session": session}}


# (query/headers/body of POST /v1/sessions, status, field)
SESSION_CASES: list[tuple[str, dict[str, Any], int, str]] = [
    ("body over 64 KiB", {"content": b'{"end_user": "' + b"x" * (64 * 1024) + b'"}', "headers": JSON}, 413, "body"),
    ("chunked body over 64 KiB", {"content": iter([b'{"metadata": {"k": "', b"x" * (70 * 1024), b'"}}']),
                                  "headers": JSON}, 413, "body"),
    ("nesting beyond the limit", {"content": _deep(MAX_DEPTH + 1), "headers": JSON}, 400, "body"),
    ("pathological nesting", {"content": b'{"session": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "headers": JSON},
     400, "body"),
    ("not JSON", {"content": b"{nope", "headers": JSON}, 400, "body"),
    ("not UTF-8", {"content": b'\xff\xfe{"a": 1}', "headers": JSON}, 400, "body"),
    ("form body", {"content": b"a=b", "headers": {"content-type": "application/x-www-form-urlencoded"}},
     415, "Content-Type"),
    ("unknown field", {"json": {"surprise": 1}}, 400, "surprise"),
    ("ttl too short", {"json": {"ttl_seconds": 9}}, 400, "ttl_seconds"),
    ("ttl above the tenant's max", {"json": {"ttl_seconds": 3601}}, 400, "ttl_seconds"),
    ("ttl huge", {"json": {"ttl_seconds": 10**30}}, 400, "ttl_seconds"),
    ("ttl not an integer", {"json": {"ttl_seconds": 60.5}}, 400, "ttl_seconds"),
    ("ttl a string", {"json": {"ttl_seconds": "60"}}, 400, "ttl_seconds"),
    ("end_user empty", {"json": {"end_user": ""}}, 400, "end_user"),
    ("end_user too long", {"json": {"end_user": "u" * 129}}, 400, "end_user"),
    ("end_user not a string", {"json": {"end_user": 42}}, 400, "end_user"),
    ("17 metadata keys", {"json": {"metadata": {f"k{i}": "v" for i in range(17)}}}, 400, "metadata"),
    ("empty metadata key", {"json": {"metadata": {"": "v"}}}, 400, "metadata"),
    ("metadata key too long", {"json": {"metadata": {"k" * 65: "v"}}}, 400, "metadata." + "k" * 64),
    ("metadata value too long", {"json": {"metadata": {"k": "v" * 513}}}, 400, "metadata.k"),
    ("metadata value not a string", {"json": {"metadata": {"k": {"x": 1}}}}, 400, "metadata"),
    ("session not an object", {"json": {"session": "realtime"}}, 400, "session"),
    ("instructions too long", _session_body({"instructions": "i" * 32_769}), 400, "session.instructions"),
    ("129 tools", _session_body({"tools": [_tool(i) for i in range(129)]}), 400, "session.tools"),
    ("tool schema over 16 KiB", _session_body({"tools": [_tool(0, parameters={"type": "object",
                                                                               "description": "d" * 17_000})]}),
     400, "session.tools[0].parameters"),
    ("tool schema not an object", _session_body({"tools": [_tool(0, parameters=[1])]}), 400,
     "session.tools[0].parameters"),
    ("tool name invalid", _session_body({"tools": [_tool(0, name="no spaces allowed")]}), 400,
     "session.tools[0].name"),
    ("tool without type", _session_body({"tools": [{"name": "f"}]}), 400, "session.tools[0].type"),
    ("257 prompt variables", _session_body({"prompt": {"id": "p", "variables": {f"v{i}": "x" for i in range(257)}}}),
     400, "session.prompt.variables"),
    ("field the policy forbids", _session_body({"model": "gpt-realtime"}), 400, "session.model"),
    ("wait above 30", {"params": {"wait": "31"}}, 400, "wait"),
    ("wait negative", {"params": {"wait": "-1"}}, 400, "wait"),
    ("wait NaN", {"params": {"wait": "nan"}}, 400, "wait"),
    ("wait infinite", {"params": {"wait": "inf"}}, 400, "wait"),
    ("wait with underscores", {"params": {"wait": "1_0"}}, 400, "wait"),
    ("wait padded", {"params": {"wait": " 5"}}, 400, "wait"),
    ("wait empty", {"params": {"wait": ""}}, 400, "wait"),
    ("Idempotency-Key empty", {"headers": {"Idempotency-Key": ""}}, 400, "Idempotency-Key"),
    ("Idempotency-Key too long", {"headers": {"Idempotency-Key": "k" * 256}}, 400, "Idempotency-Key"),
]


def _check(r: httpx.Response, status: int, field: str | None, what: str, failures: list[str]) -> None:
    try:
        err = assert_error(r, status)
        assert err.get("field") == field, err
    except (AssertionError, json.JSONDecodeError) as exc:
        failures.append(f"{what}: {exc}")


def test_session_creation_limits(api: ApiServer, admin: Admin) -> None:
    """Invariant: every out-of-limit create request is a 4xx naming its field, and queues nothing."""
    _, key = admin.tenant("a", openai={"allowed_overrides": ["instructions", "audio", "prompt", "tools"]})
    failures: list[str] = []
    with tenant_client(api.url, key) as c:
        for what, kwargs, status, field in SESSION_CASES:
            _check(c.post("/v1/sessions", **kwargs), status, field, what, failures)
        assert c.get("/v1/sessions").json()["data"] == []  # nothing was created
        ok = [c.post("/v1/sessions", json={"end_user": "u" * 128, "metadata": {f"k{i}": "v" * 512 for i in range(16)}},
                     headers={"Idempotency-Key": "k" * 255}, params={"wait": "0"}),
              c.post("/v1/sessions", json={"session": {"tools": [_tool(i) for i in range(128)]}}),
              c.post("/v1/sessions", content=_deep(MAX_DEPTH - 5), headers=JSON)]
        assert [r.status_code for r in ok] == [202, 202, 202], [r.text for r in ok]
    assert not failures, "\n".join(failures)


def test_listing_usage_and_id_limits(api: ApiServer, admin: Admin) -> None:
    """Invariant: pagination (limit 1..100, opaque cursor), status filter, end_user and path ids
    out of range are refused with a 4xx naming the parameter (an absurd id is simply not found)."""
    _, key = admin.tenant("a")
    failures: list[str] = []
    with tenant_client(api.url, key) as c:
        for params, field in [({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"), ({"limit": "-1"}, "limit"),
                              ({"limit": "ten"}, "limit"), ({"limit": "1_0"}, "limit"), ({"limit": " 5"}, "limit"),
                              ({"limit": "5.0"}, "limit"), ({"cursor": "!!"}, "cursor"),
                              ({"cursor": "A" * 20_000}, "cursor"), ({"status": "nope"}, "status")]:
            _check(c.get("/v1/sessions", params=params), 400, field, f"list {params}"[:60], failures)
        for end_user in ("", "u" * 129):
            _check(c.get("/v1/usage", params={"end_user": end_user}), 400, "end_user", "usage end_user", failures)
        for sid in ("ses_" + "a" * 5000, "x", "ses_:x", "ses_%2F..%2Fusage"):
            for method in ("GET", "DELETE"):
                _check(c.request(method, f"/v1/sessions/{sid}"), 404, None, f"{method} id {sid[:12]}", failures)
        assert c.get("/v1/sessions", params={"limit": "100"}).status_code == 200
    assert not failures, "\n".join(failures)


ADMIN_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("name missing", {}, "name"),
    ("name empty", {"name": "  "}, "name"),
    ("name too long", {"name": "n" * 129}, "name"),
    ("name not printable", {"name": "a\u0000b"}, "name"),
    ("unknown field", {"name": "a", "plan": "gold"}, "plan"),
    ("unknown quota", {"name": "a", "quotas": {"speed": 1}}, "quotas.speed"),
    ("quota out of range", {"name": "a", "quotas": {"sessions_per_minute": 0}}, "quotas.sessions_per_minute"),
    ("quota a boolean", {"name": "a", "quotas": {"max_concurrent_sessions": True}}, "quotas.max_concurrent_sessions"),
    ("ttl cap above 7200", {"name": "a", "quotas": {"max_session_seconds": 7201}}, "quotas.max_session_seconds"),
    ("end-user policy unknown", {"name": "a", "quotas": {"end_user_policy": "x"}}, "quotas.end_user_policy"),
    ("openai key too long", {"name": "a", "openai": {"api_key": "sk-" + "k" * 1100}}, "openai.api_key"),
    ("openai key with spaces", {"name": "a", "openai": {"api_key": "sk- spaced"}}, "openai.api_key"),
    ("avaturn key not a string", {"name": "a", "avaturn": {"api_key": 12}}, "avaturn.api_key"),
    ("beta session field", {"name": "a", "openai": {"session": {"temperature": 0.8}}}, "openai.session.temperature"),
    ("override not a GA field", {"name": "a", "openai": {"allowed_overrides": ["voice"]}},
     "openai.allowed_overrides[0]"),
    ("avatar id too long", {"name": "a", "avaturn": {"avatar_id": "a" * 129}}, "avaturn.avatar_id"),
    ("background unknown", {"name": "a", "avaturn": {"background": "green"}}, "avaturn.background"),
    ("absent timeout too short", {"name": "a", "avaturn": {"user_absent_timeout": 5}}, "avaturn.user_absent_timeout"),
]


def test_admin_body_limits(api: ApiServer, admin: Admin) -> None:
    """Invariant: every admin body violation (create, patch, keys, rotate, listing) is a 4xx naming
    the field, and creates or changes nothing."""
    failures: list[str] = []
    http = admin.http
    for what, body, field in ADMIN_CASES:
        _check(http.post("/admin/v1/tenants", json=body), 400, field, f"create: {what}", failures)
        if "name" in body and field != "name":
            _check(http.post("/admin/v1/tenants", json=body), 400, field, f"again: {what}", failures)
    _check(http.post("/admin/v1/tenants", content=b'{"name": "' + b"n" * (65 * 1024) + b'"}', headers=JSON),
           413, "body", "create: body over 64 KiB", failures)
    _check(http.post("/admin/v1/tenants", content=b'{"name": "a", "quotas": ' + b'{"a":' * 5000 + b"1" + b"}" * 5001,
                     headers=JSON), 400, "body", "create: deep nesting", failures)
    _check(http.post("/admin/v1/tenants", content=b"name=a", headers={"content-type": "text/plain"}),
           415, "Content-Type", "create: not JSON", failures)
    assert http.get("/admin/v1/tenants").json()["data"] == []  # nothing was created
    tenant, _ = admin.tenant("a")
    tid = tenant["id"]
    for what, body, field in [("status unknown", {"status": "paused"}, "status"), ("name empty", {"name": ""}, "name"),
                              ("quota out of range", {"quotas": {"sessions_per_day": 0}}, "quotas.sessions_per_day")]:
        _check(http.patch(f"/admin/v1/tenants/{tid}", json=body), 400, field, f"patch: {what}", failures)
    assert http.get(f"/admin/v1/tenants/{tid}").json() == tenant
    key_id = http.get(f"/admin/v1/tenants/{tid}/keys").json()["data"][0]["id"]
    for what, body, field in [("past not_after", {"not_after": "2001-01-01T00:00:00Z"}, "not_after"),
                              ("not a time", {"not_after": "tomorrow"}, "not_after"),
                              ("unknown field", {"scope": "all"}, "scope")]:
        _check(http.post(f"/admin/v1/tenants/{tid}/keys", json=body), 400, field, f"keys: {what}", failures)
    for what, body in [("negative", {"overlap_seconds": -1}), ("beyond 7 days", {"overlap_seconds": 604_801}),
                       ("a string", {"overlap_seconds": "1h"}), ("a float", {"overlap_seconds": 1.5})]:
        _check(http.post(f"/admin/v1/tenants/{tid}/keys/{key_id}/rotate", json=body), 400, "overlap_seconds",
               f"rotate: {what}", failures)
    assert len(http.get(f"/admin/v1/tenants/{tid}/keys").json()["data"]) == 1
    for params, field in [({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"), ({"limit": "x"}, "limit"),
                          ({"cursor": "%%%"}, "cursor")]:
        _check(http.get("/admin/v1/tenants", params=params), 400, field, f"admin list {params}", failures)
    for tid_bad in ("ten_" + "x" * 5000, "x", "ten_a:b"):
        _check(http.get(f"/admin/v1/tenants/{tid_bad}"), 404, None, f"admin id {tid_bad[:10]}", failures)
    assert not failures, "\n".join(failures)
    assert httpx.get(f"{api.url}/admin/v1/tenants", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 200
