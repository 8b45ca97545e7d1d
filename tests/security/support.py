"""Helpers of the security suite: the contract's error shape, raw HTTP requests whose path no
client library normalises, and a walk over every route of the app."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from litestar import Litestar
from litestar.routes import HTTPRoute

from broker.api.app import create_app
from broker.core.logs import ARQ_WORKER_LOGGER, CHATTY_LOGGERS, configure_logging
from broker.core.settings import Settings
from tenants.apikeys import checksum

ERROR_CODE = re.compile(r"^[a-z][a-z0-9_]*$")
PUBLIC_PREFIXES = ("/healthz", "/readyz", "/metrics", "/schema", "/console/assets")
# the console's page holds no data until its user signs in; its /console/session is protected
PUBLIC_PAGES = ("/console",)
# well-formed ids that exist nowhere (a route answers 401 before it could look them up)
PATH_VALUES = {"session_id": "ses_" + "A" * 22, "tenant_id": "ten_" + "B" * 22, "key_id": "key_" + "C" * 16}


@contextlib.contextmanager
def broker_logs(level: str = "DEBUG", library_level: str = "WARNING") -> Iterator[io.StringIO]:
    """The broker's own logging setup (JSON, ``configure_logging``) writing into a buffer, to look
    for secrets in every line; the logging configuration it changed is restored afterwards."""
    root = logging.getLogger()
    names = ("uvicorn.access", ARQ_WORKER_LOGGER, *CHATTY_LOGGERS)
    handlers, root_level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in names}
    arq_filters = logging.getLogger(ARQ_WORKER_LOGGER).filters[:]
    buffer = io.StringIO()
    configure_logging("json", level, library_level)
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)
    try:
        yield buffer
    finally:
        root.handlers[:] = handlers
        root.setLevel(root_level)
        for name, saved in levels.items():
            logging.getLogger(name).setLevel(saved)
        logging.getLogger(ARQ_WORKER_LOGGER).filters[:] = arq_filters


def unknown_key() -> str:
    """A key with a valid format and checksum that no tenant has."""
    body = "Z" * 22
    return f"sbk_{body}{checksum(body)}"


def assert_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """The contract's error body: ``{"error": {"code": <snake_case>, "message": <sentence>[, "field"]}}``."""
    assert response.status_code == status, (response.status_code, response.text[:300])
    body = response.json() if hasattr(response, "json") else json.loads(response.text)
    assert set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err["code"], str) and ERROR_CODE.match(err["code"]), body
    assert isinstance(err["message"], str) and err["message"], body
    if code is not None:
        assert err["code"] == code, body
    return err


def is_public(path: str) -> bool:
    return path in PUBLIC_PAGES or any(path == p or path.startswith(p + "/") or path.startswith(p + ".") for p in PUBLIC_PREFIXES)


def route_table(app: Litestar) -> list[tuple[str, str, str]]:
    """``(method, template, concrete path)`` for every method of every HTTP route of ``app``
    (OPTIONS included: Litestar adds it to every route)."""
    out = []
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        concrete = route.path
        for name, definition in route.path_parameters.items():
            concrete = concrete.replace("{" + definition.full + "}", PATH_VALUES.get(name, "x"))
        for method in sorted(route.methods):
            out.append((method, route.path, concrete))
    return out


def full_app(settings: Settings) -> Litestar:
    return create_app(settings)


class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code = status
        self.headers = headers
        self.content = body
        self.text = body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.text)


def raw_request(base_url: str, method: str, raw_path: str, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> RawResponse:
    """Send ``raw_path`` byte for byte (httpx would resolve ``..`` and re-encode ``%2e``)."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.putrequest(method, raw_path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return RawResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def redis_dump(url: str) -> str:
    """Every key name and every stored value (strings, hashes, sets, sorted sets, lists, streams)
    of the Redis at ``url``, as one text to search."""
    import redis as sync_redis

    client = sync_redis.Redis.from_url(url)
    parts: list[bytes] = []
    try:
        for key in client.scan_iter(count=1000):
            parts.append(key)
            kind = client.type(key).decode()
            if kind == "string":
                parts.append(client.get(key) or b"")
            elif kind == "hash":
                for field, value in client.hgetall(key).items():
                    parts += [field, value]
            elif kind == "set":
                parts += list(client.smembers(key))
            elif kind == "zset":
                parts += [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
            elif kind == "list":
                parts += list(client.lrange(key, 0, -1))
            elif kind == "stream":
                for _, fields in client.xrange(key):
                    for field, value in fields.items():
                        parts += [field, value]
            else:
                raise AssertionError(f"unexpected Redis type {kind} of {key!r}")
    finally:
        client.close()
    return "\n".join(p.decode("utf-8", "replace") for p in parts)


def leaked_fragments(secret: str, haystack: str, size: int = 8, allowed: frozenset[str] = frozenset()) -> list[str]:
    """The ``size``-character substrings of ``secret`` found in ``haystack`` (minus ``allowed``)."""
    fragments = {secret[i:i + size] for i in range(max(1, len(secret) - size + 1))}
    return sorted(f for f in fragments - allowed if f in haystack)


def command_calls(url: str, command: str) -> int:
    """How many times Redis has run ``command`` (INFO commandstats)."""
    import redis as sync_redis

    client = sync_redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    entry = stats.get(f"cmdstat_{command.lower()}")
    return int(entry["calls"]) if entry else 0
