"""The HTTP connection's own limits (CONTRACT.md section 14, issue 17 item 1), tried with raw
sockets against a real ``session-broker api`` process: headers over 16 KiB are a 431 in the
error shape and the connection is closed, before the server buffers them; headers not
complete in time, or a body that stalls, get the connection dropped; memory per connection is
bounded; methods the API does not serve are a JSON 405. The timeouts are set short here
(BROKER_HTTP_*_TIMEOUT_SECONDS); the production defaults are asserted separately."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from broker.api import http_guard
from broker.embedded_redis import free_port
from broker.core.settings import Settings
from tests.fixtures.stack import ADMIN_TOKEN

from .test_auth_surface import _wait_healthy

HEADER_TIMEOUT, BODY_TIMEOUT = 1.0, 1.5


class Api:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc, self.port = proc, port

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return s

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.fixture
def api_process(settings: Settings) -> Iterator[Api]:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
        "BROKER_REDIS_URL": settings.redis_url,
        "BROKER_ADMIN_TOKEN": ADMIN_TOKEN,
        "BROKER_SECRET_KEY": ",".join(settings.secret_keys),
        "BROKER_HTTP_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT),
        "BROKER_HTTP_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
    }
    exe = os.path.join(os.path.dirname(sys.executable), "session-broker")
    proc = subprocess.Popen([exe, "api", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
        yield Api(proc, port)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _read_all(s: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (bounded by ``timeout``)."""
    s.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    else:
        raise AssertionError("the server kept the connection open")
    return out


def _parse(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body) if body else None


def _closed_within(s: socket.socket, seconds: float) -> float:
    """Seconds until the server closed ``s`` (it sends nothing before), at most ``seconds``."""
    start = time.monotonic()
    assert _read_all(s, seconds) == b""
    return time.monotonic() - start


def test_production_defaults_are_16_kib_10_s_30_s() -> None:
    """Invariant: without settings, the limits are the contract's: 16 KiB, 10 s, 30 s."""
    s = Settings.from_env({})
    assert (s.http_max_header_bytes, s.http_header_timeout_seconds, s.http_body_timeout_seconds) == (16384, 10.0, 30.0)
    cls = http_guard.guarded_protocol()
    assert (cls.max_header_bytes, cls.header_timeout, cls.body_timeout) == (16384, 10.0, 30.0)


def test_uvicorn_version_guard() -> None:
    """The guard subclasses uvicorn's httptools protocol (broker/api/http_guard.py): checked with
    uvicorn 0.55; a new major/minor must be re-checked (the hooks it overrides still exist)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    assert tuple(int(x) for x in uvicorn.__version__.split(".")[:2]) == (0, 55), uvicorn.__version__
    for name in ("connection_made", "connection_lost", "data_received", "on_message_begin", "on_headers_complete",
                 "on_message_complete", "send_400_response"):
        assert callable(getattr(HttpToolsProtocol, name)), name


def test_headers_over_16_kib_are_a_431_and_the_connection_closes(api_process: Api) -> None:
    """Invariant: a request whose line and headers exceed 16 KiB gets a 431 in the error shape
    with Connection: close, and the connection is closed; one just under the limit is served."""
    with api_process.connect() as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: broker\r\nX-Big: " + b"a" * (16 * 1024) + b"\r\n\r\n")
        status, headers, body = _parse(_read_all(s))
    assert status == 431 and headers["connection"] == "close", headers
    assert body["error"]["code"] == "request_header_fields_too_large" and body["error"]["message"]
    with api_process.connect() as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: broker\r\nConnection: close\r\nX-Big: "
                  + b"a" * (16 * 1024 - 100) + b"\r\n\r\n")
        status, _, body = _parse(_read_all(s))
    assert status == 200 and body == {"status": "ok"}


def test_endless_headers_are_cut_and_memory_stays_bounded(api_process: Api) -> None:
    """Invariant: four connections each trying to send a 20 MB header are cut after the limit
    plus at most a few socket reads (each sender sees the connection closed having sent < 4 MB),
    and the API's resident memory grows by less than 16 MB."""
    before = api_process.rss_kib()
    for _ in range(4):
        with api_process.connect() as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: broker\r\nX-Big: ")
            sent, chunk = 0, b"a" * 65536
            try:
                while sent < 20 * 1024 * 1024:
                    s.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert sent < 4 * 1024 * 1024, f"the server took {sent} bytes of one header"
    grown = api_process.rss_kib() - before
    assert grown < 16 * 1024, f"RSS grew by {grown} KiB"


