"""The authentication surface: every route of the app except the public ones refuses a request
without a valid credential of its own kind, the admin API exists only when BROKER_ADMIN_TOKEN
is set and compares the token in constant time, and ``--admin-port`` serves it on that port only.
"""

from __future__ import annotations

import hmac
import os
import signal
import subprocess
import sys
from typing import Any

import httpx
import msgspec
import pytest

from broker.api import deps
from broker.embedded_redis import free_port
from broker.core.settings import Settings
from tests.fixtures.stack import ADMIN_TOKEN, Admin, ApiServer
from tests.fixtures.wait import wait_until

from .support import RawResponse, assert_error, full_app, is_public, raw_request, route_table, unknown_key

TENANT_ROUTE_PREFIX = "/v1/"
ADMIN_ROUTE_PREFIX = "/admin/v1/"


def _protected(settings: Settings) -> list[tuple[str, str, str]]:
    table = [row for row in route_table(full_app(settings)) if not is_public(row[1])]
    # the walk must see both APIs, or it proves nothing
    assert any(t.startswith(TENANT_ROUTE_PREFIX) for _, t, _ in table)
    assert any(t.startswith(ADMIN_ROUTE_PREFIX) for _, t, _ in table)
    return table


def _send(base: str, method: str, path: str, headers: dict[str, str] | None = None) -> RawResponse:
    """One request sent as is (httpx refuses header values such as ``"Bearer "``)."""
    body = b"{}" if method in ("POST", "PATCH") else None
    return raw_request(base, method, path, {"content-type": "application/json", **(headers or {})}, body)


def test_route_walk_covers_every_route_and_only_public_ones_are_open(settings: Settings, api: ApiServer) -> None:
    """Invariant: a route that answers without a credential is one of /healthz, /readyz, /metrics, /schema*,
    and the console's page and files (/console, /console/assets/*)."""
    table = route_table(full_app(settings))
    assert len(table) >= 30  # 15 documented operations, their OPTIONS, the public routes
    open_routes = set()
    for method, template, path in table:
        if method == "OPTIONS" or "{path:" in template:
            continue
        r = _send(api.url, method, path)
        if r.status_code != 401:
            open_routes.add(template)
    assert open_routes and all(is_public(t) for t in open_routes), sorted(open_routes)
    assert {"/healthz", "/readyz", "/metrics", "/schema/openapi.json"} <= open_routes


BAD_CREDENTIALS = [
    None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer sbk_nonsense", "Bearer not-a-key-at-all",
    "Token {unknown}", "Bearer {unknown}", "Bearer {unknown} extra", "Bearer\t{unknown}x",
]


def test_every_protected_route_refuses_a_missing_or_bad_credential(settings: Settings, api: ApiServer) -> None:
    """Invariant: without a valid credential (none, empty, other scheme, malformed, unknown but
    well-formed) every non-public route, OPTIONS included, answers 401 with the contract's error
    body, which never echoes the credential."""
    table = _protected(settings)
    for credential in BAD_CREDENTIALS:
        value = None if credential is None else credential.format(unknown=unknown_key())
        headers = {} if value is None else {"Authorization": value}
        for method, _, path in table:
            r = _send(api.url, method, path, headers)
            assert_error(r, 401)
            secret = (value or "").partition(" ")[2].strip()
            assert not secret or secret not in r.text, (credential, method, path)


def test_tenant_key_is_refused_on_admin_routes_and_admin_token_on_tenant_routes(
    settings: Settings, api: ApiServer, admin: Admin
) -> None:
    """Invariant: each credential opens only its own API (a tenant key never reaches the admin API)."""
    _, tenant_key = admin.tenant("a")
    for method, template, path in _protected(settings):
        if template.startswith(ADMIN_ROUTE_PREFIX):
            assert_error(_send(api.url, method, path, {"Authorization": f"Bearer {tenant_key}"}), 401,
                         "invalid_admin_token")
        else:
            assert_error(_send(api.url, method, path, {"Authorization": f"Bearer {ADMIN_TOKEN}"}), 401,
                         "invalid_api_key")
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {tenant_key}"}) as tenant:
        assert tenant.get("/v1/sessions").status_code == 200  # the key itself is valid
    assert admin.http.get("/admin/v1/tenants").status_code == 200


