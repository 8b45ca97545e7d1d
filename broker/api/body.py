"""Reading JSON request bodies with the contract's errors (415, 400 naming the field)."""

from __future__ import annotations

import functools
import re
from typing import TypeVar

import msgspec
from litestar import Request

from broker.errors import InvalidInput, UnsupportedMediaType

from .deps import raw_header

T = TypeVar("T")
MAX_DEPTH = 64  # nesting of objects/arrays in a body: deeper input is refused before any recursive code sees it
_PATH = re.compile(r"at `\$((?:\.[A-Za-z0-9_\-]+|\[\d+\]|\[\.\.\.\])*)`")


async def read_json(request: Request, model: type[T], *, empty_ok: bool) -> tuple[T, bytes]:
    body = await request.body()
    if not body.strip():
        if empty_ok:
            return msgspec.convert({}, model), b""
        raise InvalidInput("a JSON body is required", code="missing_body", field="body")
    ctype = raw_header(request, b"content-type") or ""
    media = ctype.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(
            "Send the body as JSON with Content-Type: application/json", code="unsupported_media_type",
            field="Content-Type",
        )
    try:
        if body.count(b"[") + body.count(b"{") > MAX_DEPTH:  # fewer brackets cannot nest deeper
            _check_depth(msgspec.json.decode(body))
        return _decoder(model).decode(body), body
    except RecursionError:
        raise _too_deep() from None
    except msgspec.ValidationError as exc:
        raise InvalidInput(_clean(str(exc)), code="invalid_field", field=field_of(str(exc))) from None
    except msgspec.DecodeError:
        raise InvalidInput("the body is not valid JSON", code="invalid_json", field="body") from None


@functools.cache
def _decoder(model: type[T]) -> msgspec.json.Decoder[T]:
    return msgspec.json.Decoder(model)


def _too_deep() -> InvalidInput:
    return InvalidInput(f"the body is nested more than {MAX_DEPTH} levels deep", code="body_too_deep", field="body")


def _check_depth(value: object) -> None:
    """Iterative (no recursion of our own): refuses objects/arrays nested deeper than MAX_DEPTH."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > MAX_DEPTH:
            raise _too_deep()
        stack.extend((child, depth + 1) for child in children)


def field_of(message: str) -> str | None:
    m = _PATH.search(message)
    if not m or not m.group(1):
        # unknown top-level field: "Object contains unknown field `x`"
        unk = re.search(r"unknown field `([^`]+)`", message)
        return unk.group(1) if unk else None
    path = m.group(1).replace("[...]", "").lstrip(".").replace("[", ".").replace("]", "")
    unk = re.search(r"unknown field `([^`]+)`", message)
    return f"{path}.{unk.group(1)}" if unk else path


def _clean(message: str) -> str:
    text = _PATH.sub("", message).strip().rstrip(" -")
    field = field_of(message)
    return f"{field}: {text}" if field else text
