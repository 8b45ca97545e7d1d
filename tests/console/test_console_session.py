"""The console's HTTP side, without a browser: the sign-in cookie and its attributes, the console
session in Redis, the tenant API accepting the cookie (with CSRF on state-changing calls),
revocation and disabling ending the console session, sign-out, and the files it serves."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from http.cookies import SimpleCookie
from importlib import resources
from typing import Any

import httpx
import pytest
import redis as sync_redis

from broker.api.console_routes import ASSETS
from broker.api.console_session import COOKIE, MAX_AGE_SECONDS
from broker.core.settings import Settings
from tests.fixtures.stack import Admin, ApiServer
from tests.fixtures.wait import wait_until
from tests.security.support import assert_error, redis_dump, unknown_key

pytestmark = pytest.mark.usefixtures("api")


def _sign_in(url: str, key: str, headers: dict[str, str] | None = None) -> tuple[httpx.Response, str]:
    r = httpx.post(f"{url}/console/session", headers={"Authorization": f"Bearer {key}", **(headers or {})})
    assert r.status_code == 201, r.text
    return r, _cookie(r)[COOKIE].value


def _cookie(response: httpx.Response) -> SimpleCookie:
    jar: SimpleCookie = SimpleCookie()
    jar.load(response.headers["set-cookie"])
    return jar


def _with_cookie(token: str, csrf: str | None = None) -> dict[str, str]:
    headers = {"Cookie": f"{COOKIE}={token}"}
    if csrf is not None:
        headers["X-CSRF-Token"] = csrf
    return headers


def _record(settings: Settings, token: str) -> dict[bytes, bytes]:
    client = sync_redis.Redis.from_url(settings.redis_url)
    try:
        return client.hgetall(f"sb:console:{hashlib.sha256(token.encode()).hexdigest()}")  # type: ignore[return-value]
    finally:
        client.close()


def _new_key(admin: Admin, tenant_id: str, **body: Any) -> dict[str, Any]:
    r = admin.http.post(f"/admin/v1/tenants/{tenant_id}/keys", json=body)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def test_sign_in_sets_an_httponly_strict_cookie_and_stores_no_key(
    api: ApiServer, admin: Admin, settings: Settings
) -> None:
    """Invariant: the key buys an HttpOnly, SameSite=Strict, Path=/ cookie of at most 12 h (not
    Secure over plain http); the answer carries the tenant and a CSRF token, never the key; Redis
    holds the console session under the token's hash, with the key's id and hash, never the key
    nor the token."""
    tenant, key = admin.tenant("acme")
    r, token = _sign_in(api.url, key)
    morsel = _cookie(r)[COOKIE]
    assert morsel["httponly"] is True and morsel["samesite"].lower() == "strict" and morsel["path"] == "/"
    assert 0 < int(morsel["max-age"]) <= MAX_AGE_SECONDS
    assert not morsel["secure"]
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["tenant"] == {"id": tenant["id"], "name": "acme"}
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", body["csrf_token"])
    assert key not in r.text and key not in r.headers["set-cookie"] and token != key
    expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
    assert expires <= datetime.now(UTC) + timedelta(hours=12, seconds=1)
    record = _record(settings, token)
    assert record[b"tenant_id"].decode() == tenant["id"]
    assert record[b"key_hash"].decode() == hashlib.sha256(key.encode()).hexdigest()
    assert record[b"csrf"].decode() == body["csrf_token"]
    dump = redis_dump(settings.redis_url)
    assert key not in dump and token not in dump
    ttl = sync_redis.Redis.from_url(settings.redis_url).ttl(f"sb:console:{hashlib.sha256(token.encode()).hexdigest()}")
    assert 0 < ttl <= MAX_AGE_SECONDS


def test_cookie_is_secure_behind_an_https_proxy(api: ApiServer, admin: Admin) -> None:
    """Invariant: a sign-in that came over https (X-Forwarded-Proto from a proxy uvicorn trusts:
    loopback by default) gets a Secure cookie."""
    _, key = admin.tenant("acme")
    r, _ = _sign_in(api.url, key, {"X-Forwarded-Proto": "https"})
    assert _cookie(r)[COOKIE]["secure"] is True


def test_console_session_never_outlives_its_key(api: ApiServer, admin: Admin) -> None:
    """Invariant: a key that expires in one hour gets a cookie (and a session) of at most one hour."""
    tenant, _ = admin.tenant("acme")
    not_after = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    short = _new_key(admin, tenant["id"], not_after=not_after)
    r, _ = _sign_in(api.url, short["key"])
    assert int(_cookie(r)[COOKIE]["max-age"]) <= 3601


def test_sign_in_refuses_a_missing_wrong_or_admin_credential(api: ApiServer) -> None:
    """Invariant: the sign-in refuses exactly as the tenant API does, with its error body."""
    assert_error(httpx.post(f"{api.url}/console/session"), 401, "missing_api_key")
    assert_error(httpx.post(f"{api.url}/console/session", headers={"Authorization": "Bearer sbk_nope"}),
                 401, "invalid_api_key")
    r = httpx.post(f"{api.url}/console/session", headers={"Authorization": f"Bearer {unknown_key()}"})
    assert_error(r, 401, "invalid_api_key")
    assert "set-cookie" not in r.headers


def test_the_tenant_api_accepts_the_cookie_and_csrf_guards_state_changes(api: ApiServer, admin: Admin) -> None:
    """Invariant: with the console cookie, reads work; a state-changing call (create, stop,
    sign-out) without the session's CSRF token, or with another one, is refused 403
    ``csrf_token_invalid`` and changes nothing; with it, it works."""
    _, key = admin.tenant("acme")
    r, token = _sign_in(api.url, key)
    csrf = r.json()["csrf_token"]
    url = api.url
    assert httpx.get(f"{url}/v1/sessions", headers=_with_cookie(token)).json()["data"] == []
    me = httpx.get(f"{url}/console/session", headers=_with_cookie(token))
    assert me.status_code == 200 and me.json()["csrf_token"] == csrf
    for headers in (_with_cookie(token), _with_cookie(token, "x" * 43), _with_cookie(token, "")):
        assert_error(httpx.post(f"{url}/v1/sessions", json={}, headers=headers), 403, "csrf_token_invalid")
    assert httpx.get(f"{url}/v1/sessions", headers=_with_cookie(token)).json()["data"] == []
    created = httpx.post(f"{url}/v1/sessions", json={"ttl_seconds": 60}, headers=_with_cookie(token, csrf))
    assert created.status_code == 202, created.text
    sid = created.json()["id"]
    assert_error(httpx.delete(f"{url}/v1/sessions/{sid}", headers=_with_cookie(token)), 403, "csrf_token_invalid")
    assert httpx.get(f"{url}/v1/sessions/{sid}", headers=_with_cookie(token)).json()["status"] == "queued"
    assert_error(httpx.delete(f"{url}/console/session", headers=_with_cookie(token)), 403, "csrf_token_invalid")
    assert httpx.delete(f"{url}/v1/sessions/{sid}", headers=_with_cookie(token, csrf)).status_code in (200, 202)


def test_cookie_sees_only_its_tenant_and_a_key_wins_over_it(api: ApiServer, admin: Admin) -> None:
    """Invariant: tenant A's console cannot read tenant B's session (404 as an unknown id); a
    request with both a Bearer key and a cookie is the key's tenant."""
    _, key_a = admin.tenant("a")
    _, key_b = admin.tenant("b")
    _, token_a = _sign_in(api.url, key_a)
    sid_b = httpx.post(f"{api.url}/v1/sessions", json={}, headers={"Authorization": f"Bearer {key_b}"}).json()["id"]
    assert_error(httpx.get(f"{api.url}/v1/sessions/{sid_b}", headers=_with_cookie(token_a)), 404)
    both = httpx.get(f"{api.url}/v1/sessions/{sid_b}",
                     headers={**_with_cookie(token_a), "Authorization": f"Bearer {key_b}"})
    assert both.status_code == 200 and both.json()["id"] == sid_b
    assert_error(httpx.get(f"{api.url}/console/session", headers={"Authorization": f"Bearer {key_b}"}),
                 401, "console_session_required")


