"""Strict input of the tenant and admin APIs (issue 17, item 10): control characters in
``end_user`` and metadata, duplicate JSON keys, a charset other than UTF-8, OPTIONS and the
metrics content type. Real API (uvicorn on loopback), real Redis."""

from __future__ import annotations

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from tests.fixtures.stack import Admin, ApiServer, tenant_client

from .support import assert_error

JSON = {"content-type": "application/json"}

CONTROL = ["\x00", "\x01", "\x1b", "\n", "\r", "\t", "\x7f", "\x85", "\x9f"]


@pytest.mark.parametrize("char", CONTROL, ids=[f"U+{ord(c):04X}" for c in CONTROL])
def test_control_characters_in_end_user_and_metadata_are_400s(api: ApiServer, admin: Admin, char: str) -> None:
    """Invariant: a NUL or any other control character in end_user, a metadata key or a metadata
    value (or the end_user of /v1/usage) is a 400 naming the field, and creates nothing."""
    _, key = admin.tenant("a")
    with tenant_client(api.url, key) as c:
        cases = [
            ({"end_user": f"u{char}1"}, "end_user"),
            ({"metadata": {f"k{char}": "v"}}, "metadata"),
            ({"metadata": {"k": f"v{char}"}}, "metadata.k"),
        ]
        for body, field in cases:
            err = assert_error(c.post("/v1/sessions", json=body), 400)
            assert err["field"] == field, (body, err)
        err = assert_error(c.get("/v1/usage", params={"end_user": f"u{char}"}), 400)
        assert err["field"] == "end_user"
        assert c.get("/v1/sessions").json()["data"] == []
        ok = c.post("/v1/sessions", json={"end_user": "ü-ser 1 ✓", "metadata": {"clé": "välue with spaces"}})
        assert ok.status_code == 202, ok.text


def test_duplicate_json_keys_are_400s(api: ApiServer, admin: Admin) -> None:
    """Invariant: a JSON object with the same key twice, at any depth, is refused (400), on the
    tenant API and on the admin API; nothing is created."""
    tenant, key = admin.tenant("a")
    with tenant_client(api.url, key) as c:
        for body in (b'{"end_user": "a", "end_user": "b"}', b'{"metadata": {"k": "1", "k": "2"}}',
                     b'{"ttl_seconds": 60, "metadata": {}, "ttl_seconds": 61}'):
            err = assert_error(c.post("/v1/sessions", content=body, headers=JSON), 400)
            assert err["code"] == "duplicate_key" and err["field"] == "body" and '"' in err["message"], err
        assert c.get("/v1/sessions").json()["data"] == []
        assert c.post("/v1/sessions", content=b'{"metadata": {"a": "1", "b": "1"}, "end_user": "a"}',
                      headers=JSON).status_code == 202
    r = admin.http.post("/admin/v1/tenants", content=b'{"name": "x", "name": "y"}', headers=JSON)
    assert assert_error(r, 400)["code"] == "duplicate_key"
    r = admin.http.patch(f"/admin/v1/tenants/{tenant['id']}", content=b'{"quotas": {"sessions_per_day": 5, '
                         b'"sessions_per_day": 9}}', headers=JSON)
    assert assert_error(r, 400)["code"] == "duplicate_key"


@pytest.mark.parametrize("ctype", ["application/json; charset=utf-16", "application/json; charset=latin-1",
                                   "application/json;charset=\"iso-8859-1\"", "application/json; charset="])
def test_a_charset_other_than_utf8_is_a_415(api: ApiServer, admin: Admin, ctype: str) -> None:
    """Invariant: JSON bodies are UTF-8 (RFC 8259); a Content-Type naming another charset is a
    415 naming Content-Type; charset=utf-8 (any case, quoted or not) is accepted."""
    _, key = admin.tenant("a")
    with tenant_client(api.url, key) as c:
        err = assert_error(c.post("/v1/sessions", content=b'{"end_user": "a"}', headers={"content-type": ctype}), 415)
        assert err["field"] == "Content-Type"
        for good in ("application/json; charset=utf-8", "application/json; charset=UTF-8",
                     'application/json; charset="utf-8"', "application/json;charset=utf8"):
            r = c.post("/v1/sessions", content=b"{}", headers={"content-type": good})
            assert r.status_code == 202, (good, r.text)


def test_options_lists_the_methods_each_path_has(api: ApiServer, admin: Admin) -> None:
    """Invariant: OPTIONS answers 204 with an Allow header listing exactly the methods the path
    serves (plus OPTIONS), with the credential of its API (without one it is a 401 like every
    other method: tests/security/test_auth_surface.py)."""
    _, key = admin.tenant("a")
    expect = {
        "/v1/sessions": {"GET", "POST", "OPTIONS"},
        "/v1/sessions/ses_AAAAAAAAAAAAAAAAAAAAAA": {"GET", "DELETE", "OPTIONS"},
        "/v1/usage": {"GET", "OPTIONS"},
        "/admin/v1/tenants": {"GET", "POST", "OPTIONS"},
        "/admin/v1/tenants/ten_x": {"GET", "PATCH", "OPTIONS"},
        "/healthz": {"GET", "HEAD", "OPTIONS"},
    }
    with tenant_client(api.url, key) as c:
        for path, methods in expect.items():
            r = admin.http.options(path) if path.startswith("/admin") else c.options(path)
            assert r.status_code == 204, (path, r.status_code, r.text)
            allow = {m.strip() for m in r.headers["allow"].split(",")}
            assert allow == methods, (path, allow)


def test_metrics_content_type_has_one_charset(api: ApiServer) -> None:
    """Invariant: /metrics is Prometheus text format 0.0.4 with a single charset parameter."""
    import httpx

    r = httpx.get(f"{api.url}/metrics")
    assert r.status_code == 200
    ctype = r.headers["content-type"]
    assert ctype == CONTENT_TYPE_LATEST and ctype.lower().count("charset") == 1, ctype
