"""The worker's upstream clients (real openai SDK / httpx+aiohttp) against the running sandbox."""

from __future__ import annotations

import asyncio
import hashlib
import pickle
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from broker.embedded_redis import free_port
from workers.sandbox import SandboxServer
from workers.upstreams import (
    AvaturnClient,
    MintedSecret,
    OpenAIMinter,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from workers.upstreams.errors import parse_retry_after, sanitize

TIMEOUT = 0.5
KEY = "sk-tenant-a-000000000000000000000001"
KEY_B = "sk-tenant-b-000000000000000000000002"
AV_KEY = "av-project-key-a"
SESSION: dict[str, Any] = {"type": "realtime", "model": "gpt-realtime", "instructions": "Hi",
                           "audio": {"output": {"voice": "marin"}}}


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@pytest.fixture
async def minter(sandbox: SandboxServer) -> AsyncIterator[OpenAIMinter]:
    m = OpenAIMinter(sandbox.openai_base_url, TIMEOUT)
    yield m
    await m.aclose()


@pytest.fixture
async def avaturn(sandbox: SandboxServer) -> AsyncIterator[AvaturnClient]:
    client = AvaturnClient(sandbox.avaturn_base_url, TIMEOUT)
    yield client
    await client.aclose()


async def create(avaturn: AvaturnClient, secret: str, key: str = AV_KEY, max_duration: int = 600) -> Any:
    return await avaturn.create_session(key, secret, avatar_id="jane_20240829", background="default",
                                        user_absent_timeout=30, max_duration=max_duration)


def assert_no_secret(exc: BaseException, *secrets: str) -> None:
    """Neither the error nor anything chained to it carries a secret or a 4+ char piece of the echo."""
    assert exc.__cause__ is None and exc.__context__ is None
    shown = str(exc) + repr(exc) + repr(vars(exc))
    for secret in secrets:
        for piece in (secret, secret[:6], secret[-4:]):
            assert piece not in shown, piece


# -- happy path ------------------------------------------------------------------------------


async def test_mint_create_delete_round_trip(sandbox: SandboxServer, minter: OpenAIMinter,
                                            avaturn: AvaturnClient) -> None:
    """Mint + create + delete go through with the right keys, fields and secret, as the audit shows."""
    secret = await minter.mint(KEY, SESSION, 120)
    assert isinstance(secret, MintedSecret) and secret.value.startswith("ek_")
    assert "ek_" in repr(secret) and secret.value not in repr(secret)
    session = await create(avaturn, secret.value, max_duration=300)
    assert session.session_id and session.token and session.token not in repr(session)
    audit = sandbox.audit()
    [minted] = audit["secrets"]
    assert minted["secret_fingerprint"] == sha(secret.value) and minted["key_fingerprint"] == sha(KEY)
    assert minted["session"] == SESSION and minted["expires_after_seconds"] == 120
    assert minted["created_at"] + 119 <= secret.expires_at <= minted["created_at"] + 121
    [created] = audit["sessions"]
    assert created["session_id"] == session.session_id and created["secret_fingerprint"] == sha(secret.value)
    assert (created["max_duration"], created["user_absent_timeout"], created["key_fingerprint"]) == (300, 30,
                                                                                                   sha(AV_KEY))
    assert await avaturn.delete_session(AV_KEY, session.session_id) is True
    assert await avaturn.delete_session(AV_KEY, session.session_id) is False
    [ended] = sandbox.audit()["sessions"]
    assert ended["ended_by"] == "delete" and ended["live"] is False


async def test_secret_reused_for_a_retried_create(minter: OpenAIMinter, avaturn: AvaturnClient) -> None:
    """One minted secret can back a second create (retry after failure) within its lifetime."""
    secret = await minter.mint(KEY, SESSION, 60)
    first, second = await create(avaturn, secret.value), await create(avaturn, secret.value)
    assert first.session_id != second.session_id


async def test_delete_unknown_returns_false(avaturn: AvaturnClient, sandbox: SandboxServer) -> None:
    """An unknown id is 'already gone' (False), not an error; the 404 is in the audit."""
    assert await avaturn.delete_session(AV_KEY, "../no/such id") is False
    assert [d["status"] for d in sandbox.audit()["deletes"]] == [404]


async def test_max_duration_auto_end(sandbox: SandboxServer, minter: OpenAIMinter, avaturn: AvaturnClient) -> None:
    """After max_duration the session ended by itself: delete answers False and the audit says max_duration."""
    session = await create(avaturn, (await minter.mint(KEY, SESSION, 60)).value, max_duration=60)
    sandbox.advance_clock(61)
    assert await avaturn.delete_session(AV_KEY, session.session_id) is False
    [ended] = sandbox.audit()["sessions"]
    assert ended["ended_by"] == "max_duration" and ended["deleted_at"] is None


# -- one client per key ----------------------------------------------------------------------


async def test_one_sdk_client_per_key_reused(sandbox: SandboxServer, minter: OpenAIMinter) -> None:
    """Calls with the same key reuse one SDK client; each call still carries its own key on the wire."""
    client_a = minter.client_for(KEY)
    for key in (KEY, KEY_B, KEY, KEY, KEY_B):
        await minter.mint(key, SESSION, 60)
    assert minter.clients_created == 2 and minter.client_count == 2
    assert minter.client_for(KEY) is client_a and minter.client_for(KEY_B) is not client_a
    keys = [s["key_fingerprint"] for s in sandbox.audit()["secrets"]]
    assert keys == [sha(k) for k in (KEY, KEY_B, KEY, KEY, KEY_B)]


async def test_client_cache_is_bounded_lru(sandbox: SandboxServer) -> None:
    """With max_clients=2 the least recently used key's client is evicted and rebuilt on next use."""
    minter = OpenAIMinter(sandbox.openai_base_url, TIMEOUT, max_clients=2)
    try:
        first = minter.client_for("sk-a")
        minter.client_for("sk-b")
        minter.client_for("sk-a")  # a is now the most recent
        minter.client_for("sk-c")  # evicts b
        assert minter.client_count == 2 and minter.client_for("sk-a") is first
        minter.client_for("sk-b")
        assert minter.clients_created == 4
        assert (await minter.mint("sk-c", SESSION, 60)).value  # survivors still work on the shared pool
    finally:
        await minter.aclose()


async def test_concurrent_mints_never_mix_keys(sandbox: SandboxServer) -> None:
    """200 concurrent mints over 20 keys on the shared pool: every secret is minted under its own key."""
    # A generous timeout: the sandbox shares this process's GIL; the point is key isolation.
    minter = OpenAIMinter(sandbox.openai_base_url, 10.0)
    keys = [f"sk-concurrent-{i:02d}" for i in range(20)]
    try:
        results = await asyncio.gather(*(minter.mint(keys[i % 20], SESSION, 60) for i in range(200)))
    finally:
        await minter.aclose()
    by_secret = {s["secret_fingerprint"]: s["key_fingerprint"] for s in sandbox.audit()["secrets"]}
    assert len(by_secret) == 200
    assert all(by_secret[sha(r.value)] == sha(keys[i % 20]) for i, r in enumerate(results))
    assert minter.clients_created == 20


# -- OpenAI errors ---------------------------------------------------------------------------


async def test_invalid_key_text_never_reaches_our_error(minter: OpenAIMinter) -> None:
    """OpenAI's 401 echoes part of the key: our error is permanent and carries none of it."""
    key = "sk-invalid-CANARYHEAD-middle-CANARYTAIL"
    with pytest.raises(UpstreamRejected) as caught:
        await minter.mint(key, SESSION, 60)
    exc = caught.value
    assert (exc.upstream, exc.operation, exc.status, exc.code) == ("openai", "mint", 401, "openai_invalid_api_key")
    assert_no_secret(exc, key, "CANARYHEAD", "CANARYTAIL")
    # the trap is real: the SDK's own exception does carry the echoed key fragment
    with pytest.raises(openai.AuthenticationError) as raw:
        await minter.client_for(key).realtime.client_secrets.create(session={"type": "realtime"})
    assert "CANARYTAIL"[-4:] in str(raw.value)


async def test_ga_violation_is_bad_request_with_param(minter: OpenAIMinter) -> None:
    """A non-GA field is a permanent openai_bad_request naming the parameter."""
    with pytest.raises(UpstreamRejected) as caught:
        await minter.mint(KEY, {**SESSION, "temperature": 0.7}, 60)
    exc = caught.value
    assert (exc.status, exc.code, exc.param) == (400, "openai_bad_request", "session.temperature")
    assert "session.temperature" in exc.message
    assert_no_secret(exc, KEY)


@pytest.mark.parametrize(
    ("rule", "retry_after"),
    [({"retry_after": 1}, 1.0), ({"retry_after_ms": 250, "retry_after": 9}, 0.25), ({}, None)],
)
async def test_rate_limit_is_transient_with_retry_after(sandbox: SandboxServer, minter: OpenAIMinter,
                                                        rule: dict[str, Any], retry_after: float | None) -> None:
    """429 rate_limit_exceeded is transient, not applied, and carries Retry-After (ms header preferred)."""
    sandbox.configure({"mint": {"fail": [{"status": 429, "code": "rate_limit_exceeded", "count": 1, **rule}]}})
    with pytest.raises(UpstreamUnavailable) as caught:
        await minter.mint(KEY, SESSION, 60)
    exc = caught.value
    assert (exc.status, exc.code, exc.retry_after, exc.maybe_applied) == (429, "upstream_rate_limited",
                                                                          retry_after, False)
    assert (await minter.mint(KEY, SESSION, 60)).value  # next call goes through: the SDK did not retry
    assert sandbox.audit()["counters"]["mint"]["requests"] == 2


async def test_insufficient_quota_is_permanent(sandbox: SandboxServer, minter: OpenAIMinter) -> None:
    """429 insufficient_quota is permanent (openai_insufficient_quota), tried exactly once."""
    sandbox.configure({"mint": {"fail": [{"status": 429, "code": "insufficient_quota"}]}})
    with pytest.raises(UpstreamRejected) as caught:
        await minter.mint(KEY, SESSION, 60)
    assert (caught.value.status, caught.value.code) == (429, "openai_insufficient_quota")
    assert sandbox.audit()["counters"]["mint"]["requests"] == 1


@pytest.mark.parametrize(("status", "applied"), [(500, False), (503, False), (502, True), (504, True),
                                                  (408, False), (409, False)])
async def test_transient_statuses(sandbox: SandboxServer, minter: OpenAIMinter, status: int, applied: bool) -> None:
    """408/409/5xx are transient; only gateway answers (502/504) may have been applied."""
    sandbox.configure({"mint": {"fail": [{"status": status}]}})
    with pytest.raises(UpstreamUnavailable) as caught:
        await minter.mint(KEY, SESSION, 60)
    assert (caught.value.status, caught.value.code, caught.value.maybe_applied) == (status, "upstream_unavailable",
                                                                                    applied)


@pytest.mark.parametrize(("status", "code"), [(403, "openai_permission_denied"), (404, "openai_not_found"),
                                              (410, "openai_rejected"), (422, "openai_rejected")])
async def test_permanent_statuses(sandbox: SandboxServer, minter: OpenAIMinter, status: int, code: str) -> None:
    """Other 4xx answers are permanent with a stable code."""
    sandbox.configure({"mint": {"fail": [{"status": status}]}})
    with pytest.raises(UpstreamRejected) as caught:
        await minter.mint(KEY, SESSION, 60)
    assert (caught.value.status, caught.value.code) == (status, code)


@pytest.mark.parametrize("body", ["not json", '{"value": 3, "expires_at": 5}', '{"value": "ek_1"}', "[]"])
async def test_unusable_mint_answer(sandbox: SandboxServer, minter: OpenAIMinter, body: str) -> None:
    """A 200 without a str value and int expires_at is upstream_bad_response (transient), never a crash."""
    sandbox.configure({"mint": {"fail": [{"status": 200, "body": body}]}})
    with pytest.raises(UpstreamUnavailable) as caught:
        await minter.mint(KEY, SESSION, 60)
    assert caught.value.code == "upstream_bad_response"


async def test_mint_hang_is_timeout(sandbox: SandboxServer, minter: OpenAIMinter) -> None:
    """No answer within the timeout: transient upstream_timeout, maybe applied, in about the timeout."""
    sandbox.configure({"mint": {"fail": [{"hang": True}]}})
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamUnavailable) as caught:
        await minter.mint(KEY, SESSION, 60)
    assert TIMEOUT * 0.9 <= loop.time() - started < TIMEOUT * 4
    assert (caught.value.code, caught.value.maybe_applied, caught.value.status) == ("upstream_timeout", True, None)