def _until(check: Any, timeout: float) -> Any:
    """``check()`` once truthy; falsy if it is not within ``timeout`` (the caller says what failed)."""
    try:
        return wait_until(check, timeout, "the condition")
    except AssertionError:
        return None


def test_revoking_the_key_ends_the_console_session_within_a_second(
    api: ApiServer, admin: Admin, settings: Settings
) -> None:
    """Invariant: once the key is revoked, the cookie is refused (401 ``invalid_api_key``) within
    1 s, the console session is deleted and the answer clears the cookie; another key's console
    session of the same tenant goes on."""
    tenant, key = admin.tenant("acme")
    other = _new_key(admin, tenant["id"])
    _, token = _sign_in(api.url, key)
    _, other_token = _sign_in(api.url, other["key"])
    assert httpx.get(f"{api.url}/v1/sessions", headers=_with_cookie(token)).status_code == 200  # cached now
    key_id = next(k["id"] for k in admin.http.get(f"/admin/v1/tenants/{tenant['id']}/keys").json()["data"]
                  if k["id"] != other["id"])
    assert admin.http.delete(f"/admin/v1/tenants/{tenant['id']}/keys/{key_id}").status_code == 200
    refused = _until(lambda: (r := httpx.get(f"{api.url}/v1/sessions", headers=_with_cookie(token))).status_code
                     == 401 and r, 1.0)
    assert refused, "the console session outlived its revoked key by more than 1 s"
    assert_error(refused, 401, "invalid_api_key")
    assert _cookie(refused)[COOKIE]["max-age"] == "0"
    assert _record(settings, token) == {}
    assert_error(httpx.get(f"{api.url}/console/session", headers=_with_cookie(token)), 401, "console_session_expired")
    assert httpx.get(f"{api.url}/v1/sessions", headers=_with_cookie(other_token)).status_code == 200


