"""The sender against hostile receivers (raw HTTP servers on loopback, ``allow_private``):
what a receiver answers never raises out of the sender, never costs more than a bounded amount
of memory (compressed answers included), and never puts the endpoint's secret, whole or in
part, in the attempt log."""

from __future__ import annotations

import asyncio
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable

import pytest

from broker.webhooks.signing import new_secret
from workers.webhook_sender import RESPONSE_LIMIT, RETRY_AFTER_CAP_S, WebhookSender, retry_after_seconds

Answer = Callable[[bytes], bytes]


async def _serve(answer: Answer) -> tuple[asyncio.Server, list[bytes]]:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            seen.append(head)
            writer.write(answer(head))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, seen


@pytest.fixture
async def sender() -> AsyncIterator[WebhookSender]:
    s = WebhookSender(allow_private=True, timeout_s=10.0)
    try:
        yield s
    finally:
        await s.aclose()


def _response(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"content-length: {len(body)}", "connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _post(sender: WebhookSender, answer: Answer, secrets: list[str]):  # type: ignore[no-untyped-def]
    server, seen = await _serve(answer)
    port = server.sockets[0].getsockname()[1]
    try:
        return await sender.post(f"http://127.0.0.1:{port}/hook", secrets, "evt_1-0", b"{}"), seen
    finally:
        server.close()
        await server.wait_closed()


def test_retry_after_with_non_ascii_digits_is_unreadable_not_an_exception() -> None:
    """'²'.isdigit() is True but int('²') raises: a receiver's Retry-After must never raise
    (an exception left the attempt unrecorded and retried after every lease, forever)."""
    for value in ("²", "¹²", "５", "1²", " ³ "):
        assert retry_after_seconds(value) is None
    assert retry_after_seconds("٣") is None  # other scripts' digits: not HTTP's delta-seconds either
    assert retry_after_seconds("7") == 7.0
    # int() refuses more than 4300 digits: such a value is far in the future, i.e. the cap
    assert retry_after_seconds("9" * 5000) == RETRY_AFTER_CAP_S


async def test_a_retry_after_header_in_latin_1_is_an_attempt_not_an_exception(sender: WebhookSender) -> None:
    attempt, _ = await _post(sender, lambda _: _response(b"busy", "retry-after: \xb2", status="503 Busy"),
                             [new_secret()])
    assert (attempt.status, attempt.retry_after_s) == (503, None)


async def test_a_compressed_answer_costs_no_memory_beyond_the_limit(sender: WebhookSender) -> None:
    """A 'gzip bomb' (64 MiB of zeros in ~64 KiB) must not be inflated: the sender asks for no
    content coding and reads the raw body's first 4 KiB (inflated at most to 4 KiB)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    zero = bytes(1 << 20)
    bomb = b"".join(comp.compress(zero) for _ in range(64)) + comp.flush()
    tracemalloc.start()
    try:
        attempt, seen = await _post(sender, lambda _: _response(bomb, "content-encoding: gzip"), [new_secret()])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert attempt.status == 200
    assert b"accept-encoding: identity" in seen[0].lower()
    assert len(attempt.response) <= RESPONSE_LIMIT
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes for a {len(bomb)}-byte answer"


async def test_a_secret_echoed_across_the_4_kib_cut_is_not_kept_in_part(sender: WebhookSender) -> None:
    secret = new_secret()
    key = secret.removeprefix("whsec_")
    for pad in (RESPONSE_LIMIT - 20, RESPONSE_LIMIT - 8, RESPONSE_LIMIT - 30):
        attempt, _ = await _post(sender, lambda _: _response(b"x" * pad + key.encode() + b" tail"), [secret])
        kept = attempt.response.removeprefix("x" * min(pad, len(attempt.response)))
        assert kept[:8] not in key, f"{kept!r} is a piece of the key"
        assert len(attempt.response) <= RESPONSE_LIMIT


async def test_a_secret_echoed_escaped_is_redacted(sender: WebhookSender) -> None:
    """A receiver echoing the secret JSON-escaped (PHP writes / as \\/) or percent-encoded."""
    while "/" not in (secret := new_secret()) or "+" not in secret:
        pass
    key = secret.removeprefix("whsec_")
    escaped = key.replace("/", "\\/")
    from urllib.parse import quote
    encoded = quote(key, safe="")
    body = f'{{"secret":"whsec_{escaped}","k":"{escaped}","q":"{encoded}","s":"{quote(secret, safe="")}"}}'
    attempt, _ = await _post(sender, lambda _: _response(body.encode()), [secret])
    for piece in (escaped, encoded, key):
        for i in range(0, len(piece) - 12):
            assert piece[i:i + 12] not in attempt.response, attempt.response


async def _counting_server() -> tuple[asyncio.Server, list[int]]:
    connections: list[int] = []

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        writer.close()

    return await asyncio.start_server(count, "127.0.0.1", 0), connections


async def test_no_private_address_is_connected_to_whatever_its_spelling() -> None:
    """Invariant (allow_private off): the delivery refuses loopback however the URL writes it
    (decimal, hex, trailing dot, 0.0.0.0, IPv4-mapped, NAT64, a name) before any connection."""
    server, connections = await _counting_server()
    port = server.sockets[0].getsockname()[1]
    s = WebhookSender(allow_private=False, timeout_s=5.0)
    try:
        for host in ("127.0.0.1", "2130706433", "0x7f.1", "127.1", "017700000001", "127.0.0.1.", "0.0.0.0",
                     "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[64:ff9b::7f00:1]", "[::1]", "localhost",
                     "localhost."):
            attempt = await s.post(f"https://{host}:{port}/hook", [new_secret()], "evt_1-0", b"{}")
            assert attempt.status is None and attempt.error in ("address_not_public", "invalid_url", "connect_error"), (host, attempt)
            if host not in ("localhost.",):  # (this machine may not resolve "localhost." at all)
                assert attempt.error != "connect_error", (host, attempt)
        http = await s.post(f"http://93.184.216.34:{port}/", [new_secret()], "evt_1-0", b"{}")
        assert http.error == "scheme_not_https"
        assert connections == []
    finally:
        await s.aclose()
        server.close()
        await server.wait_closed()


async def test_redirects_are_not_followed(sender: WebhookSender) -> None:
    target, connections = await _counting_server()
    port = target.sockets[0].getsockname()[1]
    try:
        attempt, _ = await _post(sender, lambda _: _response(b"", f"location: http://127.0.0.1:{port}/x",
                                                             status="307 Temporary Redirect"), [new_secret()])
        assert (attempt.status, attempt.error) == (307, "redirect_not_followed")
        assert connections == []
    finally:
        target.close()
        await target.wait_closed()


async def test_proxies_from_the_environment_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy would resolve and connect for the sender (past its address checks)."""
    proxy, connections = await _counting_server()
    url = f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    s = WebhookSender(allow_private=True, timeout_s=5.0)
    try:
        attempt, seen = await _post(s, lambda _: _response(b"ok"), [new_secret()])
        assert attempt.status == 200 and len(seen) == 1
        assert connections == []
    finally:
        await s.aclose()
        proxy.close()
        await proxy.wait_closed()


async def test_the_delivery_span_names_the_receivers_host_not_its_path_or_query() -> None:
    """A receiver URL often carries the tenant's own credential (a token in the path or the
    query, as Slack-style hook URLs do): the client span keeps scheme, host and port only."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from broker.core import tracing
    from broker.core.settings import Settings

    exporter = InMemorySpanExporter()
    assert tracing.configure(Settings(), "session-broker-test", exporter=exporter)
    s = WebhookSender(allow_private=True, timeout_s=5.0)
    server, seen = await _serve(lambda _: _response(b"ok"))
    port = server.sockets[0].getsockname()[1]
    try:
        attempt = await s.post(f"http://127.0.0.1:{port}/hooks/T0K3N-path?token=S3CR3T-query", [new_secret()],
                               "evt_1-0", b"{}")
        assert attempt.status == 200 and len(seen) == 1
        assert tracing.force_flush()
        spans = [sp for sp in exporter.get_finished_spans() if sp.name == "POST webhook"]
        assert spans
        text = " ".join(f"{k}={v}" for sp in spans for k, v in (sp.attributes or {}).items())
        assert f"127.0.0.1:{port}" in text
        assert "T0K3N" not in text and "S3CR3T" not in text, text
        assert all(sp.parent is None for sp in spans)
    finally:
        await s.aclose()
        tracing.shutdown()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("answer", [
    b"HELLO\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 100_000 + b"\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-%d: y\r\n" % i for i in range(5000)) + b"content-length: 0\r\n\r\n",
    b"HTTP/1.1 999999 Whatever\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: 4\r\n\r\nnope",
    b"HTTP/1.1 200 OK\r\ncontent-encoding: br\r\ncontent-length: 4\r\n\r\nnope",
    b"",
])
async def test_a_malformed_answer_is_an_attempt_not_an_exception(sender: WebhookSender, answer: bytes) -> None:
    attempt, _ = await _post(sender, lambda _: answer, [new_secret()])
    assert attempt.error or attempt.status is not None
    assert len(attempt.response) <= RESPONSE_LIMIT


async def test_a_receiver_echoing_the_request_headers_shows_no_signature(sender: WebhookSender) -> None:
    """A debugging receiver that answers with the request it got: the attempt log keeps the
    other headers but neither signature of a rotation (nor, of course, a secret)."""
    old, new = new_secret(), new_secret()
    attempt, seen = await _post(sender, lambda head: _response(head), [new, old])
    head = seen[0].decode("latin-1")
    signatures = next(line.split(":", 1)[1].strip() for line in head.split("\r\n")
                      if line.lower().startswith("webhook-signature:")).split(" ")
    assert len(signatures) == 2
    assert "webhook-id: evt_1-0" in attempt.response
    for sig in signatures:
        assert sig.partition(",")[2] not in attempt.response, attempt.response
