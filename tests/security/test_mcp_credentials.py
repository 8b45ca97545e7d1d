"""MCP credentials in session configs (an ``mcp`` tool's ``authorization`` and ``headers`` values):
shown only as the marker in every admin view, the CLI and the OpenAPI document; sealed with
BROKER_SECRET_KEY in the tenant record and in every session hash; opened only for the worker's
mint, which carries the real values; kept by a PATCH that sends the view back; re-encrypted by
``session-broker secrets rotate``; never in a log line, even when OpenAI's error text echoes one.
Real Redis, API, worker and sandbox upstreams, two tenants with distinct credentials.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet, InvalidToken
from jsonschema import Draft202012Validator, ValidationError

from broker.embedded_redis import EmbeddedRedis
from broker.core.settings import Settings
from tenants.crypto import generate_secret_key
from tenants.scope import TenantScope, tenant_record
from tenants.session_secrets import REDACTED, SEALED_PREFIX
from tests.fixtures.stack import Admin, ApiServer, WorkerThread, make_settings, tenant_client
from workers.sandbox import SandboxServer

from .support import assert_error, broker_logs, leaked_fragments, redis_dump


class Creds:
    """One MCP server's credentials, random per test, each long enough for the 8-character check."""

    def __init__(self, label: str, header: str | None = None) -> None:
        self.label = label
        self.authorization = f"mcp-auth-{label}-" + secrets.token_urlsafe(24)
        self.header = header or f"mcp-hdr-{label}-" + secrets.token_urlsafe(24)

    @property
    def values(self) -> tuple[str, str]:
        return self.authorization, self.header

    def tool(self, url: str | None = None) -> dict[str, Any]:
        return {"type": "mcp", "server_label": self.label, "server_url": url or f"https://mcp.example/{self.label}",
                "authorization": self.authorization, "headers": {"X-Api-Key": self.header, "X-Trace": ""}}

    def session(self) -> dict[str, Any]:
        return {"instructions": f"use {self.label}", "tools": [self.tool()]}


def _assert_hidden(text: str, *plaintexts: str) -> None:
    for plain in plaintexts:
        assert plain not in text
        assert not leaked_fragments(plain, text), plain[:12]


def _sync_redis(url: str) -> Any:
    import redis as sync_redis

    return sync_redis.Redis.from_url(url)


def _record(url: str, tenant_id: str) -> dict[str, Any]:
    client = _sync_redis(url)
    try:
        raw = client.get(tenant_record(tenant_id))
    finally:
        client.close()
    assert raw is not None
    return json.loads(raw)


def _session_config(url: str, tenant_id: str, session_id: str) -> dict[str, Any]:
    client = _sync_redis(url)
    try:
        raw = client.hget(TenantScope(tenant_id).session(session_id), "config")
    finally:
        client.close()
    assert raw is not None
    return json.loads(raw)


def _opened(tool: dict[str, Any], key: str) -> tuple[str, str]:
    """(authorization, X-Api-Key) of a stored tool, decrypted with ``key`` (sealed form required)."""
    sealed = tool["authorization"], tool["headers"]["X-Api-Key"]
    assert all(v.startswith(SEALED_PREFIX) for v in sealed), sealed
    fernet = Fernet(key.encode())
    auth, header = (fernet.decrypt(v[len(SEALED_PREFIX):].encode()).decode() for v in sealed)
    return auth, header


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "session-broker")
    base = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return subprocess.run([exe, *args], env={**base, **env}, capture_output=True, text=True, timeout=60)


def _cli_env(settings: Settings, keys: str | None = None) -> dict[str, str]:
    return {"BROKER_REDIS_URL": settings.redis_url, "BROKER_SECRET_KEY": keys or ",".join(settings.secret_keys)}


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """The broker's logging (JSON, DEBUG, libraries at DEBUG too) into a buffer; restored after."""
    with broker_logs("DEBUG", "DEBUG") as buffer:
        yield buffer


# ---- views -------------------------------------------------------------------------------------


