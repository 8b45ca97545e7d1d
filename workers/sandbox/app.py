"""The sandbox as one plain ASGI app: both upstream fakes, fault injection, and the control API.

Routes::

    POST   /v1/realtime/client_secrets   OpenAI mint          (operation "mint")
    POST   /api/v1/sessions              Avaturn create       (operation "create")
    DELETE /api/v1/sessions/{id}         Avaturn delete       (operation "delete")
    GET    /_sandbox/healthz
    GET    /_sandbox/audit[?summary=1]   secrets (sha256 only), sessions, deletes, counters, config
    POST   /_sandbox/reset               forget everything, config included
    GET    /_sandbox/config
    PUT    /_sandbox/config              see workers.sandbox.faults
    POST   /_sandbox/clock               {"advance": seconds}: move the sandbox clock forward
    *      /_sandbox/webhooks[/{name}[/config]]   webhook receivers: see workers.sandbox.webhooks

Plain ASGI (no framework) keeps it fast and gives ``close`` access to the transport:
uvicorn's ``send`` is a bound method of the request cycle, which holds the transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, unquote

import msgspec

from workers.sandbox import avaturn_fake, openai_fake
from workers.sandbox.faults import FaultPlan, FaultRule, decode_config
from workers.sandbox.reply import AvaturnError, OpenAIError, Reply, bearer, json_reply
from workers.sandbox.state import SandboxState
from workers.sandbox.webhooks import NAME, decode_config as decode_receiver_config

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MINT_PATH = "/v1/realtime/client_secrets"
WEBHOOKS_PATH = "/_sandbox/webhooks"
SESSIONS_PATH = "/api/v1/sessions"
_STATUS_TEXT = {
    400: "The request was rejected by the sandbox (injected).",
    401: "Unauthorized (injected).",
    403: "Forbidden (injected).",
    404: "Not found (injected).",
    409: "Conflict (injected).",
    410: "Gone (injected).",
    422: "Unprocessable (injected).",
    429: "Rate limit reached for requests (injected). Please try again later.",
    500: "The server had an error while processing your request. Sorry about that! (injected)",
    502: "Bad gateway (injected).",
    503: "The server is overloaded or not ready yet (injected).",
    504: "Gateway timeout (injected).",
}
_QUOTA_TEXT = "You exceeded your current quota, please check your plan and billing details. (injected)"


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send(send: Send, reply: Reply) -> None:
    headers = [(b"content-length", str(len(reply.body)).encode()), *reply.headers]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


async def _wait_disconnect(receive: Receive, timeout: float) -> bool:
    """True once the client went away, False if it is still there after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while (await receive())["type"] != "http.disconnect":
                pass
    except TimeoutError:
        return False
    return True


def _fault_headers(rule: FaultRule) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    if rule.retry_after is not None:
        headers.append((b"retry-after", f"{rule.retry_after:g}".encode()))
    if rule.retry_after_ms is not None:
        headers.append((b"retry-after-ms", str(rule.retry_after_ms).encode()))
    should_retry = rule.should_retry
    if should_retry is None and rule.code == "insufficient_quota":
        should_retry = False
    if should_retry is not None:
        headers.append((b"x-should-retry", b"true" if should_retry else b"false"))
    return headers


def injected_reply(op: str, rule: FaultRule, headers: dict[str, str], status: int | None = None) -> Reply:
    """The answer of a ``status`` rule (or the 504 that ends a ``hang``), shaped like the upstream."""
    status = status or rule.status or 504
    extra = _fault_headers(rule)
    if rule.body is not None:
        return Reply(status, rule.body.encode(), [(b"content-type", rule.content_type.encode()), *extra])
    if op == "mint":
        code = rule.code
        if code is None:
            code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
        message = rule.message or (_QUOTA_TEXT if code == "insufficient_quota" else _STATUS_TEXT.get(status))
        if status == 401 and rule.message is None:
            key = bearer(headers) or ""
            message = f"Incorrect API key provided: {openai_fake.masked_key(key)}. (injected)"
        kind = "server_error" if status >= 500 else "requests" if status == 429 else "invalid_request_error"
        if code == "insufficient_quota":
            kind = "insufficient_quota"
        err = OpenAIError(status, message or "Injected failure.", code=code, type_=kind)
        return err.reply(extra)
    detail: str | list[dict[str, Any]] = rule.message or _STATUS_TEXT.get(status, "Injected failure.")
    if status == 422:
        detail = [{"loc": ["body"], "msg": detail, "type": "value_error"}]
    return AvaturnError(status, detail).reply(extra)