def test_slow_or_missing_headers_get_the_connection_dropped(api_process: Api) -> None:
    """Invariant: a connection that sends nothing, or only part of its headers, is closed once
    the header timeout has passed (1 s here), not before half of it."""
    with api_process.connect() as silent, api_process.connect() as partial:
        partial.sendall(b"GET /healthz HTTP/1.1\r\nHost: broker\r\n")
        took = _closed_within(partial, HEADER_TIMEOUT + 5)
        assert HEADER_TIMEOUT / 2 <= took <= HEADER_TIMEOUT + 5
        assert _closed_within(silent, HEADER_TIMEOUT + 5) <= HEADER_TIMEOUT + 5
    with api_process.connect() as s:  # a keep-alive connection that finished a request is not cut by it
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: broker\r\n\r\n")
        s.settimeout(5)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")


def test_a_stalled_body_gets_the_connection_dropped_a_trickling_one_does_not(api_process: Api) -> None:
    """Invariant: a body that receives no byte for the body timeout (1.5 s here) gets its
    connection dropped (with a valid admin token, on a route that reads the body); a body whose
    bytes keep coming, one every 0.3 s for longer than the timeout, is read and answered."""
    body = json.dumps({"name": "trickle"}).encode()
    head = (b"POST /admin/v1/tenants HTTP/1.1\r\nHost: broker\r\nAuthorization: Bearer " + ADMIN_TOKEN.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
    with api_process.connect() as s:
        s.sendall(head + body[:5])
        took = _closed_within(s, BODY_TIMEOUT + 5)
        assert BODY_TIMEOUT / 2 <= took <= BODY_TIMEOUT + 5
    with api_process.connect() as s:
        s.sendall(head)
        start = time.monotonic()
        for i in range(len(body)):
            s.sendall(body[i : i + 1])
            time.sleep(0.3)  # the trickle itself (what is tested), not a synchronisation
            if time.monotonic() - start > BODY_TIMEOUT * 2:
                s.sendall(body[i + 1 :])
                break
        s.settimeout(10)
        status, _, answer = _parse(s.recv(65536))
    assert time.monotonic() - start > BODY_TIMEOUT and status == 201, answer


@pytest.mark.parametrize("method", [b"FOO", b"PROPFIND", b"TRACE", b"CONNECT", b"get", b"BREW"])
def test_methods_the_api_does_not_serve_are_a_json_405(api_process: Api, method: bytes) -> None:
    """Invariant: a method the API serves on no route is a 405 in the error shape (not
    uvicorn's plain-text 400), with an Allow header, and the connection is closed."""
    with api_process.connect() as s:
        s.sendall(method + b" /v1/sessions HTTP/1.1\r\nHost: broker\r\n\r\n")
        status, headers, body = _parse(_read_all(s))
    assert status == 405 and body["error"]["code"] == "method_not_allowed", (status, body)
    assert "GET" in headers["allow"] and headers["content-type"] == "application/json"


def test_malformed_requests_are_a_json_400(api_process: Api) -> None:
    """Invariant: a request httptools cannot parse is a 400 in the error shape (uvicorn's own
    answer was plain text)."""
    for raw in (b"GET /healthz HTTP/9.9\r\n\r\n", b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n",
                b"POST /v1/sessions HTTP/1.1\r\nHost: b\r\nContent-Length: x\r\n\r\n"):
        with api_process.connect() as s:
            s.sendall(raw)
            status, headers, body = _parse(_read_all(s))
        assert status == 400 and body["error"]["code"] == "invalid_request", (raw, status, body)