TRICKY_PATHS = [
    "/v1/admin/healthz-dump", "/v1/healthz", "/healthz-dump", "/healthzv1/sessions",
    "/healthz/../v1/sessions", "/healthz/%2e%2e/v1/sessions", "/healthz%2f..%2fv1%2fsessions",
    "/metrics/../admin/v1/tenants", "/readyz/../../admin/v1/tenants", "/schema/../v1/sessions",
    "/schema/%2e%2e/admin/v1/tenants", "/v1/sessions/", "/v1/sessions//", "//v1/sessions", "/v1//sessions",
    "/V1/sessions", "/v1/SESSIONS", "/V1/SESSIONS", "/v1/Usage", "/ADMIN/v1/tenants", "/Admin/V1/Tenants",
    "/admin/v1/tenants/", "/admin//v1/tenants", "/admin/v1/tenants/%2e%2e/tenants", "/v1/sessions;/healthz",
    "/v1/sessions%00", "/v1/sessions?x=/healthz", "/v1/sessions#/healthz", "/v1/./sessions", "/./v1/usage",
    "/v1/sessions/..%2fusage", "/v1/sessions/%2e%2e/usage", "/admin/v1/tenants/x/../../tenants",
    "/v1/usage/", "/v1/usage/.", "/admin/v1/tenants/ten_x/keys/", "/v1/sessions/ses_x/",
]


def test_tricky_paths_never_bypass_authentication(api: ApiServer) -> None:
    """Invariant: no spelling of a protected path (dot segments, encodings, case, slashes, a public
    prefix) is served without a credential: the answer is an error (401/404/405) in the contract's
    shape (under /schema too), never a 2xx or 3xx."""
    for path in TRICKY_PATHS:
        for method in ("GET", "POST", "DELETE", "PATCH"):
            body = b"{}" if method in ("POST", "PATCH") else None
            r = raw_request(api.url, method, path, {"content-type": "application/json"}, body)
            assert not 200 <= r.status_code < 400, (method, path, r.status_code, r.text[:200])
            assert r.status_code in (400, 401, 404, 405), (method, path, r.status_code)
            assert_error(r, r.status_code)


def _without_admin(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, admin_token=None)


def test_admin_api_does_not_exist_without_admin_token(settings: Settings) -> None:
    """Invariant: with BROKER_ADMIN_TOKEN unset every admin path answers 404 (with or without a
    token), the routes are not registered and the OpenAPI schema does not mention them."""
    admin_rows = [row for row in route_table(full_app(settings)) if row[1].startswith(ADMIN_ROUTE_PREFIX)]
    assert len(admin_rows) >= 15
    off = _without_admin(settings)
    assert not [r for r in route_table(full_app(off)) if r[1].startswith("/admin")]
    server = ApiServer(off).start()
    try:
        for method, _, path in admin_rows:
            for headers in ({}, {"Authorization": f"Bearer {ADMIN_TOKEN}"}, {"Authorization": "Bearer "}):
                r = _send(server.url, method, path, headers)
                if method == "OPTIONS":
                    assert r.status_code in (404, 405), (method, path, r.status_code)
                    continue
                assert_error(r, 404)
        schema = httpx.get(f"{server.url}/schema/openapi.json").json()
        assert not [p for p in schema["paths"] if p.startswith("/admin")]
        assert "adminToken" in schema["components"]["securitySchemes"]  # the scheme is documented, unused
    finally:
        server.stop()