def test_admin_views_cli_and_openapi_show_only_the_marker(api: ApiServer, admin: Admin, settings: Settings) -> None:
    """Invariant: no admin answer (create, get, list, patch, disable, enable) and no CLI output
    (create, show, list, update) carries an MCP credential, a piece of one or its ciphertext: each
    set value is the marker, an empty one stays empty; the OpenAPI document describes exactly that
    (a view with a value in place of the marker breaks its schema)."""
    a, b = Creds("crm"), Creds("wiki")
    r = admin.http.post("/admin/v1/tenants", json={"name": "a", "openai": {"session": a.session()}})
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    tool = _record(settings.redis_url, tid)["openai"]["session"]["tools"][0]
    ciphertexts = (tool["authorization"], tool["headers"]["X-Api-Key"])
    answers = [r, admin.http.get(f"/admin/v1/tenants/{tid}"), admin.http.get("/admin/v1/tenants"),
               admin.http.patch(f"/admin/v1/tenants/{tid}", json={"name": "a2"}),
               admin.http.post(f"/admin/v1/tenants/{tid}/disable"), admin.http.post(f"/admin/v1/tenants/{tid}/enable")]
    spec = httpx.get(f"{api.url}/schema/openapi.json").json()

    def valid(body: Any, name: str) -> None:
        Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": spec["components"]}).validate(body)

    for answer in answers:
        assert answer.status_code in (200, 201), answer.text
        _assert_hidden(answer.text + str(answer.headers), *a.values, *ciphertexts)
        assert SEALED_PREFIX not in answer.text
        body = answer.json()  # disable answers the tenant with sessions_stopped (issue 18)
        valid(body, "TenantList" if "data" in body else "TenantDisabled" if "sessions_stopped" in body else "TenantView")
    view = answers[1].json()
    shown = view["openai"]["session"]["tools"][0]
    assert shown["authorization"] == REDACTED and shown["headers"] == {"X-Api-Key": REDACTED, "X-Trace": ""}
    assert shown["server_url"] == "https://mcp.example/crm"
    shown["authorization"] = a.authorization[:4]
    with pytest.raises(ValidationError):
        valid(view, "TenantView")

    env = _cli_env(settings)
    created = _cli(env, "tenants", "create", "--name", "b", "--json", json.dumps({"openai": {"session": b.session()}}))
    assert created.returncode == 0, created.stderr
    tid_b = json.loads(created.stdout)["id"]
    outputs = [created, _cli(env, "tenants", "show", tid), _cli(env, "tenants", "list"),
               _cli(env, "tenants", "update", tid_b, "--json", '{"name": "b2"}')]
    for out in outputs:
        assert out.returncode == 0, out.stderr
        _assert_hidden(out.stdout + out.stderr, *a.values, *b.values, *ciphertexts)
        assert SEALED_PREFIX not in out.stdout
    assert json.loads(outputs[1].stdout)["openai"]["session"]["tools"][0]["authorization"] == REDACTED


# ---- at rest, and the mint ---------------------------------------------------------------------