async def test_mint_dropped_connection(sandbox: SandboxServer, minter: OpenAIMinter) -> None:
    """A connection dropped after the request was sent is transient and maybe applied (not a timeout)."""
    sandbox.configure({"mint": {"fail": [{"close": True}]}})
    with pytest.raises(UpstreamUnavailable) as caught:
        await minter.mint(KEY, SESSION, 60)
    assert (caught.value.code, caught.value.maybe_applied) == ("upstream_unavailable", True)


async def test_connect_refused_was_not_applied() -> None:
    """Nothing listening: transient, and certainly not applied, for both upstreams."""
    port = free_port()
    minter = OpenAIMinter(f"http://127.0.0.1:{port}/v1", TIMEOUT)
    avaturn = AvaturnClient(f"http://127.0.0.1:{port}/api/v1", TIMEOUT)
    try:
        with pytest.raises(UpstreamUnavailable) as minted:
            await minter.mint(KEY, SESSION, 60)
        with pytest.raises(UpstreamUnavailable) as created:
            await create(avaturn, "ek_x")
        with pytest.raises(UpstreamUnavailable) as deleted:
            await avaturn.delete_session(AV_KEY, "s")
    finally:
        await minter.aclose()
        await avaturn.aclose()
    for caught in (minted, created, deleted):
        assert (caught.value.code, caught.value.maybe_applied) == ("upstream_unavailable", False)
    assert_no_secret(minted.value, KEY)