def test_admin_token_is_compared_in_constant_time(api: ApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant: the admin guard decides with hmac.compare_digest on the whole token, for a wrong
    token of the same length as for the right one (no early-exit string comparison)."""
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)
    same_length_wrong = ADMIN_TOKEN[:-1] + ("x" if ADMIN_TOKEN[-1] != "x" else "y")
    assert_error(httpx.get(f"{api.url}/admin/v1/tenants", headers={"Authorization": f"Bearer {same_length_wrong}"}),
                 401, "invalid_admin_token")
    assert httpx.get(f"{api.url}/admin/v1/tenants", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 200
    token = ADMIN_TOKEN.encode()
    assert (same_length_wrong.encode(), token) in calls
    assert (token, token) in calls


def test_admin_surface_on_its_own_port_only(settings: Settings) -> None:
    """Invariant: with the API split by surfaces (what --admin-port does), the main port has no
    admin route even for the right token, and the admin port serves no tenant route."""
    main = ApiServer(settings, ("tenant", "ops")).start()
    admin_only = ApiServer(settings, ("admin", "ops")).start()
    try:
        token = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        for method, template, path in route_table(full_app(settings)):
            if method == "OPTIONS" or is_public(template):
                continue
            if template.startswith(ADMIN_ROUTE_PREFIX):
                assert_error(_send(main.url, method, path, token), 404)
            else:
                assert_error(_send(admin_only.url, method, path, token), 404)
        assert httpx.get(f"{admin_only.url}/admin/v1/tenants", headers=token).status_code == 200
        assert_error(httpx.get(f"{main.url}/v1/sessions"), 401)
        main_schema = httpx.get(f"{main.url}/schema/openapi.json").json()
        assert not [p for p in main_schema["paths"] if p.startswith("/admin")]
    finally:
        admin_only.stop()
        main.stop()


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"api process exited with {proc.returncode}")
        return httpx.get(url + "/healthz", timeout=1).status_code == 200

    wait_until(healthy, timeout, f"{url} healthy", ignoring=(httpx.TransportError,))


def test_cli_admin_port_serves_admin_api_only_there(settings: Settings) -> None:
    """Invariant: `session-broker api --admin-port P` (a real process) serves /admin/v1 on P only;
    the main port answers 404 to the admin API even with the right token."""
    port, admin_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
        "BROKER_REDIS_URL": settings.redis_url,
        "BROKER_ADMIN_TOKEN": ADMIN_TOKEN,
        "BROKER_SECRET_KEY": ",".join(settings.secret_keys),
    }
    exe = os.path.join(os.path.dirname(sys.executable), "session-broker")
    proc = subprocess.Popen([exe, "api", "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin_port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        main, admin_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
        _wait_healthy(main, proc)
        _wait_healthy(admin_url, proc)
        token = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        assert_error(httpx.get(f"{main}/admin/v1/tenants", headers=token), 404)
        created = httpx.post(f"{admin_url}/admin/v1/tenants", headers=token, json={"name": "split"})
        assert created.status_code == 201, created.text
        assert_error(httpx.get(f"{admin_url}/admin/v1/tenants", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(httpx.get(f"{admin_url}/v1/sessions"), 404)
        assert_error(httpx.get(f"{main}/v1/sessions"), 401)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert ADMIN_TOKEN.encode() not in err


def test_metrics_are_served_on_the_metrics_port_only(settings: Settings) -> None:
    """Invariant: `session-broker api --admin-port A --metrics-port M` (a real process) answers 404
    (contract shape) for /metrics on the tenant port and on the admin port - it names tenants and
    their counts - and serves it on M, counting the requests of every port in one registry; M
    serves nothing else but /healthz. Without --metrics-port no port serves /metrics."""
    port, admin_port, metrics_port = free_port(), free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
        "BROKER_REDIS_URL": settings.redis_url,
        "BROKER_ADMIN_TOKEN": ADMIN_TOKEN,
        "BROKER_SECRET_KEY": ",".join(settings.secret_keys),
    }
    exe = os.path.join(os.path.dirname(sys.executable), "session-broker")
    for with_metrics in (True, False):
        argv = [exe, "api", "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin_port)]
        if with_metrics:
            argv += ["--metrics-port", str(metrics_port)]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            main, admin_url, metrics_url = (f"http://127.0.0.1:{p}" for p in (port, admin_port, metrics_port))
            _wait_healthy(main, proc)
            _wait_healthy(admin_url, proc)
            token = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            tenant = httpx.post(f"{admin_url}/admin/v1/tenants", headers=token, json={"name": "m"}).json()
            assert_error(httpx.get(f"{main}/metrics"), 404)
            assert_error(httpx.get(f"{admin_url}/metrics"), 404)
            assert_error(httpx.get(f"{main}/v1/sessions"), 401)
            if not with_metrics:
                with pytest.raises(httpx.ConnectError):
                    httpx.get(f"{metrics_url}/metrics")
                continue
            _wait_healthy(metrics_url, proc)
            text = httpx.get(f"{metrics_url}/metrics").text
            assert 'broker_http_requests_total{method="GET",route="unmatched",status="404"}' in text
            assert 'route="/admin/v1/tenants",status="201"' in text and 'route="/v1/sessions",status="401"' in text
            assert tenant["id"] not in httpx.get(f"{main}/metrics").text
            assert_error(httpx.get(f"{metrics_url}/v1/sessions"), 404)
            assert_error(httpx.get(f"{metrics_url}/admin/v1/tenants", headers=token), 404)
            assert_error(httpx.get(f"{metrics_url}/readyz"), 404)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