def test_sealed_in_redis_and_opened_only_for_the_mint(
    api: ApiServer, worker: WorkerThread, admin: Admin, settings: Settings, sandbox: SandboxServer,
    logs: io.StringIO,
) -> None:
    """Invariant: Redis (tenant records, session hashes, queue) never holds an MCP credential in
    plaintext or a piece of one: the tenant's defaults and a request's own override are sealed
    with BROKER_SECRET_KEY; the worker's mint request carries each session's real values (tenant
    A's defaults, A's override, tenant B's defaults: never another's); no log line (DEBUG, libraries
    included) carries one."""
    a, a_override, b = Creds("crm"), Creds("billing"), Creds("wiki")
    tenant_a, key_a = admin.tenant("a", openai={"session": a.session(), "allowed_overrides": ["instructions", "tools"]})
    tenant_b, key_b = admin.tenant("b", openai={"session": b.session()})
    with tenant_client(api.url, key_a) as ca, tenant_client(api.url, key_b) as cb:
        ready = [ca.post("/v1/sessions?wait=10"),
                 ca.post("/v1/sessions?wait=10", json={"session": {"tools": [a_override.tool()]}}),
                 cb.post("/v1/sessions?wait=10")]
    for r in ready:
        assert r.status_code == 201, r.text
        _assert_hidden(r.text, *a.values, *a_override.values, *b.values)
    every = (*a.values, *a_override.values, *b.values)
    _assert_hidden(redis_dump(settings.redis_url), *every)

    key = settings.secret_keys[0]
    expected = [(tenant_a["id"], a), (tenant_a["id"], a_override), (tenant_b["id"], b)]
    for (tid, creds), r in zip(expected, ready, strict=True):
        stored = _session_config(settings.redis_url, tid, r.json()["id"])["tools"][0]
        assert stored["server_label"] == creds.label and _opened(stored, key) == creds.values
    assert _opened(_record(settings.redis_url, tenant_a["id"])["openai"]["session"]["tools"][0], key) == a.values

    minted = [s["session"]["tools"][0] for s in sandbox.audit()["secrets"]]
    assert [t["server_label"] for t in minted] == ["crm", "billing", "wiki"]
    for tool, (_, creds) in zip(minted, expected, strict=True):
        assert tool["authorization"] == creds.authorization
        assert tool["headers"] == {"X-Api-Key": creds.header, "X-Trace": ""}
    text = logs.getvalue()
    assert '"level":"debug"' in text
    _assert_hidden(text, *every)


def test_openai_error_text_echoing_a_credential_is_not_passed_on(
    api: ApiServer, worker: WorkerThread, admin: Admin, settings: Settings, sandbox: SandboxServer,
    logs: io.StringIO,
) -> None:
    """Invariant: when OpenAI refuses the config with a message that echoes an MCP credential,
    the session fails with OpenAI's code but a fixed message: the credential reaches neither the
    tenant's answer, Redis (the session's error) nor a log line. (The header value is made of
    short runs, which the generic upstream-text sanitizer does not take for a secret.)"""
    a = Creds("crm", header="pass:" + ":".join(secrets.token_hex(4) for _ in range(6)))
    _, key = admin.tenant("a", openai={"session": a.session()})
    sandbox.configure({"mint": {"fail": [{"status": 400, "count": 1, "code": "invalid_value",
                                          "message": f"Invalid header value '{a.header}' for X-Api-Key"}]}})
    with tenant_client(api.url, key) as c:
        failed = c.post("/v1/sessions?wait=10")
    assert failed.status_code == 502, failed.text
    error = failed.json()["error"]
    assert error["code"] == "openai_bad_request" and error["message"].startswith("OpenAI rejected the session")
    for text in (failed.text, redis_dump(settings.redis_url), logs.getvalue()):
        _assert_hidden(text, *a.values)


# ---- round trip and refusals -------------------------------------------------------------------


