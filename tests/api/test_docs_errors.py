"""The paths Litestar serves by itself (the OpenAPI documents under /schema, unknown paths,
methods a route does not have) answer errors in the contract's shape, like every handler of
ours, over real HTTP (uvicorn on loopback): Litestar's OpenAPI router would otherwise answer an
unknown ``/schema/<name>`` with an HTML "Error 404" page of its own."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.fixtures.stack import ApiServer
from tests.security.support import raw_request

# every document Litestar serves under /schema, with the content type it is served with
SERVED = {
    "/schema": "text/html", "/schema/": "text/html", "/schema/swagger": "text/html",
    "/schema/oauth2-redirect.html": "text/html",
    "/schema/openapi.json": "application/vnd.oai.openapi+json", "/schema/openapi.yaml": "application/vnd.oai.openapi",
    "/schema/openapi.yml": "application/vnd.oai.openapi",
}
UNKNOWN_UNDER_SCHEMA = [
    "/schema/nope", "/schema/openapi.xml", "/schema/openapi", "/schema/index.html", "/schema/nope.json",
    "/schema/nope.yaml", "/schema/a/b", "/schema/redoc", "/schema/elements", "/schema/rapidoc", "/schema/redoc/x",
    "/schema/swagger-ui/nope.js", "/schema/swagger-ui/../openapi.json/x", "/schema/openapi.json/x", "/schema/..", "/schema/%2e%2e",
    "/schema/%00", "/schema/" + "x" * 300,
]
UNKNOWN_ELSEWHERE = ["/nope", "/favicon.ico", "/schemax", "/schema.json", "/v2/sessions", "/metrics/x", "/healthz/x"]
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
CODES = {404: "not_found", 405: "method_not_allowed"}


def assert_json_error(method: str, path: str, status: int, content_type: str, body: bytes,
                      allowed: tuple[int, ...]) -> None:
    where = (method, path, status, body[:120])
    assert status in allowed, where
    assert content_type == "application/json", where
    if method == "HEAD":
        assert body == b"", where  # a HEAD answer has no body, only the headers of one
        return
    error = json.loads(body)["error"]
    assert set(json.loads(body)) == {"error"}, where
    assert error["code"] == CODES[status] and error["message"], where


def test_unknown_paths_under_schema_answer_the_contract_error(api: ApiServer) -> None:
    """Invariant: any path under /schema that is not a served document answers, for every
    method, 404 (or 405 where Litestar has a route for the path but not the method) with the
    body ``{"error": {"code", "message"}}`` and ``Content-Type: application/json``, never an
    HTML page; a GET is always a 404 ``not_found``."""
    for path in UNKNOWN_UNDER_SCHEMA:
        for method in METHODS:
            r = raw_request(api.url, method, path)
            allowed = (404,) if method == "GET" else (404, 405)
            assert_json_error(method, path, r.status_code, r.headers.get("content-type", ""), r.content, allowed)


def test_unknown_paths_and_wrong_methods_elsewhere_answer_the_contract_error(api: ApiServer) -> None:
    """Invariant: the same holds for unknown paths outside /schema and for a method a public
    route (or a served document) does not have: Litestar's own 404/405 take the contract's shape."""
    for path in UNKNOWN_ELSEWHERE:
        for method in METHODS:
            r = raw_request(api.url, method, path)
            assert_json_error(method, path, r.status_code, r.headers.get("content-type", ""), r.content, (404, 405))
    for path in [*SERVED, "/healthz", "/readyz", "/metrics"]:
        for method in ("POST", "PUT", "PATCH", "DELETE") if path in ("/healthz", "/readyz") else \
                ("HEAD", "POST", "PUT", "PATCH", "DELETE"):
            r = raw_request(api.url, method, path)
            assert_json_error(method, path, r.status_code, r.headers.get("content-type", ""), r.content, (405,))


def test_served_schema_documents_are_unchanged(api: ApiServer) -> None:
    """Invariant: the documents themselves keep their status, content type and content (the
    error hook rewrites only error answers): the JSON and YAML documents describe the API, the
    viewers are the HTML pages of the same document."""
    for path, content_type in SERVED.items():
        r = httpx.get(f"{api.url}{path}")
        assert r.status_code == 200, (path, r.status_code)
        assert r.headers["content-type"].split(";")[0] == content_type, (path, r.headers["content-type"])
    document = httpx.get(f"{api.url}/schema/openapi.json").json()
    assert "/v1/sessions" in document["paths"] and "Error" in document["components"]["schemas"]
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load(httpx.get(f"{api.url}/schema/openapi.yaml").text) == document
    for viewer in ("/schema", "/schema/swagger"):
        assert "<title>Session Broker</title>" in httpx.get(f"{api.url}{viewer}").text, viewer


def test_the_viewer_loads_nothing_from_another_host(api: ApiServer) -> None:
    """Invariant: the one HTML viewer renders offline: every script, stylesheet and icon it
    references is a path of this API, and each of them is served (200, the right type)."""
    import re

    page = httpx.get(f"{api.url}/schema").text
    refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page)
    assert len(refs) >= 3, page[:500]
    types = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    for ref in refs:
        assert ref.startswith("/schema/"), ref  # no http(s)://, no //cdn...
        r = httpx.get(f"{api.url}{ref}")
        assert r.status_code == 200 and len(r.content) > 100, ref
        assert r.headers["content-type"].startswith(types[ref[ref.rindex("."):]]), (ref, r.headers["content-type"])


def test_healthz_and_readyz_answer_head_like_get_without_a_body(api: ApiServer) -> None:
    for path in ("/healthz", "/readyz"):
        get, head = httpx.get(f"{api.url}{path}"), httpx.head(f"{api.url}{path}")
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path