def _session_id(scope: Scope) -> str | None:
    """The ``{id}`` of ``/api/v1/sessions/{id}``, matched on the raw path (an id may hold ``%2F``)."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    prefix = SESSIONS_PATH.encode() + b"/"
    if not raw.startswith(prefix):
        return None
    tail = raw[len(prefix):].split(b"?", 1)[0]
    if not tail or b"/" in tail:
        return None
    return unquote(tail.decode("latin-1"))


def _drop_connection(send: Send) -> bool:
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        return False
    transport.close()
    return True


class SandboxApp:
    def __init__(self, state: SandboxState | None = None) -> None:
        self.state = state or SandboxState()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        raw = await _read_body(receive)
        if raw is None:
            return
        method: str = scope["method"]
        path: str = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        state = self.state
        if path == WEBHOOKS_PATH or path.startswith(WEBHOOKS_PATH + "/"):
            await self._webhooks(method, path, scope.get("query_string", b""), headers, raw, receive, send)
        elif path.startswith("/_sandbox/"):
            await _send(send, self._control(method, path, scope.get("query_string", b""), raw))
        elif path == MINT_PATH and method == "POST":
            await self._operation("mint", lambda: openai_fake.mint(state, headers, raw), headers, receive, send)
        elif path == SESSIONS_PATH and method == "POST":
            await self._operation("create", lambda: avaturn_fake.create(state, headers, raw), headers, receive, send)
        elif (session_id := _session_id(scope)) is not None and method == "DELETE":
            await self._operation("delete", lambda: avaturn_fake.delete(state, headers, session_id), headers,
                                  receive, send)
        elif path in (MINT_PATH, SESSIONS_PATH) or path.startswith(SESSIONS_PATH + "/"):
            await _send(send, json_reply(405, {"detail": "Method Not Allowed"}))
        else:
            await _send(send, json_reply(404, {"detail": "Not Found"}))

    async def _operation(self, op: str, handler: Callable[[], Reply], headers: dict[str, str],
                         receive: Receive, send: Send) -> None:
        state = self.state
        state.count(op, "requests")
        delay = state.faults.latency(op)
        if delay:
            await asyncio.sleep(delay)
        rule = state.faults.pick(op)
        if rule is not None and not rule.after_apply:
            await self._misbehave(op, rule, headers, receive, send)
            return
        reply = handler()
        if rule is not None and reply.ok:
            state.count(op, "applied")
            await self._misbehave(op, rule, headers, receive, send)
            return
        state.count(op, str(reply.status))
        await _send(send, reply)

    async def _misbehave(self, op: str, rule: FaultRule, headers: dict[str, str],
                         receive: Receive, send: Send) -> None:
        state = self.state
        state.count(op, "injected")
        if rule.close:
            state.count(op, "closed")
            if not _drop_connection(send):
                raise RuntimeError("sandbox: cannot reach the transport to drop the connection")
            await _wait_disconnect(receive, 5.0)
            return
        status = None
        if rule.hang:
            state.count(op, "hung")
            if await _wait_disconnect(receive, rule.hang_seconds):
                return
            status = 504
        reply = injected_reply(op, rule, headers, status)
        state.count(op, str(reply.status))
        await _send(send, reply)

    async def _webhooks(self, method: str, path: str, query: bytes, headers: dict[str, str], raw: bytes,
                        receive: Receive, send: Send) -> None:
        receivers = self.state.receivers
        parts = path[len(WEBHOOKS_PATH):].strip("/").split("/")
        if parts == [""]:
            if method != "GET":
                await _send(send, json_reply(405, {"error": "GET lists the receivers"}))
                return
            await _send(send, json_reply(200, receivers.summary()))
            return
        name = parts[0]
        if not NAME.match(name) or len(parts) > 2 or (len(parts) == 2 and parts[1] != "config"):
            await _send(send, json_reply(404, {"error": f"no webhook route {method} {path}"}))
            return
        if len(parts) == 2:
            if method != "PUT":
                await _send(send, json_reply(405, {"error": "PUT replaces a receiver's config"}))
                return
            try:
                config = decode_receiver_config(raw)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                await _send(send, json_reply(400, {"error": str(exc)}))
                return
            receiver = receivers.get(name)
            receiver.configure(config)
            await _send(send, json_reply(200, receiver.describe()))
            return
        if method == "GET":
            params = parse_qs(query.decode())
            try:
                after = int(params.get("after", ["0"])[0])
                limit = int(params.get("limit", ["1000"])[0])
            except ValueError:
                await _send(send, json_reply(400, {"error": "`after` and `limit` are integers"}))
                return
            if not 1 <= limit <= 10_000:
                await _send(send, json_reply(400, {"error": "`limit` must be within 1..10000"}))
                return
            await _send(send, json_reply(200, receivers.get(name).listing(after, limit)))
        elif method == "DELETE":
            receivers.by_name.pop(name, None)
            await _send(send, json_reply(200, {"ok": True}))
        elif method == "POST":
            await self._delivery(name, headers, raw, receive, send)
        else:
            await _send(send, json_reply(405, {"error": f"{method} is not a webhook route"}))

    async def _delivery(self, name: str, headers: dict[str, str], raw: bytes, receive: Receive, send: Send) -> None:
        receiver = self.state.receivers.get(name)
        delivery = receiver.record(headers, raw)
        misbehave = receiver.misbehaves(delivery)
        delay = receiver.delay() if misbehave else 0.0
        delivery.delay_ms = round(delay * 1000.0, 3)
        if delay and await _wait_disconnect(receive, delay):
            receiver.answered(delivery, None)  # the sender gave up first (its timeout)
            return
        rule = receiver.pick() if misbehave else None
        if rule is None:
            if delivery.verified:
                reply = Reply(204)
            else:
                reply = json_reply(401, {"error": f"signature not verified: {delivery.error}"})
        elif rule.close:
            receiver.answered(delivery, None)
            if not _drop_connection(send):
                raise RuntimeError("sandbox: cannot reach the transport to drop the connection")
            await _wait_disconnect(receive, 5.0)
            return
        elif rule.hang:
            if await _wait_disconnect(receive, rule.hang_seconds):
                receiver.answered(delivery, None)
                return
            reply = injected_reply("webhook", rule, headers, 504)
        else:
            reply = injected_reply("webhook", rule, headers)
        receiver.answered(delivery, reply.status)
        await _send(send, reply)

    def _control(self, method: str, path: str, query: bytes, raw: bytes) -> Reply:
        state = self.state
        route = (method, path)
        if route == ("GET", "/_sandbox/healthz"):
            return json_reply(200, {"ok": True})
        if route == ("GET", "/_sandbox/audit"):
            summary = parse_qs(query.decode()).get("summary", ["0"])[0] not in ("0", "false", "")
            return json_reply(200, state.summary() if summary else state.audit())
        if route == ("POST", "/_sandbox/reset"):
            state.reset()
            return json_reply(200, {"ok": True})
        if route == ("GET", "/_sandbox/config"):
            return json_reply(200, state.faults.describe())
        if route == ("PUT", "/_sandbox/config"):
            try:
                state.faults = FaultPlan(decode_config(raw or b"{}"))
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                return json_reply(400, {"error": str(exc)})
            return json_reply(200, state.faults.describe())
        if route == ("POST", "/_sandbox/clock"):
            try:
                advance = msgspec.json.decode(raw or b"{}", type=dict[str, float]).get("advance", 0.0)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                return json_reply(400, {"error": str(exc)})
            if advance < 0:
                return json_reply(400, {"error": "the sandbox clock only moves forward"})
            state.clock_offset += advance
            return json_reply(200, {"now": state.now(), "clock_offset": state.clock_offset})
        return json_reply(404, {"error": f"no control route {method} {path}"})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