# -- Avaturn errors --------------------------------------------------------------------------


async def test_create_hang_after_apply_is_maybe_applied(sandbox: SandboxServer, minter: OpenAIMinter,
                                                        avaturn: AvaturnClient) -> None:
    """Create applied upstream then no answer: timeout with maybe_applied=True, and the session does exist."""
    secret = await minter.mint(KEY, SESSION, 60)
    sandbox.configure({"create": {"fail": [{"hang": True, "after_apply": True, "count": 1}]}})
    with pytest.raises(UpstreamUnavailable) as caught:
        await create(avaturn, secret.value)
    assert (caught.value.operation, caught.value.code, caught.value.maybe_applied) == ("create", "upstream_timeout",
                                                                                       True)
    assert [s["live"] for s in sandbox.audit()["sessions"]] == [True]
    assert_no_secret(caught.value, secret.value, AV_KEY)


@pytest.mark.parametrize("op", ["create", "delete"])
async def test_avaturn_dropped_connection(sandbox: SandboxServer, minter: OpenAIMinter, avaturn: AvaturnClient,
                                          op: str) -> None:
    """A dropped connection is transient and maybe applied (aiohttp's disconnect is not a connect error)."""
    secret = await minter.mint(KEY, SESSION, 60)
    sandbox.configure({op: {"fail": [{"close": True}]}})
    with pytest.raises(UpstreamUnavailable) as caught:
        await (create(avaturn, secret.value) if op == "create" else avaturn.delete_session(AV_KEY, "s"))
    assert (caught.value.operation, caught.value.code, caught.value.maybe_applied) == (op, "upstream_unavailable",
                                                                                       True)


