"""What a sandbox handler answers, and the two upstreams' error shapes."""

from __future__ import annotations

from typing import Any

import msgspec

_json = msgspec.json.Encoder()


class Reply(msgspec.Struct):
    status: int
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = msgspec.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def json_reply(status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None) -> Reply:
    hdrs = [(b"content-type", b"application/json")]
    hdrs.extend(headers or [])
    return Reply(status, _json.encode(payload), hdrs)


class OpenAIError(Exception):
    """An OpenAI-shaped error answer: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None,
        param: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type_

    def reply(self, headers: list[tuple[bytes, bytes]] | None = None) -> Reply:
        err = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return json_reply(self.status, {"error": err}, headers)


class AvaturnError(Exception):
    """An Avaturn (FastAPI) error answer: ``{"detail": "..."}`` or ``{"detail": [{loc,msg,type}]}``."""

    def __init__(self, status: int, detail: str | list[dict[str, Any]]) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail

    def reply(self, headers: list[tuple[bytes, bytes]] | None = None) -> Reply:
        return json_reply(self.status, {"detail": self.detail}, headers)


def unprocessable(loc: list[str | int], msg: str, type_: str) -> AvaturnError:
    return AvaturnError(422, [{"loc": ["body", *loc], "msg": msg, "type": type_}])


def bearer(headers: dict[str, str]) -> str | None:
    """The bearer token of an ``authorization`` header (scheme matched case-insensitively)."""
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None
