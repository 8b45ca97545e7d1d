"""A finished JSON answer as a bare ASGI callable: the body is encoded once with a shared
msgspec encoder and the headers are already bytes, so the hot route skips Litestar's
``Response`` building (header containers, media-type resolution, encoder lookup)."""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
from litestar.types import Receive, Scope, Send

_encode = msgspec.json.Encoder().encode
_CONTENT_TYPE = (b"content-type", b"application/json")


class JsonAnswer:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.body = body
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


def json_answer(status: int, content: object, headers: Iterable[tuple[bytes, bytes]] = ()) -> JsonAnswer:
    body = _encode(content)
    return JsonAnswer(status, body, [*headers, _CONTENT_TYPE, (b"content-length", str(len(body)).encode())])