async def test_delete_hang_is_timeout(sandbox: SandboxServer, avaturn: AvaturnClient) -> None:
    """A hanging delete is a transient timeout."""
    sandbox.configure({"delete": {"fail": [{"hang": True}]}})
    with pytest.raises(UpstreamUnavailable) as caught:
        await avaturn.delete_session(AV_KEY, "s")
    assert (caught.value.code, caught.value.maybe_applied) == ("upstream_timeout", True)


@pytest.mark.parametrize(("rule", "cls", "code"), [
    ({"status": 503, "retry_after": 2}, UpstreamUnavailable, "upstream_unavailable"),
    ({"status": 429, "retry_after": 3}, UpstreamUnavailable, "upstream_rate_limited"),
    ({"status": 401}, UpstreamRejected, "avaturn_invalid_api_key"),
    ({"status": 410}, UpstreamRejected, "avaturn_avatar_gone"),
    ({"status": 400}, UpstreamRejected, "avaturn_rejected"),
])
async def test_create_status_classification(sandbox: SandboxServer, minter: OpenAIMinter, avaturn: AvaturnClient,
                                            rule: dict[str, Any], cls: type[UpstreamError], code: str) -> None:
    """Injected create answers map to the right class and code; Retry-After is kept on transient ones."""
    secret = await minter.mint(KEY, SESSION, 60)
    sandbox.configure({"create": {"fail": [rule]}})
    with pytest.raises(cls) as caught:
        await create(avaturn, secret.value)
    assert (type(caught.value), caught.value.code, caught.value.status) == (cls, code, rule["status"])
    if isinstance(caught.value, UpstreamUnavailable):
        assert caught.value.retry_after == rule["retry_after"] and caught.value.maybe_applied is False
    assert sandbox.audit()["sessions"] == []


