"""Input limits of the HTTP connection itself, below the ASGI app (CONTRACT.md section 14).

uvicorn's httptools protocol enforces no limit on the size of a request's headers (httptools
buffers a header value until it ends: four 100 MB headers took the API to 614 MB) and no
deadline on reading them or the body (slow-header connections stayed open for minutes). This
is that protocol with the limits added, chosen as the ``http`` protocol class of
``uvicorn.Config`` (documented: a protocol class is accepted there as well as a name):

- request line and headers over ``max_header_bytes`` (16 KiB): a 431 in the contract's error
  shape, ``Connection: close``, and the connection closed; the bytes are counted *before* the
  parser buffers them, so a connection holds at most the limit plus one socket read;
- headers not complete ``header_timeout`` (10 s) after the connection opened or the request
  began: the connection is dropped (an idle keep-alive connection is uvicorn's own keep-alive
  timeout's, 5 s);
- a body that receives no byte for ``body_timeout`` (30 s): the connection is dropped (the
  app's body reader sees the disconnect: a 499, not an error, see middleware.py);
- a method the API does not serve at all (anything but GET, HEAD, POST, PUT, PATCH, DELETE,
  OPTIONS): a 405 in the error shape and the connection closed (httptools refuses unknown
  methods itself, and uvicorn answered that with a plain-text 400); other malformed requests
  get uvicorn's 400 in the error shape.

Compat: this subclasses ``uvicorn.protocols.http.httptools_impl.HttpToolsProtocol`` and
overrides its asyncio ``Protocol`` methods, its httptools parser callbacks
(``on_message_begin``, ``on_headers_complete``, ``on_body``, ``on_message_complete``) and
``send_400_response``, and uses its ``transport`` and ``loop`` attributes: nothing private.
``tests/security/test_http_limits.py`` pins the uvicorn versions it was checked with. The cost,
measured with ``python -m tests.bench --only admission``, is in the commit that added it.

Timers cost nothing on the common path: a request whose headers (and body) arrive in one read
never arms one; they are armed only when a read leaves the headers or the body incomplete, and
checked against a deadline when they fire (one timer per phase, not one per read).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEADER_BYTES = 16 * 1024
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
SERVED_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})
_LONGEST_METHOD = max(len(m) for m in SERVED_METHODS)

_IDLE, _HEADERS, _BODY, _CLOSED = 0, 1, 2, 3
_REASONS = {400: b"Bad Request", 405: b"Method Not Allowed", 431: b"Request Header Fields Too Large"}


def _error_answer(status: int, code: str, message: str, extra: tuple[bytes, ...] = ()) -> bytes:
    body = msgspec.json.encode({"error": {"code": code, "message": message}})
    head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]), b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body), b"connection: close\r\n", *extra, b"\r\n"]
    return b"".join(head) + body


ANSWER_431 = _error_answer(431, "request_header_fields_too_large",
                           f"The request line and headers exceed {MAX_HEADER_BYTES // 1024} KiB.")
ANSWER_405 = _error_answer(405, "method_not_allowed", "This method is not allowed on this server.",
                           (b"allow: " + b", ".join(sorted(SERVED_METHODS)) + b"\r\n",))
ANSWER_400 = _error_answer(400, "invalid_request", "The request is not valid HTTP/1.1.")


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header/body limits (module docstring). Use
    :func:`guarded_protocol` to get a class with given limits."""

    max_header_bytes = MAX_HEADER_BYTES
    header_timeout = HEADER_TIMEOUT_S
    body_timeout = BODY_TIMEOUT_S
    answer_431 = ANSWER_431

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard_phase = _HEADERS            # a new connection is waiting for its first headers
        self._guard_header_bytes = 0
        self._guard_tail = b""                  # the last 3 bytes counted (the end marker may straddle reads)
        self._guard_deadline = 0.0              # of the phase the timer watches
        self._guard_timer: asyncio.TimerHandle | None = None
        self._guard_sniff = True                # the next read starts a request line: check its method

    # ---- asyncio Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._guard_arm(self.header_timeout)  # a connection that never sends its headers is dropped

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard_phase = _CLOSED
        self._guard_cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        phase = self._guard_phase
        if phase == _CLOSED:
            return
        if phase != _BODY:
            if self._guard_sniff and not self._guard_method_ok(data):
                return
            if not self._guard_count(data):
                return
        super().data_received(data)
        phase = self._guard_phase
        if phase == _HEADERS and self._guard_timer is None:
            self._guard_arm(self.header_timeout)   # headers incomplete after this read
        elif phase == _BODY:
            if self.transport.get_protocol() is not self:  # upgraded (WebSocket): no longer an HTTP body
                self._guard_phase = _CLOSED
                self._guard_cancel()
                return
            self._guard_arm(self.body_timeout)     # body incomplete after this read: (re)start its clock

    # ---- httptools parser callbacks --------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._guard_phase != _CLOSED:
            self._guard_phase = _HEADERS

    def on_headers_complete(self) -> None:
        self._guard_phase = _BODY
        self._guard_header_bytes = 0
        self._guard_tail = b""
        self._guard_cancel()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        if self._guard_phase != _CLOSED:
            self._guard_phase = _IDLE
            self._guard_sniff = True
        self._guard_cancel()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request httptools cannot parse, in the contract's error shape."""
        self._guard_close(ANSWER_400)

    # ---- the guard -------------------------------------------------------------------------

    def _guard_method_ok(self, data: bytes) -> bool:
        """The method of a request line beginning in ``data`` is one the API serves; else 405."""
        start = data.lstrip(b"\r\n")
        if not start:
            return True
        self._guard_sniff = False
        space = start.find(b" ", 0, _LONGEST_METHOD + 1)
        method = start[:space] if space >= 0 else start[: _LONGEST_METHOD + 1]
        if method in SERVED_METHODS or (space < 0 and len(start) <= _LONGEST_METHOD):
            return True  # served, or a method split across reads (httptools checks it then)
        self._guard_close(ANSWER_405)
        return False

    def _guard_count(self, data: bytes) -> bool:
        """Counts the header bytes of ``data`` (up to the end of the headers, if it is in it)."""
        if self._guard_phase == _IDLE:
            self._guard_phase = _HEADERS
        seen = self._guard_tail + data
        end = seen.find(b"\r\n\r\n")
        counted = len(data) if end < 0 else end + 4 - len(self._guard_tail)
        self._guard_header_bytes += counted
        if self._guard_header_bytes > self.max_header_bytes:
            self._guard_close(self.answer_431)
            return False
        self._guard_tail = seen[-3:]
        return True

    def _guard_close(self, answer: bytes) -> None:
        self._guard_phase = _CLOSED
        self._guard_cancel()
        if not self.transport.is_closing():
            self.transport.write(answer)
            self.transport.close()

    def _guard_arm(self, seconds: float) -> None:
        self._guard_deadline = self.loop.time() + seconds
        if self._guard_timer is None:
            self._guard_timer = self.loop.call_at(self._guard_deadline, self._guard_expired)

    def _guard_cancel(self) -> None:
        if self._guard_timer is not None:
            self._guard_timer.cancel()
            self._guard_timer = None

    def _guard_expired(self) -> None:
        self._guard_timer = None
        if self._guard_phase not in (_HEADERS, _BODY):
            return
        if self.loop.time() < self._guard_deadline:  # re-armed by a later read: wait for the rest
            self._guard_timer = self.loop.call_at(self._guard_deadline, self._guard_expired)
            return
        self._guard_phase = _CLOSED
        self.transport.close()  # dropped: headers too slow, or a body that stalled


def guarded_protocol(max_header_bytes: int = MAX_HEADER_BYTES, header_timeout: float = HEADER_TIMEOUT_S,
                     body_timeout: float = BODY_TIMEOUT_S) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``, with these limits."""
    answer = _error_answer(431, "request_header_fields_too_large",
                           f"The request line and headers exceed {max_header_bytes} bytes.")
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {
        "max_header_bytes": max_header_bytes, "header_timeout": header_timeout, "body_timeout": body_timeout,
        "answer_431": answer,
    })