def test_disabling_the_tenant_ends_its_console_sessions(api: ApiServer, admin: Admin, settings: Settings) -> None:
    """Invariant: a disabled tenant's cookie is refused 403 ``tenant_disabled`` within 1 s and its
    console session deleted (enabling the tenant again does not revive it)."""
    tenant, key = admin.tenant("acme")
    _, token = _sign_in(api.url, key)
    assert httpx.get(f"{api.url}/v1/usage", headers=_with_cookie(token)).status_code == 200
    assert admin.http.post(f"/admin/v1/tenants/{tenant['id']}/disable").status_code == 200
    refused = _until(lambda: (r := httpx.get(f"{api.url}/v1/usage", headers=_with_cookie(token))).status_code
                     == 403 and r, 1.0)
    assert refused, "the console session outlived the tenant's disabling by more than 1 s"
    assert_error(refused, 403, "tenant_disabled")
    assert _record(settings, token) == {}
    assert admin.http.post(f"/admin/v1/tenants/{tenant['id']}/enable").status_code == 200
    assert_error(httpx.get(f"{api.url}/v1/usage", headers=_with_cookie(token)), 401, "console_session_expired")


def test_sign_out_ends_the_console_session(api: ApiServer, admin: Admin, settings: Settings) -> None:
    """Invariant: DELETE /console/session (with its CSRF token) deletes the session and clears the
    cookie; the cookie then opens nothing; a new sign-in with an old cookie replaces that session."""
    _, key = admin.tenant("acme")
    r, token = _sign_in(api.url, key)
    out = httpx.delete(f"{api.url}/console/session", headers=_with_cookie(token, r.json()["csrf_token"]))
    assert out.status_code == 200 and out.json() == {"signed_out": True}
    assert _cookie(out)[COOKIE]["max-age"] == "0"
    assert _record(settings, token) == {}
    assert_error(httpx.get(f"{api.url}/v1/sessions", headers=_with_cookie(token)), 401, "console_session_expired")
    _, first = _sign_in(api.url, key)
    _, second = _sign_in(api.url, key, _with_cookie(first))
    assert _record(settings, first) == {} and _record(settings, second) != {}


def test_unknown_or_forged_cookies_are_refused_without_a_lookup_of_the_key(api: ApiServer) -> None:
    """Invariant: a cookie that names no console session answers 401 ``console_session_expired``
    (and clears it), whatever its shape."""
    for value in ("x", "A" * 43, "A" * 500, "%00", ""):
        r = httpx.get(f"{api.url}/v1/sessions", headers={"Cookie": f"{COOKIE}={value}"})
        if value == "":  # an empty cookie is no credential at all
            assert_error(r, 401)
            continue
        assert_error(r, 401, "console_session_expired")


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href", "action") and v]


def test_console_files_are_served_with_a_strict_policy_and_load_nothing_from_elsewhere(api: ApiServer) -> None:
    """Invariant: GET /console is the page (public, no data), with a CSP that allows only this
    origin; every file it names is served from /console/assets; no file refers to another host;
    every file shipped in broker/api/static is served (so the wheel carries what the page needs)."""
    page = httpx.get(f"{api.url}/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    parser = _Links()
    parser.feed(page.text)
    local = [u for u in parser.urls if not u.startswith("#")]
    assert local and all(u.startswith("/console/assets/") for u in local), parser.urls
    shipped = {p.name for p in resources.files("broker.api").joinpath("static").iterdir()}
    assert shipped == {"index.html", *ASSETS}
    for name in ASSETS:
        r = httpx.get(f"{api.url}/console/assets/{name}")
        assert r.status_code == 200, name
        assert not re.search(r"\b(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", r.text, re.I), name
        assert "localStorage" not in r.text and "sessionStorage" not in r.text, name
    assert_error(httpx.get(f"{api.url}/console/assets/../app.py"), 404)
    assert_error(httpx.get(f"{api.url}/console/assets/nothing.js"), 404)