async def test_real_rejections_from_avaturn(minter: OpenAIMinter, avaturn: AvaturnClient) -> None:
    """Bad key 401, unknown secret 400, out-of-range field 422 with its field name but no raw detail."""
    secret = await minter.mint(KEY, SESSION, 60)
    with pytest.raises(UpstreamRejected) as bad_key:
        await create(avaturn, secret.value, key="zz-invalid-av-key-QQQQ")
    assert bad_key.value.code == "avaturn_invalid_api_key"
    with pytest.raises(UpstreamRejected) as unknown:
        await create(avaturn, "ek_never_minted_by_openai")
    assert (unknown.value.status, unknown.value.code) == (400, "avaturn_rejected")
    with pytest.raises(UpstreamRejected) as short:
        await create(avaturn, secret.value, max_duration=30)
    assert (short.value.status, short.value.param) == (422, "max_duration")
    assert "greater than" not in short.value.message
    for exc in (bad_key.value, unknown.value, short.value):
        assert_no_secret(exc, secret.value, "zz-invalid-av-key-QQQQ", "ek_never_minted_by_openai")


async def test_delete_errors(sandbox: SandboxServer, avaturn: AvaturnClient) -> None:
    """Delete: 410 means already gone (False); 401 is permanent; 500 transient."""
    sandbox.configure({"delete": {"fail": [{"status": 410, "count": 1}, {"status": 500, "count": 1}]}})
    assert await avaturn.delete_session(AV_KEY, "s") is False
    with pytest.raises(UpstreamUnavailable):
        await avaturn.delete_session(AV_KEY, "s")
    with pytest.raises(UpstreamRejected) as caught:
        await avaturn.delete_session("invalid-key", "s")
    assert (caught.value.operation, caught.value.code) == ("delete", "avaturn_invalid_api_key")