def test_patch_with_the_redacted_view_keeps_the_stored_credentials(
    api: ApiServer, admin: Admin, settings: Settings
) -> None:
    """Invariant: a PATCH that sends the view's session back unchanged keeps every stored MCP
    credential (the very same ciphertexts); a marker keeps only the value of the same field of the
    same tool on the same server, so it is refused (400 naming the field, nothing written) where
    nothing is stored: on create, after the server_url changed, on another tenant (B cannot reach
    A's credential), and in a tenant's own override, as is a sealed-looking value."""
    a = Creds("crm")
    tenant, key = admin.tenant("a", openai={"session": a.session(), "allowed_overrides": ["tools"]})
    other, _ = admin.tenant("b")
    tid = tenant["id"]
    before = _record(settings.redis_url, tid)["openai"]["session"]
    view = admin.http.get(f"/admin/v1/tenants/{tid}").json()["openai"]["session"]

    kept = admin.http.patch(f"/admin/v1/tenants/{tid}", json={"openai": {"session": view}})
    assert kept.status_code == 200, kept.text
    assert kept.json()["openai"]["session"] == view
    assert _record(settings.redis_url, tid)["openai"]["session"] == before

    new_header = "mcp-hdr-new-" + secrets.token_urlsafe(24)
    changed = json.loads(json.dumps(view))
    changed["tools"][0]["headers"]["X-Api-Key"] = new_header
    assert admin.http.patch(f"/admin/v1/tenants/{tid}", json={"openai": {"session": changed}}).status_code == 200
    stored = _record(settings.redis_url, tid)["openai"]["session"]["tools"][0]
    assert _opened(stored, settings.secret_keys[0]) == (a.authorization, new_header)
    assert stored["authorization"] == before["tools"][0]["authorization"]
    record = _record(settings.redis_url, tid)

    moved = json.loads(json.dumps(view))
    moved["tools"][0]["server_url"] = "https://elsewhere.example/mcp"
    sealed = json.loads(json.dumps(view))
    sealed["tools"][0]["headers"]["X-Api-Key"] = stored["authorization"]
    refusals = [
        (admin.http.patch(f"/admin/v1/tenants/{tid}", json={"openai": {"session": moved}}),
         "openai.session.tools[0].authorization"),
        (admin.http.patch(f"/admin/v1/tenants/{tid}", json={"openai": {"session": sealed}}),
         "openai.session.tools[0].headers.X-Api-Key"),
        (admin.http.patch(f"/admin/v1/tenants/{other['id']}", json={"openai": {"session": view}}),
         "openai.session.tools[0].authorization"),
        (admin.http.post("/admin/v1/tenants", json={"name": "c", "openai": {"session": view}}),
         "openai.session.tools[0].authorization"),
    ]
    with tenant_client(api.url, key) as c:
        refusals.append((c.post("/v1/sessions", json={"session": {"tools": view["tools"]}}),
                         "session.tools[0].authorization"))
    for answer, field in refusals:
        err = assert_error(answer, 400, "invalid_session_config")
        assert err["field"] == field, err
        _assert_hidden(answer.text, a.authorization, new_header, stored["authorization"])
    assert _record(settings.redis_url, tid) == record
    assert "tools" not in _record(settings.redis_url, other["id"])["openai"]["session"]
    assert len(admin.http.get("/admin/v1/tenants").json()["data"]) == 2


# ---- key rotation ------------------------------------------------------------------------------


def test_secrets_rotate_reencrypts_mcp_credentials(
    redis_server: EmbeddedRedis, sandbox: SandboxServer, settings: Settings, api: ApiServer, admin: Admin
) -> None:
    """Invariant: `session-broker secrets rotate` with BROKER_SECRET_KEY="new,old" re-encrypts the
    MCP credentials of every tenant's defaults with the new key (a tenant with no other credential
    counts), the old key no longer opens them, the view is unchanged, no output carries one, and a
    broker holding only the new key mints with the real values."""
    old_key, new_key = settings.secret_keys[0], generate_secret_key()
    a = Creds("crm")
    tenant, key = admin.tenant("a", openai={"session": a.session()})
    admin.tenant("bare")
    view = admin.http.get(f"/admin/v1/tenants/{tenant['id']}").json()

    done = _cli(_cli_env(settings, f"{new_key},{old_key}"), "secrets", "rotate")
    assert done.returncode == 0, done.stderr
    assert "1 tenant(s)" in done.stdout
    _assert_hidden(done.stdout + done.stderr, *a.values)
    tool = _record(settings.redis_url, tenant["id"])["openai"]["session"]["tools"][0]
    assert _opened(tool, new_key) == a.values
    with pytest.raises(InvalidToken):
        _opened(tool, old_key)

    rotated = make_settings(redis_server.url, sandbox, BROKER_SECRET_KEY=new_key)
    server, worker = ApiServer(rotated).start(), WorkerThread(rotated).start()
    fresh = Admin(server.url)
    try:
        assert fresh.http.get(f"/admin/v1/tenants/{tenant['id']}").json()["openai"] == view["openai"]
        with tenant_client(server.url, key) as c:
            r = c.post("/v1/sessions?wait=10")
            assert r.status_code == 201, r.text
    finally:
        fresh.close()
        worker.stop()
        server.stop()
    minted = sandbox.audit()["secrets"][-1]["session"]["tools"][0]
    assert (minted["authorization"], minted["headers"]["X-Api-Key"]) == a.values