@pytest.mark.parametrize("body", ["oops", '{"session_id": "s"}', '{"session_id": "", "token": "t"}'])
async def test_unusable_create_answer_is_maybe_applied(sandbox: SandboxServer, minter: OpenAIMinter,
                                                       avaturn: AvaturnClient, body: str) -> None:
    """A 200 create without session_id+token: upstream_bad_response, maybe applied (a session may exist)."""
    secret = await minter.mint(KEY, SESSION, 60)
    sandbox.configure({"create": {"fail": [{"status": 200, "body": body}]}})
    with pytest.raises(UpstreamUnavailable) as caught:
        await create(avaturn, secret.value)
    assert (caught.value.code, caught.value.maybe_applied) == ("upstream_bad_response", True)


# -- error objects ---------------------------------------------------------------------------


def test_errors_pickle_and_repr() -> None:
    """Errors survive pickling (job results) with every field; repr shows fields, str the message."""
    exc = UpstreamUnavailable(upstream="avaturn", operation="create", status=None, code="upstream_timeout",
                              message="Avaturn did not answer in time.", retry_after=1.5, maybe_applied=True)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is UpstreamUnavailable and vars(back) == vars(exc)
    assert str(back) == "Avaturn did not answer in time." and "maybe_applied=True" in repr(back)
    assert exc.retryable is True and UpstreamRejected.retryable is False


def test_sanitize_and_retry_after() -> None:
    """sanitize drops key-like text; Retry-After parses ms, seconds and HTTP dates, ignores garbage."""
    assert sanitize("Unknown parameter: 'session.temperature'.") == "Unknown parameter: 'session.temperature'."
    assert sanitize("Incorrect API key provided: sk-abc***wxyz") is None
    assert "ek_123" not in (sanitize("secret ek_1234567890abcdef is bad") or "")
    assert "A" * 30 not in (sanitize("token " + "A" * 30) or "")
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "Thu, 01 Jan 2026 00:00:10 GMT"}, now=1767225600.0) == 10.0
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after({}) is None


# -- no state shared between tenants through the pool ------------------------------------------


async def test_no_cookie_crosses_tenants() -> None:
    """Invariant: one tenant's upstream answer never changes what goes out with another's request.

    Both clients are shared by every tenant, and OpenAI's edge sets cookies (Cloudflare's
    ``__cf_bm``/``_cfuvid``) on API answers. A server here sets one on every answer and records
    the Cookie header of each request; ``localhost`` (not an IP) so that aiohttp's own jar, which
    skips IP hosts, would store it too."""
    from aiohttp import web

    seen: list[str | None] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        if request.path.endswith("/client_secrets"):
            body: dict[str, Any] = {"value": f"ek_cookie_test_{len(seen)}", "expires_at": 2_000_000_000,
                                    "session": SESSION}
        else:
            body = {"session_id": f"s{len(seen)}", "token": "frontend-token"}
        response = web.json_response(body)
        response.set_cookie("__cf_bm", f"edge-{len(seen)}", path="/", httponly=True)
        response.headers.add("Set-Cookie", f"_cfuvid=visitor-{len(seen)}; Path=/; Domain=localhost")
        return response

    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    minter = OpenAIMinter(f"http://localhost:{port}/v1", 5.0)
    avaturn = AvaturnClient(f"http://localhost:{port}/api/v1", 5.0)
    try:
        for key in (KEY, KEY_B, KEY):
            await minter.mint(key, SESSION, 60)
        for key in (AV_KEY, "av-project-key-b", AV_KEY):
            await avaturn.create_session(key, "ek_x", avatar_id="a", background="default",
                                         user_absent_timeout=30, max_duration=60)
    finally:
        await minter.aclose()
        await avaturn.aclose()
        await runner.cleanup()
    assert len(seen) == 6
    assert seen == [None] * 6, seen
